"""Repeated faults survived unattended: ``dist-robust train --max-restarts N`` restarts the job from its
latest checkpoint each time a rank is SIGKILLed, and ends where an uninterrupted run ends."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import REPO, TINY, deepspeed, launcher_env, results

FLAGS = [*TINY, "--max-steps", "16", "--eval-steps", "4", "--save-steps", "2", "--log-interval", "0"]


@pytest.mark.launcher
def test_three_random_kills_end_where_an_uninterrupted_run_ends(tmp_path):
    straight = tmp_path / "straight"
    start = time.monotonic()
    deepspeed([*FLAGS, "--output-dir", str(straight)])
    clean_seconds = time.monotonic() - start
    expected = results(straight)

    rng = random.Random(20261207)  # the faults: random places and ranks, the same every run
    plan = [f"step@{rng.randint(3, 6)}@{rng.randint(0, 1)}",  # between two steps
            f"save@step-{rng.choice([8, 10]):08d}@{rng.randint(0, 1)}",  # inside a checkpoint save
            f"eval@12@{rng.randint(0, 1)}"]  # as the evaluation at step 12 starts
    markers = tmp_path / "fired"
    markers.mkdir()
    run = tmp_path / "run"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dist_robust.cli", "train", *FLAGS, "--nproc-per-node", "2",
                           "--max-restarts", "5", "--output-dir", str(run)], cwd=REPO,
                          env=launcher_env(DIST_ROBUST_CHAOS=f"{markers}:{','.join(plan)}"), capture_output=True,
                          text=True, timeout=1200)
    chaos_seconds = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert len(list(markers.iterdir())) == 3, plan  # every fault fired
    assert len(re.findall(r"restart \d of 5, from the latest checkpoint", out)) == 3

    got = results(run)
    assert got["train_losses"] == pytest.approx(expected["train_losses"], abs=1e-6)
    assert got["dev_history"] == expected["dev_history"]
    assert got["per_language"] == expected["per_language"] and got["generalized"] == expected["generalized"]
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # what each fault cost: the steps done again (from the checkpoint the restart resumed at) and the time
    resumed_at = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", out)]
    # the last step done when the rank died: before step N, N - 1; inside step N's save or evaluation, N
    killed_at = [int(p.split("@")[1].split("-")[-1]) - (p.startswith("step@")) for p in plan]
    recomputed = [k - r for k, r in zip(killed_at, resumed_at)]
    print(f"\nchaos: {plan}; resumed at steps {resumed_at}; steps recomputed per fault {recomputed}; "
          f"{chaos_seconds:.0f} s against {clean_seconds:.0f} s uninterrupted "
          f"({(chaos_seconds - clean_seconds) / 3:.0f} s lost per fault)")
    assert all(0 <= r <= 2 for r in recomputed)  # checkpoints every 2 steps: at most 2 steps again
