"""Tidy up after trials that Tune stopped: give back their workers' resources, end their MLflow runs.

When a scheduler stops a trial (ASHA) or pauses it (PBT), Tune kills the trial's actor and, with
it, the Train controller the actor owns, before either can clean up:

* the workers' placement group belongs to the job, not to that controller, and Ray Train's own
  cleaner finds dead controllers through the state API, which needs the dashboard; without one
  the CPUs (GPUs) stay reserved and the next trial waits forever;
* the trial's MLflow run would stay RUNNING.

Each worker reports its placement group id and the trial its run id, and this Tune callback (in
the sweep's driver) removes the group and ends the run of every trial that is no longer running.
"""

from __future__ import annotations

import logging

import ray
from ray import tune
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from dist_robust.tuning import sweep_runs

log = logging.getLogger(__name__)

PG_KEY = "placement_group"  # the metric naming a trial's current Train placement group
RUN_KEY = "mlflow_run_id"  # the metric naming the trial segment's MLflow run


def current_placement_group_id() -> str:
    """Hex id of the placement group this (worker) process runs in, or ''."""
    pg = ray.util.get_current_placement_group()
    return pg.id.hex() if pg is not None else ""


class TrialCleanup(tune.Callback):
    """Once a trial stops, errs, pauses or restarts: remove its Train placement group, end its run."""

    def __init__(self, tracking: sweep_runs.SweepTracking | None):
        self.tracking = tracking
        self._done: set[str] = set()

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._cleanup(trial, "KILLED")  # what is left of a restarted trial's previous Train run

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._cleanup(trial, "KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._cleanup(trial, "FAILED")

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        for trial in trials:
            if trial.status == "PAUSED":
                self._cleanup(trial, "KILLED")

    def _cleanup(self, trial, status: str) -> None:
        result = trial.last_result or {}
        pg_id = result.get(PG_KEY)
        if pg_id and pg_id not in self._done:
            self._done.add(pg_id)
            _remove_placement_group(pg_id, trial.trial_id)
        run_id = result.get(RUN_KEY)
        if self.tracking is not None and run_id and run_id not in self._done:
            self._done.add(run_id)
            sweep_runs.end_if_running(self.tracking, run_id, status)


def _remove_placement_group(pg_id: str, trial_id: str) -> None:
    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id)))
    try:
        if placement_group_table(pg).get("state") not in (None, "REMOVED"):
            remove_placement_group(pg)
            log.info("released the placement group of trial %s's stopped workers", trial_id)
    except Exception as e:  # e.g. a group from before a restore, unknown to this Ray instance
        log.debug("placement group %s of trial %s: %s", pg_id, trial_id, e)
