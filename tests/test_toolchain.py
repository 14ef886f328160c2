"""Set-up compiles DeepSpeed's CPU op once, into this environment's own cache, and runs find it there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_robust.infra.toolchain import build_cache_dir, use_environment_build_cache
from tests.launch import REPO, TINY, launcher_env


def test_the_build_cache_belongs_to_this_environment(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_environment_build_cache()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == build_cache_dir()
    assert build_cache_dir().startswith(os.path.join(sys.prefix, "torch_extensions"))
    assert os.environ["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    monkeypatch.setenv("DIST_ROBUST_EXTENSIONS_FOR", "/another/venv")  # set here for another interpreter: replaced
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/another/venv/torch_extensions/abc")
    use_environment_build_cache()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == build_cache_dir()
    monkeypatch.delenv("DIST_ROBUST_EXTENSIONS_FOR")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")  # the user's own choice stands
    use_environment_build_cache()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/somewhere/else"


@pytest.mark.launcher
def test_a_run_after_set_up_compiles_nothing(tmp_path):
    """``python -m dist_robust.infra.toolchain`` (what ``make setup`` runs), then a training run: the op's
    library is not rebuilt (same file, same time) and the run's output shows no compiler step."""
    env = {k: v for k, v in launcher_env().items() if k not in ("TORCH_EXTENSIONS_DIR", "DIST_ROBUST_EXTENSIONS_FOR")}
    env["PATH"] = "/usr/bin:/bin"  # as a shell without the environment activated: set-up must not depend on it
    setup = subprocess.run([sys.executable, "-m", "dist_robust.infra.toolchain"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert setup.returncode == 0, setup.stderr[-3000:]
    built = sorted(Path(build_cache_dir()).rglob("*.so"))
    if not built:
        pytest.skip("no op to compile on this host (a GPU host builds none up front)")
    before = {p: p.stat().st_mtime_ns for p in built}
    # the run as `make train` starts it: the environment's tools first on PATH
    run_env = {**env, "PATH": os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])}
    run = subprocess.run([sys.executable, "train.py", *TINY, "--max-steps", "1", "--eval-steps", "0",
                          "--no-export-model", "--output-dir", str(tmp_path / "run")], cwd=REPO, env=run_env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in built} == before
    for step in ("Building extension module", "Emitting ninja build file", "c++ -MMD"):
        assert step not in run.stdout + run.stderr
