"""The leakage guard: fires on evaluation pairs used for training, quiet on the disjoint files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dist_robust.config.run_config import DataConfig
from dist_robust.data.examples import PairExample
from dist_robust.data.leakage import LeakageError, check_leakage, find_overlaps, normalize
from dist_robust.data.readers import PAWSX_LABELS, read_pairs
from dist_robust.data.real_tasks import pawsx, xnli


def _pair(i: int, s1: str, s2: str) -> PairExample:
    return PairExample(str(i), s1, s2, 0, "en", "en")


def test_pawsx_en_dev_as_training_data_is_refused(shared_data: Path):
    train = str(shared_data / "pawsx" / "en" / "dev.tsv")
    cfg = DataConfig(task="pawsx", data_dir=str(shared_data), languages=["en", "de"], train_file=train)
    with pytest.raises(LeakageError) as err:
        pawsx(cfg)
    msg = str(err.value)
    assert f"training set {train} (2000 pairs) overlaps" in msg
    assert f"{train}: 2000 of its 2000 pairs" in msg
    assert "--allow-leakage" in msg and "paws_wiki_en/test.tsv" in msg


def test_pawsx_en_test_pairs_leak_into_the_test_report(shared_data: Path, tmp_path: Path):
    # Training on a copy of en/test (not the file itself) while reporting test: both overlaps named.
    rows = read_pairs(str(shared_data / "pawsx" / "en" / "test.tsv"), PAWSX_LABELS).examples[:300]
    dev = read_pairs(str(shared_data / "pawsx" / "en" / "dev.tsv"), PAWSX_LABELS).examples[:40]
    train = tmp_path / "train.tsv"
    lines = ["id\tsentence1\tsentence2\tlabel"]
    # Reformatted: case, spacing and sentence order changed; still the same pairs.
    lines += [f"{e.id}\t{e.sentence2.upper()}\t  {e.sentence1}\t{e.label}" for e in rows + dev]
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = DataConfig(task="pawsx", data_dir=str(shared_data), languages=["en", "ko"], train_file=str(train))
    with pytest.raises(LeakageError) as err:
        pawsx(cfg)
    msg = str(err.value)
    assert f"{shared_data / 'pawsx' / 'en' / 'test.tsv'}: 300 of its 2000 pairs" in msg
    assert f"{shared_data / 'pawsx' / 'en' / 'dev.tsv'}: 40 of its 2000 pairs" in msg


def test_paws_wiki_test_is_quiet(shared_data: Path, caplog):
    train = read_pairs(str(shared_data / "paws_wiki_en" / "test.tsv"), PAWSX_LABELS).examples
    refs = {name: read_pairs(str(shared_data / "pawsx" / "en" / f"{name}.tsv"), PAWSX_LABELS).examples
            for name in ("dev", "test")}
    assert find_overlaps(train, refs) == []
    with caplog.at_level(logging.WARNING, logger="dist_robust"):
        data = pawsx(DataConfig(task="pawsx", data_dir=str(shared_data), languages=["en", "de", "ko", "zh"],
                                train_file=str(shared_data / "paws_wiki_en" / "test.tsv")))
    assert len(data.test["en"]) == 2000  # both dev and test were checked
    assert not [r for r in caplog.records if "overlaps" in r.getMessage()]


def test_xnli_dev_training_refused_test_training_quiet(shared_data: Path):
    with pytest.raises(LeakageError, match=r"dev.tsv: 2490 of its 2490 pairs and 830 of its 830 distinct"):
        xnli(DataConfig(task="xnli", data_dir=str(shared_data), languages=["en", "fr"],
                        train_file=str(shared_data / "xnli" / "en" / "dev.tsv")))
    data = xnli(DataConfig(task="xnli", data_dir=str(shared_data), languages=["en", "fr"],
                           train_file=str(shared_data / "xnli" / "en" / "test.tsv")))
    assert len(data.train) == 5010


def test_allow_leakage_downgrades_to_a_warning(shared_data: Path, caplog):
    train = str(shared_data / "pawsx" / "en" / "dev.tsv")
    with caplog.at_level(logging.WARNING, logger="dist_robust"):
        data = pawsx(DataConfig(task="pawsx", data_dir=str(shared_data), languages=["en"], train_file=train,
                                allow_leakage=True))
    assert len(data.train) == 2000
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2000 of its 2000 pairs" in w and "--allow-leakage is set" in w for w in warnings)


def test_normalization_and_pair_order():
    assert normalize("  The  Cat\tsat ") == "the cat sat"
    assert normalize("ＡＢＣ") == "abc"  # NFKC folds full-width letters
    ref = [_pair(1, "one two three four five six", "x"), _pair(2, "alpha beta", "gamma delta")]
    train = [_pair(9, "GAMMA  delta", "alpha beta"), _pair(8, "One two three four five SIX", "other")]
    (o,) = find_overlaps(train, {"ref": ref})
    assert (o.pairs, o.sentence1, o.reference_size, o.sentence1_size) == (1, 1, 2, 1)


def test_short_sentence1_alone_does_not_fire():
    ref = [_pair(1, "Yes .", "Something else entirely here .")]
    train = [_pair(2, "yes .", "A different hypothesis .")]
    assert check_leakage(train, "train", {"ref": ref}) == []
