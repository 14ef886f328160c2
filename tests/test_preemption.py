"""Preemption loses no step: a SIGTERM from outside ends the run at a step boundary with that step
checkpointed, and --resume auto continues from it on the uninterrupted run's trajectory."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.launch import REPO, TINY, deepspeed, deepspeed_command, launcher_env, results

FLAGS = [*TINY, "--max-steps", "16", "--eval-steps", "8", "--save-steps", "1000", "--log-interval", "0",
         "--no-export-model"]


def _signal_after(cmd: list[str], env: dict, step: int, signum: int = signal.SIGTERM) -> tuple[str, int]:
    """Start ``cmd`` in its own session, send ``signum`` to all of it once rank 0 logged ``step``; its output."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if re.search(rf"step {step}/\d+: loss", line):
                break
        assert proc.poll() is None, "".join(seen)[-3000:]
        os.killpg(proc.pid, signum)
        out = "".join(seen) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return out, proc.returncode


@pytest.mark.launcher
def test_sigterm_checkpoints_the_step_and_resume_continues_the_same_trajectory(tmp_path):
    straight = tmp_path / "straight"
    deepspeed([*FLAGS, "--output-dir", str(straight)])
    expected = results(straight)

    run = tmp_path / "run"
    cmd, _ = deepspeed_command([*FLAGS, "--output-dir", str(run)])
    out, _ = _signal_after(cmd, launcher_env(DIST_ROBUST_STEP_SECONDS="0.4"), step=5)
    stopped = re.search(r"preempted by SIGTERM after step (\d+): checkpoint step-(\d+) saved in", out)
    assert stopped, out[-4000:]
    step = int(stopped.group(1))
    assert 5 <= step < 16 and int(stopped.group(2)) == step
    assert (run / "checkpoints" / "latest").read_text() == f"step-{step:08d}"
    assert not (run / "results.json").exists()

    resumed = deepspeed([*FLAGS, "--output-dir", str(run), "--resume", "auto"])
    assert f"at step {step}" in resumed.stdout + resumed.stderr
    got = results(run)
    assert got["train_losses"] == pytest.approx(expected["train_losses"], abs=1e-6)
    assert got["dev_history"] == expected["dev_history"] and got["per_language"] == expected["per_language"]


def test_one_process_exits_75_and_says_it_is_resumable(tmp_path):
    out, code = _signal_after([sys.executable, "train.py", *FLAGS, "--output-dir", str(tmp_path / "run")],
                              launcher_env(DIST_ROBUST_STEP_SECONDS="0.4"), step=3)
    assert code == 75, out[-3000:]
    assert re.search(r"preempted by SIGTERM after step \d+: checkpoint step-\d+ saved in [\d.]+ s, [\d.]+ s after "
                     r"the signal\. Resumable: rerun the same command with --resume auto to continue from step-", out)
    assert "Traceback" not in out


def test_too_short_a_grace_period_says_so_and_names_where_a_resume_starts(tmp_path):
    """A checkpoint that would not fit into --preempt-grace is not started (a kill mid-save would waste it)."""
    out, code = _signal_after([sys.executable, "train.py", *FLAGS, "--save-steps", "3", "--preempt-grace", "0.001",
                               "--output-dir", str(tmp_path / "run")], launcher_env(DIST_ROBUST_STEP_SECONDS="0.4"),
                              step=3)
    assert code == 75, out[-3000:]
    assert "no checkpoint: --preempt-grace 0.001 s leaves too little time" in out
    assert re.search(r"continue from step-0000000[3-9]", out)


def test_ctrl_c_is_reported_as_ctrl_c(tmp_path):
    out, code = _signal_after([sys.executable, "train.py", *FLAGS, "--output-dir", str(tmp_path / "run")],
                              launcher_env(DIST_ROBUST_STEP_SECONDS="0.4"), step=3, signum=signal.SIGINT)
    assert code == 130 and "stopped by Ctrl+C" in out and "SIGTERM" not in out, out[-3000:]
