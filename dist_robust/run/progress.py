"""Progress on long work: a bar on rank 0 with ``--progress``, else a log line every ``--log-interval`` seconds."""

from __future__ import annotations

import logging
import statistics
import time

from dist_robust.infra import distributed as D
from dist_robust.infra.clock import duration

log = logging.getLogger(__name__)


class ProgressLines:
    """What the bar shows, as a log line every ``seconds`` (and at the last step), for runs without one.

    The time left is the wall-clock pace of this process so far (evaluations, checkpoints and a busy
    machine included), not the last few steps' compute time, which swings with whatever else runs.
    """

    def __init__(self, seconds: float, max_steps: int, first_step: int = 0):
        self.seconds, self.max_steps = seconds, max_steps
        self.started, self.first_step = time.monotonic(), first_step
        self.last = self.started
        self.losses: list[float] = []
        self.times: list[float] = []

    def step(self, step: int, loss: float, elapsed: float) -> None:
        self.losses.append(loss)
        self.times.append(elapsed)
        now = time.monotonic()
        if now - self.last < self.seconds and step < self.max_steps:
            return
        pace = (now - self.started) / max(step - self.first_step, 1)
        log.info("step %d/%d: loss %.4f (mean of %d step(s)), %.2f s/step, about %s left", step, self.max_steps,
                 statistics.fmean(self.losses), len(self.losses), statistics.median(self.times),
                 duration((self.max_steps - step) * pace))
        self.last, self.losses, self.times = now, [], []


def bar(cfg, total: int, desc: str, unit: str, initial: int = 0):
    """A progress bar on rank 0 when ``--progress`` is on (``cfg``: the train section), else None."""
    if not (cfg.progress and D.is_main()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
