"""What a sweep shows on the terminal: one line per trial event, then the result table.

Ray's own messages (its driver-side loggers, Tune's status tables) and the trial processes'
output (every rank's training log, Ray Train's internal warnings) go to files instead:
``<scratch>/<sweep>-ray-driver.log`` and Ray's session log directory on each node. Tune offers
no setting for "events only", hence the callback here.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile

from ray import tune

RAY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.data", "ray.air")


def ray_session_logs() -> str:
    """Where this machine's Ray keeps the worker processes' stdout/stderr."""
    return os.path.join(os.environ.get("RAY_TMPDIR", tempfile.gettempdir()), "ray", "session_latest", "logs")


def send_ray_logs_to(path: str) -> None:
    """Ray's driver-side loggers write to ``path`` and no longer to the terminal."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False


class TrialEvents(tune.Callback):
    """Prints a line when a trial starts, reports an evaluation, finishes, is stopped early, or fails."""

    def __init__(self, metric: str):
        self.metric = metric

    def on_trial_start(self, iteration, trials, trial, **info):
        config = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.config.items())
        _say(f"trial {trial.trial_id} started: {config}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "standard_avg" in result or not any(k.startswith("dev_acc.") for k in result):
            return  # the final report (said on completion) or a checkpoint-only one: nothing new to say
        _say(f"trial {trial.trial_id} step {result.get('step')}: {self.metric} {_fmt(result.get(self.metric))}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if "standard_avg" not in last:
            _say(f"trial {trial.trial_id} stopped early by the scheduler at step {last.get('step')}")
            return
        final = ", ".join(f"{k} {_fmt(last[k])}" for k in dict.fromkeys((self.metric, "standard_avg", "generalized_avg"))
                          if k in last)
        _say(f"trial {trial.trial_id} finished: {final}")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = str(getattr(trial, "error_file", "") or "")
        _say(f"trial {trial.trial_id} failed{f' (details: {error})' if error else ''}")


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _say(line: str) -> None:
    print(line, flush=True)
