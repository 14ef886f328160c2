"""MLflow's own UI, looked at as a person would: after one tiny run, the experiment page shows it.

Starts ``mlflow ui`` on 127.0.0.1 over the run's local store and renders the experiment page
in headless Chromium (``chromium`` from the system's packages: ``apt-get install chromium``).
Skipped, with the reason, where Chromium is not installed.

    DIST_ROBUST_SCREENSHOT=docs/img/mlflow_ui.png python -m pytest tests/test_mlflow_ui.py   # refresh the docs' picture
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dist_robust.infra.distributed import free_port
from tests.launch import REPO, TINY, launcher_env

pytestmark = [pytest.mark.launcher, pytest.mark.slow]  # a minute of a browser: make test-all, not CI

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("needs Chromium (apt-get install chromium) to look at the UI")
    cwd = tmp_path_factory.mktemp("ui")
    env = {k: v for k, v in launcher_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                         MASTER_PORT=str(free_port())).items() if k != "MLFLOW_TRACKING_URI"}
    flags = [f for f in TINY if f not in ("--mlflow-uri", "none")]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *flags, "--max-steps", "4", "--eval-steps", "2",
                           "--objective", "pgd"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "ui", "--backend-store-uri",
                               "sqlite:///mlflow.db", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    yield url, cwd
    os.killpg(server.pid, 15)
    server.wait(timeout=30)


def _experiment_id(cwd: Path) -> str:
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{cwd}/mlflow.db").get_experiment_by_name("dist-robust").experiment_id


def _render(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=20000",
                           "--window-size=1500,900", *args], capture_output=True, text=True, timeout=180)


def test_experiment_page_shows_the_run_on_the_training_view(ui, tmp_path):
    url, cwd = ui
    page = f"{url}/#/experiments/{_experiment_id(cwd)}/runs?workflowType=machine_learning"  # the link training prints
    dom = _render(["--dump-dom", page], tmp_path).stdout
    assert "pgd epsilon=0.01 synthetic tiny s42" in dom  # the run, by its readable name
    assert "Model registry" in dom  # the model-training view's navigation, not the GenAI one
    shot = Path(os.environ.get("DIST_ROBUST_SCREENSHOT") or tmp_path / "ui.png")
    _render([f"--screenshot={shot}", page], tmp_path)
    assert shot.exists() and shot.stat().st_size > 20_000
