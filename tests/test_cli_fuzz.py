"""Property-based fuzzing of command lines: every command answers a bad one with its own error, never a traceback.

Random combinations of each command's real flags with wrong types, out-of-range and non-finite
numbers, unknown names, empty and comma lists and nonexistent paths, for ``train``, ``eval``,
``certify``, ``config``, ``experiment``, ``tune`` and ``compare``. Each command runs in this
process up to the point where its real work would start (training, a child run, Ray), which
is replaced by a marker: a command line that gets there passed every check. Anything else must
end in an exit status (0, 1, 2) with a message, and no exception escapes. The count of cases
and what they ended in is printed (``pytest -s``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_robust import cli
from tests.launch import REPO

CASES = int(os.environ.get("DIST_ROBUST_FUZZ_CASES", "100"))  # per command
FUZZ = settings(max_examples=CASES, deadline=20_000, suppress_health_check=list(HealthCheck), database=None,
                derandomize="DIST_ROBUST_FUZZ_CASES" not in os.environ)
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

VALUES = ["abc", "-1", "0", "1", "3", "0.5", "nan", "inf", "-inf", "1e999", "", "en", "en,de", "en,,de", "xx",
          "en,xx", "de fr", "auto", "none", "tiny", "xlm-roberta-lage", "runs/nosuch/model", "/nonexistent/file.tsv",
          "pgd", "l2", "synonym", "2e-5", "key=value", "-", "--", "ä", "x" * 300]


class Reached(Exception):
    """The command line passed every check: the real work would start here."""


def _stop(*args, **kwargs):
    raise Reached()


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if any(o.startswith("--") for o in a.option_strings) and a.dest != "help"]


INTS = ["-1", "0", "1", "3", "100", "abc", "1e999", "2.5"]
FLOATS = ["nan", "inf", "-inf", "-1", "0", "0.5", "1e-5", "2e-5", "1e999", "abc"]


def _values(action: argparse.Action):
    """Values for one option: of its kind mostly (its choices, numbers), wrong ones often."""
    if action.nargs == 0:
        return st.just([])
    if action.choices:
        pool = [*map(str, action.choices), "xx", ""]
    elif action.type is int:
        pool = INTS
    elif action.type is float:
        pool = FLOATS
    else:
        pool = VALUES
    many = action.nargs in ("+", "*")
    return st.lists(st.sampled_from(pool), min_size=0 if many else 1, max_size=3 if many else 1)


def _parser_of(command: str) -> argparse.ArgumentParser:
    from dist_robust.config.parsing import Parser, add_run_arguments

    if command in ("train", "eval", "certify", "config"):
        parser = Parser(prog=command)
        add_run_arguments(parser)
        parser.add_argument("--nproc-per-node", "--world-size", type=int)
        return parser
    if command == "experiment":
        from dist_robust.experiment import _parser

        return _parser()
    if command == "tune":
        from dist_robust.tuning.cli import _parser

        return _parser()
    from dist_robust.analysis.compare import build_parser

    return build_parser()


RUN_COMMANDS = ("train", "eval", "certify", "config")
REQUIRED = {"experiment": ["--experiment", "fuzz"], "tune": ["--space", str(REPO / "tuning" / "smoke.yaml")]}


def _argv(command: str):
    """A command line: options of the command (with the required ones most of the time), run options after
    ``--`` for experiment, dotted overrides for the run commands."""
    def option(parser):
        return st.sampled_from(_options(parser)).flatmap(
            lambda a: _values(a).map(lambda vs: [a.option_strings[-1], *vs]))

    own = option(_parser_of(command))
    run = option(_parser_of("train"))
    value = st.sampled_from(VALUES)
    override = st.tuples(st.sampled_from(["objective.epsilon", "train.max_steps", "data.languages", "model.name",
                                          "train.nosuch", "bogus"]), value).map(lambda t: [f"{t[0]}={t[1]}"])
    parts = st.lists(st.one_of(own, override) if command in RUN_COMMANDS else own, min_size=0, max_size=4)
    required = st.sampled_from([REQUIRED.get(command, []), REQUIRED.get(command, []), []])
    after = st.lists(run, max_size=3).map(lambda ps: ["--", *(x for p in ps for x in p)] if ps else []) \
        if command == "experiment" else st.just([])
    return st.tuples(required, parts, after).map(lambda t: [*t[0], *(x for p in t[1] for x in p), *t[2]])


@pytest.fixture
def contained(monkeypatch, tmp_path):
    """Each command's real work replaced by :class:`Reached`; no network, files only under ``tmp_path``."""
    import dist_robust.experiment as experiment
    import dist_robust.run.launch as launch
    import dist_robust.run.trainer as trainer
    import dist_robust.tuning.cli as tune_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(trainer, "run", _stop)
    monkeypatch.setattr(launch, "relaunch", _stop)
    monkeypatch.setattr(launch, "supervise", _stop)
    monkeypatch.setattr(experiment.subprocess, "call", _stop)
    monkeypatch.setattr(tune_cli, "_init_ray", _stop)
    return tmp_path


def _outcome(argv: list[str]) -> str:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(argv)
    except Reached:
        return "reached the real work"
    except SystemExit as exit_:  # argparse: a usage error
        assert exit_.code in (0, 2), (argv, exit_.code, err.getvalue())
        return f"exit {exit_.code} (usage)"
    assert code in (0, 1, 2), (argv, code)
    text = err.getvalue()
    assert "Traceback" not in text, (argv, text)
    if code:
        assert "error" in text.lower(), (argv, text)
    return f"exit {code}"


@pytest.mark.parametrize("command", ["train", "eval", "certify", "config", "experiment", "tune", "compare"])
def test_no_command_line_ends_in_a_traceback(command, contained):
    @FUZZ
    @given(_argv(command))
    def case(argv):
        OUTCOMES[command][_outcome([command, *argv])] += 1

    case()
    seen = OUTCOMES[command]
    print(f"\n{command}: {sum(seen.values())} command lines: {dict(seen)}")
    assert sum(seen.values()) >= min(CASES, 20)


@pytest.mark.parametrize("argv, needle", [
    (["--task", "xnli", "--languages", "en", "xx"], "data.languages (--languages) = xx: xnli has no such language"),
    (["--task", "xnli", "--languages", "en,xx"], "data.languages (--languages) = xx"),
    (["--model", "runs/nosuch/model"], "model.name (--model) = 'runs/nosuch/model': no such folder"),
    (["--model", "xlm-roberta-lage"], "not in the Hugging Face cache, and the hub"),
    (["--task", "xnli"], "data.data_dir (--data-dir) = None: xnli then comes from the hub"),
    (["--train-file", "/nonexistent/train.tsv"], "data.train_file (--train-file) = '/nonexistent/train.tsv': no such"),
])
def test_what_the_command_line_names_is_checked_before_anything_starts(argv, needle, contained):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["train", *argv])
    assert code == 2 and needle in err.getvalue(), err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_a_model_folder_without_a_config_and_a_data_dir_without_a_language(contained):
    (contained / "empty").mkdir()
    (contained / "data" / "xnli" / "en").mkdir(parents=True)
    (contained / "data" / "xnli" / "en" / "dev.tsv").write_text("x")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["train", "--model", str(contained / "empty"), "--task", "xnli", "--data-dir",
                         str(contained / "data"), "--languages", "en,de"])
    assert code == 2, err.getvalue()
    assert "the folder has no config.json" in err.getvalue()
    assert "no dev file for 'de'" in err.getvalue() and "no dev file for 'en'" not in err.getvalue()


def test_comma_lists_are_lists(contained):
    from dist_robust.config.parsing import Parser, add_run_arguments, config_from_args

    parser = Parser(prog="t")
    add_run_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--languages", "en,de", "fr", "--tags", "note=a,b"]))
    assert cfg.data.languages == ["en", "de", "fr"] and cfg.tracking.tags == ["note=a,b"]


def test_an_unreachable_hub_is_known_in_seconds(monkeypatch):
    import time

    from dist_robust.run import preflight

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    preflight._reachable.clear()
    start = time.monotonic()
    problem = preflight.model_problem("model.name", "someone/some-model")
    assert time.monotonic() - start < 5 and "cannot be reached" in problem
