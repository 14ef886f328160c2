"""Fault injection for the reliability tests, switched on by environment variables only.

Each fault is the real thing, not an exception that pretends: a rank that stops answering
(it sleeps inside the step loop, its peers wait in a collective), and a process killed with
SIGKILL in the middle of writing a checkpoint.

    DIST_ROBUST_CRASH_AT_STEP=5        raise before step 5 (every rank)
    DIST_ROBUST_HANG_AT_STEP=4:1       rank 1 stops answering before step 4
    DIST_ROBUST_KILL_IN_SAVE=step-00000006
                                       rank 0 is SIGKILLed after DeepSpeed wrote that tag's files,
                                       before its manifest and pointer
    DIST_ROBUST_STEP_SECONDS=0.5       every rank waits that long before each step (a slow step, so a
                                       signal from outside lands mid-run)
    DIST_ROBUST_CHAOS=DIR:step@5@1,save@step-00000008@0,eval@12@1
                                       one-shot SIGKILLs of a chosen rank: before step 5, inside the save
                                       of a tag (after DeepSpeed's files, before the manifest), at the
                                       start of the evaluation at a step; each fires once in the whole
                                       job, restarts included (a marker file in DIR records it)
    DIST_ROBUST_NAN_AT_STEPS=3,4       NaN word embeddings during those steps (the non-finite-step tests)
    DIST_ROBUST_KILL_WORKER_AT_STEP=4:/tmp/marker
                                       in a Ray Tune trial, the last rank is SIGKILLed once Ray Train
                                       has committed step 4's checkpoint, once (the marker file
                                       records that it happened, so the retried worker lives)

The faults around the training loop plug into it as a callback (:class:`FaultInjection`), which the
trainer adds only when one of these variables is set; the one inside a checkpoint save is called there.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from dist_robust.infra import distributed as D
from dist_robust.run.callbacks import Callback

CRASH_ENV = "DIST_ROBUST_CRASH_AT_STEP"
HANG_ENV = "DIST_ROBUST_HANG_AT_STEP"
KILL_IN_SAVE_ENV = "DIST_ROBUST_KILL_IN_SAVE"
KILL_WORKER_ENV = "DIST_ROBUST_KILL_WORKER_AT_STEP"
STEP_SECONDS_ENV = "DIST_ROBUST_STEP_SECONDS"
CHAOS_ENV = "DIST_ROBUST_CHAOS"
NAN_ENV = "DIST_ROBUST_NAN_AT_STEPS"
LOOP_FAULTS = (CRASH_ENV, HANG_ENV, STEP_SECONDS_ENV, CHAOS_ENV, NAN_ENV)

log = logging.getLogger(__name__)


class FaultInjection(Callback):
    """The faults that happen around the training loop, as the loop's callback."""

    def __init__(self):
        self.nan_steps = {int(s) for s in os.environ.get(NAN_ENV, "").replace(",", " ").split()}
        self.embeddings = self.handle = None

    @staticmethod
    def wanted() -> FaultInjection | None:
        """One, when the environment plans a fault around the loop."""
        return FaultInjection() if any(os.environ.get(name) for name in LOOP_FAULTS) else None

    def on_start(self, setup) -> None:
        from dist_robust.model.build import word_embeddings

        self.embeddings = word_embeddings(setup.engine.module)

    def on_step_start(self, step: int) -> None:
        before_step(step)
        if step in self.nan_steps:
            log.warning("%s: NaN word embeddings during step %d", NAN_ENV, step)
            self.handle = self.embeddings.register_forward_hook(lambda m, i, out: out * float("nan"))

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        self._remove()

    def on_evaluation_start(self, step: int) -> None:
        before_evaluation(step)

    def on_end(self, error: BaseException | None) -> None:
        self._remove()

    def _remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def before_step(step: int) -> None:
    """Called before each optimizer step (1-based)."""
    crash = int(os.environ.get(CRASH_ENV, "0") or 0)
    if crash and step == crash:
        raise RuntimeError(f"injected crash before step {crash} ({CRASH_ENV})")
    chaos("step", str(step))
    slow = float(os.environ.get(STEP_SECONDS_ENV, "0") or 0)
    if slow:
        time.sleep(slow)
    hang = os.environ.get(HANG_ENV)
    if hang:
        at, _, who = hang.partition(":")
        if step == int(at) and D.rank() == int(who or 0):
            while True:  # until killed: its peers block in their next collective
                time.sleep(60)


def inside_save(tag: str) -> None:
    """Called after DeepSpeed wrote ``tag``'s files and before the manifest is written."""
    chaos("save", tag)
    if os.environ.get(KILL_IN_SAVE_ENV) == tag and D.is_main():
        os.kill(os.getpid(), signal.SIGKILL)


def before_evaluation(step: int) -> None:
    """Called when the dev evaluation after ``step`` starts."""
    chaos("eval", str(step))


def chaos(kind: str, where: str) -> None:
    """SIGKILL this rank if ``$DIST_ROBUST_CHAOS`` plans ``kind@where@<this rank>`` and it has not fired yet."""
    spec = os.environ.get(CHAOS_ENV)
    if not spec:
        return
    marker_dir, _, events = spec.rpartition(":")
    for i, event in enumerate(events.split(",")):
        k, w, r = event.split("@")
        marker = os.path.join(marker_dir, f"fired-{i}")
        if k == kind and w == where and int(r) == D.rank() and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(f"{event} {time.time()}\n")
            log.warning("%s: killing rank %d (%s)", CHAOS_ENV, D.rank(), event)
            os.kill(os.getpid(), signal.SIGKILL)


def after_ray_checkpoint(step: int) -> None:
    """Called in a Ray Train worker after it reported the checkpoint of ``step``."""
    spec = os.environ.get(KILL_WORKER_ENV)
    if not spec or D.rank() != D.world_size() - 1:
        return
    at, _, marker = spec.partition(":")
    if int(at) == step and not os.path.exists(marker):
        import ray.train

        # A report is only registered once the controller has polled it from every worker; without this
        # wait a loaded machine can kill the worker first and the retry goes back further than `step`.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                               timeout_s=300)
        open(marker, "w").close()
        log.warning("%s: killing this worker (rank %d) after step %d", KILL_WORKER_ENV, D.rank(), step)
        os.kill(os.getpid(), signal.SIGKILL)
