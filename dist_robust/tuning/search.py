"""A checked :class:`~dist_robust.tuning.spec.SweepSpec` as Ray Tune objects: space, scheduler, search.

Schedulers compare trials on ``step`` (the trainer's optimizer step), so rungs and perturbation
intervals are in steps whatever the evaluation cadence. Search algorithms: random and grid are
Tune's own variant generator; ``optuna`` is Optuna's TPE through ``ray.tune.search.optuna``
(a maintained Bayesian-optimisation library whose TPE handles the log-scaled, integer and
categorical keys a sweep mixes; installed separately with ``pip install optuna``).
"""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler

from dist_robust.tuning.spec import ParamSpec, SweepSpec

TIME_ATTR = "step"


def domain(param: ParamSpec) -> Any:
    """The ray.tune distribution of one param (``grid`` becomes ``tune.grid_search``)."""
    a = param.args
    if param.type == "grid":
        return tune.grid_search(list(a["values"]))
    if param.type == "choice":
        return tune.choice(list(a["values"]))
    if "q" in a:
        return getattr(tune, param.type)(a["low"], a["high"], a["q"])
    return getattr(tune, param.type)(a["low"], a["high"])


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: one flat key per searched config key."""
    return {key: domain(p) for key, p in spec.params.items()}


def scheduler(spec: SweepSpec) -> TrialScheduler:
    """ASHA (early stopping at rungs), PBT (exploit and explore at checkpoints) or FIFO."""
    s, t = spec.scheduler, spec.base.train
    if s["type"] == "asha":
        # No rung at the last step and no stop on reaching max_t: the final evaluation (test accuracy,
        # generalized matrix) follows the last step's report and must not be cut off.
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=t.max_steps - 1, grace_period=s["grace_period"],
                             reduction_factor=s["reduction_factor"], stop_last_trials=False)
    if s["type"] == "pbt":
        mutations = {k: _mutation(spec.params[k]) for k in s["mutate"]}
        return PopulationBasedTraining(time_attr=TIME_ATTR, perturbation_interval=s["perturbation_interval"],
                                       hyperparam_mutations=mutations, quantile_fraction=s["quantile_fraction"],
                                       resample_probability=s["resample_probability"], synch=s["synch"])
    return FIFOScheduler()


def _mutation(param: ParamSpec) -> Any:
    """PBT resamples from a distribution, or moves along a list of values."""
    if param.type in ("grid", "choice"):
        return list(param.args["values"])
    return domain(param)


def search_alg(spec: SweepSpec, max_concurrent: int):
    """Tune's variant generator (random, grid), or Optuna's TPE; at most ``max_concurrent`` trials at once."""
    s = spec.search
    if s["type"] == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=s.get("seed")), max_concurrent=max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=s.get("seed"))


def use_gpu(spec: SweepSpec, cluster: dict[str, float]) -> bool:
    """One GPU per worker: as the sweep says, or (auto) when the cluster has GPUs now."""
    return cluster.get("GPU", 0) > 0 if spec.use_gpu == "auto" else bool(spec.use_gpu)


def max_concurrent_trials(spec: SweepSpec, cluster: dict[str, float]) -> int:
    """The sweep's limit, else as many trials as the cluster's CPUs (GPUs) hold now.

    Trial drivers reserve no CPU, so without a limit Tune would start every trial and their
    Train workers would queue for CPUs (and time out waiting). An autoscaling cluster should
    set the limit in the sweep file: at launch it may have no worker node at all.
    """
    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    fits = cluster.get("CPU", 0) // (spec.workers_per_trial * spec.cpus_per_worker)
    if use_gpu(spec, cluster):
        fits = min(fits, cluster.get("GPU", 0) // spec.workers_per_trial)
    return max(1, int(fits))
