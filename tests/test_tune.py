"""A real sweep: 4 trials x 2 DeepSpeed workers (ZeRO-3) through Ray Tune + Ray Train, tracked on an MLflow server.

One sweep serves every test here. Its first trial has a worker killed once its step-4 checkpoint
is committed (Ray Train retries it from that checkpoint); once that retry has saved
step 6, the sweep's driver is interrupted with SIGINT and the sweep is finished with ``--resume``
(Tuner.restore). ASHA compares the trials at steps 2 and 4.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import REPO, TINY, launcher_env

pytestmark = [pytest.mark.launcher, pytest.mark.slow]  # make test-all; not in CI

NAME = "sweep-test"
EXPERIMENT = "tune-test"
STEPS = 8
LANGS = ("en", "de", "fr", "es", "zh")


def _space(tmp: Path) -> Path:
    flags = [f for f in TINY if f not in ("--mlflow-uri", "none")]
    flags += ["--deepspeed", str(REPO / "ds_configs" / "zero3.json"), "--objective", "pgd",
              "--max-steps", str(STEPS), "--eval-steps", "2", "--save-steps", "2", "--no-export-model"]
    space = {
        "name": NAME,
        "base": {"flags": flags},
        "params": {"objective.epsilon": {"type": "loguniform", "low": 0.05, "high": 0.5},
                   "train.seed": {"type": "grid", "values": [1, 2, 3, 4]}},
        "metric": "dev_standard_avg",  # target-language dev: separates the seeds' trials where English ties
        "zero_shot": False,
        "workers_per_trial": 2,
        "max_concurrent_trials": 1,
        "max_failures": 1,
        "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
        "search": {"type": "random", "seed": 0},
        "scratch_dir": str(tmp / "scratch"),
    }
    path = tmp / "space.yaml"
    path.write_text(json.dumps(space))  # JSON is YAML
    return path


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGKILL)
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mlflow_server):
    root = tmp_path_factory.mktemp("sweep")
    storage = root / "results"
    killed = root / "killed"
    ray_tmp = tmp_path_factory.mktemp("ray")
    env = launcher_env(RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(ray_tmp),
                       DIST_ROBUST_KILL_WORKER_AT_STEP=f"4:{killed}")
    cmd = [sys.executable, "-m", "dist_robust.tuning", "--space", str(_space(root)), "--storage", str(storage),
           "--mlflow-uri", mlflow_server, "--experiment", EXPERIMENT, "--num-cpus", "2"]
    with open(root / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        retried_to_step_6 = str(storage / NAME / "train-runs" / "*" / "checkpoint_*" / "step-00000006")
        _wait_for(lambda: killed.exists() and glob.glob(retried_to_step_6), first, "the retry saved step 6")
        first.send_signal(signal.SIGINT)
        first.wait(timeout=300)
    resumed = subprocess.run([*cmd, "--resume"], cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    out = {"root": root, "storage": storage, "first_code": first.returncode,
           "first_log": (root / "first.log").read_text(), "code": resumed.returncode,
           "log": resumed.stdout + resumed.stderr, "uri": mlflow_server, "ray_tmp": ray_tmp}
    assert resumed.returncode == 0, out["log"][-6000:]
    return out


def _runs(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents[0], children


def _trial_results(storage: Path) -> dict[str, list[dict]]:
    """Every result Tune recorded, per trial, across the interrupted and the resumed driver."""
    out = {}
    for path in (storage / NAME).glob("*/result.json"):
        out[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def test_interrupted_driver_is_restored_and_finishes_the_sweep(sweep):
    assert sweep["first_code"] == 130, sweep["first_log"][-4000:]
    assert "continue with  dist-robust tune --resume" in sweep["first_log"]
    results = _trial_results(sweep["storage"])
    assert len(results) == 4
    for trial, rows in results.items():
        steps = [r["step"] for r in rows]
        # across the interrupted and the resumed driver, no trial went back to an earlier step
        assert steps == sorted(steps), (trial, steps)
        assert steps[-1] in (2, 4, STEPS)
    assert any("standard_avg" in rows[-1] for rows in results.values()), "no trial ran to the end"


def test_asha_stops_at_least_one_trial_early(sweep):
    last = {trial: rows[-1] for trial, rows in _trial_results(sweep["storage"]).items()}
    stopped = [t for t, r in last.items() if r["step"] < STEPS]
    assert stopped, f"ASHA stopped no trial: {[(t, r['step'], r['dev_standard_avg']) for t, r in last.items()]}"
    assert all("standard_avg" not in last[t] for t in stopped)  # stopped trials never reached the final evaluation


def test_killed_worker_is_retried_from_its_checkpoint(sweep):
    # The workers' own output is in Ray's session logs, not on the sweep's terminal.
    log = "".join(p.read_text(errors="replace") for p in sweep["ray_tmp"].glob("ray/session_*/logs/**/*")
                  if p.is_file() and p.suffix in (".out", ".err", ".log"))
    assert "killing this worker (rank 1) after step 4" in log
    # The retry starts from the checkpoint Ray Train committed before the worker died, not from scratch.
    assert re.search(r"resumed from \S+/step-00000004 at step 4", log), log[-4000:]
    first_trial = sorted(_trial_results(sweep["storage"]))[0]
    steps = [r["step"] for r in _trial_results(sweep["storage"])[first_trial]]
    assert steps == sorted(steps) and steps[-1] == STEPS, steps


def test_every_trial_is_a_child_run_with_per_step_and_per_language_metrics(sweep):
    client, parent, children = _runs(sweep["uri"])
    assert len(children) == 4
    for run in children:
        assert {"objective.epsilon", "train.seed", "objective.name"} <= set(run.data.params)
        assert {f"dev_acc.{lang}" for lang in LANGS} <= set(run.data.metrics)
        history = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        # Every step is logged; steps after the last committed checkpoint can repeat when the restore goes
        # back to it, but steps up to 4 (the checkpoint the killed worker's retry resumed from) only once.
        assert set(history) == set(range(1, max(history) + 1)), history
        assert all(history.count(s) == 1 for s in range(1, min(4, max(history)) + 1)), history
    finished = [r for r in children if "standard_avg" in r.data.metrics]
    assert finished and all({f"acc.{lang}" for lang in LANGS} <= set(r.data.metrics) for r in finished)
    assert all("gen.en.de" in r.data.metrics and "generalized_avg" in r.data.metrics for r in finished)
    assert all(r.info.status == "FINISHED" for r in finished)


def test_parent_run_summarises_the_best_trial(sweep):
    client, parent, children = _runs(sweep["uri"])
    assert parent.info.status == "FINISHED"
    m = parent.data.metrics
    assert m["trials.total"] == 4 and m["trials.errored"] == 0 and m["trials.stopped_early"] >= 1
    best_id = parent.data.tags["best.run_id"]
    best = next(r for r in children if r.info.run_id == best_id)
    assert m["best.dev_standard_avg"] == pytest.approx(max(r.data.metrics["dev_standard_avg"] for r in children))
    assert m["best.dev_standard_avg"] == pytest.approx(best.data.metrics["dev_standard_avg"])
    assert parent.data.params["space.train.seed"] == 'grid({"values": [1, 2, 3, 4]})'
    assert parent.data.tags["dist_robust.zero_shot"] == "false"  # it selected on target-language labels
    assert all(r.data.tags["dist_robust.zero_shot"] == "false" for r in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_trial.json", "trials.json", "sweep.json"} <= artifacts


def test_reported_checkpoints_hold_every_ranks_shards(sweep):
    checkpoints = sorted(p for p in glob.glob(str(sweep["storage"] / NAME / "train-runs" / "*" / "checkpoint_*"))
                         if os.path.isdir(p))
    assert checkpoints
    for ckpt in checkpoints:
        tags = [d for d in os.listdir(ckpt) if d.startswith("step-")]
        assert len(tags) == 1
        files = set(os.listdir(os.path.join(ckpt, tags[0])))
        for rank in (0, 1):  # ZeRO-3: each rank's parameter and optimizer partitions
            assert f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" in files, (ckpt, files)
            assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files, (ckpt, files)
        assert os.path.exists(os.path.join(ckpt, "tokenizer", "tokenizer.json"))


def test_the_terminal_shows_trial_events_not_ray_noise(sweep):
    """One line per trial event and the table; Ray's messages and the workers' output go to files."""
    for log in (sweep["first_log"], sweep["log"]):
        assert "Ray's messages go to" in log and "ray-driver.log" in log
        assert "Failed to query Ray Train Controller" not in log
        assert "[rank0]" not in log  # the trials' own training logs stay in Ray's session logs
    assert re.search(r"^trial \S+ started: objective\.epsilon=", sweep["first_log"], re.M)
    assert re.search(r"^trial \S+ (finished: dev_standard_avg|stopped early by the scheduler)", sweep["log"], re.M)
    assert len(sweep["log"].splitlines()) < 80
