"""What a run holds: what is built once before the first step (:class:`Setup`), and what a checkpoint carries so
a resumed run continues exactly (:class:`State`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dist_robust.config.run_config import RunConfig
from dist_robust.data.augment import SynonymAugmenter
from dist_robust.data.pipeline import Collator
from dist_robust.data.tasks import TaskData
from dist_robust.infra.clock import StartupClock
from dist_robust.infra.zero import zero3_context
from dist_robust.objectives import EmbeddingPerturbation, Objective
from dist_robust.run import evaluate as E
from dist_robust.run.checkpointing import CheckpointStore
from dist_robust.run.plan import Plan
from dist_robust.run.tracking import NullTracker, Tracker


@dataclass
class Setup:
    """Everything built once before the first step."""

    plan: Plan  # the config, the resolved ds_config and the resume point, frozen
    data: TaskData
    tokenizer: Any
    collator: Collator
    train_set: Any
    dev: E.EvalGroups
    engine: Any
    objective: Objective
    perturbation: EmbeddingPerturbation
    store: CheckpointStore
    zero3: zero3_context
    clock: StartupClock
    augmenter: SynonymAugmenter | None = None
    tracker: Tracker = field(default_factory=NullTracker)
    # Per-language dev accuracy by step, measured by this process on ``dev`` (not carried across a
    # resume: a later process may have other evaluation sets).
    dev_measured: dict[int, dict[str, float]] = field(default_factory=dict)
    save_seconds: float | None = None  # how long this process's last checkpoint took

    @property
    def cfg(self) -> RunConfig:
        return self.plan.cfg

    @property
    def ds_config(self) -> Mapping:
        return self.plan.ds_config


@dataclass
class State:
    """What a checkpoint's client_state carries so a resumed run continues exactly."""

    step: int = 0
    batch_index: int = 0
    train_losses: list[float] = field(default_factory=list)
    dev_history: list[dict] = field(default_factory=list)
    best_score: float = -1.0
    best_step: int = -1
    skipped_steps: int = 0
    max_delta_norm: float = 0.0  # largest perturbation norm an objective reported (rank mean of batch maxima)
    seconds_per_step: float = float("nan")  # median over this session's steps after the first
    mlflow_run_id: str | None = None
