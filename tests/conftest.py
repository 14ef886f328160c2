"""Shared fixtures: the evaluation data beside the repository, a real MLflow server, launches."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dist_robust.infra.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real PAWS-X/XNLI files). Skips without it; fails under CI."""
    if not (SHARED_DATA / "SOURCES.md").exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the evaluation data is missing: expected {SHARED_DATA.name} "
                        "in ../shared beside the repository")
        pytest.skip("../shared/data (real PAWS-X/XNLI files) is not beside the repository")
    return SHARED_DATA


def start_mlflow_server(root: Path, port: int, admin_password: str | None = None) -> subprocess.Popen:
    """A real ``mlflow server`` process on 127.0.0.1:port (one worker, sqlite store under ``root``), once healthy.

    Started in its own session: ``os.killpg(proc.pid, ...)`` stops it with its workers. The
    same root and port start it again with the same runs (an outage, then recovery).
    """
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts")]
    # No job runner: MLflow's GenAI jobs are unused here, and each start with it would leave an
    # empty directory of its job store in /dev/shm that MLflow never removes.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if admin_password is not None:  # MLflow's basic-auth app: every request needs a user's credentials
        cmd += ["--app-name", "basic-auth"]
        env.update(MLFLOW_AUTH_ADMIN_PASSWORD=admin_password, MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex(),
                   MLFLOW_AUTH_CONFIG_PATH=str(_auth_config(root)))
    log = open(root / "server.log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    log.close()
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited early:\n{(root / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:  # (open without credentials)
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_mlflow_server(proc)
    raise RuntimeError("mlflow server did not become healthy within 120 s")


def _auth_config(root: Path) -> Path:
    """The basic-auth app's settings, its user store under ``root`` (not the working directory)."""
    path = root / "basic_auth.ini"
    path.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/basic_auth.db\n"
                    "admin_username = admin\nauthorization_function = "
                    "mlflow.server.auth:authenticate_request_basic_auth\n")
    return path


def stop_mlflow_server(proc: subprocess.Popen, sig: int = 15) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` process on 127.0.0.1; yields its http:// URI, stopped at the end of the session."""
    port = free_port()
    proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    yield f"http://127.0.0.1:{port}"
    stop_mlflow_server(proc)
