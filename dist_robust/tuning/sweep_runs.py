"""MLflow for a sweep: one parent run, a nested child run per trial segment, the best trial on the parent.

The sweep driver creates the parent; each trial's driver creates (or finds again, after a restore)
its child run and hands the id to the trainer, whose rank 0 logs params, per-step metrics and the
final per-language and generalized evaluation into it. A PBT segment gets its own child run, so
a mutated hyperparameter is a param of a new run, never a changed param of an old one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from dist_robust.analysis.mlflow_runs import PARENT_TAG, quote
from dist_robust.infra.redaction import redact_tree
from dist_robust.run.tracking import MLflowTracker, flatten, resolve_uri
from dist_robust.tuning.spec import SweepSpec

log = logging.getLogger(__name__)

SWEEP_TAG = "dist_robust.sweep"
ZERO_SHOT_TAG = "dist_robust.zero_shot"  # "false" when trials are selected with target-language labels
SELECTION_TAG = "dist_robust.selection"
SEGMENT_TAG = "dist_robust.segment"
SUMMARY_KEYS = ("standard_avg", "generalized_avg", "all_avg", "source_acc", "dev_standard_avg", "dev_source_acc")


@dataclass
class SweepTracking:
    """Where a sweep's runs go; sent to every trial."""

    uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str


def absolute_uri(uri: str | None) -> str | None:
    """The tracking URI with local paths made absolute (trials run in other working directories).

    ``sqlite:///rel.db`` becomes ``sqlite:////abs/rel.db``, a plain path becomes ``file:///abs``;
    None when tracking is off (``none``).
    """
    uri = resolve_uri(uri)
    if uri is None:
        return None
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if "://" not in uri:
        return "file://" + os.path.abspath(uri)
    return uri


def start_parent(uri: str, experiment: str, spec: SweepSpec, run_id: str | None = None) -> SweepTracking:
    """Create (or, on ``--resume``, continue) the sweep's parent run and log the sweep's settings."""
    tags = {SWEEP_TAG: spec.name, "task": spec.base.data.task, "objective": spec.base.objective.name,
            **selection_tags(spec.metric)}
    parent = MLflowTracker(uri, experiment, spec.name, run_id=run_id, tags=tags)
    parent.log_params(redact_tree(sweep_params(spec)))
    if run_id is None:
        parent.log_dict(redact_tree(spec.to_dict()), "sweep.json")
    from mlflow import MlflowClient

    exp_id = MlflowClient(uri).get_run(parent.run_id).info.experiment_id
    return SweepTracking(uri, experiment, exp_id, parent.run_id)


def selection_tags(metric: str) -> dict[str, str]:
    """Whether trials are selected zero-shot, as MLflow tags (on the parent and every child run)."""
    from dist_robust.tuning.space_checks import ZERO_SHOT_METRICS, selection_note

    return {ZERO_SHOT_TAG: str(metric in ZERO_SHOT_METRICS).lower(), SELECTION_TAG: selection_note(metric)}


def sweep_params(spec: SweepSpec) -> dict[str, Any]:
    """The parent's params: the search (space, scheduler, metric) and the base run config."""
    params: dict[str, Any] = {f"space.{k}": f"{p.type}({json.dumps(p.args)})" for k, p in spec.params.items()}
    params.update({f"sweep.{k}": getattr(spec, k) for k in
                   ("metric", "mode", "zero_shot", "num_samples", "workers_per_trial", "max_failures")})
    params["sweep.scheduler"] = json.dumps(spec.scheduler)
    params["sweep.search"] = json.dumps(spec.search)
    base = {k: v for k, v in spec.base.to_dict().items() if k not in ("ds_config", "tracking")}
    params.update(flatten(base, "base."))
    return params


def _client(tracking: SweepTracking):
    from mlflow import MlflowClient

    return MlflowClient(tracking.uri)


def child_run(tracking: SweepTracking, segment: str, run_name: str, tags: dict[str, str]) -> str:
    """The child run of a trial segment: found by its segment tag, else created under the parent."""
    client = _client(tracking)
    found = client.search_runs([tracking.experiment_id],
                               f"tags.`{SEGMENT_TAG}` = '{quote(segment)}' and "
                               f"tags.`{PARENT_TAG}` = '{quote(tracking.parent_run_id)}'", max_results=1)
    if found:
        return found[0].info.run_id
    all_tags = {**tags, PARENT_TAG: tracking.parent_run_id, SEGMENT_TAG: segment}
    return client.create_run(tracking.experiment_id, run_name=run_name, tags=all_tags).info.run_id


def set_status(tracking: SweepTracking, run_id: str, status: str) -> None:
    """End a run as ``status`` (FINISHED, FAILED, KILLED)."""
    _client(tracking).set_terminated(run_id, status=status)


def end_if_running(tracking: SweepTracking, run_id: str, status: str) -> None:
    """End a run that its trainer could not end (its trial was stopped or killed)."""
    client = _client(tracking)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status=status)


def set_tag(tracking: SweepTracking, run_id: str, key: str, value: str) -> None:
    _client(tracking).set_tag(run_id, key, value)


def log_summary(tracking: SweepTracking, spec: SweepSpec, trials: list[dict], best: dict | None,
                status: str) -> None:
    """The sweep's outcome on the parent: counts, the best trial's metrics, config and run, plots."""
    client = _client(tracking)
    parent = tracking.parent_run_id
    counts = {"trials.total": len(trials),
              "trials.finished": sum(t["status"] == "finished" for t in trials),
              "trials.stopped_early": sum(t["status"] == "stopped_early" for t in trials),
              "trials.errored": sum(t["status"] == "error" for t in trials)}
    for key, value in counts.items():
        client.log_metric(parent, key, value)
    client.log_dict(parent, {"trials": trials}, "trials.json")
    if best is not None:
        for key in (spec.metric, *SUMMARY_KEYS):
            if isinstance(best["metrics"].get(key), (int, float)):
                client.log_metric(parent, f"best.{key}", best["metrics"][key])
        client.set_tag(parent, "best.trial_id", best["trial_id"])
        client.set_tag(parent, "best.run_id", best["mlflow_run_id"] or "")
        for key, value in best["config"].items():
            client.set_tag(parent, f"best.{key}", str(value))
        client.log_dict(parent, best, "best_trial.json")
    _log_plots(tracking)
    client.set_terminated(parent, status=status)


def _log_plots(tracking: SweepTracking) -> None:
    """Accuracy against epsilon / sigma over the trials, when the plotting code is there."""
    try:
        from dist_robust.analysis.compare_plots import log_sweep_plots
    except ImportError:
        return
    try:
        log_sweep_plots(tracking.uri, tracking.parent_run_id)
    except Exception as e:  # plots are a convenience; the sweep's results are already logged
        log.warning("sweep plots not logged: %s", e)
