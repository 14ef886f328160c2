"""Training objectives behind one interface, built by name."""

from __future__ import annotations

from collections.abc import Callable

from dist_robust.config import ObjectiveConfig
from dist_robust.objectives.base import EmbeddingPerturbation, Objective, StepContext
from dist_robust.objectives.erm import ERM
from dist_robust.objectives.freelb import FreeLB
from dist_robust.objectives.gaussian import Gaussian
from dist_robust.objectives.pgd import PGD
from dist_robust.objectives.smart import SMART

BUILDERS: dict[str, Callable[[ObjectiveConfig], Objective]] = {
    "erm": lambda c: ERM(),
    "pgd": lambda c: PGD(c.epsilon, c.alpha, c.adv_steps, c.norm, c.adv_weight, c.scale == "relative",
                         c.linf_step, c.adv_begin_step),
    "freelb": lambda c: FreeLB(c.epsilon, c.alpha, c.adv_steps, c.norm, c.scale == "relative", c.init_mag,
                               c.linf_step, c.same_dropout, c.adv_begin_step),
    "gaussian": lambda c: Gaussian(c.sigma, c.noise_samples, c.scale == "relative"),
    "smart": lambda c: SMART(c.epsilon, c.alpha, c.adv_steps, c.smart_lambda, c.noise_type, c.noise_scale,
                             c.scale == "relative"),
}


def build_objective(cfg: ObjectiveConfig) -> Objective:
    """The objective named by ``cfg.name``; an unknown name lists the valid ones."""
    if cfg.name not in BUILDERS:
        raise ValueError(f"unknown objective {cfg.name!r}; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[cfg.name](cfg)


__all__ = ["BUILDERS", "ERM", "EmbeddingPerturbation", "FreeLB", "Gaussian", "Objective", "PGD",
           "SMART", "StepContext", "build_objective"]
