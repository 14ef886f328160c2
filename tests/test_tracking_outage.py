"""Training outlives its MLflow server: one warning, nothing lost, the run's own error always shown.

Real ``mlflow server`` processes on 127.0.0.1, stopped with SIGKILL and started again on the
same port and store: the tracker keeps what it could not send (in order, with the original
metric timestamps) and sends it when the server is back; a run that never reaches its server
leaves a journal that ``dist-robust replay-tracking`` sends later.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time

from mlflow import MlflowClient

from dist_robust.infra.distributed import free_port
from dist_robust.run.tracking import JOURNAL, ResilientTracker
from tests.conftest import start_mlflow_server, stop_mlflow_server
from tests.launch import REPO, TINY, launcher_env


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def test_server_killed_mid_run_then_back(tmp_path, caplog):
    port, root = free_port(), tmp_path / "server"
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    journal_dir = tmp_path / "run"
    try:
        with caplog.at_level(logging.WARNING, logger="dist_robust.run.tracking"):
            tracker = ResilientTracker(str(journal_dir), uri, "outage", "mid-run", retry_s=1.0)
            tracker.log_params({"lr": 0.1})
            for step in (1, 2):
                tracker.log_metrics({"train/loss": 1.0 / step}, step)
            stop_mlflow_server(server, 9)
            t0 = time.monotonic()
            for step in (3, 4, 5):
                tracker.log_metrics({"train/loss": 1.0 / step}, step)
            tracker.log_text("kept while the server was down", "note.txt")
            assert time.monotonic() - t0 < 30, "training waited on the dead server"
            assert (journal_dir / JOURNAL).exists()
            server = start_mlflow_server(root, port)
            time.sleep(1.1)  # past the retry interval: the next call sends everything kept
            tracker.log_metrics({"train/loss": 1.0 / 6}, 6)
            assert not (journal_dir / JOURNAL).exists()
            tracker.finish()
        warnings = [r.getMessage() for r in caplog.records]
        assert sum("is unreachable" in w for w in warnings) == 1, warnings  # one warning, not one per call
        assert sum("reachable again" in w for w in warnings) == 1
        client = MlflowClient(uri)
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
        history = _history(client, tracker.run_id, "train/loss")
        assert [(s, round(v, 6)) for s, v, _ in history] == [(s, round(1.0 / s, 6)) for s in range(1, 7)]
        stamps = [t for _, _, t in history]
        assert stamps == sorted(stamps)  # kept metrics carry the time they were logged, not the time sent
        local = client.download_artifacts(tracker.run_id, "note.txt", str(tmp_path / "dl"))
        assert open(local).read() == "kept while the server was down"
    finally:
        stop_mlflow_server(server)


def _train(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in launcher_env(**(env_extra or {})).items() if k != "MLFLOW_TRACKING_URI"}
    exe = shutil.which("dist-robust", path=os.path.dirname(sys.executable))
    return subprocess.run([exe, "train", *TINY, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_server_down_from_the_start_then_replayed(tmp_path):
    port, root = free_port(), tmp_path / "server"
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    out = tmp_path / "run"
    crashed = _train(["--mlflow-uri", uri, "--experiment", "down", "--max-steps", "6", "--eval-steps", "2",
                      "--save-steps", "0", "--output-dir", str(out)], {"DIST_ROBUST_CRASH_AT_STEP": "5"})
    assert crashed.returncode != 0
    assert "injected crash before step 5" in crashed.stderr.strip().splitlines()[-1]  # the run's own error, last
    assert crashed.stderr.count("is unreachable") == 1  # one warning for the whole run
    assert "replay-tracking" in crashed.stderr and (out / JOURNAL).exists()

    server = start_mlflow_server(root, port)
    try:
        exe = shutil.which("dist-robust", path=os.path.dirname(sys.executable))
        replay = subprocess.run([exe, "replay-tracking", str(out)], capture_output=True, text=True, timeout=300)
        assert replay.returncode == 0, replay.stderr
        assert not (out / JOURNAL).exists()
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("down").experiment_id])
        assert run.info.status == "FAILED" and run.data.params["objective.name"] == "erm"
        history = _history(client, run.info.run_id, "train/loss")
        assert [s for s, _, _ in history] == [1, 2, 3, 4]  # every step logged before the crash
        dev = _history(client, run.info.run_id, "dev_acc.en")
        assert [s for s, _, _ in dev] == [2, 4]
        assert all(0.0 <= v <= 1.0 for _, v, _ in dev)
    finally:
        stop_mlflow_server(server)
