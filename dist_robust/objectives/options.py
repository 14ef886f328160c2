"""How an objective declares itself: its options (fields with help, flag and bounds), its checks and its
constructor, registered by name.

Each ``objectives/<name>.py`` ends with ``register(ObjectiveSpec(...))``. Everything else is derived from
the registry: the ``objective`` section of the run config (one flat dataclass holding every objective's
options, so ``objective.epsilon`` and ``--epsilon`` mean the same for PGD and FreeLB), the command-line
flags, the validation messages, and :func:`dist_robust.objectives.build_objective`.

An objective outside this package registers the same way from its own module, named in
``$DIST_ROBUST_OBJECTIVES`` (comma-separated module names, imported before the config is built, in
every process of a run).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dist_robust.infra.section import Section

Problem = Callable[[str, Any, str], None]  # bad(key, value, accepted)


def option(default: Any, help: str, flag: str, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None) -> Any:
    """A dataclass field for an objective option: ``--flag`` and ``objective.<name>`` on the command line and
    in run and sweep files. ``low``/``high`` bound it (inclusive); ``choices`` list its accepted values."""
    meta = {"help": help, "flag": flag, "low": low, "high": high}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective: its name, its options dataclass and how to build it from them."""

    name: str
    options: type  # a dataclass whose fields are declared with :func:`option`
    build: Callable[[Any], Any]  # options -> the objective (see objectives.base.Objective)
    check: Callable[[Any, Problem], None] | None = None  # problems beyond the fields' own bounds
    micro_steps: Callable[[Any], int] = lambda options: 1  # engine micro-steps per data batch (FreeLB: K)

    def option_fields(self) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(self.options)

    def options_from(self, config: Any) -> Any:
        """This objective's options, read from the flat ``objective`` config section."""
        return self.options(**{f.name: getattr(config, f.name) for f in self.option_fields()})


REGISTRY: dict[str, ObjectiveSpec] = {}


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    """Add an objective; its options must agree in kind and default with other objectives' of the same name."""
    if spec.name in REGISTRY and REGISTRY[spec.name] is not spec:
        raise ValueError(f"objective {spec.name!r} is registered twice")
    for f in spec.option_fields():
        if "flag" not in f.metadata:
            raise TypeError(f"objective {spec.name!r}: option {f.name!r} is not declared with option()")
        for other in REGISTRY.values():
            same = {g.name: g for g in other.option_fields()}.get(f.name)
            if same is not None and (str(same.type), same.default, same.metadata["flag"]) != \
                    (str(f.type), f.default, f.metadata["flag"]):
                raise TypeError(f"objective {spec.name!r}: option {f.name!r} differs from {other.name!r}'s "
                                f"(type, default and flag must agree: they share objective.{f.name})")
    REGISTRY[spec.name] = spec
    return spec


def flat_config_class(default: str = "erm") -> type:
    """The ``objective`` section: ``name`` and every registered objective's options, each once.

    A shared option's help names the objectives that use it; the checks use the declaration of the
    objective a run names (SMART accepts ``adv_steps`` 0, PGD does not).
    """
    users: dict[str, list[str]] = {}
    first: dict[str, dataclasses.Field] = {}
    for spec in REGISTRY.values():
        for f in spec.option_fields():
            users.setdefault(f.name, []).append(spec.name)
            first.setdefault(f.name, f)
    fields = [("name", "str", field(default=default, metadata={
        "help": "Training objective.", "flag": "--objective", "choices": tuple(REGISTRY)}))]
    for name, f in first.items():
        meta = {**f.metadata, "help": f"{'/'.join(users[name])}: {f.metadata['help']}"}
        fields.append((name, f.type, field(default=f.default, metadata=meta)))
    cls = dataclasses.make_dataclass("ObjectiveConfig", fields, bases=(Section,))
    cls.__module__ = __name__.rpartition(".")[0]  # pickled (Ray, the experiment's children) as objectives.ObjectiveConfig
    cls.__doc__ = "The run config's objective section: ``name`` and every registered objective's options."
    return cls


def problems(config: Any, bad: Problem) -> None:
    """Report every option outside its declared bounds or choices, then the named objective's own checks."""
    spec = REGISTRY.get(config.name)
    if spec is None:
        bad("objective.name", config.name, f"accepted objectives: {', '.join(REGISTRY)}")
    own = {f.name: f for f in spec.option_fields()} if spec else {}
    for f in dataclasses.fields(config):
        if f.name == "name":
            continue
        declared = own.get(f.name) or f
        accepted = _bound_problem(declared, getattr(config, f.name))
        if accepted:
            bad(f"objective.{f.name}", getattr(config, f.name), accepted)
    if spec is not None and spec.check is not None:
        spec.check(spec.options_from(config), bad)


def _bound_problem(f: dataclasses.Field, value: Any) -> str | None:
    meta, unset = f.metadata, " (or unset)" if f.default is None else ""
    if value is None:
        return None
    if "choices" in meta and value not in meta["choices"]:
        return f"accepted: {', '.join(map(str, meta['choices']))}"
    low, high = meta.get("low"), meta.get("high")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None  # (the type and finiteness are checked for every config field alike)
    if low is not None and high is not None and not low <= value <= high:
        return f"must be in [{low:g}, {high:g}]{unset}"
    if low is not None and value < low:
        return f"must be >= {low:g}{unset}"
    if high is not None and value > high:
        return f"must be <= {high:g}{unset}"
    return None
