"""``dist-robust align``: the command line of :mod:`.alignment` (one model) and :mod:`.alignment_runs` (``--runs``:
every model of an experiment)."""

from __future__ import annotations

import json
import os
import re
import sys

from dist_robust.analysis.alignment import MEASURES, align_report, format_report, metrics_of


def _parser():
    from dist_robust.config.parsing import Parser

    p = Parser(prog="dist-robust align",
               description="How far each language's sentences lie from their English translations, layer by layer.")
    p.add_argument("--model", required=True, help="Model folder (an exported run's model/) or hub name; with "
                   "--runs, the pretrained model the runs started from.")
    p.add_argument("--runs", default=None, metavar="ROOT",
                   help="Measure every exported model of an experiment (its --output-root: folders <method>-s<seed>) "
                        "and relate each language's zero-shot gap to its misalignment, per method over seeds; "
                        "reports kept in ROOT/align (see docs/results.md).")
    p.add_argument("--measure", default="relative_distance", choices=MEASURES,
                   help="With --runs: the misalignment (cosine and retrieval as 1 - value).")
    p.add_argument("--layer", default="embeddings", help="With --runs: where it is measured: embeddings (what the "
                   "perturbations perturb), layer<k> or last.")
    p.add_argument("--plot-dir", default=None, help="With --runs: the plot's folder (default ROOT/align).")
    p.add_argument("--task", choices=("xnli", "pawsx"), default="xnli", help="Parallel dev sets of this task.")
    p.add_argument("--data-dir", default=None, help="As in training (default: the hub).")
    p.add_argument("--languages", nargs="+", default=[], help="Languages against English (default: all).")
    p.add_argument("--max-sentences", type=int, default=1000, help="Evenly spaced rows per language.")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", default=None, help="Write the report here as JSON.")
    p.add_argument("--mlflow-uri", default=None, help="Tracking URI (as training: 'none' turns it off).")
    p.add_argument("--experiment", default=None, help="MLflow experiment (as training).")
    p.add_argument("--run-id", default=None, help="Log into this run (e.g. the model's training run).")
    p.add_argument("--tags", nargs="+", default=[], metavar="KEY=VALUE", help="Tags of a new run.")
    return p


def align_main(argv: list[str] | None = None) -> int:
    """``dist-robust align --model DIR --task xnli --data-dir D``: the report, as JSON, on the console, in MLflow."""
    from dist_robust.config.run_config import ConfigError
    from dist_robust.data.readers import DataFileError
    from dist_robust.data.tasks import task_languages
    from dist_robust.run.evaluate import ParallelIdError
    from dist_robust.run.preflight import model_problem

    args = _parser().parse_args(argv)
    langs = [lang for item in args.languages for lang in item.split(",") if lang] or \
        [lang for lang in task_languages(args.task) if lang != "en"]
    problems = [f"--languages {lang}: {args.task} has no such language; accepted: "
                f"{' '.join(task_languages(args.task))}" for lang in langs if lang not in task_languages(args.task)]
    problem = model_problem("model.name", args.model)
    problems += [problem] if problem else []
    if args.max_sentences < 2:
        problems.append(f"--max-sentences {args.max_sentences}: must be >= 2")
    if args.runs and (args.output or args.run_id or args.tags):
        problems.append("--output, --run-id and --tags are for one model: with --runs every report goes to "
                        "ROOT/align and into its training run")
    if args.runs and not (args.layer in ("embeddings", "last") or re.fullmatch(r"layer[1-9][0-9]{0,2}", args.layer)):
        problems.append(f"--layer {args.layer}: embeddings, layer<k> (layer1 is the first) or last")
    if problems:
        print(f"error: {ConfigError(problems)}", file=sys.stderr)
        return 2
    if args.runs:
        from dist_robust.analysis.alignment_runs import AlignRunsError, run_over_experiment

        args.languages = langs
        try:
            return run_over_experiment(args)
        except (AlignRunsError, ConfigError, DataFileError, ParallelIdError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        report = align_report(args.model, args.task, args.data_dir, langs, args.max_sentences, args.batch_size)
    except (ConfigError, DataFileError, ParallelIdError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report), flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    _track(report, args)
    return 0


def _track(report: dict, args) -> None:
    from dist_robust.run.tracking import MLflowTracker, resolve_experiment, resolve_uri

    uri = resolve_uri(args.mlflow_uri)
    if uri is None:
        return
    tags = {"phase": "align", "model": report["model"], **dict(t.partition("=")[::2] for t in args.tags)}
    tracker = MLflowTracker(uri, resolve_experiment(args.experiment),
                            f"align {os.path.basename(report['model'].rstrip('/'))}", run_id=args.run_id,
                            tags=None if args.run_id else tags)
    tracker.log_metrics(metrics_of(report), step=0)
    tracker.log_dict(report, "alignment.json")
    tracker.finish()
