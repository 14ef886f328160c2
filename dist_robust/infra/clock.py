"""Time for people: durations in words (progress lines, estimates of time left), and where start-up time goes."""

from __future__ import annotations

import time


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``2.3 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def seconds_since_launch() -> float:
    """Wall time since this process started (imports and argument parsing included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


class StartupClock:
    """Where start-up time goes: the phases of setup, logged as one line.

    Counted from the process's launch for its first run (imports included), from the start of
    the run for later runs in the same process (a notebook, the GPU check).
    """

    runs = 0  # runs this process has set up

    def __init__(self):
        first = StartupClock.runs == 0
        StartupClock.runs += 1
        self.since = "launch" if first else "the run started"
        self.origin = time.time() - (seconds_since_launch() if first else 0.0)
        self.phases: list[tuple[str, float]] = [("imports", self.elapsed())] if first else []  # and the CLI
        self.last = time.perf_counter()

    def elapsed(self) -> float:
        return time.time() - self.origin

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases.append((name, now - self.last))
        self.last = now

    def line(self) -> str:
        parts = ", ".join(f"{name} {sec:.1f}" for name, sec in self.phases)
        return f"start-up {self.elapsed():.1f} s since {self.since} ({parts})"
