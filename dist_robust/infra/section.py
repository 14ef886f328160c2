"""Config sections that can be frozen: assembled mutably, then read-only once a run's plan is resolved."""

from __future__ import annotations

import dataclasses
from typing import Any


class Section:
    """A config section: mutable while the config is assembled (files, overrides, flags), read-only once
    :meth:`RunConfig.frozen` hands out the copy a run follows."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(f"the run's config is frozen: {type(self).__name__}.{name} cannot "
                                                  f"change after it was resolved (use RunConfig.with_values)")
        super().__setattr__(name, value)
