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
    """SIGTERM, raised in the main thread like Ctrl+C: the run is closed (MLflow status KILLED), not torn off."""


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
def stops_as_exceptions() -> Iterator[None]:
    """While training, SIGTERM raises :class:`Stopped` and Ctrl+C ``KeyboardInterrupt``, outside shielded calls."""
    if not _main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        # Once is enough: a scheduler signals every process, and the launcher then passes the
        # same stop on again, which must not cut the run's closing short (it escalates to
        # SIGKILL after 30 s by itself).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _raise_or_hold(Stopped())

    def on_sigint(signum, frame):
        _raise_or_hold(KeyboardInterrupt())

    previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl+C only where Python handles it: a job started in the background ignores SIGINT, and keeps doing so.
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
