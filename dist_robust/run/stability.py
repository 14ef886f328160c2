"""Non-finite losses and gradients: skip the update, count it, and stop a run that keeps diverging.

DeepSpeed's ZeRO (stages 1-3), bf16 and fp16 optimizers already check the gradients before
every update and skip it when one is not finite (counted in ``engine.skipped_steps``; fp16
also lowers its loss scale). Only the plain optimizer of ZeRO-0 in fp32 has no such check and
would write NaN into every weight: :func:`guard_plain_optimizer` gives it the same behaviour.
:class:`BadStepMonitor` then turns skipped steps and non-finite losses into one warning per
step and a clear error after too many in a row.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


def guard_plain_optimizer(engine) -> bool:
    """Make an optimizer that DeepSpeed does not check skip non-finite updates; True if it was needed.

    The engine reads ``optimizer.overflow`` after ``step()``: when true it counts a skipped
    step and leaves the LR schedule alone, exactly as for its own optimizers. Gradients of a
    plain (ZeRO-0) optimizer are already averaged over ranks when ``step`` runs, so every rank
    reaches the same decision without another collective.
    """
    opt = engine.optimizer
    if opt is None or hasattr(opt, "overflow"):
        return False
    step = opt.step

    def guarded_step(*args, **kwargs):
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        opt.overflow = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if not opt.overflow:
            return step(*args, **kwargs)
        return None

    opt.overflow = False
    opt.step = guarded_step
    return True


def fp16_loss_scale(engine) -> float:
    """The engine's current fp16 loss scale (1.0 unless fp16 is on)."""
    if not engine.fp16_enabled():
        return 1.0
    opt = engine.optimizer
    for holder, name in ((opt, "cur_scale"), (opt, "loss_scale"), (getattr(opt, "loss_scale_config", None), "cur_scale")):
        value = getattr(holder, name, None)
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return 1.0


class BadStepMonitor:
    """Counts optimizer steps whose loss or gradient was not finite; raises after ``limit`` in a row."""

    def __init__(self, engine, limit: int):
        self.engine = engine
        self.limit = limit
        self.total = 0
        self.consecutive = 0
        self._skipped_before = engine.skipped_steps

    def check(self, step: int, loss: float) -> bool:
        """Record optimizer step ``step`` (its loss averaged over ranks); True when it was bad."""
        skipped = self.engine.skipped_steps - self._skipped_before
        self._skipped_before = self.engine.skipped_steps
        if skipped == 0 and math.isfinite(loss):
            self.consecutive = 0
            return False
        self.total += 1
        self.consecutive += 1
        what = f"loss {loss:.4g}" + (", non-finite gradient" if math.isfinite(loss) else "")
        if self.engine.fp16_enabled():
            what += f" (fp16 loss scale now {fp16_loss_scale(self.engine):g})"
        log.warning("step %d: %s; the update was skipped (%d bad step(s) in a row, %d in all)",
                    step, what, self.consecutive, self.total)
        if self.consecutive >= self.limit:
            raise TrainingDivergedError(
                f"stopping at step {step}: {self.consecutive} consecutive steps had a non-finite loss or gradient "
                f"(train.max_bad_steps = {self.limit}). Lower the learning rate (--lr), the perturbation "
                "(--epsilon/--alpha/--sigma), or use bf16 instead of fp16; resume with --resume auto from the "
                "last checkpoint, or raise the limit with --max-bad-steps")
        return True
