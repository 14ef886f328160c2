"""The final dev evaluation: per-language numbers reused from selection, off-diagonal cells on a subset.

One run of the keyword task (tests/test_best_checkpoint.py) in one process, final split dev,
``--generalized-examples 10``: the diagonal is not evaluated a second time (the selected step's
dev accuracies are reused), and each off-diagonal cell is the accuracy over 10 evenly spaced ids
of the 64. Both are checked against the exported model run by ``transformers`` alone.
"""

from __future__ import annotations

import pytest
import torch

from dist_robust.run.evaluate import spaced_subset
from tests.launch import deepspeed, results
from tests.test_best_checkpoint import write_keyword_task

K = 10


def test_spaced_subset_spreads_over_the_whole_set():
    rows = list(range(64))
    picked = spaced_subset(rows, K)
    assert len(picked) == K and len(set(picked)) == K and picked == sorted(picked)
    assert picked[0] == 0 and picked[-1] > 64 - 2 * 64 // K  # reaches the end, not a prefix
    gaps = [b - a for a, b in zip(picked, picked[1:])]
    assert max(gaps) - min(gaps) <= 1
    assert spaced_subset(rows, 64) == rows and spaced_subset(rows, None) == rows and spaced_subset(rows, 100) == rows


@pytest.mark.launcher
def test_final_dev_evaluation_reuses_selection_and_subsets_off_diagonal(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dist_robust.data.readers import PAWSX_LABELS, read_pairs

    data = write_keyword_task(tmp_path / "data")
    out = tmp_path / "run"
    deepspeed(["--model", "tiny", "--task", "pawsx", "--data-dir", str(data), "--languages", "en", "de",
               "--train-file", str(data / "train.tsv"), "--micro-batch-size", "8", "--no-progress",
               "--mlflow-uri", "none", "--tokenizer-vocab-size", "200", "--max-length", "32",
               "--eval-steps", "6", "--save-steps", "0", "--max-steps", "12", "--lr", "0.01",
               "--generalized-examples", str(K), "--output-dir", str(out)], nproc=0)
    res = results(out)
    assert res["eval_split"] == "dev" and res["generalized_examples"] == K
    history = {h["step"]: h["per_language"] for h in res["dev_history"]}
    assert res["per_language"] == history[res["best_step"]]

    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    dev = {lang: read_pairs(str(data / "pawsx" / lang / "dev.tsv"), PAWSX_LABELS, lang).examples
           for lang in ("en", "de")}

    def accuracy(s1_lang: str, s2_lang: str, ids: list[str]) -> float:
        by_id = {lang: {r.id: r for r in rows} for lang, rows in dev.items()}
        rows = [(by_id[s1_lang][i].sentence1, by_id[s2_lang][i].sentence2, by_id[s1_lang][i].label) for i in ids]
        enc = tokenizer([a for a, _, _ in rows], [b for _, b, _ in rows], padding=True, truncation=True,
                        max_length=32, return_tensors="pt")
        with torch.no_grad():
            predicted = model(**enc).logits.argmax(-1)
        return (predicted == torch.tensor([y for _, _, y in rows])).double().mean().item()

    all_ids = [r.id for r in dev["en"]]
    spread = [all_ids[(i * len(all_ids)) // K] for i in range(K)]
    for lang in ("en", "de"):
        assert res["generalized"][lang][lang] == res["per_language"][lang] == accuracy(lang, lang, all_ids)
    assert res["generalized"]["en"]["de"] == accuracy("en", "de", spread)
    assert res["generalized"]["de"]["en"] == accuracy("de", "en", spread)
    assert res["generalized_avg"] == pytest.approx((accuracy("en", "de", spread) + accuracy("de", "en", spread)) / 2)
