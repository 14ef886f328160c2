"""Crashes cost at most the work since the last checkpoint, never a wrong result.

Real faults on 2-rank ``deepspeed`` launcher runs (ZeRO-3, PGD, fp32), chained on one output
directory: a rank SIGKILLed from outside mid-run, then a rank-0 process SIGKILLed inside
``save_checkpoint`` (a torn checkpoint), then a plain ``--resume auto``. The final loss
trajectory and dev accuracies must equal those of an uninterrupted run (made with torchrun:
the two launchers agree too), so no sample was skipped or repeated. A rank that stops
answering ends the job after ``--dist-timeout`` instead of hanging it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from dist_robust.run.checkpointing import MANIFEST
from tests.launch import REPO, TINY, deepspeed, deepspeed_command, launcher_env, results, torchrun

pytestmark = pytest.mark.launcher

FLAGS = [*TINY, "--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--objective", "pgd",
         "--max-steps", "8", "--save-steps", "3", "--eval-steps", "2", "--epsilon", "0.5", "--alpha", "0.2"]


def _rank_process(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if f"--local_rank={rank}" in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} never started")


def _wait_for(path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text() == text:
            return
        assert proc.poll() is None, f"the run ended before {path} named {text}"
        time.sleep(0.2)
    raise AssertionError(f"{path} never named {text}")


def test_killed_rank_then_torn_checkpoint_then_resume_match_uninterrupted_run(tmp_path):
    straight = tmp_path / "straight"
    torchrun([*FLAGS, "--output-dir", str(straight)])
    expected = results(straight)
    assert len(expected["train_losses"]) == 8

    run = tmp_path / "run"
    latest = run / "checkpoints" / "latest"
    # 1. Rank 1 is SIGKILLed from outside after the step-3 checkpoint (it waits before step 5,
    #    so the moment is not a race with the end of the run).
    cmd, port = deepspeed_command([*FLAGS, "--output-dir", str(run), "--resume", "auto"])
    launcher = subprocess.Popen(cmd, cwd=REPO, env=launcher_env(DIST_ROBUST_HANG_AT_STEP="5:1"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(latest, "step-00000003", launcher)
        os.kill(_rank_process(launcher, 1).pid, signal.SIGKILL)
        killed = time.monotonic()
        out, _ = launcher.communicate(timeout=120)
        assert launcher.returncode != 0
        assert time.monotonic() - killed < 60, "the job did not end promptly after a rank was killed"
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert latest.read_text() == "step-00000003" and not (run / "results.json").exists()

    # 2. Resumed, and rank 0 is SIGKILLed inside save_checkpoint of step 6: a torn tag.
    torn = deepspeed([*FLAGS, "--output-dir", str(run), "--resume", "auto"],
                     env=launcher_env(DIST_ROBUST_KILL_IN_SAVE="step-00000006"), check=False)
    assert torn.returncode != 0
    assert latest.read_text() == "step-00000003"  # never the torn tag
    step6 = run / "checkpoints" / "step-00000006"
    assert step6.is_dir() and any(step6.iterdir()) and not (step6 / MANIFEST).exists()

    # 3. A plain resume finishes the run on the same trajectory.
    resumed = deepspeed([*FLAGS, "--output-dir", str(run), "--resume", "auto"])
    assert "at step 3" in resumed.stderr + resumed.stdout
    res = results(run)
    assert res["train_losses"] == pytest.approx(expected["train_losses"], abs=1e-6)
    assert res["dev_history"] == expected["dev_history"]  # same model after resume, same accuracy
    assert (run / "checkpoints" / "step-00000006" / MANIFEST).exists()
    assert (run / "model" / "model.safetensors").exists()


def test_a_rank_that_stops_answering_ends_the_job_after_the_collective_timeout(tmp_path):
    start = time.monotonic()
    proc = deepspeed([*FLAGS, "--output-dir", str(tmp_path / "run"), "--eval-steps", "0", "--save-steps", "0",
                      "--dist-timeout", "10"], env=launcher_env(DIST_ROBUST_HANG_AT_STEP="3:1"), check=False,
                     timeout=300)
    assert proc.returncode != 0
    assert time.monotonic() - start < 150
    out = proc.stdout + proc.stderr
    assert "error: rank 0: a collective waited longer than --dist-timeout (10 s)" in out
    assert "--resume auto" in out
