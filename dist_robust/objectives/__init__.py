"""Training objectives behind one interface, each declared in its own module and built by name.

Importing this package registers the built-in objectives (in this order: the ``--objective`` choices
and ``--help`` list them so) and those named in ``$DIST_ROBUST_OBJECTIVES``, then derives the run
config's ``objective`` section from them (:class:`ObjectiveConfig`).
"""

from __future__ import annotations

import importlib
import os

from dist_robust.objectives.base import EmbeddingPerturbation, Objective, StepContext
from dist_robust.objectives.options import REGISTRY, ObjectiveSpec, flat_config_class, option, problems, register
# Each module registers its objective when imported, in the order the choices are listed.
from dist_robust.objectives.erm import ERM
from dist_robust.objectives.pgd import PGD
from dist_robust.objectives.freelb import FreeLB
from dist_robust.objectives.gaussian import Gaussian
from dist_robust.objectives.smart import SMART

PLUGINS_ENV = "DIST_ROBUST_OBJECTIVES"


def _import_plugins() -> list[str]:
    """Import the modules ``$DIST_ROBUST_OBJECTIVES`` names; what went wrong, for the config's validation."""
    found = []
    for name in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - reported with the config's other problems, not as a traceback
            found.append(f"${PLUGINS_ENV} names {name!r}, which cannot be imported ({type(err).__name__}: {err}); "
                         f"expected importable module names, comma-separated")
    return found


PLUGIN_PROBLEMS = _import_plugins()
ObjectiveConfig = flat_config_class()


def build_objective(cfg) -> Objective:
    """The objective ``cfg.name`` names (``cfg``: the run config's objective section); an unknown name lists the
    valid ones."""
    if cfg.name not in REGISTRY:
        raise ValueError(f"unknown objective {cfg.name!r}; choose one of {', '.join(REGISTRY)}")
    spec = REGISTRY[cfg.name]
    return spec.build(spec.options_from(cfg))


def micro_steps_per_batch(cfg) -> int:
    """Engine micro-steps one data batch takes under the objective ``cfg`` names (FreeLB: K)."""
    spec = REGISTRY.get(cfg.name)
    return spec.micro_steps(spec.options_from(cfg)) if spec else 1


__all__ = ["ERM", "EmbeddingPerturbation", "FreeLB", "Gaussian", "Objective", "ObjectiveConfig", "ObjectiveSpec",
           "PGD", "PLUGIN_PROBLEMS", "REGISTRY", "SMART", "StepContext", "build_objective", "micro_steps_per_batch", "option",
           "problems", "register"]
