"""The sweep-level settings of a sweep file: metric, scheduler, search, resources (see :mod:`.space`)."""

from __future__ import annotations

import dataclasses

import importlib.util
from typing import Any

from dist_robust.infra.storage import safe_segment
from dist_robust.tuning.spec import SweepSpec

LISTED_TYPES = ("choice", "grid")
SCHEDULERS = {"asha": ("grace_period", "reduction_factor"),
              "pbt": ("perturbation_interval", "quantile_fraction", "resample_probability", "mutate", "synch"),
              "fifo": ()}
SEARCHERS = {"random": ("seed",), "grid": (), "optuna": ("seed",)}
# Reported at every evaluation (usable by ASHA and PBT) / only once, at the end of a trial.
INTERMEDIATE_METRICS = ("dev_source_acc", "dev_standard_avg", "dev_all_avg")
FINAL_METRICS = ("standard_avg", "generalized_avg", "all_avg", "source_acc")
# Selecting on anything else uses target-language labels (or the split the results are reported on).
ZERO_SHOT_METRICS = ("dev_source_acc",)
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def with_defaults(spec: SweepSpec) -> SweepSpec:
    """A copy with the short forms written out (``scheduler: asha``) and the scheduler's defaults filled in, so the
    checks and the sweep read one spelling; the checks below change nothing. Malformed values stay as they are
    (the checks report them)."""
    worker_env = {str(k): str(v) for k, v in spec.worker_env.items()} if isinstance(spec.worker_env, dict) \
        else spec.worker_env
    scheduler = {"type": spec.scheduler} if isinstance(spec.scheduler, str) else spec.scheduler
    search = {"type": spec.search} if isinstance(spec.search, str) else spec.search
    if isinstance(scheduler, dict):
        t = spec.base.train
        defaults = {
            "asha": {"grace_period": max(t.eval_steps, 1), "reduction_factor": 2},
            "pbt": {"perturbation_interval": t.save_steps, "quantile_fraction": 0.25, "resample_probability": 0.25,
                    "synch": False, "mutate": [k for k, v in spec.params.items() if v.type != "grid"]},
        }.get(scheduler.get("type"), {})
        scheduler = {**defaults, **scheduler}
    return dataclasses.replace(spec, worker_env=worker_env, scheduler=scheduler,
                               search=dict(search) if isinstance(search, dict) else search)


def check_options(spec: SweepSpec) -> list[str]:
    """Problems with everything but the base and the params (of a spec :func:`with_defaults` filled in)."""
    p = []

    def bad(key: str, value: Any, accepted: str) -> None:
        p.append(f"{key} = {value!r}: {accepted}")

    if not isinstance(spec.name, str) or safe_segment(spec.name) != spec.name:
        bad("name", spec.name, f"letters, digits, '.', '_' and '-' only: it names the sweep's folder under --storage "
            f"and its scratch directory (e.g. {safe_segment(str(spec.name))!r})")
    if spec.metric not in INTERMEDIATE_METRICS + FINAL_METRICS:
        bad("metric", spec.metric, f"accepted: {', '.join(INTERMEDIATE_METRICS + FINAL_METRICS)}")
    elif spec.zero_shot is True and spec.metric not in ZERO_SHOT_METRICS:
        bad("metric", spec.metric, f"selects trials with {selection_source(spec.metric)}, which zero-shot transfer "
            f"does not have: use {', '.join(ZERO_SHOT_METRICS)} (source-language dev, the default), or set "
            "zero_shot: false to select on it anyway (the summary and MLflow then mark the sweep as not zero-shot)")
    if not isinstance(spec.zero_shot, bool):
        bad("zero_shot", spec.zero_shot, "true (select on source-language dev only) or false")
    if spec.mode not in ("max", "min"):
        bad("mode", spec.mode, "accepted: max, min")
    for key in ("num_samples", "workers_per_trial"):
        if not isinstance(getattr(spec, key), int) or getattr(spec, key) < 1:
            bad(key, getattr(spec, key), "must be an integer >= 1")
    for key, low in (("max_concurrent_trials", 0), ("max_failures", -1)):
        if not isinstance(getattr(spec, key), int) or getattr(spec, key) < low:
            bad(key, getattr(spec, key), f"must be an integer >= {low}")
    if not isinstance(spec.cpus_per_worker, (int, float)) or spec.cpus_per_worker <= 0:
        bad("cpus_per_worker", spec.cpus_per_worker, "must be > 0")
    if spec.keep_checkpoints is not None and (not isinstance(spec.keep_checkpoints, int) or spec.keep_checkpoints < 1):
        bad("keep_checkpoints", spec.keep_checkpoints, "must be an integer >= 1, or null to keep all")
    if spec.use_gpu not in (True, False, "auto"):
        bad("use_gpu", spec.use_gpu, "accepted: true, false, auto")
    if spec.placement not in PLACEMENTS:
        bad("placement", spec.placement, f"accepted: {', '.join(PLACEMENTS)}")
    if not isinstance(spec.worker_env, dict):
        bad("worker_env", spec.worker_env, "expected a mapping of environment variable names to values")
    p.extend(_check_scheduler(spec))
    p.extend(_check_search(spec))
    return p


def _check_scheduler(spec: SweepSpec) -> list[str]:
    s, t = spec.scheduler, spec.base.train
    kind = s.get("type") if isinstance(s, dict) else s
    if not isinstance(s, dict) or not isinstance(kind, str) or kind not in SCHEDULERS:
        return [f"scheduler.type = {kind!r}: accepted: {', '.join(SCHEDULERS)}"]
    p = [f"scheduler.{k}: unknown option for {kind}; accepted: {', '.join(SCHEDULERS[kind]) or 'none'}"
         for k in s if k != "type" and k not in SCHEDULERS[kind]]
    if kind != "fifo" and spec.metric not in INTERMEDIATE_METRICS:
        p.append(f"metric = {spec.metric!r}: is only known when a trial ends, so {kind} cannot use it; "
                 f"use {', '.join(INTERMEDIATE_METRICS)} or scheduler type fifo")
    if kind != "fifo" and t.eval_steps < 1:
        p.append(f"scheduler.type = {kind!r} compares trials at evaluations: base train.eval_steps must be >= 1")
    if kind == "asha":
        grace, rf = s["grace_period"], s["reduction_factor"]
        if not isinstance(grace, int) or not 1 <= grace < t.max_steps:
            p.append(f"scheduler.grace_period = {grace!r}: must be an integer in [1, train.max_steps = {t.max_steps})")
        if not isinstance(rf, (int, float)) or rf <= 1:
            p.append(f"scheduler.reduction_factor = {rf!r}: must be > 1")
    if kind == "pbt":
        p.extend(_check_pbt(spec, s))
    return p


def _check_pbt(spec: SweepSpec, s: dict) -> list[str]:
    t, p = spec.base.train, []
    interval = s["perturbation_interval"]
    if not isinstance(interval, int) or interval < 1 or not t.save_steps or interval % t.save_steps:
        p.append(f"scheduler.perturbation_interval = {interval!r}: must be a positive multiple of base "
                 f"train.save_steps ({t.save_steps}), so a checkpoint exists at every perturbation")
    for key in ("quantile_fraction", "resample_probability"):
        value = s[key]
        if not isinstance(value, (int, float)) or not 0 <= value <= (0.5 if key == "quantile_fraction" else 1):
            p.append(f"scheduler.{key} = {value!r}: must be in [0, {0.5 if key == 'quantile_fraction' else 1}]")
    if not isinstance(s["synch"], bool):
        p.append(f"scheduler.synch = {s['synch']!r}: true (perturb when every trial reached the interval) or false")
    mutate = s["mutate"]
    unknown = [k for k in mutate if k not in spec.params] if isinstance(mutate, list) else [mutate]
    if unknown or not mutate:
        p.append(f"scheduler.mutate = {mutate!r}: must list searched params ({', '.join(spec.params) or 'none'})")
    return p


def _check_search(spec: SweepSpec) -> list[str]:
    s = spec.search
    kind = s.get("type") if isinstance(s, dict) else s
    if not isinstance(s, dict) or not isinstance(kind, str) or kind not in SEARCHERS:
        return [f"search.type = {kind!r}: accepted: {', '.join(SEARCHERS)}"]
    p = [f"search.{k}: unknown option for {kind}; accepted: {', '.join(SEARCHERS[kind]) or 'none'}"
         for k in s if k != "type" and k not in SEARCHERS[kind]]
    if kind == "grid":
        p += [f"params.{k}.type = {v.type!r}: search type grid takes grid or choice (enumerated) only"
              for k, v in spec.params.items() if v.type not in LISTED_TYPES]
    if kind == "optuna":
        p += [f"params.{k}.type = 'grid': search type optuna samples; use choice" for k, v in spec.params.items()
              if v.type == "grid"]
        if importlib.util.find_spec("optuna") is None:
            p.append("search.type = 'optuna': needs the optuna package (pip install optuna); or use random or grid")
        if isinstance(spec.scheduler, dict) and spec.scheduler.get("type") == "pbt":
            p.append("search.type = 'optuna' with scheduler pbt: PBT mutates configs itself; use random or grid")
    return p


def selection_source(metric: str) -> str:
    """What a selection metric is computed from, in words."""
    if metric in ZERO_SHOT_METRICS:
        return "source-language dev labels only"
    if metric in INTERMEDIATE_METRICS:
        return "target-language dev labels"
    return "the labels of the split the final results are reported on"


def selection_note(metric: str) -> str:
    """One line for summaries: is trial selection zero-shot?"""
    if metric in ZERO_SHOT_METRICS:
        return f"selection: zero-shot ({metric}: {selection_source(metric)})"
    return f"selection: NOT zero-shot ({metric}: {selection_source(metric)})"
