"""--output-dir as an fsspec URL: checkpoints are published there and resumed from there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import free_port
from tests.launch import REPO, TINY, launcher_env

pytestmark = pytest.mark.launcher


def test_memory_filesystem_checkpoint_publish_and_resume(tmp_path):
    env = launcher_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(free_port()), TMPDIR=str(tmp_path))
    flags = [*TINY, "--deepspeed", str(REPO / "ds_configs" / "zero2.json"), "--objective", "gaussian",
             "--sigma", "0.05", "--max-steps", "5", "--save-steps", "2", "--eval-steps", "0"]
    proc = subprocess.run([sys.executable, "tests/remote_resume.py", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["latest_after_crash"] == "step-00000002"
    assert len(out["straight"]) == 5
    assert out["resumed"] == pytest.approx(out["straight"], abs=1e-6)
    files = out["files"]
    assert "checkpoints/latest" in files and "results.json" in files and "generalized.csv" in files
    assert "model/model.safetensors" in files and "model/tokenizer.json" in files
    assert any(f.startswith("checkpoints/step-00000004/") for f in files)
    assert not any(f.startswith("checkpoints/step-00000002/") for f in files)  # pruned (keep 2)
    assert any(f.startswith("checkpoints/step-00000005/") for f in files)
