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

Each tag also holds ``layout.json`` (ranks, batch sizes, ZeRO stage), so a run on another number
of ranks can plan before building its engine and load the tag through DeepSpeed's universal
format (:func:`load_tag`). When nodes do not share the output directory (node-local disks),
every node keeps complete checkpoints of its own (:meth:`CheckpointStore.detect_node_local`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

from dist_robust.infra import distributed as D
from dist_robust.run import faults
from dist_robust.infra import storage
from dist_robust.model.build import join_word_embedding_blocks
from dist_robust.run.publishing import Publisher
from dist_robust.run.tags import BEST, BEST_PREFIX, LATEST, MANIFEST, CheckpointError, checked_tag, read_pointer
from dist_robust.infra.zero import disk_failure, save_checkpoint_or_failure

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "dist-robust-checkpoint/1"
LAYOUT = "layout.json"
UNIVERSAL_DIR = "universal-checkpoints"


class CheckpointStore:
    """DeepSpeed checkpoints of one run: saved on every rank into the publisher's local root, completed
    (layout, manifest), pointed to, pruned, verified before every load.

    Where they go from there (a remote output directory: staging, retries, the store's pointers) is the
    :class:`~dist_robust.run.publishing.Publisher`'s job; :meth:`save` hands each finished tag over to it.
    """

    def __init__(self, output_dir: str, staging_dir: str | None, keep: int, publish_timeout: float = 600.0):
        self.publisher = Publisher(output_dir, staging_dir, publish_timeout)
        self.keep = keep
        self.node_local = False  # set by detect_node_local(): nodes write to their own disks

    @property
    def output_dir(self) -> str:
        return self.publisher.output_dir

    @property
    def remote(self) -> bool:
        return self.publisher.remote

    @property
    def local_root(self) -> str:
        """This node's checkpoints directory (the output directory's, or its staging copy)."""
        return self.publisher.local_root

    @property
    def root(self) -> str:
        """The output directory's checkpoints folder (on the store, when remote)."""
        return self.publisher.root

    def detect_node_local(self) -> bool:
        """Find out (collectively, before the engine exists) whether nodes share the output directory.

        Rank 0 leaves a probe file there and every node's first rank looks for it in its own
        ``--output-dir``. Where some node cannot see it (node-local disks), every node keeps a
        complete checkpoint of its own: DeepSpeed writes the model states on each node
        (``checkpoint.use_node_local_storage``, which the caller sets), and manifests, layouts and
        pointers are written, and old tags pruned, on each node.
        """
        if self.remote or D.world_size() == 1:
            return False
        root = storage.local_path(self.output_dir)
        probe = os.path.join(root, f".node-probe-{D.from_main(os.urandom(8).hex())}")
        if D.is_main():
            storage.write_text(probe, "")
        D.barrier()
        seen = D.gather_objects(os.path.exists(probe) if D.local_rank() == 0 else True)
        D.barrier()
        if D.is_main():
            os.remove(probe)
        self.node_local = not all(seen)
        if self.node_local:
            log.info("--output-dir %s is not shared by all nodes: each node keeps complete checkpoints of its own",
                     self.output_dir)
        return self.node_local

    def _writes_pointers(self) -> bool:
        """Rank 0 writes manifests and pointers; with node-local disks every node's first rank does."""
        return D.is_main() or (self.node_local and D.local_rank() == 0)

    def save(self, engine, tag: str, client_state: dict, pointer: str = LATEST, layout: dict | None = None) -> str:
        """Save on every rank, complete the tag (layout, manifest), move ``pointer`` to it, prune, publish.

        ``layout`` (world size, batch sizes) is written beside the engine's files as
        ``layout.json``, so a resume can plan for another world size before building its engine.
        Returns the local directory of the tag (this node's files).
        """
        local_tag = os.path.join(self.local_root, tag)
        if D.local_rank() == 0:  # what a torn earlier save of this tag left behind
            shutil.rmtree(local_tag, ignore_errors=True)
        D.barrier()
        failure = save_checkpoint_or_failure(engine, self.local_root, tag, client_state)
        writer = self._writes_pointers()
        if failure is None and layout is not None and writer:
            failure = _written(lambda: storage.write_text(os.path.join(local_tag, LAYOUT),
                                                          json.dumps(layout, indent=1, sort_keys=True)))
        faults.inside_save(tag)
        self._stop_on_failure(tag, failure)  # (collective, as the barrier it stands for)
        # Each node hashes what it wrote (nodes may have their own disks); the manifest is the union.
        files = _describe_files(local_tag) if D.local_rank() == 0 else {}
        manifest = {"format": MANIFEST_FORMAT, "tag": tag, "files": {}}
        for node_files in D.gather_objects(files):
            for rel, described in node_files.items():
                if manifest["files"].setdefault(rel, described) != described:  # (model states on every node)
                    raise CheckpointError(f"checkpoint {tag}: the nodes wrote different contents for {rel}, so no "
                                          f"manifest can vouch for every copy; this is a bug, please report it")
        failure = _written(lambda: storage.write_text(os.path.join(local_tag, MANIFEST),
                                                      json.dumps(manifest, indent=1, sort_keys=True))) if writer else None
        self._stop_on_failure(tag, failure)
        if writer:
            if os.path.isdir(os.path.join(self.local_root, pointer)):  # a `best` directory of an older version
                shutil.rmtree(os.path.join(self.local_root, pointer))
            failure = _written(lambda: storage.write_text(os.path.join(self.local_root, pointer), tag))
        # every node's pointer moved before any node deletes what an old one named
        self._stop_on_failure(tag, failure)
        stale = self._stale() if writer else []
        if self.remote:  # staging: every node prunes its part
            stale = D.from_main(stale)
        if writer or (self.remote and D.local_rank() == 0):
            for old in stale:
                shutil.rmtree(os.path.join(self.local_root, old), ignore_errors=True)
        D.barrier()
        self.publisher.saved(tag, stale)
        log.info("checkpoint %s saved to %s (%s)", tag,
                 self.root if not self.publisher.unpublished else self.local_root, pointer)
        return local_tag

    def _stop_on_failure(self, tag: str, failure: str | None) -> None:
        """Collective: when a write of ``tag`` failed on any rank, delete what it left and raise the same
        :class:`CheckpointError` everywhere. The pointers and the earlier checkpoints are untouched."""
        failures = [f for f in D.gather_objects(failure) if f]
        if not failures:
            return
        # rank 0 measures before any node's first rank removes the tag (reading while another rank deletes races)
        written = D.from_main(_bytes_under(os.path.join(self.local_root, tag)) if D.is_main() else 0)
        if D.local_rank() == 0:
            shutil.rmtree(os.path.join(self.local_root, tag), ignore_errors=True)  # the space the torn tag took
        D.barrier()
        raise CheckpointError(self._no_room(tag, failures[0], written))

    def _no_room(self, tag: str, failure: str, written: int) -> str:
        """What failed, the free space against what a checkpoint takes, and where a resume continues."""
        latest = read_pointer(os.path.join(self.local_root, LATEST))
        size = _manifest_size(os.path.join(self.local_root, latest)) if latest else None
        free = shutil.disk_usage(self.local_root).free if os.path.isdir(self.local_root) else 0
        need = f"a checkpoint of this run takes {_gib(size)}" if size else \
            f"a checkpoint of this run takes more than the {_gib(written)} written before the failure"
        more = f"; free at least {_gib(size - free)} more" if size and size > free else ""
        where = (f"{latest} and the pointers are untouched: once there is room, rerun the same command with "
                 f"--resume auto to continue from it") if latest else \
            "no earlier checkpoint: once there is room, rerun the same command"
        return (f"could not write checkpoint {tag} to {self.local_root} ({failure}); the disk has {_gib(free)} free "
                f"and {need}{more}. The partly written {tag} was removed; {where}")

    def _stale(self) -> list[str]:
        """Local tags to delete: all but the newest ``keep`` periodic ones and the one ``best`` names."""
        names = sorted(os.listdir(self.local_root)) if os.path.isdir(self.local_root) else []
        periodic = [t for t in names if t.startswith("step-")]
        best = read_pointer(os.path.join(self.local_root, BEST))
        return periodic[: max(0, len(periodic) - self.keep)] + [
            t for t in names if t.startswith(BEST_PREFIX) and t != best]

    def pointed(self, pointer: str) -> str | None:
        """The tag a pointer file (``latest``, ``best``) names for this run, or None.

        With a remote store, the staged pointer: staging starts as a copy of the store's pointers
        when the run resumes from it (:meth:`fetch`), and this run moves them first, so reading
        them needs no store (which may be away).
        """
        if self.remote:
            return read_pointer(os.path.join(self.local_root, pointer))
        return self.publisher.published(pointer)

    def agreed(self, pointer: str) -> str | None:
        """The tag a pointer names, the same on every rank (collective).

        Remote: rank 0's reading (only it stages pointers). Node-local disks: a kill between two
        nodes' pointer writes leaves them one save apart, and the older tag is complete on every
        node (pruning waits for all pointers).
        """
        if self.remote:
            return D.from_main(self.pointed(pointer) if D.is_main() else None)
        if not self.node_local:
            return self.pointed(pointer)
        tags = {t for t in D.gather_objects(self.pointed(pointer)) if t is not None}
        return min(tags) if tags else None

    def latest_tag(self) -> str | None:
        """The newest complete checkpoint of the output directory (the store's, when remote)."""
        if self.remote:
            return D.from_main(self.publisher.published(LATEST) if D.is_main() else None)
        return self.agreed(LATEST)

    def fetch(self, source_root: str, tag: str, trust: bool = False) -> str:
        """Make ``source_root/tag`` available locally on every node and verify it; return the local root.

        Raises :class:`CheckpointError` on every rank when the manifest is missing (unless
        ``trust``) or a file it lists is missing or differs.
        """
        local = self.publisher.fetch(source_root, tag)
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
    pointer = storage.join(resume, LATEST)
    if storage.exists(pointer):
        return resume, checked_tag(storage.read_text(pointer).strip(), pointer)
    if storage.exists(resume) and any(n.startswith(("mp_rank_", "zero_pp_rank_")) for n in storage.listdir(resume)):
        parent, _, tag = resume.rstrip("/").rpartition("/")
        return parent, tag
    raise CheckpointError(f"--resume {resume}: no checkpoint there (expected a directory with a "
                            f"'{LATEST}' file, or a checkpoint tag directory holding mp_rank_* or zero_pp_rank_* files)")


def _written(work) -> str | None:
    """``work()`` (a file write); a failed write is returned as text, other errors raised."""
    try:
        work()
    except Exception as err:  # noqa: BLE001 - only write failures are answered here
        if not disk_failure(err):
            raise
        return f"{type(err).__name__}: {err}"
    return None


def _bytes_under(folder: str) -> int:
    """The bytes of the files under ``folder`` (what a failed save left there)."""
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(folder) for n in names)


def _manifest_size(tag_dir: str) -> int | None:
    """The bytes a complete checkpoint holds, from its manifest (None when it has none)."""
    try:
        with open(os.path.join(tag_dir, MANIFEST), encoding="utf-8") as f:
            return sum(entry["size"] for entry in json.load(f)["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _describe_files(tag_dir: str, only: set[str] | None = None) -> dict[str, dict]:
    """{relative path: {size, sha256}} of the files under ``tag_dir`` (all, or those in ``only``)."""
    out = {}
    for root, _, names in os.walk(tag_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, tag_dir).replace(os.sep, "/")
            if rel != MANIFEST and (only is None or rel in only):
                out[rel] = {"size": os.path.getsize(path), "sha256": storage.file_sha256(path)}
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


def read_layout(local_root: str, tag: str) -> dict | None:
    """The ``layout.json`` of a fetched tag (rank 0 reads it), on every rank; None when absent."""
    layout = None
    path = os.path.join(local_root, tag, LAYOUT)
    if D.is_main() and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            layout = json.load(f)
    return D.from_main(layout)


def to_universal(local_root: str, tag: str, world_size: int) -> str:
    """Convert ``local_root/tag``, written by ``world_size`` ranks, to DeepSpeed's universal format.

    Each node's first rank converts its copy with ``deepspeed.checkpoint.ds_to_universal``
    (files only, no process group); returns the root that holds the converted ``tag``, which
    any number of ranks can load with ``checkpoint.load_universal``. Every old rank's optimizer
    shard must be on each node: node-local checkpoints from several nodes cannot be merged here.
    """
    source = os.path.join(local_root, tag)
    out_root = os.path.join(os.path.dirname(local_root), UNIVERSAL_DIR)
    problem = None
    if D.local_rank() == 0:
        shards = [n for n in os.listdir(source) if n.startswith(("zero_pp_rank_", "bf16_zero_pp_rank_"))
                  and n.endswith("optim_states.pt")]
        if len(shards) != world_size:
            problem = (f"this node holds {len(shards)} of the {world_size} optimizer shards of {source}; resuming on "
                       f"another number of ranks needs all of them on every node: put --output-dir on shared or "
                       f"remote storage, or resume on {world_size} ranks")
        else:
            target = os.path.join(out_root, tag)
            shutil.rmtree(target, ignore_errors=True)
            workers = str(max(1, min(4, os.cpu_count() or 1)))
            proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                   source, "--output_folder", target, "--inject_missing_state",
                                   "--num_extract_workers", workers, "--num_merge_workers", workers],
                                  capture_output=True, text=True)
            if proc.returncode:
                problem = f"converting {source} to a universal checkpoint failed:\n{proc.stderr[-3000:]}"
    problems = [p for p in D.gather_objects(problem) if p]
    if problems:
        raise CheckpointError(problems[0])
    return out_root


FORMATS = {0: 0, 1: 1, 2: 1, 3: 3}  # ZeRO stage -> its checkpoint format (ZeRO-1 and 2 share one)


def check_stage(layout: dict, stage: int, shown: str) -> None:
    """Raise CheckpointError when a checkpoint written at ``layout``'s ZeRO stage cannot load at ``stage``.

    A checkpoint loads at its own ZeRO stage, or between ZeRO-1 and 2 (one format); DeepSpeed 0.19
    loads no other stage's, even through the universal format (ZeRO-3 looks for per-rank
    model-state files a ZeRO-2 checkpoint does not have).
    """
    old_stage = layout.get("zero_stage", stage)  # (a layout from before stages were recorded: as this run's)
    if FORMATS.get(old_stage) != FORMATS.get(stage):
        fits = " or ".join(str(s) for s in sorted(FORMATS) if FORMATS[s] == FORMATS.get(old_stage))
        raise CheckpointError(f"checkpoint {shown} was written at ZeRO-{old_stage} and this run is at ZeRO-{stage}: "
                              f"DeepSpeed loads a checkpoint only at a stage of its format (ZeRO-0, ZeRO-1/2, "
                              f"ZeRO-3); resume it with a ds_config at ZeRO-{fits}, e.g. --deepspeed "
                              f"ds_configs/zero{old_stage}.json (on any number of ranks)")


def load_tag(engine, local_root: str, tag: str, layout: dict | None, **kwargs) -> dict:
    """Load a verified tag into the engine, from any world size; return its client state.

    A tag written by another number of ranks with partitioned optimizer state (ZeRO 1-3) is
    converted to the universal format and loaded as such (DeepSpeed's ``checkpoint.load_universal``
    switch, set for this one load: the run's own checkpoints stay in the native format), then the
    conversion is deleted (it is as large as the optimizer state). ZeRO-0 checkpoints hold the
    whole optimizer state and load on any world size as they are. The tag must be of the engine's
    checkpoint format (:func:`check_stage`, which the trainer calls before it builds the model).
    """
    old_world = layout["world_size"] if layout else D.world_size()
    if old_world == D.world_size() or engine.zero_optimization_stage() == 0:
        _, client_state = engine.load_checkpoint(local_root, tag=tag, **kwargs)
        return client_state
    universal_root = to_universal(local_root, tag, old_world)
    engine._config.load_universal_checkpoint = True
    try:
        _, client_state = engine.load_checkpoint(universal_root, tag=tag, **kwargs)
    finally:
        engine._config.load_universal_checkpoint = False
    D.barrier()
    if D.local_rank() == 0:
        shutil.rmtree(universal_root, ignore_errors=True)
    return client_state


def consolidated_state_dict(engine) -> dict | None:
    """The full model state dict on rank 0 (None elsewhere), gathered from ZeRO-3 shards."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
    return engine.module.state_dict() if D.is_main() else None


def export_model(engine, tokenizer, store: CheckpointStore) -> str:
    """Write the model (safetensors) and tokenizer with ``save_pretrained`` and publish them; return the URI."""
    from transformers.utils import logging as hf_logging

    state = consolidated_state_dict(engine)
    if D.is_main():
        hf_logging.disable_progress_bar()  # a bar for writing one file: noise on the run's console
        state = join_word_embedding_blocks(engine.module, state)  # the names from_pretrained expects
        local = os.path.join(store.publisher.mirror, "model")
        engine.module.save_pretrained(local, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(local)
        store.publisher.publish_dir("model")
    D.barrier()
    return storage.join(store.output_dir, "model")
