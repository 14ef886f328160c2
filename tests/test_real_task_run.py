"""A real 2-rank DeepSpeed run on real data: PAWS-Wiki English -> PAWS-X dev in 7 languages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.launch import TINY, deepspeed, results

PAWSX_LANGS = ["en", "de", "es", "fr", "ja", "ko", "zh"]


@pytest.mark.launcher
def test_pawsx_run_reports_languages_and_generalized_matrix(shared_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    deepspeed(["--task", "pawsx", "--data-dir", str(shared_data),
               "--train-file", str(shared_data / "paws_wiki_en" / "test.tsv"),
               "--max-train-examples", "512", "--max-eval-examples", "200", "--max-steps", "20",
               "--eval-steps", "10", "--save-steps", "0", "--no-export-model", "--output-dir", str(out), *TINY,
               "--tokenizer-vocab-size", "4000"])  # > the 2358 distinct characters of the 7 languages
    res = results(out)
    assert res["task"] == "pawsx" and res["config"]["world_size"] == 2
    # es/fr/ja have no test labels, so all 7 languages are reported on dev.
    assert res["eval_split"] == "dev"
    assert list(res["per_language"]) == PAWSX_LANGS
    matrix = res["generalized"]
    assert list(matrix) == PAWSX_LANGS and all(list(row) == PAWSX_LANGS for row in matrix.values())
    for lang, acc in res["per_language"].items():
        assert abs(acc * 200 - round(acc * 200)) < 1e-6, (lang, acc)  # 200 real rows, padding not counted
        assert matrix[lang][lang] == pytest.approx(acc)  # the diagonal is the standard set
    off = [matrix[a][b] for a in PAWSX_LANGS for b in PAWSX_LANGS if a != b]
    assert res["generalized_avg"] == pytest.approx(sum(off) / 42)
    assert res["standard_avg"] == pytest.approx(sum(res["per_language"][x] for x in PAWSX_LANGS[1:]) / 6)
    assert len(res["train_losses"]) == 20
    assert (out / "generalized.csv").read_text().splitlines()[0] == "s1_lang," + ",".join(PAWSX_LANGS)
