"""A run that crashes resumes from its last checkpoint and continues the same trajectory."""

from __future__ import annotations

import pytest

from tests.launch import REPO, TINY, deepspeed, launcher_env, results, torchrun

pytestmark = pytest.mark.launcher

FLAGS = [*TINY, "--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--objective", "pgd",
         "--max-steps", "6", "--save-steps", "3", "--eval-steps", "2", "--epsilon", "0.5", "--alpha", "0.2"]


def test_crash_then_resume_matches_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    torchrun([*FLAGS, "--output-dir", str(straight)])  # torchrun and the deepspeed launcher agree
    expected = results(straight)["train_losses"]
    assert len(expected) == 6

    run = tmp_path / "crashed"
    crashed = deepspeed([*FLAGS, "--output-dir", str(run), "--resume", "auto"],
                        env=launcher_env(DIST_ROBUST_CRASH_AT_STEP="5"), check=False)
    assert crashed.returncode != 0
    assert "injected crash before step 5" in crashed.stderr + crashed.stdout
    assert (run / "checkpoints" / "latest").read_text() == "step-00000003"
    assert not (run / "results.json").exists()

    resumed = deepspeed([*FLAGS, "--output-dir", str(run), "--resume", "auto"])
    assert "at step 3" in resumed.stderr + resumed.stdout
    res = results(run)
    assert res["train_losses"] == pytest.approx(expected, abs=1e-6)
    assert [h["step"] for h in res["dev_history"]] == [2, 4, 6]
    assert res["dev_history"] == results(straight)["dev_history"]  # same model after resume, same accuracy
    assert (run / "model" / "model.safetensors").exists()
