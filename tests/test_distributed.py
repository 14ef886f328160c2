"""Who the process is when no launcher said so."""

from __future__ import annotations

import os

import pytest

from dist_robust.infra import distributed as D

ENV = (*D.LAUNCHER_ENV, *D.MPI_ENV, "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "SLURM_NTASKS")


@pytest.fixture
def bare_env(monkeypatch):
    for key in ENV:
        monkeypatch.setenv(key, "")  # recorded, so whatever the test sets is undone afterwards
        monkeypatch.delenv(key)
    return monkeypatch


def test_no_launcher_means_one_rank_on_a_free_port(bare_env):
    assert D.default_single_process_env() is True
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and 1024 < int(os.environ["MASTER_PORT"]) < 65536


@pytest.mark.parametrize("key", ["RANK", "OMPI_COMM_WORLD_RANK"])
def test_a_launchers_world_is_left_alone(bare_env, key):
    bare_env.setenv(key, "3")
    assert D.default_single_process_env() is False
    assert "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE") is None


def test_several_slurm_tasks_without_a_launcher_is_an_error(bare_env):
    bare_env.setenv("SLURM_NTASKS", "4")
    with pytest.raises(RuntimeError, match="SLURM started 4 tasks"):
        D.default_single_process_env()


def test_large_frees_go_back_to_the_os_on_linux():
    import subprocess
    import sys

    # in a fresh process: the setting is process-wide
    out = subprocess.run([sys.executable, "-c", "from dist_robust.infra.distributed import return_large_frees_to_os as f; "
                          "print(f())"], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ("True" if sys.platform.startswith("linux") else "False")
