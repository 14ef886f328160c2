"""One Tune trial: a Ray Train ``TorchTrainer`` with N DeepSpeed workers, run from a Tune function trainable.

Train V2 runs the workers, retries them from the last checkpoint (``FailureConfig(max_failures)``)
and persists every rank's checkpoint files. This module adds what Tune's schedulers need on top:

* every Train report is forwarded to Tune, with a small *pointer* checkpoint naming the Train
  checkpoint, so PBT can clone it into another trial and ``Tuner.restore`` can continue a trial;
* a trial is a sequence of *segments*, one Train run each: a restored trial continues its
  segment (Train resumes it from its own latest checkpoint), while a trial that PBT restarts
  from another trial's checkpoint, or with mutated hyperparameters, starts a new segment from
  that checkpoint, logged to a new MLflow child run (so no param value ever changes in a run).

Why not Ray's ``ray.tune.integration.ray_train.TuneReportCallback``: it hands Tune each report's
metrics with the Train checkpoint's *path* as a metric, never a Tune checkpoint (Ray 2.60), and
PBT exploits only trials that have Tune checkpoints; ``Tuner.restore`` of a PBT clone also needs
to know which segment it was in. Hence ``ForwardToTune``: the same hand-over from the Train
controller, plus the pointer checkpoint, reported from the trial's own thread as Tune requires.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray import tune
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue

from dist_robust.infra import storage
from dist_robust.config.run_config import RunConfig, set_key
from dist_robust.infra.redaction import sealed_config, sealed_env
from dist_robust.tuning import sweep_runs
from dist_robust.tuning.cleanup import RUN_KEY
from dist_robust.tuning.spec import SweepSpec
from dist_robust.tuning.worker import train_worker

POINTER = "pointer.json"


@dataclass
class TrialPlan:
    """What every trial of a sweep shares (sent to the trial actors)."""

    spec: SweepSpec
    train_storage: str  # Train runs live here, one directory per segment
    scratch_dir: str  # node-local working directories of the trials
    tracking: sweep_runs.SweepTracking | None
    use_gpu: bool = False  # one GPU per worker


@dataclass
class Segment:
    """A stretch of a trial trained as one Train run under one set of hyperparameters."""

    name: str
    generation: int  # how many PBT clones lie behind it
    initial_checkpoint: str | None  # another trial's checkpoint to start from (PBT)
    cloned_from_run: str | None  # the MLflow run of that checkpoint


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """Tune function trainable: train the trial's current segment, forwarding results to Tune."""
    ctx = tune.get_context()
    config = plain(config)
    segment = choose_segment(ctx.get_trial_id(), config, read_pointer(tune.get_checkpoint()))
    run_id = None
    if plan.tracking is not None:
        run_id = sweep_runs.child_run(plan.tracking, segment.name, _run_name(plan, ctx.get_trial_id(), segment),
                                      _child_tags(plan, ctx.get_trial_id(), segment))
    cfg = trial_run_config(plan, segment, config, run_id)
    trainer, queue = _torch_trainer(plan, segment, config, cfg)
    try:
        _forward(trainer, queue, _Pointer(plan, ctx.get_trial_id(), segment, config, run_id))
    finally:
        queue.shutdown()


def plain(config: dict[str, Any]) -> dict[str, Any]:
    """Sampled values as plain Python numbers (numpy scalars do not survive JSON)."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in config.items()}


def choose_segment(trial_id: str, config: dict[str, Any], pointer: dict | None) -> Segment:
    """Continue the segment the trial's latest checkpoint belongs to, or start a new one.

    A new segment starts when the checkpoint Tune hands over is another trial's or was trained
    with other hyperparameters: that is how a PBT exploit shows itself to a function trainable.
    """
    if pointer is None:
        return Segment(trial_id, 0, None, None)
    if pointer["trial_id"] == trial_id and pointer["config"] == config:
        return Segment(pointer["segment"], pointer["generation"], None, None)
    # Named after the checkpoint it starts from, so a restore before its first report finds it again.
    key = hashlib.sha1(pointer["checkpoint"].encode()).hexdigest()[:8]
    return Segment(f"{trial_id}-{key}", pointer["generation"] + 1, pointer["checkpoint"], pointer["mlflow_run_id"])


def trial_run_config(plan: TrialPlan, segment: Segment, config: dict[str, Any], run_id: str | None) -> RunConfig:
    """The base run config with the trial's values, its own working directory and MLflow run.

    Each worker puts it under its node's address (see ``worker.train_worker``).
    """
    cfg = copy.deepcopy(plan.spec.base)
    for key, value in config.items():
        if key in plan.spec.params and key != "augment.copies":
            set_key(cfg, key, value)
    cfg.train.output_dir = os.path.join(plan.scratch_dir, segment.name)
    cfg.train.resume = None
    cfg.train.log_model = False  # not a model copy in MLflow per trial: the sweep's checkpoints hold every trial's
    if plan.tracking is None:
        cfg.tracking.mlflow_uri = "none"
    else:
        cfg.tracking.mlflow_uri = plan.tracking.uri
        cfg.tracking.experiment = plan.tracking.experiment
        cfg.tracking.run_id = run_id
    return cfg


def _run_name(plan: TrialPlan, trial_id: str, segment: Segment) -> str:
    return f"{plan.spec.name}-{trial_id}" + (f"-g{segment.generation}" if segment.generation else "")


def _child_tags(plan: TrialPlan, trial_id: str, segment: Segment) -> dict[str, str]:
    base = plan.spec.base
    tags = {sweep_runs.SWEEP_TAG: plan.spec.name, "ray.trial_id": trial_id,
            "dist_robust.generation": str(segment.generation),
            "task": base.data.task, "objective": base.objective.name, **sweep_runs.selection_tags(plan.spec.metric)}
    if segment.cloned_from_run:
        tags["dist_robust.cloned_from_run"] = segment.cloned_from_run
    return tags


def _torch_trainer(plan: TrialPlan, segment: Segment, config: dict[str, Any],
                   cfg: RunConfig) -> tuple[TorchTrainer, Queue]:
    spec = plan.spec
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    keep = None if spec.scheduler["type"] == "pbt" else spec.keep_checkpoints  # PBT clones older checkpoints
    # Ray Train shows its train_loop_config on the dashboard's API: the config and the workers'
    # environment travel sealed (whole when unpickled, masked when printed).
    loop_config = {"cfg": sealed_config(cfg), "env": sealed_env(spec.worker_env),
                   "initial_checkpoint": segment.initial_checkpoint, "augment_copies": config.get("augment.copies")}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=spec.workers_per_trial, use_gpu=plan.use_gpu,
                                               resources_per_worker=_worker_resources(plan),
                                               placement_strategy=spec.placement),
        run_config=ray.train.RunConfig(
            name=segment.name, storage_path=plan.train_storage, callbacks=[ForwardToTune(queue)],
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep)),
    )
    return trainer, queue


def _worker_resources(plan: TrialPlan) -> dict[str, float]:
    resources = {"CPU": plan.spec.cpus_per_worker}
    if plan.use_gpu:
        resources["GPU"] = 1
    return resources


class ForwardToTune(ray.train.UserCallback):
    """Runs in the Train controller: hands each report (rank 0's metrics, checkpoint name) to the trial."""

    def __init__(self, queue: Queue):
        self._queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint: ray.train.Checkpoint | None) -> None:
        self._queue.put((dict(metrics[0]), os.path.basename(checkpoint.path) if checkpoint else None))


class _Pointer:
    """Turns a forwarded Train report into a Tune report with a pointer checkpoint."""

    def __init__(self, plan: TrialPlan, trial_id: str, segment: Segment, config: dict, run_id: str | None):
        self.plan, self.trial_id, self.segment, self.config, self.run_id = plan, trial_id, segment, config, run_id
        self._tagged_nodes = False
        self._last: dict[str, float] = {}

    def report(self, metrics: dict, checkpoint_name: str | None) -> None:
        metrics = with_selection_metric(metrics, self.plan.spec.metric, self._last)
        metrics = {**metrics, RUN_KEY: self.run_id or "", "generation": self.segment.generation}
        if self.run_id is not None and not self._tagged_nodes and "num_nodes" in metrics:
            sweep_runs.set_tag(self.plan.tracking, self.run_id, "ray.num_nodes", str(metrics["num_nodes"]))
            self._tagged_nodes = True
        if checkpoint_name is None:
            tune.report(metrics)
            return
        pointer = {"trial_id": self.trial_id, "segment": self.segment.name, "generation": self.segment.generation,
                   "config": self.config, "mlflow_run_id": self.run_id,
                   "checkpoint": storage.join(self.plan.train_storage, self.segment.name, checkpoint_name)}
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, POINTER), "w", encoding="utf-8") as f:
                json.dump(pointer, f)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def with_selection_metric(metrics: dict, metric: str, last: dict[str, float]) -> dict:
    """``metrics`` carrying the sweep's metric, which Tune requires in every report.

    Checkpoint-only reports (a save between evaluations) and a final-only metric's earlier reports
    lack it: they carry the trial's last value, or NaN before there is one, instead of making Tune
    abort the sweep. ``last`` is the trial's memory of it, updated here.
    """
    if metric in metrics:
        last[metric] = metrics[metric]
        return metrics
    return {**metrics, metric: last.get(metric, float("nan"))}


def _forward(trainer: TorchTrainer, queue: Queue, pointer: _Pointer) -> None:
    """Run ``trainer.fit()`` in a thread; report what it forwards to Tune from this (the trial's) thread."""
    errors: list[BaseException] = []
    done = threading.Event()

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised below, in the trial's thread
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=fit, name="torch-trainer", daemon=True).start()
    # A trial Tune stops dies here, in tune.report; cleanup.TrialCleanup then frees its workers.
    while not (done.is_set() and queue.empty()):
        try:
            metrics, checkpoint_name = queue.get(timeout=1.0)
        except Empty:
            continue
        pointer.report(metrics, checkpoint_name)
    if errors:
        raise errors[0]


def read_pointer(checkpoint: tune.Checkpoint | None) -> dict | None:
    """The pointer a trial reported last (None for a fresh trial)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        with open(os.path.join(d, POINTER), encoding="utf-8") as f:
            return json.load(f)
