"""How long a process takes to end after a training run: plain interpreter shutdown against ``cli.leave``.

    python bench/process_exit.py [--rounds 3]

Each round starts two fresh processes that train the tiny model for a few steps on one rank
(no tracking) and print the time at which the command returned; one then exits as Python
does, the other through ``dist_robust.cli.leave`` (what ``train.py`` and ``dist-robust`` do).
The seconds from the command's return to the end of the process are timed from outside, the
two taking turns; the medians and their ratio are printed. Every rank, eval and certify pays
this once per launch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROGRAM = """
import sys, time
from dist_robust.cli import leave, train_main
status = train_main(sys.argv[2:])
print(f"returned {time.time():.6f}", flush=True)
sys.exit(leave(status) if sys.argv[1] == "leave" else status)
"""
FLAGS = ["--model", "tiny", "--synthetic-train-size", "256", "--synthetic-eval-size", "32", "--max-steps", "4",
         "--no-progress", "--mlflow-uri", "none", "--no-generalized", "--tokenizer-vocab-size", "600"]


def _exit_seconds(mode: str, out: str) -> float:
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, mode, *FLAGS, "--output-dir", out], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    returned = None
    for line in proc.stdout:
        if line.startswith("returned "):
            returned = float(line.split()[1])
    proc.wait()
    ended = time.time()
    if proc.returncode != 0 or returned is None:
        raise SystemExit(f"the {mode} run failed ({proc.returncode})")
    return ended - returned


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    seconds: dict[str, list[float]] = {"plain": [], "leave": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(args.rounds):
            for mode in seconds:
                seconds[mode].append(_exit_seconds(mode, f"{d}/{mode}{r}"))
                print(f"round {r + 1}: {mode:5s} exit {seconds[mode][-1]:.2f} s", flush=True)
    plain, leave = (statistics.median(seconds[m]) for m in ("plain", "leave"))
    print(f"median exit after the run: plain {plain:.2f} s, leave {leave:.2f} s; plain / leave = {plain / leave:.1f}x, "
          f"{plain - leave:.2f} s saved per process")


if __name__ == "__main__":
    main()
