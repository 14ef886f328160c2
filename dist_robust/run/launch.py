"""Starting a job's ranks: the ``deepspeed`` launcher on a free port, and a supervisor that restarts a job that
died from its latest checkpoint (``dist-robust train --nproc-per-node N --max-restarts K``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from dist_robust.run.stopping import PREEMPTED_EXIT


def launch_env() -> dict[str, str]:
    """The launcher's environment: on a host without a GPU, DeepSpeed told so (``DS_ACCELERATOR=cpu``),
    instead of guessing and warning about it in the launcher and in every rank."""
    env = dict(os.environ)
    if "DS_ACCELERATOR" not in env:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    return env


def relaunch(nproc: int, argv: list[str]) -> int:
    """The job with ``nproc`` ranks through the deepspeed launcher; its exit status."""
    from dist_robust.infra.distributed import free_port

    return subprocess.call(relaunch_command(nproc, argv, free_port()), env=launch_env())


def supervise(nproc: int, argv: list[str], max_restarts: int, output_dir: str) -> int:
    """Run the job (``nproc`` ranks, the deepspeed launcher) and start it again from its latest checkpoint
    when it dies, up to ``max_restarts`` times. Configuration errors (2) and preemption (75) are not retried:
    the first would fail again, the second's machine is going away."""
    import time

    from dist_robust.infra.distributed import free_port

    resumed = any(a == "--resume" or a.startswith("--resume=") for a in argv)
    for attempt in range(max_restarts + 1):
        cmd = relaunch_command(nproc, [*argv, *([] if resumed or not attempt else ["--resume", "auto"])], free_port())
        start = time.monotonic()
        code = subprocess.call(cmd, env=launch_env())
        if code in (0, 2, PREEMPTED_EXIT) or attempt == max_restarts:
            if code not in (0, 2, PREEMPTED_EXIT):
                print(f"error: the job failed (exit {code}) after {max_restarts} restart(s); its checkpoints are in "
                      f"{output_dir}: rerun with --resume auto to continue", file=sys.stderr)
            return code
        print(f"dist-robust train: the job ended with exit {code} after {time.monotonic() - start:.0f} s (a rank "
              f"died?); restart {attempt + 1} of {max_restarts}, from the latest checkpoint in {output_dir}",
              file=sys.stderr, flush=True)
    return 1


def relaunch_command(nproc: int, args: list[str], port: int) -> list[str]:
    """The deepspeed launcher command for N local ranks on ``port`` (so two jobs on a host never collide)."""
    # The launcher beside this interpreter first: a virtual environment need not be activated.
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed") or "deepspeed"
    # --no_local_rank: the launcher would put --local_rank=N before the subcommand; ranks read
    # $LOCAL_RANK, which it sets anyway.
    quiet_launcher = [] if "--verbose" in args else ["--quiet"]  # the launcher's own INFO lines, as the ranks'
    return [launcher, "--num_gpus", str(nproc), "--master_port", str(port), "--no_local_rank", *quiet_launcher,
            "--module", "dist_robust.cli", "train", *args]
