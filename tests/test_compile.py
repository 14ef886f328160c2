"""--compile: the model compiled in place (torch.compile through DeepSpeed's engine.compile) trains the
uncompiled model's trajectory, for ERM and for PGD (whose ascent pass goes through the same module)."""

from __future__ import annotations

import pytest

from tests.launch import TINY, deepspeed, results

FLAGS = [*TINY, "--max-steps", "4", "--eval-steps", "0", "--save-steps", "0", "--no-export-model",
         "--no-generalized", "--dropout", "0", "--lr", "0.01", "--adv-steps", "1"]
TOLERANCE = 1e-4  # compiled kernels fuse and reorder float32 sums


@pytest.mark.launcher
@pytest.mark.slow  # torch.compile on a CPU takes 1.5 min a run (make test-all)
@pytest.mark.parametrize("objective", ["erm", "pgd"])
def test_compiled_training_follows_the_eager_trajectory(tmp_path, objective):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    deepspeed([*FLAGS, "--objective", objective, "--output-dir", str(eager)], nproc=0)
    deepspeed([*FLAGS, "--objective", objective, "--compile", "--output-dir", str(compiled)], nproc=0, timeout=1500)
    a, b = results(eager)["train_losses"], results(compiled)["train_losses"]
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, abs=TOLERANCE), (a, b)
    assert results(compiled)["config"]["train"]["compile"] is True
