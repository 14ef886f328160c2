"""What a sweep is, once its file has been read and checked: the base run and how to search around it.

Plain data (``to_dict`` / ``from_dict``), saved beside the sweep's results so ``--resume`` can
rebuild it. :mod:`.space` reads sweep files into it; :mod:`.space_checks` checks its settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dist_robust.config.run_config import RunConfig, from_dict


@dataclass
class ParamSpec:
    """One searched key: a ray.tune distribution and its arguments."""

    key: str
    type: str
    args: dict[str, Any]


@dataclass
class SweepSpec:
    """A parsed, validated sweep: the base run config plus how to search around it."""

    name: str
    base: RunConfig
    params: dict[str, ParamSpec]
    metric: str = "dev_source_acc"
    mode: str = "max"
    zero_shot: bool = True  # refuse selection metrics that use target-language (or reported-split) labels
    num_samples: int = 1
    workers_per_trial: int = 2
    cpus_per_worker: float = 1.0
    max_concurrent_trials: int = 0
    max_failures: int = 1
    keep_checkpoints: int | None = 2
    placement: str = "PACK"
    use_gpu: bool | str = "auto"  # one GPU per worker: true, false, or auto (if the cluster has GPUs at launch)
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    search: dict[str, Any] = field(default_factory=lambda: {"type": "random"})
    experiment: str | None = None
    scratch_dir: str | None = None
    worker_env: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain data (JSON-safe) from which :meth:`from_dict` rebuilds the spec, for ``--resume``."""
        out = dataclasses.asdict(self)
        out["base"] = self.base.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> SweepSpec:
        data = dict(data)
        data["base"] = from_dict(data["base"])
        data["params"] = {k: ParamSpec(**p) for k, p in data["params"].items()}
        return cls(**data)
