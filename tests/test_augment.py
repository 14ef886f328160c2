"""RS-DA synonym substitution on the real neighbour map and PAWS-Wiki pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_robust.config.run_config import DataConfig
from dist_robust.data.augment import (SynonymAugmenter, augment_copies, augment_main, load_neighbors,
                                      substitute)
from dist_robust.data.examples import PairExample
from dist_robust.data.readers import PAWSX_LABELS, read_pairs


@pytest.fixture(scope="module")
def neighbors(shared_data: Path) -> dict:
    return load_neighbors(str(shared_data / "synonyms" / "counterfitted_neighbors.json"))


@pytest.fixture(scope="module")
def pairs(shared_data: Path) -> list[PairExample]:
    return read_pairs(str(shared_data / "paws_wiki_en" / "test.tsv"), PAWSX_LABELS).examples[:300]


def test_neighbour_map_loads_as_published(neighbors):
    assert len(neighbors) == 49975
    assert sum(bool(v) for v in neighbors.values()) == 25591
    assert sum(len(v) for v in neighbors.values()) == 109104
    assert neighbors["movie"][:3] == ["film", "filmmaking", "films"]


def _check_substitution(original: str, augmented: str, neighbors: dict) -> int:
    """Assert RS-DA's invariants word by word; return how many words changed."""
    before, after = original.split(" "), augmented.split(" ")
    assert len(before) == len(after)
    changed = 0
    for w, v in zip(before, after):
        if v != w:
            assert neighbors.get(w), f"{w!r} has no neighbours but became {v!r}"
            assert v in neighbors[w], f"{v!r} is not a listed neighbour of {w!r}"
            changed += 1
    return changed


def test_only_words_with_neighbours_change_and_only_to_neighbours(neighbors, pairs):
    aug = SynonymAugmenter(neighbors, prob=1.0, seed=3)
    changed = 0
    for e in pairs:
        out = aug(e, key=0)
        assert (out.id, out.label, out.lang1) == (e.id, e.label, e.lang1)
        changed += _check_substitution(e.sentence1, out.sentence1, neighbors)
        changed += _check_substitution(e.sentence2, out.sentence2, neighbors)
    assert changed > 1000  # most PAWS-Wiki sentences have several substitutable words


def test_offline_copies_differ_and_are_reproducible(neighbors, pairs):
    aug = SynonymAugmenter(neighbors, seed=7)
    copies = augment_copies(pairs[:50], aug, copies=10)
    assert len(copies) == 500
    assert [c.id for c in copies[:3]] == [f"{pairs[0].id}~0", f"{pairs[0].id}~1", f"{pairs[0].id}~2"]
    for i, e in enumerate(pairs[:50]):
        group = copies[10 * i: 10 * (i + 1)]
        assert {c.label for c in group} == {e.label}
        if aug.substitutable(e):
            assert len({(c.sentence1, c.sentence2) for c in group}) > 1, e.id
    assert augment_copies(pairs[:50], SynonymAugmenter(neighbors, seed=7), 10) == copies
    assert augment_copies(pairs[:50], SynonymAugmenter(neighbors, seed=8), 10) != copies


def test_on_the_fly_draw_is_a_function_of_seed_id_and_key(neighbors, pairs):
    aug = SynonymAugmenter(neighbors, prob=0.5, seed=11)
    a, b = pairs[0], pairs[1]
    # Another rank, another batch composition, another process: same (seed, id, key) -> same pair.
    assert aug.batch([a, b], 4)[1] == aug.batch([b], 4)[0] == SynonymAugmenter(neighbors, 0.5, 11)(b, 4)
    fresh = sum(aug(e, 0) != aug(e, 1) for e in pairs)
    assert fresh > 250  # a new epoch redraws


def test_probability_scales_the_substitutions(neighbors, pairs):
    def changed(prob: float) -> int:
        aug = SynonymAugmenter(neighbors, prob=prob, seed=5)
        return sum(_check_substitution(e.sentence1, aug(e, 0).sentence1, neighbors) for e in pairs)

    assert changed(0.0) == 0
    full, half = changed(1.0), changed(0.5)
    assert 0.4 < half / full < 0.6


def test_uniform_over_word_and_neighbours():
    import random

    rng = random.Random(0)
    draws = [substitute("big", {"big": ["large", "huge", "great"]}, rng) for _ in range(4000)]
    counts = {w: draws.count(w) for w in ("big", "large", "huge", "great")}
    assert all(900 < c < 1100 for c in counts.values()), counts
    assert substitute("Big  dog", {"big": ["large"]}, rng) == "Big  dog"  # exact lookup, spacing kept


def test_from_config(shared_data: Path):
    assert SynonymAugmenter.from_config(DataConfig(), seed=1) is None
    cfg = DataConfig(augment="synonym", synonyms=str(shared_data / "synonyms" / "counterfitted_neighbors.json"),
                     synonym_prob=0.3)
    aug = SynonymAugmenter.from_config(cfg, seed=9)
    assert (aug.prob, aug.seed, len(aug.neighbors)) == (0.3, 9, 49975)


def test_bad_neighbour_files(tmp_path: Path):
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list.json: expected a JSON object"):
        load_neighbors(str(tmp_path / "list.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"cat": "dog"}))
    with pytest.raises(ValueError, match=r"bad.json: entry 'cat' is 'dog', expected a list of strings"):
        load_neighbors(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="missing.json: file not found"):
        load_neighbors(str(tmp_path / "missing.json"))


def test_augment_command_writes_n_copies(shared_data: Path, tmp_path: Path, capsys):
    src = (shared_data / "paws_wiki_en" / "test.tsv").read_text(encoding="utf-8").split("\n")[:41]
    (tmp_path / "train.tsv").write_text("\n".join(src) + "\n", encoding="utf-8")
    syn = str(shared_data / "synonyms" / "counterfitted_neighbors.json")
    args = ["--task", "pawsx", "--input", str(tmp_path / "train.tsv"), "--synonyms", syn, "--copies", "3"]
    assert augment_main([*args, "--output", str(tmp_path / "aug.tsv")]) == 0
    assert "wrote 120 pairs (40 x 3 copies)" in capsys.readouterr().out
    assert augment_main([*args, "--output", str(tmp_path / "again.tsv")]) == 0
    assert (tmp_path / "aug.tsv").read_bytes() == (tmp_path / "again.tsv").read_bytes()
    rows = read_pairs(str(tmp_path / "aug.tsv"), PAWSX_LABELS).examples
    original = read_pairs(str(tmp_path / "train.tsv"), PAWSX_LABELS).examples
    assert len(rows) == 120
    assert [r.label for r in rows] == [e.label for e in original for _ in range(3)]
    assert rows[0].id == f"{original[0].id}~0"


def test_augment_command_reports_bad_input(tmp_path: Path, shared_data: Path, capsys):
    (tmp_path / "bad.tsv").write_text("id\tsentence1\tsentence2\tlabel\n1\ta\tb\tyes\n", encoding="utf-8")
    code = augment_main(["--task", "pawsx", "--input", str(tmp_path / "bad.tsv"), "--output",
                         str(tmp_path / "out.tsv"), "--synonyms",
                         str(shared_data / "synonyms" / "counterfitted_neighbors.json")])
    assert code == 2
    assert f"{tmp_path / 'bad.tsv'}:2: unknown label 'yes'" in capsys.readouterr().err
    assert not (tmp_path / "out.tsv").exists()
