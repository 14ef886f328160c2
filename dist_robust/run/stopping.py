"""Stops (SIGTERM from a scheduler or the launcher, Ctrl+C) that land between tracking calls.

A stop is raised in the main thread wherever it happens to be. Raised in the middle of an
MLflow write to a sqlite store, it leaves that connection inside an open transaction that
holds the file's lock, so closing the run as KILLED then waits on the lock (MLflow's own
20 s timeout, twice) and the launcher's SIGKILL, 30 s after its SIGTERM, comes first: the run
stays RUNNING for ever and the "how to resume" line is never printed. Code that talks to a
tracking store therefore runs :func:`shielded`: a stop arriving there is raised as soon as the
call is done.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Stopped(KeyboardInterrupt):
    """SIGTERM (or the preemption signal), raised in the main thread like Ctrl+C: the run is closed (MLflow
    status KILLED), not torn off."""

    def __init__(self, signal_name: str = "SIGTERM"):
        super().__init__(signal_name)
        self.signal_name = signal_name


class Preempted(Exception):
    """The run stopped at a step boundary after a preemption signal, its last step checkpointed (or not,
    when the grace period was too short): a rerun with ``--resume auto`` continues."""

    def __init__(self, signal_name: str, step: int, tag: str | None, resume_tag: str | None, detail: str):
        super().__init__(detail)
        self.signal_name, self.step, self.tag, self.resume_tag, self.detail = signal_name, step, tag, resume_tag, detail


PREEMPTED_EXIT = 75  # sysexits' EX_TEMPFAIL: a temporary failure, to be retried (--resume auto)


class _Preemption:
    """A preemption signal that the training loop takes at its next step boundary.

    While armed (the training loop runs), the signal only records when it came; the loop sees it
    after the step in progress (collectively: every rank learns of it with the step's losses),
    checkpoints that step if the grace period leaves time, and raises :class:`Preempted`.
    Elsewhere (start-up, the final evaluation) the signal stops the run at once (:class:`Stopped`).
    """

    def __init__(self):
        self.armed = False
        self.signal_name: str | None = None
        self.at: float | None = None

    def requested(self) -> bool:
        return self.at is not None


PREEMPTION = _Preemption()


@contextlib.contextmanager
def preemption_window(enabled: bool = True) -> Iterator[_Preemption]:
    """Arm :data:`PREEMPTION` for the training loop (a signal that came before it stops the run there)."""
    PREEMPTION.armed = enabled
    try:
        yield PREEMPTION
    finally:
        PREEMPTION.armed = False


_depth = 0
_pending: BaseException | None = None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Hold a stop that arrives inside the block until the block has finished."""
    global _depth, _pending
    if not _main_thread():  # signals are only ever handled in the main thread
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            err, _pending = _pending, None
            raise err


def _raise_or_hold(err: BaseException) -> None:
    global _pending
    if _depth:
        _pending = _pending or err
        return
    raise err


@contextlib.contextmanager
def stops_as_exceptions(preempt_signal: str = "SIGTERM") -> Iterator[None]:
    """While training, SIGTERM (and ``preempt_signal``) raise :class:`Stopped` and Ctrl+C ``KeyboardInterrupt``,
    outside shielded calls; inside the training loop they are taken at the next step (:class:`_Preemption`)."""
    if not _main_thread():
        yield
        return
    import time

    def on_stop(signum, frame):
        name = signal.Signals(signum).name
        if PREEMPTION.armed:
            if PREEMPTION.at is None:
                PREEMPTION.signal_name, PREEMPTION.at = name, time.monotonic()
            return
        # Once is enough: a scheduler signals every process, and the launcher then passes the
        # same stop on again, which must not cut the run's closing short (it escalates to
        # SIGKILL after 30 s by itself).
        signal.signal(signum, signal.SIG_IGN)
        _raise_or_hold(Stopped(name))

    def on_sigint(signum, frame):
        _raise_or_hold(KeyboardInterrupt())

    extra = getattr(signal, preempt_signal) if preempt_signal != "SIGTERM" else None
    previous_extra = signal.signal(extra, on_stop) if extra is not None else None
    previous_term = signal.signal(signal.SIGTERM, on_stop)
    # Ctrl+C only where Python handles it: a job started in the background ignores SIGINT, and keeps doing so.
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
        if extra is not None:
            signal.signal(extra, previous_extra)
