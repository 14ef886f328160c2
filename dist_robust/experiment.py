"""``dist-robust experiment``: every method over several seeds, hyperparameters picked on source dev.

One command runs the comparison the product exists for: ERM against the robust objectives,

    erm, pgd, freelb, gaussian, synonym (RS-DA on the fly), synonym+pgd
    (and, when asked, smart, and synonym-offline: RS-DA as the paper runs it)

each over ``--seeds``, as ordinary training runs (``dist-robust train``, one at a time, so
every run has the machine) logged to one MLflow experiment. Before them, an optional
selection sweep (``--select lr=2e-5,5e-5 epsilon=0.03,0.1,0.3 sigma=... synonym_prob=...``; an
epsilon brings its ascent step, alpha = epsilon / 2) trains the
method that owns each hyperparameter on separate ``--select-seeds`` *without* the generalized
evaluation and keeps the value with the highest mean **source-language dev** accuracy of the
selected checkpoints (ties: the smaller value, the least departure from ERM). Hyperparameters
are chosen one after the other, in the order given, each sweep using the values chosen before
it (``lr`` first: the learning rate of every method, chosen with ERM). No target
language and no test set is looked at, so the comparison stays zero-shot. The choice is
written to ``selection.json`` and used by every method that has the hyperparameter.

With ``--extra-languages``, each run's exported model is then evaluated on more languages, per
language only (the generalized matrix grows with the square of the languages), together with
the source language, whose accuracy must repeat the run's own: a check that the exported model
is the one that was evaluated. These runs are tagged ``phase=extra``; the summary joins each
with its training run (``compare --join tags.method seed``), so every language is one table.

Resumable: a run whose ``results.json`` exists is skipped, an interrupted one continues from
its last checkpoint (``--resume auto``), and ``selection.json`` is reused. At the end the
experiment is summarised by ``dist-robust compare`` (mean +- std per language, the averages,
and paired differences against ERM over seeds) and, with ``--align``, by ``dist-robust align
--runs``: every model's alignment with English and the zero-shot gap against it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from dist_robust.infra import storage
from dist_robust.config.parsing import without_flags
from dist_robust.infra.clock import duration
from dist_robust.infra.redaction import redact

METHODS: dict[str, list[str]] = {
    "erm": ["--objective", "erm"],
    "pgd": ["--objective", "pgd"],
    "freelb": ["--objective", "freelb"],
    "gaussian": ["--objective", "gaussian"],
    "synonym": ["--objective", "erm", "--augment", "synonym"],
    "synonym+pgd": ["--objective", "pgd", "--augment", "synonym"],
    "smart": ["--objective", "smart"],
    # RS-DA as the paper runs it: trained on a file holding every pair --augment-copies times, each copy
    # substituted afresh (dist-robust augment), made once per seed from the run's --train-file
    "synonym-offline": ["--objective", "erm"],
}
OFFLINE = "synonym-offline"
DEFAULT_METHODS = ("erm", "pgd", "freelb", "gaussian", "synonym", "synonym+pgd")  # the paper's comparison
# The hyperparameters a selection sweep may choose, the method it is chosen on, and who uses it.
SELECTABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "lr": ("erm", tuple(METHODS)),
    "epsilon": ("pgd", ("pgd", "freelb", "synonym+pgd")),
    "sigma": ("gaussian", ("gaussian",)),
    "synonym_prob": ("synonym", ("synonym", "synonym+pgd", OFFLINE)),
}
# The training runs and the --extra-languages evaluations of their models (MLflow's search has no OR).
EVERY_LANGUAGE = "tags.phase != 'select' and tags.phase != 'align' and tags.phase != 'align-summary'"
_FLAG = {"lr": "--lr", "epsilon": "--epsilon", "sigma": "--sigma", "synonym_prob": "--synonym-prob"}
_WITH_ALPHA = ("epsilon",)  # the ascent step follows the radius: alpha = epsilon / 2


def parse_select(specs: list[str]) -> dict[str, list[float]]:
    """``["epsilon=0.03,0.1"]`` -> ``{"epsilon": [0.03, 0.1]}``, with errors that list what is accepted."""
    out: dict[str, list[float]] = {}
    for spec in specs:
        key, _, values = spec.partition("=")
        key = key.replace("-", "_")
        if key not in SELECTABLE or not values:
            raise ValueError(f"--select {spec!r}: expected NAME=V1,V2,... with NAME one of {', '.join(SELECTABLE)}")
        try:
            out[key] = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise ValueError(f"--select {spec!r}: the values must be numbers, e.g. {key}=0.03,0.1,0.3") from None
    return out


def choose(mean_dev: dict[float, float]) -> float:
    """The value with the highest mean source dev accuracy; ties go to the smaller value."""
    best = max(mean_dev.values())
    return min(v for v, acc in mean_dev.items() if acc >= best - 1e-9)


def run_flags(method: str, chosen: dict[str, float]) -> list[str]:
    """The training flags of one method, with the hyperparameters chosen for it."""
    flags = list(METHODS[method])
    for key, value in chosen.items():
        if method in SELECTABLE[key][1]:
            flags += [_FLAG[key], repr(value)] + (["--alpha", repr(value / 2)] if key in _WITH_ALPHA else [])
    return flags


class Runner:
    """Runs ``dist-robust train`` once per (label, seed) into ``root/label-s<seed>``, skipping done ones."""

    def __init__(self, args: argparse.Namespace, extra: list[str]):
        self.args, self.extra = args, extra
        self.done = 0
        self.seconds: dict[str, list[float]] = {}  # wall time of the runs trained here, by method
        self.extra_seconds: list[float] = []  # wall time of the --extra-languages evaluations made here

    def finished(self, label: str, seed: int) -> bool:
        return storage.exists(storage.join(self.args.output_root, f"{label}-s{seed}", "results.json"))

    def results(self, label: str, seed: int) -> dict:
        return json.loads(storage.read_text(storage.join(self.args.output_root, f"{label}-s{seed}", "results.json")))

    def train(self, label: str, seed: int, flags: list[str], total: int, phase: str = "main", method: str = "",
              after: list[tuple[str, int, str]] = ()) -> dict:
        """Train (or keep) one run; ``after``: the (label, seed, method) runs still to come, for the time left."""
        out = storage.join(self.args.output_root, f"{label}-s{seed}")
        self.done += 1
        prefix = f"[{self.done}/{total}] {label} seed {seed}"
        if self.finished(label, seed):
            print(f"{prefix}: done before, kept", flush=True)
            return self.results(label, seed)
        last = ["--train-file", self.augmented(seed, flags)] if (method or label) == OFFLINE else []
        cmd = [sys.executable, "-m", "dist_robust.cli", "train", *flags, "--seed", str(seed), "--output-dir", out,
               "--resume", "auto", "--experiment", self.args.experiment, "--run-name", f"{label} s{seed}",
               "--tags", f"method={label}", f"phase={phase}", "--no-progress", *self.extra, *self._launch_flags(),
               *last]
        print(f"{prefix}: {redact(' '.join(cmd[3:]))}", flush=True)
        start = time.monotonic()
        self._call(cmd, f"{label}-s{seed}", f"{label} seed {seed}")
        result = self.results(label, seed)
        if self.args.prune_checkpoints and result.get("model_uri"):
            storage.remove(storage.join(out, "checkpoints"))  # the exported model is what the comparison keeps
        seconds = time.monotonic() - start
        self.seconds.setdefault(method or label, []).append(seconds)
        print(f"{prefix}: {seconds:.0f} s, {self.args.source_language} dev "
              f"{100 * result['best_dev_source_acc']:.2f}{self.time_left(after)}", flush=True)
        return result

    def augmented(self, seed: int, flags: list[str]) -> str:
        """The offline RS-DA training file of ``seed`` (``dist-robust augment``), written once and kept."""
        from dist_robust.data.augment import augment_main

        def option(name: str, default: str | None = None) -> str | None:
            found = [args[i + 1] for args in (flags, self.extra) for i, a in enumerate(args[:-1]) if a == name]
            return found[-1] if found else default

        task, source, synonyms = option("--task"), option("--train-file"), option("--synonyms")
        if task not in ("pawsx", "xnli") or not source or not synonyms:
            raise RuntimeError(f"{OFFLINE} writes its training file from the runs' --task (pawsx or xnli), "
                               f"--train-file and --synonyms: pass them after --")
        out = storage.join(self.args.output_root, "augmented", f"{task}-c{self.args.augment_copies or 'paper'}-"
                           f"p{option('--synonym-prob', '1.0')}-s{seed}.tsv")
        if not storage.exists(out):
            argv = ["--task", task, "--input", source, "--output", out + ".partial.tsv", "--synonyms", synonyms,
                    "--synonym-prob", option("--synonym-prob", "1.0"), "--seed", str(seed)]
            argv += ["--copies", str(self.args.augment_copies)] if self.args.augment_copies else []
            if augment_main(argv):
                raise RuntimeError(f"dist-robust augment {' '.join(argv)} failed")
            storage.write_text(out, storage.read_text(out + ".partial.tsv"))
            storage.remove(out + ".partial.tsv")
        return out

    def evaluate_more(self, label: str, seed: int, run: dict, languages: list[str]) -> None:
        """Evaluate a run's exported model (``run``: its results) on ``languages``, per language, plus the
        source again; kept if done."""
        out = storage.join(self.args.output_root, "extra", f"{label}-s{seed}")
        if storage.exists(storage.join(out, "results.json")):
            return
        if not run.get("model_uri"):  # (results name it with credentials masked: the run's folder is used)
            raise RuntimeError(f"{label} seed {seed} exported no model (was --no-export-model given?): "
                               "--extra-languages evaluates each run's exported model")
        source = self.args.source_language
        model = storage.join(self.args.output_root, f"{label}-s{seed}", "model")
        cmd = [sys.executable, "-m", "dist_robust.cli", "eval", *self.extra, "--model", model,
               "--languages", source, *(lang for lang in languages if lang != source), "--no-generalized",
               "--eval-split", run["eval_split"], "--seed", str(seed), "--output-dir", out,
               "--experiment", self.args.experiment, "--run-name", f"{label} s{seed} extra",
               "--tags", f"method={label}", "phase=extra", "--no-progress", *self._launch_flags()]
        start = time.monotonic()
        self._call(cmd, f"{label}-s{seed}-extra", f"{label} seed {seed}, --extra-languages")
        self.extra_seconds.append(time.monotonic() - start)
        acc = json.loads(storage.read_text(storage.join(out, "results.json")))["per_language"]
        again, own = acc[source], run["per_language"][source]
        check = ("as the run's own" if abs(again - own) < 5e-4 else
                 f"NOT the run's own {100 * own:.2f}: the exported model, data or split differ from the run's")
        print("    " + ", ".join(f"{lang} {100 * a:.2f}" for lang, a in acc.items() if lang != source)
              + f" ({source} {100 * again:.2f}, {check})", flush=True)

    def _launch_flags(self) -> list[str]:
        # (--mlflow-uri goes to the runs through their environment: an argv is readable by every user)
        return ["--nproc-per-node", str(self.args.nproc_per_node)] if self.args.nproc_per_node else []

    def _call(self, cmd: list[str], log_name: str, what: str) -> None:
        """Run one ``dist-robust`` command, its output appended to ``logs/<log_name>.log``."""
        log_path = os.path.join(self.args.log_dir, f"{log_name}.log")
        with open(log_path, "a") as log:  # a resumed run's log keeps what its earlier launches wrote
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} dist-robust {redact(' '.join(cmd[3:]))}\n")
            log.flush()
            env = {**os.environ, **({"MLFLOW_TRACKING_URI": self.args.mlflow_uri} if self.args.mlflow_uri else {})}
            code = subprocess.call(self._private_argv(cmd, log_name), stdout=log, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            raise RuntimeError(f"{what} failed (exit {code}); its log: {log_path}. Rerunning the same command "
                               "continues where it stopped (a training run from its last checkpoint)")

    def _private_argv(self, cmd: list[str], name: str) -> list[str]:
        """``cmd`` as launched: when an option carries a credential (a URL's password, a token), the options go
        in a file only this user can read (``@file``: one per line) instead of the command line, which
        every user of the machine can read in the process table."""
        head, options = cmd[:4], cmd[4:]  # python -m dist_robust.cli <command>
        if all(redact(o) == o for o in options):
            return cmd
        folder = os.path.join(self.args.log_dir, ".options")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        path = os.path.join(folder, f"{name}.args")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
            f.write("".join(f"{o}\n" for o in options))
        return [*head, f"@{path}"]

    def time_left(self, after: list[tuple[str, int, str]]) -> str:
        """``; about 2.3 h left (7 run(s))``: each run to come at its method's mean time so far (else all runs')."""
        todo = [method for label, seed, method in after if not self.finished(label, seed)]
        if not todo:
            return ""
        every = [s for times in self.seconds.values() for s in times]
        left = sum(statistics.fmean(self.seconds.get(method) or every) for method in todo)
        left += len(todo) * (statistics.fmean(self.extra_seconds) if self.extra_seconds else 0.0)
        return f"; about {duration(left)} left ({len(todo)} run(s))"


def select(runner: Runner, grid: dict[str, list[float]], seeds: list[int],
           then: list[tuple[str, int, str]] = ()) -> dict[str, float]:
    """The selection sweep (source dev only, no generalized evaluation); reuses selection.json.

    ``then``: the (label, seed, method) runs that follow it, counted in the time left.
    """
    path = storage.join(runner.args.output_root, "selection.json")
    saved = json.loads(storage.read_text(path)) if storage.exists(path) else {}
    if saved and saved.get("grid") != grid:
        raise ValueError(f"{path} was made for the grid {saved.get('grid')}, not {grid}: use another "
                         "--output-root, or delete it to select again")
    if saved:
        return saved["chosen"]
    plan = [(f"select-{key}-{value:g}", s, SELECTABLE[key][0], key, value)
            for key, values in grid.items() for value in values for s in seeds]
    chosen, table = {}, {}
    for key, values in grid.items():  # in the order given: each sweep runs at the values chosen before it
        accs: dict[float, list[float]] = {}
        for i, (label, s, method, k, value) in enumerate(plan):
            if k != key:
                continue
            after = [run[:3] for run in plan[i + 1:]] + list(then)
            result = runner.train(label, s, run_flags(method, {**chosen, key: value}) + ["--no-generalized"],
                                  len(plan), "select", method, after)
            accs.setdefault(value, []).append(result["best_dev_source_acc"])
        mean_dev = {value: statistics.fmean(accs[value]) for value in values}
        chosen[key] = choose(mean_dev)
        table[key] = {f"{v:g}": round(100 * acc, 2) for v, acc in mean_dev.items()}
        print(f"selected {key} = {chosen[key]:g} on {runner.args.source_language} dev: {table[key]}", flush=True)
    storage.write_text(path, json.dumps({"grid": grid, "seeds": seeds, "source_dev_accuracy": table,
                                         "chosen": chosen}, indent=2))
    return chosen


def _parser() -> argparse.ArgumentParser:
    from dist_robust.config.parsing import Parser

    p = Parser(prog="dist-robust experiment", description=__doc__.split("\n")[0],
               usage="dist-robust experiment --experiment NAME [options] [-- TRAIN_OPTIONS...]",
               epilog="Everything after -- goes to every training run (e.g. -- --task xnli --model DIR).")
    p.add_argument("--experiment", required=True, help="MLflow experiment the runs are logged to.")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"Methods to run, of {', '.join(METHODS)} (default: {', '.join(DEFAULT_METHODS)}).")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="Seeds of every method.")
    p.add_argument("--select", nargs="+", default=[], metavar="NAME=V1,V2",
                   help=f"Choose hyperparameters first, on source dev ({', '.join(SELECTABLE)}).")
    p.add_argument("--select-seeds", nargs="+", type=int, default=[101, 102],
                   help="Seeds of the selection sweep (kept apart from --seeds).")
    p.add_argument("--output-root", default=None, help="Directory of the runs (default: runs/<experiment>).")
    p.add_argument("--nproc-per-node", type=int, default=None, help="Ranks per run (default: one process).")
    p.add_argument("--mlflow-uri", default=None, help="Tracking URI (default: as dist-robust train).")
    p.add_argument("--source-language", default="en", help="Language whose dev accuracy selects (as in training).")
    p.add_argument("--plot-dir", default=None, help="Also write the comparison plots here.")
    p.add_argument("--prune-checkpoints", action="store_true",
                   help="Delete a run's checkpoints once it has finished and exported its model (each one holds "
                        "the optimizer state: several times the model's size).")
    p.add_argument("--augment-copies", type=int, default=None, metavar="N",
                   help=f"{OFFLINE}: copies of every training pair (default: the paper's, 3 for XNLI, 10 for "
                        "PAWS-X). Keep --max-steps: the runs then see every pair's copies once as often as the "
                        "others see the pair.")
    p.add_argument("--extra-languages", nargs="+", default=[], metavar="LANG",
                   help="Also evaluate every run's exported model on these languages, per language only "
                        "(no generalized matrix), tagged phase=extra and summarised with the runs; e.g. tr vi sw.")
    p.add_argument("--align", action="store_true",
                   help="At the end, measure the alignment of every run's exported model and of the pretrained "
                        "one (dist-robust align --runs), and relate each language's zero-shot gap to it, per "
                        "method over seeds. Needs the runs' --task (xnli or pawsx: parallel dev sets) and --model.")
    p.add_argument("--align-sentences", type=int, default=1000, metavar="N",
                   help="--align: parallel dev sentences per language.")
    return p


def option_value(argv: list[str], name: str) -> str | None:
    """The last value of ``name`` in a training command line (``--name V`` or ``--name=V``)."""
    found = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith(name + "="):
            found = arg.split("=", 1)[1]
    return found


def align_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """``dist-robust align --runs`` for the experiment's runs, or ValueError saying what is missing."""
    task, model = option_value(extra, "--task"), option_value(extra, "--model")
    if task not in ("xnli", "pawsx") or not model:
        raise ValueError(f"--align measures on a task's parallel dev sets from the pretrained model: pass the "
                         f"runs' --task xnli or --task pawsx and --model after -- (given: --task {task}, "
                         f"--model {model})")
    if args.align_sentences < 2:
        raise ValueError(f"--align-sentences {args.align_sentences}: must be >= 2")
    if "--no-export-model" in extra:
        raise ValueError("--align measures every run's exported model: drop --no-export-model from the training "
                         "options")
    data_dir = option_value(extra, "--data-dir")
    return ["--runs", args.output_root, "--model", model, "--task", task, "--experiment", args.experiment,
            "--max-sentences", str(args.align_sentences), *(["--data-dir", data_dir] if data_dir else []),
            *(["--mlflow-uri", args.mlflow_uri] if args.mlflow_uri else [])]


def experiment_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = _parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    # An experiment name may be a path in MLflow's sense (/Shared/x on Databricks): one folder name here.
    args.output_root = args.output_root or os.path.join("runs", storage.safe_segment(args.experiment))
    try:
        grid = parse_select(args.select)
        if args.extra_languages and "--no-export-model" in extra:
            raise ValueError("--extra-languages evaluates every run's exported model: drop --no-export-model "
                             "from the training options")
        align = align_argv(args, extra) if args.align else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.log_dir = os.path.join(args.output_root, "logs") if "://" not in args.output_root else \
        os.path.join("runs", storage.safe_segment(args.experiment), "logs")
    try:
        os.makedirs(args.log_dir, exist_ok=True)
    except OSError as err:
        print(f"error: --output-root {args.output_root}: cannot create {args.log_dir} ({err.strerror})",
              file=sys.stderr)
        return 2
    if args.mlflow_uri:  # the experiment's tracking wins over one in the training options (as a last flag would)
        extra = without_flags(extra, ("--mlflow-uri",))
    runner = Runner(args, extra)
    start = time.monotonic()
    try:
        # Seed by seed, every method within a seed: an experiment stopped early still holds
        # complete seeds, each a paired comparison against ERM.
        plan = [(method, seed, method) for seed in args.seeds for method in args.methods]
        chosen = select(runner, grid, args.select_seeds, plan)
        runner.done = 0
        for i, (method, seed, _) in enumerate(plan):
            run = runner.train(method, seed, run_flags(method, chosen), len(plan), method=method, after=plan[i + 1:])
            if args.extra_languages:
                runner.evaluate_more(method, seed, run, args.extra_languages)
    except (RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"experiment {args.experiment}: {len(args.methods)} method(s) x {len(args.seeds)} seed(s) in "
          f"{(time.monotonic() - start) / 60:.1f} min", flush=True)
    from dist_robust.analysis.compare import compare_main

    def summary(filter_string: str, *more: str) -> list[str]:
        flags = ["--experiment", args.experiment, "--group-by", "tags.method", "--filter", filter_string, *more]
        flags += ["--baseline", "erm", "--paired"] if "erm" in args.methods else []
        return flags + (["--mlflow-uri", args.mlflow_uri] if args.mlflow_uri else [])

    if "erm" not in args.methods:
        print("no erm among --methods: the summary has no baseline (add erm to pair the methods against it; "
              "finished runs are kept)", flush=True)
    code = compare_main(summary("tags.phase = 'main'", *(["--plot-dir", args.plot_dir] if args.plot_dir else [])))
    if args.extra_languages:
        print(f"\nevery language: each run joined with its --extra-languages ({', '.join(args.extra_languages)}) "
              "evaluation, standard_avg over all of their target languages:", flush=True)
        code = compare_main(summary(EVERY_LANGUAGE, "--join", "tags.method", "seed")) or code
    if align:
        from dist_robust.analysis.align_cli import align_main

        print("\nalignment of every model against English, and the zero-shot gap against it:", flush=True)
        code = align_main(align) or code
    return code
