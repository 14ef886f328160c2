"""One validation pass over a run before any process starts: the config's fields, then its ds_config.

Every problem is collected and raised at once (``ConfigError``), each naming the key, the value
and what is accepted.
"""

from __future__ import annotations

from dist_robust.config.run_config import ConfigError, RunConfig, config_problems
from dist_robust.config.ds_config import ds_config_problems


def validate(cfg: RunConfig, world_size: int) -> None:
    """Raise one ConfigError listing every problem of ``cfg`` (and its ds_config) for ``world_size`` ranks."""
    problems = config_problems(cfg, world_size) + ds_config_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)
