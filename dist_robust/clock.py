"""Durations in words, for progress lines and estimates of time left."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``2.3 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
