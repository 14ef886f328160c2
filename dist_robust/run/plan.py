"""The plan a run follows: resolved once from the validated config, the world and the checkpoint it resumes
from, then frozen.

Validation (:func:`dist_robust.config.validation.validate`) only reads the config. :func:`resolve` is the one place
that derives what the run does from it (the ds_config with its "auto" values filled, the accumulation a
resume on another number of ranks needs, node-local checkpoint writes); nothing changes the plan afterwards
(:meth:`dist_robust.config.run_config.RunConfig.frozen`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from dist_robust.infra import distributed as D
from dist_robust.run.checkpointing import CheckpointStore, check_stage, read_layout, resolve_resume
from dist_robust.config.run_config import ConfigError, RunConfig, read_only, thawed
from dist_robust.infra.zero import zero_stage
from dist_robust.config.ds_config import resolve_ds_config, user_grad_accum

log = logging.getLogger(__name__)


@dataclass
class ResumePoint:
    """A verified checkpoint to continue from, found before the engine is built."""

    root: str  # where it lives (for messages)
    tag: str
    local_root: str  # this node's verified copy
    layout: dict | None  # the writing run's world size and batch sizes (None: older checkpoints)


def find_resume(cfg: RunConfig, store: CheckpointStore) -> ResumePoint | None:
    """The checkpoint ``--resume`` names, fetched to every node and verified, or None."""
    found = resolve_resume(cfg.train.resume, store)
    if found is None:
        if cfg.train.resume:
            log.info("--resume %s: no checkpoint yet, starting from step 0", cfg.train.resume)
        return None
    root, tag = found
    local_root = store.fetch(root, tag, trust=cfg.train.trust_checkpoint)
    return ResumePoint(root, tag, local_root, read_layout(local_root, tag))


def _for_resume(cfg: RunConfig, resume: ResumePoint | None) -> tuple[RunConfig, dict]:
    """The run's config and ds_config; resuming on another number of ranks keeps the checkpoint's global batch
    (a copy of the config with the accumulation that does; ``cfg`` itself is not changed).

    The data position then carries over exactly (every optimizer step reads the same examples),
    with gradient accumulation making up for the ranks that came or went.
    """
    ds = resolve_ds_config(cfg, D.world_size())
    layout = resume.layout if resume is not None else None
    if layout is not None:  # before the model is built: a stage the checkpoint cannot load at fails now
        check_stage(layout, zero_stage(ds), f"{resume.root}/{resume.tag}")
    if layout is None or layout["world_size"] == D.world_size():
        return cfg, ds
    micro, old_world = ds["train_micro_batch_size_per_gpu"], layout["world_size"]
    src = cfg.ds_config_path or "the ds_config"
    if micro != layout["micro_batch_size"]:
        raise ConfigError([f"train.micro_batch_size (--micro-batch-size) = {micro}: the checkpoint {resume.root}/"
                           f"{resume.tag} was trained with micro-batches of {layout['micro_batch_size']}; resuming "
                           f"on another number of ranks needs the same micro-batch size"])
    examples = layout["micro_batch_size"] * layout["grad_accum"] * old_world
    accum, rest = divmod(examples, micro * D.world_size())
    if rest or accum < 1:
        raise ConfigError([f"the checkpoint {resume.root}/{resume.tag} was trained with {examples} examples per "
                           f"step ({old_world} ranks x {layout['micro_batch_size']} x {layout['grad_accum']} "
                           f"accumulated); {D.world_size()} ranks x {micro} cannot make that up: resume on a number "
                           f"of ranks that divides {examples // micro}"])
    if accum != user_grad_accum(ds, cfg.objective):
        if cfg.ds_config.get("gradient_accumulation_steps", "auto") != "auto":
            raise ConfigError([f"{src}: gradient_accumulation_steps = {cfg.ds_config['gradient_accumulation_steps']}"
                               f": resuming a {old_world}-rank checkpoint on {D.world_size()} ranks needs {accum} "
                               f"to keep its {examples} examples per step; set it to \"auto\" or {accum}"])
        log.warning("resuming a %d-rank checkpoint on %d ranks: gradient accumulation %d (was %d) keeps its %d "
                    "examples per step", old_world, D.world_size(), accum, layout["grad_accum"], examples)
        cfg = cfg.with_values({"train.grad_accum": accum})
        ds = resolve_ds_config(cfg, D.world_size())
    return cfg, ds


@dataclass(frozen=True)
class Plan:
    """What the run follows."""

    cfg: RunConfig  # frozen (its ds_config is the file's, with "auto" values)
    ds_config: Mapping  # resolved, read-only; the engine gets a copy (:meth:`engine_config`)
    batches_per_step: int  # data batches per optimizer step on each rank (the accumulation, without FreeLB's K)
    resume: ResumePoint | None  # the verified checkpoint it continues from

    def engine_config(self) -> dict:
        """A plain copy of the ds_config for ``deepspeed.initialize`` (which writes into the dict it gets)."""
        return thawed(self.ds_config)


def resolve(cfg: RunConfig, store: CheckpointStore, node_local: bool) -> Plan:
    """Collective (the resume point is fetched to every node): the plan for ``cfg`` on this world."""
    resume = find_resume(cfg, store)
    cfg, ds = _for_resume(cfg, resume)
    if node_local:  # DeepSpeed then writes the model states on every node, not on rank 0 alone
        ds.setdefault("checkpoint", {})["use_node_local_storage"] = True
    D.settle_zero3_host_memory(ds)  # gathered parameters would otherwise pile up in the heap
    return Plan(cfg.frozen(), read_only(ds), user_grad_accum(ds, cfg.objective), resume)
