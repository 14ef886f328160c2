"""The README and docs run as written.

Every ``bash`` block is read: each ``train.py`` / ``dist-robust ...`` command in it must parse
with the real argument parsers (a renamed or misspelled flag fails here). Blocks marked
``<!-- runnable -->`` are run for real, in document order, in a fresh directory, with
``$DIST_ROBUST_OVERRIDES`` shrinking every run to a few steps of the tiny model (the quick
start's ``make train`` itself is ``tests/test_default_run.py``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = "<!-- runnable -->"
TINY_OVERRIDES = ("data.synthetic_train_size=256 data.synthetic_eval_size=32 model.tokenizer_vocab_size=600 "
                  "model.max_length=64 train.max_steps=4 train.eval_steps=2 train.save_steps=0 "
                  "train.micro_batch_size=8 train.progress=false")


def bash_blocks(path: Path) -> list[tuple[bool, str, int]]:
    """(marked runnable, text, first line number) of every ```bash block."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            end = lines.index("```", i + 1)
            out.append((before == RUNNABLE, "\n".join(lines[i + 1:end]), i + 1))
            i = end
        i += 1
    return out


def commands(block: str) -> list[list[str]]:
    """Each command of a block as tokens: continuations joined, comments dropped, loop variables filled in."""
    text = block.replace("\\\n", " ")
    loops = dict(re.findall(r"for (\w+) in (\S+)", text))
    out = []
    for line in text.splitlines():
        for name, first in loops.items():
            line = line.replace(f"${name}", first)
        tokens = shlex.split(line, comments=True)
        if tokens:
            out.append(tokens)
    return out


def _parser_for(tokens: list[str]):
    """(parser, its arguments) for a dist-robust command, or None for other commands."""
    from dist_robust.config.parsing import Parser
    from dist_robust.config.parsing import add_run_arguments

    def run_parser():
        p = Parser(prog="train")
        add_run_arguments(p)
        p.add_argument("--nproc-per-node", type=int)
        return p

    if "train.py" in tokens:
        return run_parser(), tokens[tokens.index("train.py") + 1:]
    if tokens[0] != "dist-robust" or len(tokens) < 2:
        return None
    sub, args = tokens[1], tokens[2:]
    if sub in ("train", "eval", "certify", "config"):
        parser = run_parser()
        parser.add_argument("--world-size", type=int)
        return parser, args
    if sub == "compare":
        from dist_robust.analysis.compare import build_parser

        return build_parser(), args
    if sub == "experiment":  # its own options, then "--" and training options (checked by the train parser)
        from dist_robust.experiment import _parser

        if "--" in args:
            run_parser().parse_args(args[args.index("--") + 1:])
            args = args[:args.index("--")]
        return _parser(), args
    if sub == "tune":
        from dist_robust.tuning.cli import _parser

        return _parser(), args
    if sub == "augment":
        from dist_robust.data.augment import _parser

        return _parser(), args
    if sub in ("import-model", "trim-vocab"):
        from dist_robust.model import commands

        return {"import-model": commands.import_model_parser, "trim-vocab": commands.trim_vocab_parser}[sub](), args
    if sub == "align":
        from dist_robust.analysis.align_cli import _parser

        return _parser(), args
    raise AssertionError(f"unknown command in the docs: dist-robust {sub}")


ALL_COMMANDS = [(f"{path.name}:{line}", tokens) for path in DOCS for _, block, line in bash_blocks(path)
                for tokens in commands(block)]


@pytest.mark.parametrize("where,tokens", ALL_COMMANDS, ids=[w for w, _ in ALL_COMMANDS])
def test_every_documented_command_parses(where, tokens):
    found = _parser_for(tokens)
    if found is None:
        return
    parser, args = found
    try:
        parser.parse_args(args)
    except SystemExit as exit_:
        raise AssertionError(f"{where}: `{' '.join(tokens)}` does not parse") from exit_


def test_documents_have_runnable_blocks():
    assert sum(runnable for path in DOCS for runnable, _, _ in bash_blocks(path)) >= 2


@pytest.mark.launcher
def test_runnable_blocks_run_as_written(tmp_path):
    for name in ("train.py", "ds_configs", "tuning"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", DIST_ROBUST_OVERRIDES=TINY_OVERRIDES, OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    # Every command here runs without a launcher's environment (one process), as the stripped env makes sure.
    steps = [(f"{path.name}:{line}", block) for path in DOCS for runnable, block, line in bash_blocks(path)
             if runnable]
    outputs = {}
    for where, script in steps:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{where} failed:\n{script}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs[where] = proc.stdout
    # the README's experiment: two seeds per method, the paired table against ERM, the plots
    assert any("| erm (baseline) | 2 |" in out and "| gaussian | " in out and "paired by seed" in out
               for out in outputs.values())
    assert (tmp_path / "runs" / "synthetic-small" / "gaussian-s2" / "results.json").exists()
    assert (tmp_path / "runs" / "erm-s1-eval" / "results.json").exists()  # the README's eval
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlruns").is_dir()


def _numbers(text: str) -> list[str]:
    """Signed or unsigned decimals as written (``+0.92``, ``68.91``), intervals' ends included."""
    return re.findall(r"[+-]?\d+\.\d+", text)


def _table_rows(text: str, first_header: str) -> dict[str, str]:
    """The rows (first cell -> the rest of the line) of the Markdown table whose header starts with ``first_header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header}"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = " | ".join(cells[1:])
    return rows


def test_the_results_the_readme_repeats_are_the_results_in_docs_results():
    """Every number in the README's two results tables appears in docs/results.md's table of the same
    method, and every method with five seeds there has its row in the README."""
    readme, results = (REPO / "README.md").read_text(), (REPO / "docs" / "results.md").read_text()
    synthetic = _table_rows(readme, "method | standard avg")
    source = _table_rows(results, "method | n | en")
    for method, values in synthetic.items():
        name = method.split(" (")[0].replace(" + ", "+")
        row = source[f"{name} (baseline)" if name == "erm" else name]
        for number in _numbers(values):
            assert number.lstrip("+") in row or number in results, (method, number)
    pretrained = _table_rows(readme, "method | en | zero-shot avg")
    minilm = _table_rows(results, "method | en | standard avg (de, es, fr)")
    assert {m.split(" (")[0] for m in pretrained} == {m.split(" (")[0] for m in minilm}, "a method missing"
    for method, values in pretrained.items():
        row = next(v for m, v in minilm.items() if m.split(" (")[0] == method.split(" (")[0])
        for number in _numbers(values):
            assert number in row, (method, number, row)
    assert "2 of its 5 seeds" not in readme


def test_every_picture_the_docs_show_exists_and_is_named_for_what_it_shows():
    """An image link must resolve; a generalized-difference picture's file and alt text name the same method,
    and a `generalized_diff_<method>.png` the text names must be a difference picture of that method shown
    there (a picture titled "synonym - erm" is not generalized_diff_gaussian.png)."""
    for doc in DOCS:
        text = doc.read_text()
        images = re.findall(r"!\[([^\]]*)\]\(([^)]+)\)", text)
        for alt, target in images:
            assert (doc.parent / target).exists(), (doc.name, target)
            stem = Path(target).stem
            if "generalized_diff_" in stem:
                assert stem.rsplit("generalized_diff_", 1)[1] in alt.lower(), (doc.name, target, alt)
        differences = [alt.lower() for alt, _ in images if " minus " in alt.lower()]
        for named in re.findall(r"`generalized_diff_(\w+)\.png`", text):
            assert any(named in alt for alt in differences), (doc.name, named, differences)
