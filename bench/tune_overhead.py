"""What a Ray Tune sweep costs beyond its training: the same runs as sweep trials and as plain launches.

    python bench/tune_overhead.py [--trials 4] [--steps 6]

The runs: ``tuning/smoke.yaml``'s base (tiny model, synthetic task, PGD, 2 DeepSpeed workers,
evaluation and a checkpoint every 2 steps), one per seed 1..N, no MLflow. They run

* ``sweep``: as one ``dist-robust tune`` sweep (a local Ray instance, FIFO so no trial stops
  early, one trial at a time, each a Ray Train run of 2 workers), and
* ``launch``: one after another through the ``deepspeed`` launcher (``train.py``), the way a
  single run is started without Ray.

Both sides train, evaluate and checkpoint the same steps; what the sweep adds is Ray's start,
the trial actors, the Train controller and workers, their process group, the upload of every
checkpoint to the sweep's storage, and the reporting. Each trial's span is timed from the
driver's "started" line to its "finished" line as they arrive. Printed: per trial, its span
against its launch's wall time; the sweep's wall time against the launches' total; and the
per-trial overhead, (sweep - launches) / N.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVENT = re.compile(r"^trial (\S+) (started|finished)")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "MLFLOW_TRACKING_URI": "none"}


def _flags(steps: int) -> list[str]:
    base = yaml.safe_load(open(os.path.join(REPO, "tuning", "smoke.yaml"), encoding="utf-8"))["base"]["flags"]
    flags = [str(f) for f in base]
    flags[flags.index("--max-steps") + 1] = str(steps)
    return flags


def run_sweep(tmp: str, flags: list[str], trials: int) -> tuple[float, dict[str, float], dict[str, int], list[float]]:
    """The sweep's wall time, each trial's span (driver's start line to finish line), its seed, and
    the times before the first trial started and after the last one finished."""
    space = {"name": "overhead", "base": {"flags": flags},
             "params": {"train.seed": {"type": "grid", "values": list(range(1, trials + 1))}},
             "metric": "dev_source_acc", "workers_per_trial": 2, "max_concurrent_trials": 1, "max_failures": 0,
             "scheduler": {"type": "fifo"}, "search": {"type": "grid"}, "scratch_dir": os.path.join(tmp, "scratch")}
    path = os.path.join(tmp, "space.yaml")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(space, f)
    cmd = [sys.executable, "-m", "dist_robust.tuning", "--space", path, "--storage", os.path.join(tmp, "results"),
           "--mlflow-uri", "none", "--num-cpus", str(os.cpu_count() or 2)]
    started, spans, seeds = {}, {}, {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        match = EVENT.match(line)
        if match and match.group(2) == "started":
            started[match.group(1)] = time.perf_counter()
            seeds[match.group(1)] = int(re.search(r"train\.seed=(\d+)", line).group(1))
        elif match:
            spans[match.group(1)] = time.perf_counter() - started[match.group(1)]
    if proc.wait() != 0:
        sys.exit("the sweep failed:\n" + "".join(log[-60:]))
    end = time.perf_counter()
    last_finish = max(started[t] + spans[t] for t in spans)
    return end - t0, spans, seeds, [min(started.values()) - t0, end - last_finish]


def run_launch(tmp: str, flags: list[str], seed: int) -> float:
    """Wall time of one run through the deepspeed launcher."""
    exe = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or "deepspeed"
    out = os.path.join(tmp, f"launch-{seed}")
    cmd = [exe, "--num_gpus", "2", os.path.join(REPO, "train.py"), *flags, "--seed", str(seed), "--output-dir", out,
           "--mlflow-uri", "none"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"launch failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    flags = _flags(args.steps)
    with tempfile.TemporaryDirectory(prefix="tune-overhead-") as tmp:
        sweep_wall, spans, seeds, (before, after) = run_sweep(tmp, flags, args.trials)
        launches = {seed: run_launch(tmp, flags, seed) for seed in sorted(seeds.values())}
    total = sum(launches.values())
    print(f"{args.trials} runs of {args.steps} steps (tuning/smoke.yaml's base), 2 workers each, one at a time\n")
    print(f"{'seed':>4}  {'trial span s':>12}  {'launch s':>8}  {'difference s':>12}")
    for trial, seed in sorted(seeds.items(), key=lambda kv: kv[1]):
        print(f"{seed:>4}  {spans[trial]:12.1f}  {launches[seed]:8.1f}  {spans[trial] - launches[seed]:+12.1f}")
    print(f"\nsweep wall {sweep_wall:.1f} s, launches {total:.1f} s: ratio {sweep_wall / total:.2f}x; "
          f"per-trial overhead (sweep - launches) / {args.trials} = {(sweep_wall - total) / args.trials:+.1f} s; "
          f"outside the trials' spans: {sweep_wall - sum(spans.values()):.1f} s ({before:.1f} s before the first "
          f"trial started: imports, Ray's start, the sweep's set-up; {after:.1f} s after the last one finished: "
          "the summary, Ray's shutdown)")


if __name__ == "__main__":
    main()
