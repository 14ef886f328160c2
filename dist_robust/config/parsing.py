"""The argument parser every ``dist-robust`` command uses: readable help, short errors with
suggestions, and the run config's flags (one per config field) with their precedence."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import shlex
import sys
from typing import NoReturn

from dist_robust.config.run_config import (RunConfig, apply_mapping, apply_overrides, field_kind, iter_fields,
                                load_run_file)
from dist_robust.config.ds_config import load_ds_config


def plain(doc: str | None) -> str | None:
    """A docstring as terminal text: reStructuredText's ``literal`` marks become `literal`."""
    return None if doc is None else re.sub(r"``(.+?)``", r"`\1`", doc)


class Parser(argparse.ArgumentParser):
    """``argparse`` with help text shown as written, and errors that fit on a screen.

    A misspelled option gets the closest known ones (``--epsilonn`` -> ``--epsilon``) and a
    one-line usage, instead of the full option list before the one line that matters.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("fromfile_prefix_chars", "@")  # @FILE: options one per line (kept off the process table)
        kwargs["description"] = plain(kwargs.get("description"))
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        hints = []
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = [s for action in self._actions for s in action.option_strings]
            for arg in unknown.group(1).split():
                name = arg.split("=", 1)[0]
                if not name.startswith("-"):
                    continue
                close = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
                if close:
                    hints.append(f"{name}: did you mean {' or '.join(close)}?")
        print(f"usage: {self.prog} [options] ...  (--help lists every option)", file=sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        for hint in hints:
            print(f"  {hint}", file=sys.stderr)
        sys.exit(2)


# What `dist-robust eval` uses of the run options (the rest is accepted, but not listed by --help).
EVAL_FIELDS = {
    "model": {"name", "tokenizer", "tokenizer_vocab_size", "max_length"},
    "data": {"task", "data_dir", "train_file", "data_format", "skip_bad_rows", "allow_leakage", "cache_dir",
             "languages", "source_language", "max_eval_examples", "synthetic_eval_size", "synthetic_misalignment"},
    "train": {"seed", "eval_batch_size", "generalized", "generalized_examples", "eval_split", "output_dir",
              "overwrite", "staging_dir", "resume", "trust_checkpoint", "dist_timeout", "progress", "verbose"},
    "tracking": None,  # all
}
# ... and `dist-robust certify`, which also smooths
CERTIFY_FIELDS = {**EVAL_FIELDS, "objective": {"sigma", "scale"}, "data": EVAL_FIELDS["data"] | {"synonyms"},
                  "certify": None}


def add_run_arguments(parser: argparse.ArgumentParser, shown: dict[str, set[str] | None] | None = None) -> None:
    """Flags for every config field, plus the DeepSpeed and launcher conventions.

    ``shown`` (section -> field names, None for all) limits what ``--help`` lists to what a command
    uses; every flag is still accepted.
    """
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="Dotted overrides, e.g. objective.epsilon=0.05 train.max_steps=100.")
    parser.add_argument("--config", help="YAML/JSON run file with sections model, data, objective, train, "
                                         "tracking (and optionally ds_config).")
    parser.add_argument("--deepspeed", nargs="?", const="", default=None, metavar="DS_CONFIG",
                        help="DeepSpeed JSON config (ZeRO stage, precision, optimizer, batch). Default: "
                             "built-in ZeRO-2.")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                        help="Same as --deepspeed PATH (DeepSpeed's own spelling).")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section, f in iter_fields():
        flag = f.metadata.get("flag")
        if not flag:
            continue
        listed = shown is None or (section in shown and (shown[section] is None or f.name in shown[section]))
        group = groups.setdefault(section, parser.add_argument_group(section))
        kwargs: dict = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                        "help": _help_of(f) if listed else argparse.SUPPRESS, "metavar": f.name.upper()}
        kind = field_kind(f)
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
            del kwargs["metavar"]
        elif kind == "list":
            kwargs["nargs"] = f.metadata.get("nargs", "+")
        else:
            kwargs["type"] = {"int": int, "float": float}.get(kind, str)
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        group.add_argument(flag, **kwargs)


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def _help_of(f: dataclasses.Field) -> str:
    """The field's help, with its default appended unless the help already says what happens by default."""
    text, default = f.metadata["help"], _default_of(f)
    if "Default" in text or default is None or default == []:
        return text
    if isinstance(default, bool):
        return f"{text} (default: {'on' if default else 'off'})"
    return f"{text} (default: {default})"


OVERRIDES_ENV = "DIST_ROBUST_OVERRIDES"  # extra section.key=value overrides, e.g. for scripted smoke runs


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults < run file < $DIST_ROBUST_OVERRIDES < key=value overrides < explicit flags."""
    cfg = RunConfig()
    if args.config:
        apply_mapping(cfg, load_run_file(args.config), f"--config {args.config}")
    apply_overrides(cfg, shlex.split(os.environ.get(OVERRIDES_ENV, "")) + list(args.overrides))
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            if isinstance(value, list) and key != "tracking.tags":  # --languages en,de as well as en de
                value = [item for v in value for item in v.split(",") if item]
            setattr(getattr(cfg, section), name, value)
    ds_path = args.deepspeed or args.deepspeed_config
    if ds_path or not cfg.ds_config:
        cfg.ds_config = load_ds_config(ds_path)
        cfg.ds_config_path = ds_path or None
    return cfg


def without_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` less ``flags`` (each with its value, ``--flag V`` or ``--flag=V``)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if a.split("=", 1)[0] in flags:
            continue
        rest.append(a)
    return rest
