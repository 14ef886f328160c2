"""Names and paths read from stores, pointers and journals are never trusted as paths.

A ``latest`` / ``best`` pointer naming ``../../victim`` or an absolute path, a store key with ``..``
segments, a tracking journal naming a file outside its folder: each is refused before anything
is deleted, written, listed or uploaded, with one clear error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from dist_robust.infra import storage
from dist_robust.run.checkpointing import CheckpointError, CheckpointStore, checked_tag, resolve_resume
from tests.launch import REPO, TINY, launcher_env, train_process


def _victim(root: Path) -> Path:
    victim = root / "victim"
    victim.mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    return victim


@pytest.mark.parametrize("bad", ["../../victim", "/etc", "step-00000002/../../../victim", "step-2", "best-0000001x",
                                 ""])
def test_only_tags_of_our_own_form_pass(bad):
    with pytest.raises(CheckpointError, match="not a dist-robust checkpoint tag"):
        checked_tag(bad, "checkpoints/latest")
    assert checked_tag("step-00000300", "x") == "step-00000300" and checked_tag("best-00000002", "x")


def test_a_remote_pointer_out_of_its_folder_deletes_nothing(tmp_path):
    """The store's ``latest`` says ``../../victim``: before, --resume auto rmtree'd staging/checkpoints/../../victim."""
    staging = tmp_path / "a" / "staging"
    victim = _victim(tmp_path / "a")  # = staging/checkpoints/../../victim
    store = CheckpointStore(f"memory://pointer-{tmp_path.name}/run", str(staging), keep=2)
    storage.write_text(storage.join(store.root, "latest"), "../../victim")
    with pytest.raises(CheckpointError, match="'../../victim', which is not a dist-robust checkpoint tag"):
        resolve_resume("auto", store)
    with pytest.raises(CheckpointError, match="expected one directory name"):
        store.fetch(store.root, "../../victim")
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_resume_from_a_folder_whose_pointer_leaves_it_fails_in_one_line(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text(str(_victim(tmp_path)))
    proc = train_process([*TINY, "--max-steps", "2", "--resume", "auto", "--output-dir", str(out)])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "which is not a dist-robust checkpoint tag" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "victim" / "precious.txt").read_text() == "keep me"


def test_a_store_key_with_dot_dot_segments_writes_nothing_outside(tmp_path):
    fs = fsspec.filesystem("memory")
    base = f"/keys-{tmp_path.name}/step-2"
    for key in ("mp_rank_00_model_states.pt", "../../../escaped.txt"):
        with fs.open(f"{base}/{key}", "w") as f:
            f.write("x")
    target = tmp_path / "stage" / "checkpoints" / "step-2"
    with pytest.raises(storage.UnsafePathError, match="'../../../escaped.txt' is not a plain relative path"):
        storage.download_dir(f"memory://{base}", str(target))
    assert not list(tmp_path.rglob("escaped.txt")) and not target.exists()  # checked before the first write
    fs.rm(f"{base}/../../../escaped.txt")
    storage.download_dir(f"memory://{base}", str(target))
    assert (target / "mp_rank_00_model_states.pt").read_text() == "x"


def test_a_symlink_inside_the_target_does_not_lead_out(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "link").symlink_to(tmp_path)
    with pytest.raises(storage.UnsafePathError, match="leads outside"):
        storage.inside(str(target), "link/escaped.txt", "memory://x")
    assert storage.inside(str(target), "a/b.txt", "memory://x") == str(target / "a" / "b.txt")


def test_a_ray_trial_best_pointer_out_of_its_folder_lists_nothing(tmp_path):
    from dist_robust.tuning.worker import checkpoint_files

    root = tmp_path / "trial" / "checkpoints"
    (root / "step-00000004").mkdir(parents=True)
    (root / "step-00000004" / "mp_rank_00_model_states.pt").write_text("x")
    (root / "best").write_text("../../home/.aws")
    with pytest.raises(CheckpointError, match="not a dist-robust checkpoint tag"):
        checkpoint_files(str(root / "step-00000004"), str(tmp_path / "trial"))


def _replay(journal_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_robust.cli", "replay-tracking", str(journal_dir),
                           "--mlflow-uri", f"sqlite:///{journal_dir / 'mlflow.db'}"], cwd=REPO, env=launcher_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("call, needle", [
    ({"call": "log_artifact", "args": ["/etc/passwd", None]}, "names the artifact '/etc/passwd', outside"),
    ({"call": "log_artifact", "args": ["RUN/mlflow-journal-files/0/../../../secret.txt", None]}, "outside"),
    ({"call": "__init__", "args": []}, "holds a call '__init__' that a tracking journal never does"),
])
def test_replay_tracking_sends_only_the_journal_s_own_files(tmp_path, call, needle):
    run = tmp_path / "run"
    (run / "mlflow-journal-files" / "0").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("s3cret")
    call = json.loads(json.dumps(call).replace("RUN", str(run)))
    lines = [{"run": {"uri": "sqlite:///x.db", "experiment": "e", "run_name": "r", "run_id": None, "tags": {}}},
             {"call": "log_metrics", "args": [{"a": 1.0}, 1, 0]}, call]
    (run / "mlflow-journal.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = _replay(run)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "mlflow-journal.jsonl").exists()  # kept: nothing was sent
    assert not (run / "mlflow.db").exists()


def test_shared_temporary_folders_are_private_and_a_planted_one_is_refused(tmp_path, monkeypatch):
    import os
    import stat
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    top = tmp_path / f"dist-robust-{os.getuid()}"
    staging = storage.private_dir("staging", "abc")
    assert staging == str(top / "staging" / "abc") and stat.S_IMODE(top.stat().st_mode) == 0o700
    # another user got there first: a symlink to a folder they control, or an open folder
    import shutil

    shutil.rmtree(top)
    (tmp_path / "attacker").mkdir()
    top.symlink_to(tmp_path / "attacker")
    with pytest.raises(storage.UnsafePathError, match="not a private folder of this user"):
        storage.private_dir("staging", "abc")
    assert not list((tmp_path / "attacker").iterdir())
    top.unlink()
    top.mkdir(mode=0o777)
    top.chmod(0o777)
    with pytest.raises(storage.UnsafePathError, match="mode 777"):
        CheckpointStore("memory://private/run", None, keep=2)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{k}: &{k} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, k in zip("abcdefgh", "bcdefghi"))


def test_a_yaml_alias_bomb_in_a_run_file_is_refused_at_once(tmp_path):
    import time

    run_file = tmp_path / "run.yaml"
    run_file.write_text("model:\n  name: tiny\n" + BOMB.replace("\n", "\n  ").join(["bomb:\n  ", ""]))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dist_robust.cli", "config", "--config", str(run_file)], cwd=REPO,
                          env=launcher_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "aliases (*name) are not accepted" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - start < 30


def test_a_yaml_alias_bomb_in_a_sweep_file_is_refused_at_once(tmp_path):
    from dist_robust.tuning.space import SpaceError, load_space

    sweep = tmp_path / "s.yaml"
    sweep.write_text("params:\n  objective.epsilon: {type: choice, values: [0.1]}\nworker_env:\n  "
                     + BOMB.replace("\n", "\n  "))
    with pytest.raises(SpaceError, match="aliases"):
        load_space(str(sweep))
