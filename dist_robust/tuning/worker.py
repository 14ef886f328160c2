"""Inside a Ray Train worker: restore the trial's checkpoint, run ``trainer.run``, report through Ray.

Ray Train has already created the process group; the trainer's ``deepspeed.init_distributed()``
reuses it. Every rank reports every checkpoint with a share of the files its node holds and no
earlier node uploads (its ranks' ZeRO shards; node 0 also the model states and the tokenizer), and
Ray merges the uploads into one checkpoint directory, so a checkpoint holds every shard and any
later attempt, node or PBT clone can resume.

Layout of a reported checkpoint::

    step-00000004/   the DeepSpeed tag just saved (every rank's files)
    best-00000002/   the best-so-far tag, when the run keeps one (its final evaluation loads it)
    best             the pointer file naming it
    tokenizer/       a tokenizer trained by the run (built-in model configs)
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from typing import Any

from dist_robust.infra import distributed as D
from dist_robust.run import faults
from dist_robust.run.callbacks import Callback
from dist_robust.run.tags import BEST, BEST_PREFIX, LATEST, read_pointer
from dist_robust.config.run_config import RunConfig
from dist_robust.infra.toolchain import use_environment_build_cache

log = logging.getLogger(__name__)

RESTORED = ".restored-from"  # names the Ray checkpoint a local checkpoints/ dir was rebuilt from


def train_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train loop: one ``trainer.run`` that resumes from the trial's latest checkpoint."""
    import ray
    import ray.train

    from dist_robust.run import trainer

    use_environment_build_cache()
    os.environ.update(loop_config["env"].value)
    trial_cfg: RunConfig = loop_config["cfg"].value
    # One working directory per node, as on machines with local disks (also when scratch is shared).
    scratch, segment = os.path.split(trial_cfg.train.output_dir.rstrip("/"))
    node = {"train.output_dir": os.path.join(scratch, ray.util.get_node_ip_address(), segment)}
    checkpoint = ray.train.get_checkpoint() or _initial(loop_config.get("initial_checkpoint"))
    if checkpoint is not None:
        restore_checkpoint(checkpoint, node["train.output_dir"])
        node["train.resume"] = "auto"
    else:  # the trial's own directory: an attempt that failed before its first Ray checkpoint left nothing to keep
        node["train.overwrite"] = True
    copies = loop_config.get("augment_copies")
    if copies:
        node.update(offline_augment(trial_cfg.with_values(node), int(copies)))
    cfg = trial_cfg.with_values(node)  # the trial's config is not changed: this node's is a copy
    from dist_robust.tuning.cleanup import PG_KEY, current_placement_group_id

    trial = RayTrial(cfg.train.output_dir, {"num_nodes": _num_nodes(), PG_KEY: current_placement_group_id()},
                     check_preemption=cfg.train.preempt_grace > 0)
    trainer.run(cfg, callbacks=[trial])


def _initial(uri: str | None):
    """The checkpoint a new PBT segment starts from (another trial's), when given."""
    from ray.train import Checkpoint

    return Checkpoint(uri) if uri else None


def _num_nodes() -> int:
    """How many nodes this trial's workers span."""
    import ray.train
    import torch.distributed as dist

    node = ray.train.get_context().get_node_rank()
    if not dist.is_initialized():
        return 1
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def checkpoint_files(tag_dir: str, output_dir: str) -> dict[str, str]:
    """What this node holds of a reported checkpoint: name inside the Ray checkpoint -> local file.

    The tag just saved, the best-so-far tag and its pointer (when the run keeps one), and the
    tokenizer a built-in model's run trained.
    """
    root = os.path.dirname(tag_dir.rstrip("/"))
    sources = {os.path.basename(tag_dir.rstrip("/")): tag_dir, "tokenizer": os.path.join(output_dir, "tokenizer")}
    best = read_pointer(os.path.join(root, BEST))  # a tag of ours, or CheckpointError: never a path elsewhere
    if best:
        sources[best] = os.path.join(root, best)
    files = {BEST: os.path.join(root, BEST)} if best else {}
    for name, src in sources.items():
        for parent, _, names in os.walk(src):
            for f in names:
                path = os.path.join(parent, f)
                files[os.path.join(name, os.path.relpath(path, src))] = path
    return files


def assign_uploads(listings: list[tuple[str, dict[str, str]]]) -> list[dict[str, str]]:
    """Which files each rank uploads, from every rank's ``(node, checkpoint_files(...))`` in rank order.

    Every file is uploaded exactly once, by the first node (in rank order) that holds it: nodes with
    their own disks each hold a copy of rank 0's model states, and node 0 uploads those. A node's
    share is spread over its ranks, largest files first to the rank with the fewest bytes so far,
    so the uploads run in parallel as the ranks' own shards did. Which rank wrote which file is
    never read from DeepSpeed's file names.
    """
    ranks_of: dict[str, list[int]] = {}
    for r, (node, _) in enumerate(listings):
        ranks_of.setdefault(node, []).append(r)
    out: list[dict[str, str]] = [{} for _ in listings]
    seen: set[str] = set()
    for ranks in ranks_of.values():
        files = listings[ranks[0]][1]
        sizes = {n: _size(files[n]) for n in files if n not in seen}
        load = dict.fromkeys(ranks, 0)
        for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
            r = min(ranks, key=lambda k: (load[k], k))
            out[r][name] = files[name]
            load[r] += sizes[name]
        seen.update(files)
    return out


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def stage_node_files(tag_dir: str, output_dir: str) -> str | None:
    """Hard-link (or copy) the files this rank uploads for a checkpoint into a staging directory for Ray.

    Collective: every rank reports every checkpoint (see :func:`assign_uploads`). Returns the
    directory, or None when this rank uploads nothing.
    """
    node = f"{socket.gethostname()}:{os.path.realpath(output_dir)}"
    mine = assign_uploads(D.gather_objects((node, checkpoint_files(tag_dir, output_dir))))[D.rank()]
    if not mine:
        return None
    staging = os.path.join(output_dir, ".ray-upload", f"rank-{D.rank()}")
    shutil.rmtree(staging, ignore_errors=True)
    for name, path in mine.items():
        _link_or_copy(path, os.path.join(staging, name))
    return staging


def _link_or_copy(src: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


class RayTrial(Callback):
    """The trainer's callback in a Ray Train worker: metrics from every rank and each rank's checkpoint files
    through ``ray.train.report``, and Ray Train's preemption notice.

    When a node of this trial is about to be reclaimed (a spot instance, a drained node), Ray Train tells
    every worker (``ray.train.get_preemption_info``, asked after every step: a barrier over the trial's
    workers). The step just done is then checkpointed and reported at once, and training goes on until the
    node is gone: Ray Train restarts the workers on the nodes left and they continue from that step, not
    from the last periodic checkpoint. ``--preempt-grace 0`` turns the question off.
    """

    def __init__(self, output_dir: str, extra: dict[str, Any], check_preemption: bool = True):
        self.output_dir, self.extra = output_dir, extra
        self.check_preemption = check_preemption
        self.noticed = None  # the preemption already checkpointed for

    def wants_checkpoint(self, step: int) -> bool:
        import ray.train

        if not self.check_preemption:
            return False
        info = ray.train.get_preemption_info()  # collective: rank 0's answer on every rank
        if info is None or info == self.noticed:
            return False
        self.noticed = info
        if D.is_main():
            deadline = f"in {info.deadline_ms / 1000 - time.time():.0f} s" if info.deadline_ms else "deadline unknown"
            log.warning("Ray Train: node(s) %s of this trial are being preempted (%s, ranks %s): checkpointing "
                        "step %d now, the restart continues from it", ", ".join(info.preempted_node_ids), deadline,
                        info.preempted_ranks, step)
        return True

    def on_checkpoint(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        staging = stage_node_files(checkpoint_dir, self.output_dir) if checkpoint_dir else None
        try:
            checkpoint = ray.train.Checkpoint.from_directory(staging) if staging else None
            ray.train.report({**metrics, **self.extra}, checkpoint=checkpoint)
        finally:
            if staging:
                shutil.rmtree(staging, ignore_errors=True)
        if checkpoint_dir:
            faults.after_ray_checkpoint(int(metrics["step"]))


def restore_checkpoint(checkpoint, output_dir: str) -> None:
    """Rebuild ``<output_dir>/checkpoints`` (and the tokenizer) from a Ray checkpoint.

    Each node's local rank 0 copies it (global rank 0 first, so nodes sharing a filesystem copy
    once); afterwards ``--resume auto`` finds the tag through ``checkpoints/latest``.
    """
    root = os.path.join(output_dir, "checkpoints")
    with D.main_first():
        if D.local_rank() == 0 and _read(os.path.join(root, RESTORED)) != checkpoint.path:
            _materialize(checkpoint, output_dir, root)
    D.barrier()


def _materialize(checkpoint, output_dir: str, root: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".restore-", dir=output_dir)
    try:
        checkpoint.to_directory(tmp)
        tags = sorted(n for n in os.listdir(tmp) if n.startswith("step-"))
        if len(tags) != 1:
            raise RuntimeError(f"checkpoint {checkpoint.path} holds tags {tags}: expected one step-* directory")
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        for name in (tags[0], *(n for n in os.listdir(tmp) if n.startswith(BEST_PREFIX)), BEST):
            if os.path.exists(os.path.join(tmp, name)):
                shutil.move(os.path.join(tmp, name), os.path.join(root, name))
        if os.path.isdir(os.path.join(tmp, "tokenizer")):
            shutil.rmtree(os.path.join(output_dir, "tokenizer"), ignore_errors=True)
            shutil.move(os.path.join(tmp, "tokenizer"), os.path.join(output_dir, "tokenizer"))
        _write(os.path.join(root, LATEST), tags[0])
        _write(os.path.join(root, RESTORED), checkpoint.path)
        log.info("restored %s from %s", tags[0], checkpoint.path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def offline_augment(cfg: RunConfig, copies: int) -> dict[str, str]:
    """``copies`` synonym-substituted copies of every pair (``dist-robust augment``), made once per node: the
    config values that train on them."""
    from dist_robust.data.augment import augment_main

    d = cfg.data
    out = os.path.join(os.path.dirname(cfg.train.output_dir), "augmented",
                       f"{d.task}-c{copies}-p{d.synonym_prob}-s{cfg.train.seed}.tsv")
    with D.main_first(local=True):
        if D.local_rank() == 0 and not os.path.exists(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)
            tmp = f"{out}.{os.getpid()}.tsv"
            argv = ["--task", d.task, "--output", tmp, "--synonyms", d.synonyms, "--copies", str(copies),
                    "--synonym-prob", str(d.synonym_prob), "--seed", str(cfg.train.seed),
                    "--data-format", d.data_format]
            argv += ["--input", d.train_file] if d.train_file else []
            argv += ["--cache-dir", d.cache_dir] if d.cache_dir else []
            if augment_main(argv) != 0:
                raise RuntimeError(f"dist-robust augment {' '.join(argv)} failed")
            os.replace(tmp, out)
    return {"data.train_file": out, "data.augment": "none"}


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
