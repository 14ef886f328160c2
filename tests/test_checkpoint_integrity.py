"""Checkpoints carry a manifest (sizes, sha256) that is checked before DeepSpeed unpickles anything.

Unit level, on local and in-memory fsspec stores, with an engine stand-in that writes files and
can die half-way: a torn tag has no manifest and is refused (unless trusted), a truncated or
altered file and a missing one are named. The real kills (a process killed inside
``save_checkpoint``, a rank killed mid-run) are in ``tests/test_resume.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import fsspec
import pytest

from dist_robust.infra import storage
from dist_robust.run.checkpointing import CheckpointStore, resolve_resume
from dist_robust.run.tags import BEST, MANIFEST, CheckpointError, best_tag, step_tag

FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")


class _Engine:
    """Writes a checkpoint's files one by one, and can die half-way through (a kill mid-save)."""

    def __init__(self, fail_after: int | None = None):
        self.fail_after = fail_after

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(FILES):
            if self.fail_after is not None and i >= self.fail_after:
                raise KeyboardInterrupt("killed while saving")
            (d / name).write_bytes(f"{tag} {client_state} {name}".encode() * 100)


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    output = str(tmp_path / "out") if request.param == "local" else f"memory://integrity-{tmp_path.name}"
    return CheckpointStore(output, str(tmp_path / "staging"), keep=3)


def _reader(store: CheckpointStore) -> CheckpointStore:
    """Another run's view of the same output directory (a run reads its own tags from its staging)."""
    return CheckpointStore(store.output_dir, store.local_root + "-reader", keep=3)


def test_manifest_lists_every_file_with_its_size_and_sha256(store):
    import hashlib

    local = store.save(_Engine(), step_tag(2), {"step": 2})
    manifest = json.loads(storage.read_text(storage.join(store.root, step_tag(2), MANIFEST)))
    assert sorted(manifest["files"]) == sorted(FILES) and manifest["tag"] == step_tag(2)
    for name in FILES:  # recomputed here, independently of the code that wrote it
        data = Path(local, name).read_bytes()
        assert manifest["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert store.fetch(store.root, step_tag(2)) and store.latest_tag() == step_tag(2)


def test_torn_save_is_never_latest_and_is_refused_unless_trusted(store, caplog):
    store.save(_Engine(), step_tag(2), {"step": 2})
    with pytest.raises(KeyboardInterrupt):
        store.save(_Engine(fail_after=1), step_tag(4), {"step": 4})
    if store.remote:  # the publish never happened: put the torn files where a reader would find them
        storage.upload_dir(str(Path(store.local_root, step_tag(4))), storage.join(store.root, step_tag(4)))
    assert store.latest_tag() == step_tag(2)
    assert resolve_resume("auto", store) == (store.root, step_tag(2))
    with pytest.raises(CheckpointError, match=rf"{step_tag(4)} has no {MANIFEST}: .*--trust-checkpoint"):
        store.fetch(store.root, step_tag(4))
    with caplog.at_level(logging.WARNING):
        store.fetch(store.root, step_tag(4), trust=True)
    assert "loading it unverified (--trust-checkpoint)" in caplog.text
    store.save(_Engine(), step_tag(4), {"step": 4})  # saving the tag again replaces the torn files
    assert store.latest_tag() == step_tag(4) and store.fetch(store.root, step_tag(4))


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete"])
def test_damaged_file_is_named(store, damage):
    store.save(_Engine(), step_tag(2), {"step": 2})
    target = storage.join(store.root, step_tag(2), FILES[1])
    data = storage.read_bytes(target)
    if damage == "delete":
        storage.remove(target)
    else:
        new = data[: len(data) // 2] if damage == "truncate" else data[:-1] + b"!"
        with fsspec.open(target, "wb") as f:
            f.write(new)
    what = "missing" if damage == "delete" else "size or sha256 differs"
    with pytest.raises(CheckpointError, match=rf"does not match its {MANIFEST} \({what}: {FILES[1]}\)"):
        _reader(store).fetch(store.root, step_tag(2), trust=True)  # trust skips nothing when a manifest exists


def test_unreadable_manifest_is_an_error(store):
    store.save(_Engine(), step_tag(2), {"step": 2})
    storage.write_text(storage.join(store.root, step_tag(2), MANIFEST), "{not json")
    if store.remote:
        Path(store.local_root, step_tag(2), MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=f"{MANIFEST} is unreadable"):
        _reader(store).fetch(store.root, step_tag(2))


def test_best_pointer_moves_only_after_a_complete_save(store):
    store.save(_Engine(), best_tag(4), {"step": 4}, pointer=BEST)
    assert store.pointed(BEST) == best_tag(4)
    with pytest.raises(KeyboardInterrupt):
        store.save(_Engine(fail_after=1), best_tag(8), {"step": 8}, pointer=BEST)
    assert store.pointed(BEST) == best_tag(4)  # the torn save is never named
    assert len(storage.listdir(storage.join(store.root, best_tag(4)))) == 3  # two files and the manifest
    store.save(_Engine(), best_tag(12), {"step": 12}, pointer=BEST)
    assert store.pointed(BEST) == best_tag(12)
    names = storage.listdir(store.root)
    assert best_tag(12) in names and best_tag(4) not in names and best_tag(8) not in names  # only the best is kept


def test_retention_keeps_the_last_n_and_the_best(store):
    store.save(_Engine(), best_tag(2), {"step": 2}, pointer=BEST)
    for step in (2, 4, 6, 8, 10):
        store.save(_Engine(), step_tag(step), {"step": step})
    assert storage.listdir(store.root) == sorted([BEST, best_tag(2), "latest", *map(step_tag, (6, 8, 10))])
