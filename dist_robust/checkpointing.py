"""DeepSpeed checkpoints on any fsspec store: save locally, publish, resume, export.

Layout under ``<output-dir>/checkpoints``: one directory per tag (``step-00000300``,
``best-00000200``) exactly as ``engine.save_checkpoint`` writes it, plus two pointer files:
``latest`` names the newest complete periodic checkpoint, ``best`` the checkpoint with the
best source-language dev accuracy. A pointer is written only after every file of its tag
is in place, and old tags are deleted only after the pointer moved, so a kill at any moment
leaves both pointers naming complete checkpoints (on object stores too, where a directory
cannot be renamed atomically).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile

from dist_robust import distributed as D
from dist_robust import storage

log = logging.getLogger(__name__)

LATEST = "latest"
BEST = "best"
BEST_PREFIX = "best-"


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def best_tag(step: int) -> str:
    return f"{BEST_PREFIX}{step:08d}"


class CheckpointStore:
    """Where checkpoints live locally (for DeepSpeed) and where they are published."""

    def __init__(self, output_dir: str, staging_dir: str | None, keep: int):
        self.output_dir = output_dir
        self.remote = not storage.is_local(output_dir)
        self.keep = keep
        if self.remote:
            # One staging directory per destination, so concurrent runs never share one.
            key = hashlib.sha1(output_dir.encode()).hexdigest()[:12]
            staging = staging_dir or os.path.join(tempfile.gettempdir(), "dist-robust-staging", key)
            self.local_root = os.path.join(staging, "checkpoints")
        else:
            self.local_root = os.path.join(storage.local_path(output_dir), "checkpoints")
        self.root = storage.join(output_dir, "checkpoints")

    def save(self, engine, tag: str, client_state: dict, pointer: str = LATEST) -> str:
        """Save on every rank, publish, then move the ``pointer`` file (``latest`` or ``best``) to ``tag``.

        Returns the local directory of the tag (this node's files).
        """
        engine.save_checkpoint(self.local_root, tag=tag, client_state=client_state, save_latest=False)
        D.barrier()
        if self.remote and D.local_rank() == 0:
            storage.remove(storage.join(self.root, tag))
            storage.upload_dir(os.path.join(self.local_root, tag), storage.join(self.root, tag))
        D.barrier()
        if D.is_main():
            if storage.isdir(storage.join(self.root, pointer)):  # a `best` directory of an older version
                storage.remove(storage.join(self.root, pointer))
            storage.write_text(storage.join(self.root, pointer), tag)
            if self.remote:
                _write_local(os.path.join(self.local_root, pointer), tag)
            self._prune()
        D.barrier()
        log.info("checkpoint %s saved to %s (%s)", tag, self.root, pointer)
        return os.path.join(self.local_root, tag)

    def _prune(self) -> None:
        """Keep the newest ``keep`` periodic tags and the one ``best`` names; delete the rest."""
        names = storage.listdir(self.root)
        periodic = sorted(t for t in names if t.startswith("step-"))
        stale = periodic[: max(0, len(periodic) - self.keep)]
        best = self.pointed(BEST)
        stale += [t for t in names if t.startswith(BEST_PREFIX) and t != best]
        for old in stale:
            storage.remove(storage.join(self.root, old))
            shutil.rmtree(os.path.join(self.local_root, old), ignore_errors=True)

    def pointed(self, pointer: str) -> str | None:
        """The tag a pointer file (``latest``, ``best``) names, or None."""
        uri = storage.join(self.root, pointer)
        return storage.read_text(uri).strip() if storage.exists(uri) and not storage.isdir(uri) else None

    def latest_tag(self) -> str | None:
        return self.pointed(LATEST)

    def fetch(self, source_root: str, tag: str) -> str:
        """Make ``source_root/tag`` available locally on every node; return the local root."""
        if storage.is_local(source_root):
            return storage.local_path(source_root)
        local = self.local_root
        if D.local_rank() == 0:
            target = os.path.join(local, tag)
            shutil.rmtree(target, ignore_errors=True)
            storage.download_dir(storage.join(source_root, tag), target)
        D.barrier()
        return local


def resolve_resume(resume: str | None, store: CheckpointStore) -> tuple[str, str] | None:
    """(checkpoint root, tag) to resume from, or None for a fresh start.

    ``auto`` resumes from ``<output-dir>/checkpoints/latest`` when it exists. A path or URL
    may name a checkpoints root (with a ``latest`` file) or one tag directory.
    """
    if not resume:
        return None
    if resume == "auto":
        tag = store.latest_tag()
        return (store.root, tag) if tag else None
    if storage.exists(storage.join(resume, LATEST)):
        return resume, storage.read_text(storage.join(resume, LATEST)).strip()
    if storage.exists(resume) and any(n.startswith(("mp_rank_", "zero_pp_rank_")) for n in storage.listdir(resume)):
        parent, _, tag = resume.rstrip("/").rpartition("/")
        return parent, tag
    raise FileNotFoundError(f"--resume {resume}: no checkpoint there (expected a directory with a "
                            f"'{LATEST}' file, or a checkpoint tag directory holding mp_rank_* or zero_pp_rank_* files)")


def _write_local(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def consolidated_state_dict(engine) -> dict | None:
    """The full model state dict on rank 0 (None elsewhere), gathered from ZeRO-3 shards."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
    return engine.module.state_dict() if D.is_main() else None


def export_model(engine, tokenizer, output_dir: str, staging_dir: str | None) -> str:
    """Write the model (safetensors) and tokenizer with ``save_pretrained``; return its URI."""
    state = consolidated_state_dict(engine)
    target = storage.join(output_dir, "model")
    if D.is_main():
        with tempfile.TemporaryDirectory(dir=staging_dir) as tmp:
            local = storage.local_path(target) if storage.is_local(target) else tmp
            engine.module.save_pretrained(local, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(local)
            if not storage.is_local(target):
                storage.upload_dir(local, target)
    D.barrier()
    return target
