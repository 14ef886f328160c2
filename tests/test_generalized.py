"""Generalized cross-lingual sets on the real files: sentence1 from A, sentence2 from B, same id."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_robust.config.run_config import DataConfig
from dist_robust.data.tasks import get_task
from dist_robust.run.evaluate import ParallelIdError, generalized_sets

PAWSX_LANGS = ["en", "de", "es", "fr", "ja", "ko", "zh"]


@pytest.fixture(scope="module")
def pawsx_dev(shared_data: Path) -> dict:
    cfg = DataConfig(task="pawsx", data_dir=str(shared_data),
                     train_file=str(shared_data / "paws_wiki_en" / "test.tsv"))
    return get_task(cfg).dev


def test_every_language_pair_is_built(pawsx_dev):
    sets = generalized_sets(pawsx_dev)
    assert sorted(sets) == sorted((a, b) for a in PAWSX_LANGS for b in PAWSX_LANGS)
    assert {len(rows) for rows in sets.values()} == {2000}


def test_sentence1_from_a_sentence2_from_b_same_id(pawsx_dev):
    sets = generalized_sets(pawsx_dev)
    by_id = {lang: {e.id: e for e in rows} for lang, rows in pawsx_dev.items()}
    for (a, b), rows in sets.items():
        for e in rows:
            assert (e.lang1, e.lang2) == (a, b)
            assert e.sentence1 == by_id[a][e.id].sentence1
            assert e.sentence2 == by_id[b][e.id].sentence2
            assert e.label == by_id[a][e.id].label  # the label is sentence1's language's


def test_a_known_mixed_pair(pawsx_dev):
    (row,) = [e for e in generalized_sets(pawsx_dev)[("de", "zh")] if e.id == "4"]
    de = next(e for e in pawsx_dev["de"] if e.id == "4")
    zh = next(e for e in pawsx_dev["zh"] if e.id == "4")
    assert (row.sentence1, row.sentence2) == (de.sentence1, zh.sentence2)
    assert row.sentence1 != zh.sentence1 and row.sentence2 != de.sentence2
    assert row.pair == "de-zh"


def test_ids_align_across_languages_in_the_shared_files(pawsx_dev):
    order = [e.id for e in pawsx_dev["en"]]
    assert all([e.id for e in rows] == order for rows in pawsx_dev.values())
    # Translations agree on most labels (translators relabelled a few: SOURCES.md says 1968-1997 of 2000).
    en = [e.label for e in pawsx_dev["en"]]
    for lang in PAWSX_LANGS[1:]:
        agree = sum(x == y for x, y in zip(en, [e.label for e in pawsx_dev[lang]]))
        assert 1968 <= agree <= 1997, lang


def test_trimmed_sets_stay_parallel(shared_data: Path):
    cfg = DataConfig(task="xnli", data_dir=str(shared_data), languages=["en", "ar", "sw"],
                     train_file=str(shared_data / "xnli" / "en" / "test.tsv"), max_eval_examples=100)
    data = get_task(cfg)
    sets = generalized_sets(data.dev)
    assert len(sets) == 9 and {len(rows) for rows in sets.values()} == {100}
    ids = [e.id for e in sets[("ar", "sw")]]
    assert ids == [e.id for e in data.dev["sw"]] == [e.id for e in data.dev["en"]]
    assert ids[:4] == ["1", "2", "3", "16"]  # XNLI pairIDs, not row numbers


def test_id_mismatch_is_reported_not_dropped(pawsx_dev):
    broken = dict(pawsx_dev)
    broken["ko"] = [e for e in pawsx_dev["ko"] if e.id != "4"]
    with pytest.raises(ParallelIdError, match=r"'en' and 'ko' are not parallel: 1 id\(s\) in only one of them "
                                              r"\(e\.g\. 4\)"):
        generalized_sets(broken)
