"""Readers on the real files in ../shared/data, every format, bad input, the hub schema, the builders."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dist_robust.infra import storage
from dist_robust.config.run_config import ConfigError, DataConfig, RunConfig
from dist_robust.config.validation import validate
from dist_robust.config.ds_config import default_ds_config
from dist_robust.data import hub
from dist_robust.data.readers import (PAWSX_LABELS, XNLI_LABELS, DataFileError, MissingDataFileError,
                                      MissingLabelsError, read_pairs, write_pairs)
from dist_robust.data.real_tasks import PAWSX, XNLI, pawsx, xnli

# Label counts (0, 1) from SOURCES.md.
PAWSX_DEV = {"de": (1169, 831), "en": (1137, 863), "es": (1153, 847), "fr": (1140, 860), "ja": (1146, 854),
             "ko": (1160, 840), "zh": (1147, 853)}
PAWSX_TEST = {"de": (1105, 895), "en": (1093, 907), "ko": (1104, 896), "zh": (1106, 894)}


def _counts(rows, n_labels: int) -> tuple[int, ...]:
    c = Counter(e.label for e in rows)
    return tuple(c[i] for i in range(n_labels))


@pytest.mark.parametrize("lang", sorted(PAWSX_DEV))
def test_pawsx_dev_rows_and_labels(shared_data: Path, lang: str):
    rows = read_pairs(str(shared_data / "pawsx" / lang / "dev.tsv"), PAWSX_LABELS, lang).examples
    assert len(rows) == 2000
    assert _counts(rows, 2) == PAWSX_DEV[lang]
    assert {(e.lang1, e.lang2) for e in rows} == {(lang, lang)}


@pytest.mark.parametrize("lang", sorted(PAWSX_TEST))
def test_pawsx_test_rows_and_labels(shared_data: Path, lang: str):
    rows = read_pairs(str(shared_data / "pawsx" / lang / "test.tsv"), PAWSX_LABELS, lang).examples
    assert len(rows) == 2000
    assert _counts(rows, 2) == PAWSX_TEST[lang]


def test_paws_wiki_training_file(shared_data: Path):
    rows = read_pairs(str(shared_data / "paws_wiki_en" / "test.tsv"), PAWSX_LABELS).examples
    assert len(rows) == 8000
    assert _counts(rows, 2) == (4464, 3536)
    assert rows[0].id == "1" and rows[0].sentence1.startswith("This was a series of nested angular standards")


def test_xnli_rows_and_labels_every_language(shared_data: Path):
    for lang in XNLI.languages:
        dev = read_pairs(str(shared_data / "xnli" / lang / "dev.tsv"), XNLI_LABELS, lang).examples
        test = read_pairs(str(shared_data / "xnli" / lang / "test.tsv"), XNLI_LABELS, lang).examples
        assert (len(dev), len(test)) == (2490, 5010), lang
        assert _counts(dev, 3) == (830, 830, 830), lang
        assert _counts(test, 3) == (1670, 1670, 1670), lang
    en = read_pairs(str(shared_data / "xnli" / "en" / "dev.tsv"), XNLI_LABELS).examples
    # pairID is the id; first row: "And he said, Mama, I'm home." / neutral
    assert (en[0].id, en[0].sentence1, XNLI_LABELS.names[en[0].label]) == \
        ("1", "And he said, Mama, I'm home.", "neutral")


def test_literal_quotes_survive(shared_data: Path):
    path = shared_data / "pawsx" / "fr" / "dev.tsv"
    raw_lines = path.read_text(encoding="utf-8").split("\n")[1:]
    quoted = sum('"' in line for line in raw_lines)
    rows = read_pairs(str(path), PAWSX_LABELS, "fr").examples
    assert quoted == 207
    assert sum('"' in e.sentence1 or '"' in e.sentence2 for e in rows) == quoted
    assert sum(e.sentence1.count('"') + e.sentence2.count('"') for e in rows) == \
        sum(line.count('"') for line in raw_lines)


@pytest.mark.parametrize("lang", sorted(PAWSX_DEV))
def test_xtreme_layout_equals_ours(shared_data: Path, lang: str):
    ours = read_pairs(str(shared_data / "pawsx" / lang / "dev.tsv"), PAWSX_LABELS, lang).examples
    xtreme = read_pairs(str(shared_data / "xtreme_format" / "pawsx" / f"dev-{lang}.tsv"), PAWSX_LABELS, lang)
    assert [(e.sentence1, e.sentence2, e.label) for e in xtreme.examples] == \
        [(e.sentence1, e.sentence2, e.label) for e in ours]
    assert [e.id for e in xtreme.examples[:3]] == ["0", "1", "2"]  # no ids in XTREME: row numbers
    assert not any("\r" in e.sentence2 for e in xtreme.examples)


def test_xtreme_test_file_without_labels(tmp_path: Path):
    f = tmp_path / "test-de.tsv"
    f.write_bytes(b'Er sagte "ja" .\tEr sagte nein .\r\n"Zitat ""hier"" ."\tB .\r\n')
    with pytest.raises(MissingLabelsError, match="without a label column"):
        read_pairs(str(f), PAWSX_LABELS, "de")


def test_xtreme_quoting_is_undone(tmp_path: Path):
    f = tmp_path / "dev-de.tsv"
    f.write_bytes(b'"Zitat ""hier"" ."\tB .\t1\r\nA .\tB .\t0\r\n')
    rows = read_pairs(str(f), PAWSX_LABELS, "de").examples
    assert (rows[0].sentence1, rows[0].label, rows[1].label) == ('Zitat "hier" .', 1, 0)


def test_jsonl_and_parquet_read_like_tsv(shared_data: Path, tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ours = read_pairs(str(shared_data / "xnli" / "de" / "dev.tsv"), XNLI_LABELS, "de").examples[:50]
    write_pairs(str(tmp_path / "de.jsonl"), ours, XNLI_LABELS)
    table = pa.table({"premise": [e.sentence1 for e in ours], "hypothesis": [e.sentence2 for e in ours],
                      "label": [e.label for e in ours], "id": [e.id for e in ours]})
    pq.write_table(table, tmp_path / "de.parquet")
    for name in ("de.jsonl", "de.parquet"):
        again = read_pairs(str(tmp_path / name), XNLI_LABELS, "de").examples
        assert again == ours, name


def test_tsv_round_trip(shared_data: Path, tmp_path: Path):
    ours = read_pairs(str(shared_data / "pawsx" / "fr" / "dev.tsv"), PAWSX_LABELS, "fr").examples
    write_pairs(str(tmp_path / "fr.tsv"), ours, PAWSX_LABELS)
    assert (tmp_path / "fr.tsv").read_bytes() == (shared_data / "pawsx" / "fr" / "dev.tsv").read_bytes()


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_unknown_label_names_file_and_line(tmp_path: Path):
    f = _write(tmp_path / "bad.tsv", "id\tsentence1\tsentence2\tlabel\n1\ta .\tb .\t1\n2\tc .\td .\tmaybe\n")
    with pytest.raises(DataFileError) as err:
        read_pairs(f, PAWSX_LABELS)
    assert f"{f}:3: unknown label 'maybe'" in str(err.value)
    assert "accepted labels: 0, 1" in str(err.value) and "--skip-bad-rows" in str(err.value)


def test_wrong_column_count_names_file_and_line(tmp_path: Path):
    f = _write(tmp_path / "bad.tsv", "id\tsentence1\tsentence2\tlabel\n1\ta .\tb .\t1\n2\tc .\t1\n3\te\tf\t0\n")
    with pytest.raises(DataFileError, match=rf"{f}:3: 3 tab-separated column\(s\), the header has 4"):
        read_pairs(f, PAWSX_LABELS)


def test_skip_bad_rows_counts_and_reports(tmp_path: Path):
    f = _write(tmp_path / "bad.tsv", "pairID\tsentence1\tsentence2\tlabel\n"
               "1\ta .\tb .\tneutral\n2\tc .\tcontradictory\n3\te .\tf .\tunsure\n4\tg .\th .\tentailment\n")
    result = read_pairs(f, XNLI_LABELS, skip_bad_rows=True)
    assert [e.id for e in result.examples] == ["1", "4"]
    assert [e.label for e in result.examples] == [1, 0]
    assert len(result.skipped) == 2
    assert result.skipped[0] == f"{f}:3: 3 tab-separated column(s), the header has 4"
    assert result.skipped[1].startswith(f"{f}:4: unknown label 'unsure'")


def test_xtreme_wrong_column_count_names_line(tmp_path: Path):
    f = tmp_path / "dev-en.tsv"
    f.write_bytes(b"a .\tb .\t1\r\nc .\td .\t0\textra\r\n")
    with pytest.raises(DataFileError, match=rf"{f}:2: 4 column\(s\)"):
        read_pairs(str(f), PAWSX_LABELS)


@pytest.mark.parametrize("bad_row", [2, 3])
def test_skipping_an_xtreme_row_changes_no_other_rows_id(tmp_path: Path, bad_row: int):
    """XTREME ids are row positions: the rows of a language with a malformed row keep their numbers,
    so they still pair with the same rows of the other languages."""
    rows = [f"s1-{i} .\ts2-{i} .\t{i % 2}" for i in range(1, 6)]
    clean = tmp_path / "clean.tsv"
    clean.write_text("\r\n".join(rows) + "\r\n")
    rows[bad_row - 1] += "\textra"  # one too many columns
    broken = tmp_path / "broken.tsv"
    broken.write_text("\r\n".join(rows) + "\r\n")
    want = {e.id: e.sentence1 for e in read_pairs(str(clean), PAWSX_LABELS, fmt="xtreme").examples}
    got = read_pairs(str(broken), PAWSX_LABELS, fmt="xtreme", skip_bad_rows=True)
    assert len(got.skipped) == 1 and len(got.examples) == 4
    assert all(want[e.id] == e.sentence1 for e in got.examples)  # every surviving row kept its id


def test_jsonl_bad_line_named(tmp_path: Path):
    f = _write(tmp_path / "bad.jsonl", '{"sentence1": "a", "sentence2": "b", "label": 1}\n{"sentence1": "a"\n')
    with pytest.raises(DataFileError, match=rf"{f}:2: not valid JSON"):
        read_pairs(f, PAWSX_LABELS)


def test_empty_and_header_only_files(tmp_path: Path):
    empty = _write(tmp_path / "empty.tsv", "")
    with pytest.raises(DataFileError, match=rf"{empty}: file is empty"):
        read_pairs(empty, PAWSX_LABELS)
    header = _write(tmp_path / "header.tsv", "id\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(DataFileError, match=rf"{header}: has a header but no rows"):
        read_pairs(header, PAWSX_LABELS)


def test_non_utf8_names_line(tmp_path: Path):
    f = tmp_path / "latin1.tsv"
    f.write_bytes("id\tsentence1\tsentence2\tlabel\n1\ta\tb\t1\n2\tcaf\u00e9\td\t0\n".encode("latin-1"))
    with pytest.raises(DataFileError, match=rf"{f}:3: not valid UTF-8 \(byte 0xe9"):
        read_pairs(str(f), PAWSX_LABELS)


def test_unlabelled_tsv_is_not_training_data(shared_data: Path):
    with pytest.raises(MissingLabelsError, match="no label column"):
        read_pairs(str(shared_data / "pawsx" / "es" / "test_unlabeled.tsv"), PAWSX_LABELS, "es")


def test_missing_language_file_lists_what_exists(shared_data: Path, tmp_path: Path):
    root = tmp_path / "data"
    (root / "pawsx" / "en").mkdir(parents=True)
    (root / "pawsx" / "en" / "dev.tsv").write_bytes((shared_data / "pawsx" / "en" / "dev.tsv").read_bytes())
    (root / "pawsx" / "de").mkdir()
    cfg = DataConfig(task="pawsx", data_dir=str(root), languages=["en", "de"],
                     train_file=str(shared_data / "paws_wiki_en" / "test.tsv"))
    with pytest.raises(MissingDataFileError) as err:
        pawsx(cfg)
    msg = str(err.value)
    assert "no dev file for language 'de' of pawsx" in msg
    assert f"{root / 'pawsx'} holds de, en" in msg
    assert "pawsx/de/dev.tsv" in msg


def test_missing_train_file_says_what_to_pass(shared_data: Path):
    with pytest.raises(MissingDataFileError, match="Pass --train-file"):
        pawsx(DataConfig(task="pawsx", data_dir=str(shared_data)))


def test_unknown_language_lists_the_task_languages(shared_data: Path):
    with pytest.raises(ValueError, match=r"pawsx has no language\(s\) \['it'\]; it has en, de, es, fr, ja, ko, zh"):
        pawsx(DataConfig(task="pawsx", data_dir=str(shared_data), languages=["en", "it"]))


def test_pawsx_builder_all_languages_reports_dev(shared_data: Path):
    data = pawsx(DataConfig(task="pawsx", data_dir=str(shared_data),
                            train_file=str(shared_data / "paws_wiki_en" / "test.tsv")))
    assert data.languages == list(PAWSX.languages)
    assert {lang: len(rows) for lang, rows in data.dev.items()} == {lang: 2000 for lang in PAWSX.languages}
    assert data.test == {}  # es/fr/ja have no test labels: every language is reported on dev
    assert len(data.train) == 8000 and data.label_names == ("not_paraphrase", "paraphrase")
    assert data.sources["dev.ja"].endswith("pawsx/ja/dev.tsv")


def test_pawsx_builder_labelled_languages_report_test(shared_data: Path):
    data = pawsx(DataConfig(task="pawsx", data_dir=str(shared_data), languages=["de", "ko", "zh"],
                            train_file=str(shared_data / "paws_wiki_en" / "test.tsv")))
    assert data.languages == ["en", "de", "ko", "zh"]  # the source language is always evaluated
    assert {lang: _counts(rows, 2) for lang, rows in data.test.items()} == PAWSX_TEST


def test_xnli_builder_offline_recipe(shared_data: Path):
    data = xnli(DataConfig(task="xnli", data_dir=str(shared_data),
                           train_file=str(shared_data / "xnli" / "en" / "test.tsv")))
    assert len(data.train) == 5010
    assert data.test == {}  # the training file is en/test: report dev, never the pairs trained on
    assert {lang: len(rows) for lang, rows in data.dev.items()} == {lang: 2490 for lang in XNLI.languages}


def test_xtreme_layout_directory_builds_the_task(shared_data: Path):
    data = pawsx(DataConfig(task="pawsx", data_dir=str(shared_data / "xtreme_format"), languages=["en", "ja"],
                            train_file=str(shared_data / "paws_wiki_en" / "test.tsv")))
    assert data.sources["dev.ja"].endswith("xtreme_format/pawsx/dev-ja.tsv")
    assert _counts(data.dev["ja"], 2) == PAWSX_DEV["ja"]


def test_fsspec_url_data_dir(shared_data: Path):
    root = "memory://dist-robust-test/data"
    for lang in ("en", "fr"):
        storage.write_text(f"{root}/pawsx/{lang}/dev.tsv",
                           (shared_data / "pawsx" / lang / "dev.tsv").read_text(encoding="utf-8"))
    storage.write_text(f"{root}/train.jsonl", "\n".join(
        json.dumps({"id": i, "sentence1": f"train {i} a .", "sentence2": f"train {i} b .", "label": i % 2})
        for i in range(20)) + "\n")
    try:
        data = pawsx(DataConfig(task="pawsx", data_dir=root, languages=["en", "fr"],
                                train_file=f"{root}/train.jsonl"))
    finally:
        storage.remove("memory://dist-robust-test")
    assert [len(data.train), len(data.dev["en"]), len(data.dev["fr"])] == [20, 2000, 2000]
    assert _counts(data.dev["fr"], 2) == PAWSX_DEV["fr"]
    assert data.sources["dev.fr"] == f"{root}/pawsx/fr/dev.tsv"


def test_skipped_rows_are_recorded_in_task_data(shared_data: Path, tmp_path: Path):
    lines = (shared_data / "paws_wiki_en" / "test.tsv").read_text(encoding="utf-8").split("\n")[:101]
    lines[5] = lines[5].rsplit("\t", 1)[0] + "\t2"
    train = _write(tmp_path / "train.tsv", "\n".join(lines) + "\n")
    cfg = DataConfig(task="pawsx", data_dir=str(shared_data), languages=["en"], train_file=train)
    with pytest.raises(DataFileError, match=rf"{train}:6: unknown label '2'"):
        pawsx(cfg)
    cfg.skip_bad_rows = True
    data = pawsx(cfg)
    assert len(data.train) == 99 and data.skipped_rows == {train: 1}


def _hub_dataset(task: str):
    import datasets

    if task == "pawsx":
        features = datasets.Features({"id": datasets.Value("int32"), "sentence1": datasets.Value("string"),
                                      "sentence2": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["0", "1"])})
        return datasets.Dataset.from_dict({"id": [4, 6, 9], "sentence1": ["a1", "b1", "c1"],
                                           "sentence2": ["a2", "b2", "c2"], "label": [1, 0, -1]},
                                          features=features)
    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])})
    return datasets.Dataset.from_dict({"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0]},
                                      features=features)


def test_hub_schema_maps_onto_pairs():
    paws = hub.from_hub(_hub_dataset("pawsx"), "pawsx", "de", "dev", PAWSX_LABELS)
    assert [(e.id, e.sentence1, e.sentence2, e.label, e.lang1) for e in paws.examples] == \
        [("4", "a1", "a2", 1, "de"), ("6", "b1", "b2", 0, "de")]
    assert paws.skipped == ["hub:google-research-datasets/paws-x/de/validation: row 2: label -1 is not one of "
                            "['not_paraphrase', 'paraphrase']"]
    nli = hub.from_hub(_hub_dataset("xnli"), "xnli", "sw", "test", XNLI_LABELS)
    assert [(e.id, e.sentence1, e.sentence2, XNLI_LABELS.names[e.label]) for e in nli.examples] == \
        [("0", "p0", "h0", "contradiction"), ("1", "p1", "h1", "entailment")]


def test_hub_class_order_is_checked():
    import datasets

    ds = datasets.Dataset.from_dict(
        {"premise": ["p"], "hypothesis": ["h"], "label": [0]},
        features=datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["contradiction", "neutral",
                                                                        "entailment"])}))
    with pytest.raises(DataFileError, match="do not match ours"):
        hub.from_hub(ds, "xnli", "en", "dev", XNLI_LABELS)


def test_unreachable_hub_says_how_to_work_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(hub.HubUnavailableError, match=r"google-research-datasets/paws-x \(config 'fr', split "
                                                      r"'validation'\).*--data-dir"):
        hub.load_hub_split("pawsx", "fr", "dev", PAWSX_LABELS)


def test_config_validation_of_data_fields():
    cfg = RunConfig(ds_config=default_ds_config())
    cfg.data.task = "xnli"
    cfg.data.augment = "synonym"
    cfg.data.synonym_prob = 1.5
    cfg.data.synthetic_misalignment = -1.0
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert any("data.synonyms (--synonyms)" in p for p in err.value.problems)
    assert any("data.synonym_prob (--synonym-prob) = 1.5: must be in [0, 1]" in p for p in err.value.problems)
    assert any("data.synthetic_misalignment (--synthetic-misalignment) = -1.0: must be >= 0" in p
               for p in err.value.problems)
    synthetic = RunConfig(ds_config=default_ds_config())
    synthetic.data.augment = "synonym"  # the synthetic task brings its own synonym map
    validate(synthetic, 1)


def test_a_runaway_xtreme_field_is_one_error_naming_the_line(tmp_path: Path):
    f = tmp_path / "dev-en.tsv"
    f.write_text('a\tb\t1\n"unclosed\tc\t0\n' + "x" * (300 * 1024) + "\tz\t1\n")
    with pytest.raises(DataFileError, match=r"dev-en.tsv:\d+: "):  # the quote swallows the rest: a bad row
        read_pairs(str(f), PAWSX_LABELS, fmt="xtreme")
    f.write_text('a\tb\t1\n"unclosed\tc\t0\n' + "x" * (17 << 20) + "\tz\t1\n")  # past any sane field
    with pytest.raises(DataFileError, match=r"dev-en.tsv:\d+: not a readable XTREME .* unclosed quote"):
        read_pairs(str(f), PAWSX_LABELS, fmt="xtreme")
    long = tmp_path / "long-en.tsv"  # a long field is not an error by itself
    long.write_text("a\tb\t1\n" + "y" * (200 * 1024) + "\tc\t0\n")
    assert len(read_pairs(str(long), PAWSX_LABELS, fmt="xtreme").examples) == 2


def test_deeply_nested_jsonl_rows_follow_skip_bad_rows(tmp_path: Path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"sentence1": "a", "sentence2": "b", "label": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataFileError, match=r"train.jsonl:2: JSON nested too deeply"):
        read_pairs(str(f), PAWSX_LABELS)
    result = read_pairs(str(f), PAWSX_LABELS, skip_bad_rows=True)
    assert len(result.examples) == 1 and "nested too deeply" in result.skipped[0]
