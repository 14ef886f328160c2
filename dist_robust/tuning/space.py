"""Sweep files: what ``dist-robust tune --space FILE`` reads, checked in full before Ray starts.

A sweep file is YAML::

    name: pgd-epsilon                 # Tune experiment and MLflow parent run (default: the file's stem)
    base:                             # every trial's run, as `dist-robust train` takes it
      flags: [--task, pawsx, --objective, pgd, --max-steps, "2000"]
      overrides: {objective.adv_steps: 2}
    params:                           # dotted config keys -> distributions
      objective.epsilon: {type: loguniform, low: 0.01, high: 1.0}
      train.seed: {type: grid, values: [1, 2, 3]}
    metric: dev_source_acc            # maximized; source-language dev keeps the sweep zero-shot
    scheduler: {type: asha, grace_period: 200}
    search: {type: random}
    num_samples: 8
    workers_per_trial: 2

Every problem (unknown key, bad distribution, a value the run config refuses) is reported at
once, naming the key, the value and what is accepted.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shlex
from typing import Any

import yaml

from dist_robust.config.parsing import add_run_arguments, config_from_args
from dist_robust.config.run_config import ConfigError, RunConfig, field_kind, get_key, iter_fields, parse_yaml, set_key
from dist_robust.config.validation import validate
from dist_robust.tuning.space_checks import LISTED_TYPES, check_options, with_defaults
from dist_robust.tuning.spec import ParamSpec, SweepSpec

# type -> the arguments it takes (randint: high exclusive, as in ray.tune).
PARAM_TYPES = {
    "uniform": ("low", "high"), "loguniform": ("low", "high"), "quniform": ("low", "high", "q"),
    "qloguniform": ("low", "high", "q"), "randint": ("low", "high"), "qrandint": ("low", "high", "q"),
    "lograndint": ("low", "high"), "choice": ("values",), "grid": ("values",),
}
INT_TYPES = ("randint", "qrandint", "lograndint")
# Sweep-only keys that are not run-config fields.
PSEUDO_KEYS = {"augment.copies": "offline RS-DA: train on N synonym-substituted copies of every pair"}
# Set by the sweep for every trial; a base that sets them is refused.
SWEEP_OWNED = ("train.output_dir", "train.resume", "tracking.run_id", "tracking.run_name")
# Config fields naming local files: made absolute so trials (in other working directories) find them.
PATH_FIELDS = ("model.name", "model.tokenizer", "data.data_dir", "data.train_file", "data.synonyms",
               "data.cache_dir")
# `dist-robust tune --smoke`: the same sweep on the tiny built-in config, a few steps per trial.
SMOKE_FLAGS = ["--model", "tiny", "--task", "synthetic", "--synthetic-train-size", "256",
               "--synthetic-eval-size", "32", "--micro-batch-size", "8", "--eval-batch-size", "32",
               "--tokenizer-vocab-size", "600", "--max-length", "64", "--max-steps", "6", "--eval-steps", "2",
               "--save-steps", "2", "--no-export-model", "--no-progress", "--augment", "none"]
SMOKE_MAX_SAMPLES = 2


class SpaceError(ValueError):
    """Every problem found in a sweep file, reported at once."""

    def __init__(self, origin: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid sweep file {origin} ({len(problems)} problem(s)):\n{lines}")


TOP_KEYS = tuple(f.name for f in dataclasses.fields(SweepSpec) if f.name != "base") + ("base",)


def load_space(path: str, smoke: bool = False) -> SweepSpec:
    """Read and check a sweep file; raise :class:`SpaceError` naming every problem."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = parse_yaml(f.read())
    except FileNotFoundError:
        raise SpaceError(path, ["file not found (the repository ships tuning/*.yaml)"]) from None
    except UnicodeDecodeError as e:
        raise SpaceError(path, [f"not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    except OSError as e:  # a directory, a name too long
        raise SpaceError(path, [f"cannot be read ({type(e).__name__}: {str(e)[:200]})"]) from None
    except yaml.YAMLError as e:
        raise SpaceError(path, [f"not valid YAML: {e}"]) from None
    except RecursionError:
        raise SpaceError(path, ["nested too deeply to be a sweep file"]) from None
    if not isinstance(raw, dict):
        raise SpaceError(path, [f"expected a mapping of sweep keys ({', '.join(TOP_KEYS)}), "
                                f"got {type(raw).__name__}"])
    default_name = os.path.splitext(os.path.basename(path))[0]
    return parse_space(raw, path, default_name, smoke)


def parse_space(raw: dict, origin: str, default_name: str, smoke: bool = False) -> SweepSpec:
    """Build a :class:`SweepSpec` from a sweep file's mapping."""
    problems = [f"unknown key {k!r}; accepted: {', '.join(TOP_KEYS)}" for k in raw if k not in TOP_KEYS]
    base = _base_config(raw.get("base") or {}, smoke, problems)
    options = {k: raw[k] for k in TOP_KEYS if k in raw and k not in ("base", "params")}
    options.setdefault("name", default_name)
    params = _params(raw.get("params") or {}, problems)
    spec = with_defaults(SweepSpec(base=base, params=params, **options))
    if smoke:
        spec = _for_smoke(spec)
    problems.extend(check_options(spec))
    if not problems:  # values are checked against a base that is itself sound
        problems.extend(_check_base(spec))
    if problems:
        raise SpaceError(origin, problems)
    _absolute_paths(spec.base)
    return spec


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print and exit
        raise ConfigError([f"base.flags: {message}"])


def _base_config(base: Any, smoke: bool, problems: list[str]) -> RunConfig:
    """The trials' common run config from ``base.flags`` (+ ``base.overrides``), as `dist-robust train`."""
    if not isinstance(base, dict) or set(base) - {"flags", "overrides"}:
        problems.append(f"base = {base!r}: expected a mapping with 'flags' (list or string) and/or "
                        "'overrides' (mapping or list of section.key=value)")
        return RunConfig()
    flags = base.get("flags") or []
    flags = shlex.split(flags) if isinstance(flags, str) else [str(f) for f in flags]
    overrides = base.get("overrides") or []
    if isinstance(overrides, dict):
        overrides = [f"{k}={v}" for k, v in overrides.items()]
    parser = _RaisingParser(prog="base.flags", add_help=False)
    add_run_arguments(parser)
    try:
        args = parser.parse_args([*flags, *(SMOKE_FLAGS if smoke else []), *map(str, overrides)])
        return config_from_args(args)
    except (ConfigError, FileNotFoundError) as e:
        problems.extend(getattr(e, "problems", [str(e)]))
        return RunConfig()


def _params(raw: Any, problems: list[str]) -> dict[str, ParamSpec]:
    if not isinstance(raw, dict):
        problems.append(f"params = {raw!r}: expected a mapping of config keys to distributions, e.g. "
                        "objective.epsilon: {type: loguniform, low: 0.01, high: 1.0}")
        return {}
    out = {}
    for key, dist in raw.items():
        spec = _param(str(key), dist, problems)
        if spec is not None:
            out[spec.key] = spec
    return out


def _param(key: str, dist: Any, problems: list[str]) -> ParamSpec | None:
    fields = {f"{s}.{f.name}": f for s, f in iter_fields()}
    if key not in fields and key not in PSEUDO_KEYS:
        sections = sorted({k.split(".")[0] for k in fields})
        problems.append(f"params.{key}: unknown config key; keys are section.field with sections "
                        f"{', '.join(sections)} (see `dist-robust train --help`), or {', '.join(PSEUDO_KEYS)}")
        return None
    if key in SWEEP_OWNED:
        problems.append(f"params.{key}: set by the sweep for every trial; it cannot be searched")
        return None
    if not isinstance(dist, dict) or not isinstance(dist.get("type"), str) or dist["type"] not in PARAM_TYPES:
        kind = dist.get("type") if isinstance(dist, dict) else dist
        problems.append(f"params.{key}.type = {kind!r}: accepted types: {', '.join(PARAM_TYPES)}")
        return None
    kind, args = dist["type"], {k: v for k, v in dist.items() if k != "type"}
    wanted = PARAM_TYPES[kind]
    if set(args) != set(wanted):
        problems.append(f"params.{key} ({kind}) has arguments {sorted(args)}: it takes exactly {list(wanted)}")
        return None
    shape = _check_distribution(key, kind, args)
    problems.extend(shape)
    if shape:  # the type check reads the values: only when they have the right shape
        return None
    field_type = str(fields[key].type) if key in fields else "int"
    value_kind = field_kind(fields[key]) if key in fields else "int"
    problems.extend(_check_type(key, kind, args, field_type, value_kind))
    return ParamSpec(key, kind, args)


def _check_distribution(key: str, kind: str, args: dict) -> list[str]:
    if kind in LISTED_TYPES:
        values = args["values"]
        if not isinstance(values, list) or not values:
            return [f"params.{key}.values = {values!r}: expected a non-empty list"]
        return []
    bad = [f"params.{key}.{a} = {args[a]!r}: expected a number" for a in args
           if not isinstance(args[a], (int, float)) or isinstance(args[a], bool)]
    if bad:
        return bad
    out = []
    if args["low"] >= args["high"]:
        out.append(f"params.{key}: low ({args['low']}) must be below high ({args['high']})")
    if kind.startswith(("log", "qlog")) and args["low"] <= 0:
        out.append(f"params.{key}.low = {args['low']}: {kind} needs low > 0")
    if "q" in args and args["q"] <= 0:
        out.append(f"params.{key}.q = {args['q']}: must be > 0")
    return out


def _check_type(key: str, kind: str, args: dict, field_type: str, value_kind: str) -> list[str]:
    if value_kind == "int":
        ok = kind in INT_TYPES or (kind in LISTED_TYPES and all(isinstance(v, int) for v in args.get("values", [])))
        return [] if ok else [f"params.{key} ({field_type}) = {kind}: gives non-integers; use "
                              f"{', '.join(INT_TYPES)}, or choice/grid over integers"]
    if value_kind != "float" and kind not in LISTED_TYPES:
        return [f"params.{key} ({field_type}) = {kind}: a non-numeric key takes choice or grid"]
    return []


def _for_smoke(spec: SweepSpec) -> SweepSpec:
    """A few samples, and scheduler intervals that fit the smoke run's 6 steps."""
    t, scheduler = spec.base.train, spec.scheduler
    if isinstance(scheduler, dict) and scheduler.get("type") == "asha":
        scheduler = {**scheduler, "grace_period": t.eval_steps}
    if isinstance(scheduler, dict) and scheduler.get("type") == "pbt":
        scheduler = {**scheduler, "perturbation_interval": t.save_steps}
    samples = min(spec.num_samples, SMOKE_MAX_SAMPLES) if isinstance(spec.num_samples, int) else spec.num_samples
    return dataclasses.replace(spec, num_samples=samples, use_gpu="auto",
                               max_concurrent_trials=0, scheduler=scheduler)


def _check_base(spec: SweepSpec) -> list[str]:
    """The base and every extreme value of every param must pass the run config's own validation."""
    base, workers = spec.base, spec.workers_per_trial
    defaults = RunConfig()
    p = [f"base sets {key}: the sweep sets it for every trial; remove it" for key in SWEEP_OWNED
         if get_key(base, key) != get_key(defaults, key)]
    try:
        validate(base, workers)
    except ConfigError as e:
        return p + [f"base: {problem}" for problem in e.problems]
    for key, param in spec.params.items():
        if key == "augment.copies":
            p.extend(_check_copies(base, param))
            continue
        for value in extremes(param):
            cfg = copy.deepcopy(base)
            set_key(cfg, key, value)
            try:
                validate(cfg, workers)
            except ConfigError as e:
                p.extend(f"params.{key} = {value!r}: {problem}" for problem in e.problems)
    return p


def _check_copies(base: RunConfig, param: ParamSpec) -> list[str]:
    p = []
    if base.data.task not in ("pawsx", "xnli"):
        p.append(f"params.augment.copies: needs base data.task pawsx or xnli, not {base.data.task!r}")
    if not base.data.synonyms:
        p.append("params.augment.copies: needs base --synonyms PATH_OR_URL (the neighbour map)")
    p += [f"params.augment.copies = {v!r}: must be >= 1" for v in extremes(param) if v < 1]
    return p


def extremes(param: ParamSpec) -> list[Any]:
    """The values worth validating: every listed value, or both ends of a range."""
    a = param.args
    if param.type in LISTED_TYPES:
        return list(a["values"])
    high = a["high"] - 1 if param.type in ("randint", "lograndint") else a["high"]
    return [a["low"], high]


def _absolute_paths(cfg: RunConfig) -> None:
    """Local paths in the base, made absolute: trials run in other working directories."""
    for key in PATH_FIELDS:
        value = get_key(cfg, key)
        if isinstance(value, str) and "://" not in value and os.path.exists(value):
            set_key(cfg, key, os.path.abspath(value))
