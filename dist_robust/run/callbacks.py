"""Hooks around the training loop: what tracking, a Ray Tune trial and the fault-injection tests add to a run.

:func:`dist_robust.run.trainer.run` calls every hook on every rank. A hook marked *collective* is reached by all
ranks at the same point and in the same order, so it may run a collective of its own (Ray's report and its
preemption barrier do) and must return the same answer on every rank; the others are *local*: a rank may
be a step ahead of another when it calls them, so they must not wait for other ranks.

Order within a step::

    on_step_start -> the step -> on_step_end -> [on_evaluation_start -> on_evaluation] -> wants_checkpoint
    -> [on_checkpoint]

and once at the end of training ``on_checkpoint(final metrics, None)``, then ``on_end`` however the run ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Callback:
    """No-op hooks to override."""

    def on_start(self, setup: Any) -> None:
        """Local: the engine is built (``setup``: the run's :class:`dist_robust.run.state.Setup`)."""

    def on_step_start(self, step: int) -> None:
        """Local: optimizer step ``step`` (1-based) is about to run."""

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        """Local: step ``step`` is done; ``metrics`` (``train/...``) are already averaged over the ranks."""

    def on_evaluation_start(self, step: int) -> None:
        """Local: the dev evaluation after ``step`` starts."""

    def on_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """Local: dev accuracy after ``step`` (``dev_acc.<lang>`` and the summaries), equal on every rank."""

    def wants_checkpoint(self, step: int) -> bool:
        """Collective: whether this step must be checkpointed although no periodic checkpoint is due
        (a preemption notice); every rank must answer the same."""
        return False

    def on_checkpoint(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        """Collective: after each evaluation or checkpoint (``checkpoint_dir``: this rank's local copy of the
        tag just saved, else None), and once more with the final metrics."""

    def on_end(self, error: BaseException | None) -> None:
        """Local: the run ended (``error`` None when it finished). Release what :meth:`on_start` took."""


class Callbacks(Callback):
    """Several callbacks as one, called in the order given."""

    def __init__(self, callbacks: Sequence[Callback] = ()):
        self.callbacks = list(callbacks)

    def on_start(self, setup: Any) -> None:
        for c in self.callbacks:
            c.on_start(setup)

    def on_step_start(self, step: int) -> None:
        for c in self.callbacks:
            c.on_step_start(step)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        for c in self.callbacks:
            c.on_step_end(step, metrics)

    def on_evaluation_start(self, step: int) -> None:
        for c in self.callbacks:
            c.on_evaluation_start(step)

    def on_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        for c in self.callbacks:
            c.on_evaluation(step, metrics)

    def wants_checkpoint(self, step: int) -> bool:
        return any([c.wants_checkpoint(step) for c in self.callbacks])  # (every one asked: they may be collective)

    def on_checkpoint(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        for c in self.callbacks:
            c.on_checkpoint(metrics, checkpoint_dir)

    def on_end(self, error: BaseException | None) -> None:
        for c in self.callbacks:
            c.on_end(error)


class TrackMetrics(Callback):
    """Step and dev metrics to the run's tracker (MLflow on rank 0; a no-op tracker elsewhere)."""

    def __init__(self, tracker):
        self.tracker = tracker

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, step=step)

    def on_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(metrics, step=step)
