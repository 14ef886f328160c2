"""Authenticated tracking: a real ``mlflow server --app-name basic-auth`` on 127.0.0.1.

Runs, compare and sweeps work with the credentials MLflow's client reads from the environment;
wrong credentials are one error before anything starts; the password reaches no output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import start_mlflow_server, stop_mlflow_server
from tests.launch import REPO, TINY, launcher_env

ADMIN = "admin-Pw-4417"
PASSWORD = "alice-Pl4nted-pw"
EXPERIMENT = "auth"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """An MLflow server that takes only its users; ``alice`` is one of them."""
    from dist_robust.infra.distributed import free_port

    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-auth"), port, admin_password=ADMIN)
    uri = f"http://127.0.0.1:{port}"
    reply = requests.post(f"{uri}/api/2.0/mlflow/users/create", json={"username": "alice", "password": PASSWORD},
                          auth=("admin", ADMIN), timeout=30)
    assert reply.status_code == 200, reply.text
    yield uri
    stop_mlflow_server(proc)


def _as(user: str, password: str, **extra: str) -> dict:
    return launcher_env(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password, **extra)


def _flags(uri: str, out) -> list[str]:
    flags = [f for f in TINY if f not in ("--mlflow-uri", "none")]
    return [*flags, "--max-steps", "2", "--eval-steps", "0", "--mlflow-uri", uri, "--experiment", EXPERIMENT,
            "--output-dir", str(out)]


def test_wrong_credentials_are_one_error_before_anything_starts(auth_server, tmp_path):
    for env, given in ((_as("alice", "not-her-password"), "user 'alice'"),
                       (launcher_env(), "no credentials")):
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "train.py", *_flags(auth_server, tmp_path / "run")], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"MLflow at {auth_server} refused {given} (401" in proc.stderr and "MLFLOW_TRACKING_PASSWORD" in \
            proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
        assert time.monotonic() - start < 60


def test_a_run_and_compare_work_with_credentials_and_the_password_reaches_no_output(auth_server, tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "run"
    env = _as("alice", PASSWORD)
    proc = subprocess.run([sys.executable, "train.py", *_flags(auth_server, out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compare = subprocess.run([sys.executable, "-m", "dist_robust.cli", "compare", "--experiment", EXPERIMENT,
                              "--mlflow-uri", auth_server, "--format", "json"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert json.loads(compare.stdout)["rows"]

    import os

    os.environ.update(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=PASSWORD)
    try:
        client = MlflowClient(auth_server)
        (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
        artifacts = tmp_path / "artifacts"
        client.download_artifacts(run.info.run_id, "", str(artifacts))
    finally:
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(key)
    assert run.data.metrics["source_acc"] >= 0
    written = {"stdout": proc.stdout, "stderr": proc.stderr, "compare": compare.stdout + compare.stderr,
               "params": json.dumps(run.data.params), "tags": json.dumps(run.data.tags)}
    for path in [*out.rglob("*"), *artifacts.rglob("*")]:
        if path.is_file() and path.suffix in (".json", ".jsonl", ".csv", ".txt", ".log", ".yaml", ""):
            written[str(path)] = path.read_text(errors="replace")
    assert [name for name, text in written.items() if PASSWORD in text] == []


@pytest.mark.slow
@pytest.mark.launcher
def test_a_sweep_works_with_credentials(auth_server, tmp_path):
    flags = [f for f in TINY if f not in ("--mlflow-uri", "none")] + ["--max-steps", "4", "--eval-steps", "2",
                                                                       "--save-steps", "2", "--no-export-model"]
    space = {"name": "auth-sweep", "base": {"flags": [*flags, "--objective", "gaussian"]},
             "params": {"objective.sigma": {"type": "grid", "values": [0.05, 0.1]}},
             "workers_per_trial": 1, "max_concurrent_trials": 1, "scratch_dir": str(tmp_path / "scratch")}
    path = tmp_path / "space.yaml"
    path.write_text(json.dumps(space))
    proc = subprocess.run([sys.executable, "-m", "dist_robust.tuning", "--space", str(path), "--storage",
                           str(tmp_path / "results"), "--mlflow-uri", auth_server, "--experiment", "auth-sweep",
                           "--num-cpus", "2"], cwd=tmp_path,
                          env=_as("alice", PASSWORD, RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(tmp_path / "ray")),
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    reply = requests.post(f"{auth_server}/api/2.0/mlflow/runs/search", auth=("alice", PASSWORD), timeout=30,
                          json={"experiment_ids": [requests.get(
                              f"{auth_server}/api/2.0/mlflow/experiments/get-by-name",
                              params={"experiment_name": "auth-sweep"}, auth=("alice", PASSWORD),
                              timeout=30).json()["experiment"]["experiment_id"]]})
    assert len(reply.json()["runs"]) == 3  # the parent and its two trials
    saved = [p.read_text(errors="replace") for p in (tmp_path / "results").rglob("*") if p.is_file()
             and p.suffix in (".json", ".yaml", ".txt", ".log", ".csv")]
    assert not [t for t in saved if PASSWORD in t] and PASSWORD not in proc.stdout + proc.stderr
