"""Non-finite steps and one-process runs, through real engines.

NaN is injected for real: the word-embedding output of every rank turns NaN during the listed
steps (``DIST_ROBUST_NAN_AT_STEPS``), so the loss and every gradient are NaN. The update must
be skipped whoever checks it (DeepSpeed's own check at stages 1-3 and in bf16, which at fp32
ZeRO-2 on a CPU host reads the norm ``zero.chunked_zero_grad_norm`` returns; ours for ZeRO-0's
plain optimizer): the weights after a skipped step 3 are bit for bit those
after step 2.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dist_robust.infra.distributed import LAUNCHER_ENV
from tests.launch import REPO, TINY, deepspeed, launcher_env, results

pytestmark = pytest.mark.launcher

# dist-robust's check (ZeRO-0 fp32), DeepSpeed's at ZeRO-3 and in bf16, and at fp32 ZeRO-2 the invalid
# norm that zero.chunked_zero_grad_norm hands DeepSpeed on a CPU host
CONFIGS = ("zero0", "zero2", "zero3", "zero2_bf16", "zero2_fp16")  # (half precision: the global norm's check,
# zero.norm_overflow_check, in place of DeepSpeed's per-tensor scan)


@pytest.fixture(scope="module")
def skipped_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("nan")
    paths = []
    for name in CONFIGS:  # constant learning rate: runs of 2 and 3 steps share their first two updates
        ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
        ds.pop("scheduler", None)
        if ds.get("fp16", {}).get("enabled"):  # a loss scale the first steps do not overflow at
            ds["fp16"]["initial_scale_power"] = 4
        (out / f"{name}.json").write_text(json.dumps(ds))
        paths.append(str(out / f"{name}.json"))
    flags = [*TINY, "--eval-steps", "0", "--save-steps", "0", "--objective", "pgd", "--lr", "0.01"]
    env = launcher_env(DIST_ROBUST_NAN_AT_STEPS="3")
    phases = [f for steps in (2, 3) for f in ("--then", "--subdir", f"steps{steps}", "--max-steps", str(steps))]
    deepspeed([str(out), "--ds-configs", *paths, "--objectives", "erm", "--", *flags, *phases],
              script="tests/engine_runs.py", env=env)
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_nan_step_is_skipped_and_leaves_weights_unchanged(skipped_runs, name):
    two, three = (skipped_runs / f"steps{n}" / name / "erm" for n in (2, 3))
    res2, res3 = results(two), results(three)
    assert res3["skipped_steps"] == 1 and res2["skipped_steps"] == 0
    assert math.isnan(res3["train_losses"][2])
    assert res3["train_losses"][:2] == res2["train_losses"]
    w2, w3 = load_file(two / "model" / "model.safetensors"), load_file(three / "model" / "model.safetensors")
    assert w2.keys() == w3.keys()
    changed = [k for k in w2 if not (w2[k] == w3[k]).all()]
    assert not changed, f"the skipped step changed {changed[:3]}"
    assert all(w.isfinite().all() for w in w3.values())


def _one_process(args: list[str], tmp_path: Path, env_extra: dict | None = None,
                 exe: list[str] | None = None) -> subprocess.CompletedProcess:
    """A run with no launcher at all: no RANK, WORLD_SIZE, MASTER_ADDR or MASTER_PORT."""
    env = {k: v for k, v in launcher_env(**(env_extra or {})).items()
           if k not in (*LAUNCHER_ENV, "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return subprocess.run([*(exe or [sys.executable, "train.py"]), *TINY, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_consecutive_bad_steps_stop_the_run_with_a_clear_message(tmp_path):
    exe = shutil.which("dist-robust", path=os.path.dirname(sys.executable))
    proc = _one_process(["--max-steps", "8", "--eval-steps", "0", "--save-steps", "2", "--max-bad-steps", "3",
                         "--output-dir", str(tmp_path / "run")], tmp_path,
                        {"DIST_ROBUST_NAN_AT_STEPS": "3,4,5,6"}, exe=[exe, "train"])
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "step 3: loss nan; the update was skipped (1 bad step(s) in a row, 1 in all)" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopping at step 5: 3 consecutive steps had a non-finite loss or gradient")
    assert "--max-bad-steps" in last and "Traceback" not in proc.stderr
    # The step-4 checkpoint holds step 2's weights (3 and 4 were skipped): resuming loses nothing.
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-00000004"
