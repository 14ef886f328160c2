"""DeepSpeed checkpoints on any fsspec store: save locally, publish, resume, export.

Layout under ``<output-dir>/checkpoints``: one directory per tag (``step-00000300``,
``best-00000200``) exactly as ``engine.save_checkpoint`` writes it, plus two pointer files:
``latest`` names the newest complete periodic checkpoint, ``best`` the checkpoint with the
best source-language dev accuracy. Every tag ends with ``manifest.json`` (each file's size
and sha256), written after all its files are in place; a pointer moves only after the
manifest, and old tags are deleted only after the pointer moved, so a kill at any moment
leaves both pointers naming complete checkpoints (on object stores too, where a directory
cannot be renamed atomically).

The manifest is verified on every node before DeepSpeed loads a tag. That load unpickles
(``torch.load(weights_only=False)``), so a checkpoint can run code: one without a manifest
(not written by dist-robust, or torn) is refused unless the user trusts it
(``--trust-checkpoint``). The manifest proves the files are the ones dist-robust wrote, not
who wrote them: only resume from storage you control.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

from dist_robust import distributed as D
from dist_robust import faults
from dist_robust import storage

log = logging.getLogger(__name__)

LATEST = "latest"
BEST = "best"
BEST_PREFIX = "best-"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dist-robust-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, altered, or not trusted."""


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
        local_tag = os.path.join(self.local_root, tag)
        if D.local_rank() == 0:  # what a torn earlier save of this tag left behind
            shutil.rmtree(local_tag, ignore_errors=True)
        D.barrier()
        engine.save_checkpoint(self.local_root, tag=tag, client_state=client_state, save_latest=False)
        faults.inside_save(tag)
        D.barrier()
        if self.remote and D.local_rank() == 0:
            storage.remove(storage.join(self.root, tag))
            storage.upload_dir(local_tag, storage.join(self.root, tag))
        # Each node hashes what it wrote (nodes may have their own disks); rank 0 writes the union.
        files = _describe_files(local_tag) if D.local_rank() == 0 else {}
        manifest = {"format": MANIFEST_FORMAT, "tag": tag, "files": {}}
        for node_files in D.gather_objects(files):
            manifest["files"].update(node_files)
        if D.is_main():
            text = json.dumps(manifest, indent=1, sort_keys=True)
            storage.write_text(storage.join(self.root, tag, MANIFEST), text)
            if self.remote:
                _write_local(os.path.join(local_tag, MANIFEST), text)
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

    def fetch(self, source_root: str, tag: str, trust: bool = False) -> str:
        """Make ``source_root/tag`` available locally on every node and verify it; return the local root.

        Raises :class:`CheckpointError` on every rank when the manifest is missing (unless
        ``trust``) or a file it lists is missing or differs.
        """
        if storage.is_local(source_root):
            local = storage.local_path(source_root)
        else:
            local = self.local_root
            if D.local_rank() == 0:
                target = os.path.join(local, tag)
                shutil.rmtree(target, ignore_errors=True)
                storage.download_dir(storage.join(source_root, tag), target)
            D.barrier()
        verify(local, tag, trust, shown=storage.join(source_root, tag))
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
    raise CheckpointError(f"--resume {resume}: no checkpoint there (expected a directory with a "
                            f"'{LATEST}' file, or a checkpoint tag directory holding mp_rank_* or zero_pp_rank_* files)")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _describe_files(tag_dir: str, only: set[str] | None = None) -> dict[str, dict]:
    """{relative path: {size, sha256}} of the files under ``tag_dir`` (all, or those in ``only``)."""
    out = {}
    for root, _, names in os.walk(tag_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, tag_dir).replace(os.sep, "/")
            if rel != MANIFEST and (only is None or rel in only):
                out[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    return out


def verify(local_root: str, tag: str, trust: bool = False, shown: str | None = None) -> None:
    """Check ``local_root/tag`` against its manifest on every node; raise the same error on every rank.

    Nodes may hold different parts of a checkpoint (node-local disks): each file the manifest
    lists must be present, with its size and sha256, on at least one node and differ on none.
    """
    tag_dir, shown = os.path.join(local_root, tag), shown or os.path.join(local_root, tag)
    leader = D.local_rank() == 0
    found = None
    if leader and os.path.isfile(os.path.join(tag_dir, MANIFEST)):
        with open(os.path.join(tag_dir, MANIFEST), encoding="utf-8") as f:
            found = f.read()
    manifests = [m for m in D.gather_objects(found) if m is not None]
    if not manifests:
        if trust:
            log.warning("checkpoint %s has no %s: loading it unverified (--trust-checkpoint)", shown, MANIFEST)
            return
        raise CheckpointError(
            f"checkpoint {shown} has no {MANIFEST}: its save or upload was interrupted, or it was not written "
            f"by dist-robust. Loading a DeepSpeed checkpoint unpickles it (it can run code), so it is refused. "
            f"Resume from another checkpoint (--resume <checkpoints dir>/<tag>), or pass --trust-checkpoint if "
            f"you know where it comes from")
    try:
        manifest = json.loads(manifests[0])
        wanted = {rel: (f["size"], f["sha256"]) for rel, f in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {shown}: {MANIFEST} is unreadable ({err})") from None
    have = _describe_files(tag_dir, set(wanted)) if leader and os.path.isdir(tag_dir) else {}
    seen: dict[str, set] = {}
    for node in D.gather_objects(have):
        for rel, f in node.items():
            seen.setdefault(rel, set()).add((f["size"], f["sha256"]))
    missing = sorted(rel for rel in wanted if rel not in seen)
    altered = sorted(rel for rel in wanted if rel in seen and seen[rel] != {wanted[rel]})
    if missing or altered:
        parts = [f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                 for what, names in (("missing", missing), ("size or sha256 differs", altered)) if names]
        raise CheckpointError(f"checkpoint {shown} does not match its {MANIFEST} ({'; '.join(parts)}). "
                              f"Resume from another checkpoint (--resume <checkpoints dir>/<tag>)")


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
