"""Run the real ``deepspeed`` launcher on CPU ranks and read what the run wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dist_robust.infra.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def launcher_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "MLFLOW_TRACKING_URI": "none", **extra})
    return env


def deepspeed_command(script_args: list[str], nproc: int = 2, script: str = "train.py") -> tuple[list[str], int]:
    """The ``deepspeed`` launcher command line on a free port, and the port."""
    exe = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    ranks = ["--num_gpus", str(nproc)] if nproc else []
    port = free_port()
    return [exe, *ranks, "--master_port", str(port), script, *script_args], port


def deepspeed(script_args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 900,
              script: str = "train.py", check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N <script> ...`` (plain ``deepspeed <script>`` for nproc=0).

    Runs from the repository root unless ``cwd`` is given; output is captured.
    """
    cmd, _ = deepspeed_command(script_args, nproc, script)
    shm_before = _shm_files()
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=env or launcher_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    # Every launch, crashed ones included, must leave nothing in /dev/shm (DeepSpeed's CPU all-reduce
    # makes a 66 MB file per rank there); checked by what appeared, not by DeepSpeed's naming scheme.
    leftover = sorted(_shm_files() - shm_before)
    assert not leftover, f"{' '.join(cmd)} left shared-memory files behind: {leftover}"
    return proc


def _shm_files() -> set[str]:
    """This user's plain files in /dev/shm."""
    with os.scandir("/dev/shm") as entries:
        return {e.path for e in entries if e.is_file(follow_symlinks=False) and e.stat().st_uid == os.getuid()}


def torchrun(script_args: list[str], nproc: int = 2, env: dict | None = None,
             timeout: int = 900) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N train.py ...`` from the repository root."""
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    cmd = [exe, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), "train.py", *script_args]
    shm_before = _shm_files()
    proc = subprocess.run(cmd, cwd=REPO, env=env or launcher_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    leftover = sorted(_shm_files() - shm_before)
    assert not leftover, f"{' '.join(cmd)} left shared-memory files behind: {leftover}"
    return proc


def results(output_dir: str | Path) -> dict:
    return json.loads((Path(output_dir) / "results.json").read_text())


def train_process(script_args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python train.py ...`` as one process (one rank, no launcher) from the repository root; not checked."""
    return subprocess.run([sys.executable, "train.py", *script_args], cwd=REPO, env=launcher_env(),
                          capture_output=True, text=True, timeout=timeout)


def rewind(src: str | Path, dst: str | Path, tag: str) -> None:
    """Copy a finished run's directory as a run that stopped right after checkpoint ``tag``."""
    shutil.copytree(src, dst)
    (Path(dst) / "results.json").unlink()
    ckpt = Path(dst) / "checkpoints"
    for later in [p for p in ckpt.glob("step-*") if p.name > tag]:
        shutil.rmtree(later)
    (ckpt / "latest").write_text(tag)




# Flags that make a launch small and quiet: tiny model, small synthetic task, no tracking.
TINY = ["--model", "tiny", "--synthetic-train-size", "256", "--synthetic-eval-size", "32",
        "--micro-batch-size", "8", "--eval-batch-size", "32", "--no-progress", "--mlflow-uri", "none",
        "--tokenizer-vocab-size", "600", "--max-length", "64"]
