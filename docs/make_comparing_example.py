"""Log synthetic PAWS-X runs to an MLflow store, then draw the table and pictures of docs/comparing.md.

    python docs/make_comparing_example.py --mlflow-uri sqlite:///example.db --img-dir docs/img
    dist-robust compare --mlflow-uri sqlite:///example.db --experiment pawsx-example \\
        --group-by objective --baseline erm --format markdown

Two experiments: ``pawsx-example`` holds each objective at its best perturbation size with three
seeds; ``pawsx-example-sweep`` a sweep over the size, its trials nested under one parent run as
Ray Tune trials are. The accuracies are made up (a gain that peaks at a middle size and is larger
for languages far from English, plus seed noise); the runs carry the params, tags and metrics a
training run logs.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil

from mlflow.entities import Metric, Param

from dist_robust.compare import compare_runs
from dist_robust.compare_format import render
from dist_robust.compare_plots import log_sweep_plots, write_comparison_plots
from dist_robust.mlflow_runs import PARENT_TAG, open_client

LANGS = ("en", "de", "es", "fr", "ja", "ko", "zh")
ERM_ACC = {"en": 0.935, "de": 0.862, "es": 0.878, "fr": 0.884, "ja": 0.776, "ko": 0.768, "zh": 0.801}
DISTANCE = {"en": 0.0, "de": 0.4, "es": 0.35, "fr": 0.35, "ja": 1.0, "ko": 1.0, "zh": 0.9}
SWEEP = {"erm": [None], "pgd": [0.01, 0.03, 0.1, 0.3, 1.0], "freelb": [0.03, 0.1, 0.3, 1.0],
         "gaussian": [0.003, 0.01, 0.03, 0.1]}
BEST = {"erm": [None], "pgd": [0.1], "freelb": [0.3], "gaussian": [0.01]}
PEAK = {"pgd": (0.1, 0.024), "freelb": (0.3, 0.02), "gaussian": (0.01, 0.012)}  # best size, best gain
SEEDS = (1, 2, 3)
STEPS = 60
DOC_PICTURES = {"generalized_diff_pgd.png": "compare_generalized_diff.png",
                os.path.join("sweep", "sweep_standard_avg.png"): "compare_sweep.png"}


def gain(objective: str, size: float | None) -> float:
    """Accuracy gain at perturbation ``size``: rises to the objective's peak, then falls off."""
    if size is None:
        return 0.0
    best, top = PEAK[objective]
    r = size / best
    return top * r * math.exp(1 - r) - 0.006 * max(0.0, r - 3)


def synthetic_run(objective: str, size: float | None, seed: int) -> dict:
    """Final metrics of one made-up run (accuracies as fractions)."""
    rng = random.Random(f"{objective}-{size}-{seed}")
    g = gain(objective, size)
    acc = {lang: ERM_ACC[lang] + g * (0.3 + DISTANCE[lang]) + rng.gauss(0, 0.004) for lang in LANGS}
    gen = {(a, b): (acc[a] + acc[b]) / 2 - (1.5 * max(DISTANCE[a], DISTANCE[b]) * (0.05 - g)) * (a != b)
           + rng.gauss(0, 0.003) for a in LANGS for b in LANGS}
    metrics = {f"acc.{lang}": v for lang, v in acc.items()}
    metrics.update({f"gen.{a}.{b}": v for (a, b), v in gen.items()})
    metrics["source_acc"] = acc["en"]
    metrics["standard_avg"] = sum(acc[lang] for lang in LANGS[1:]) / (len(LANGS) - 1)
    metrics["all_avg"] = sum(acc.values()) / len(LANGS)
    metrics["generalized_avg"] = sum(v for (a, b), v in gen.items() if a != b) / (len(LANGS) * (len(LANGS) - 1))
    return metrics


def log_run(client, experiment_id: str, parent_id: str | None, objective: str, size: float | None, seed: int) -> None:
    """One trial with the params, tags, per-step and final metrics a training run logs."""
    name = f"{objective}-{size}-s{seed}" if size is not None else f"{objective}-s{seed}"
    tags = {"task": "pawsx", "objective": objective, **({PARENT_TAG: parent_id} if parent_id else {})}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    params = {"objective.name": objective, "objective.epsilon": 0.1, "objective.sigma": 0.01,
              "train.seed": seed, "train.lr": 2e-5, "data.task": "pawsx", "data.source_language": "en",
              "model.name": "xlm-roberta-base"}
    if size is not None:
        params["objective.sigma" if objective == "gaussian" else "objective.epsilon"] = size
    final = synthetic_run(objective, size, seed)
    rng = random.Random(f"{name}-loss")
    floor = 0.25 + 0.08 * (objective in ("pgd", "freelb"))  # adversarial losses stay higher
    history = [Metric("train/loss", floor + 0.45 * math.exp(-step / 15) + rng.gauss(0, 0.02), 0, step)
               for step in range(1, STEPS + 1)]
    history += [Metric("dev_standard_avg", final["standard_avg"] - 0.08 * math.exp(-step / 20), 0, step)
                for step in range(10, STEPS + 1, 10)]
    history += [Metric(k, v, 0, STEPS) for k, v in final.items()]
    client.log_batch(run_id, metrics=history, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run_id)


def log_experiment(client, name: str, configs: dict[str, list], sweep: bool) -> None:
    """Every (objective, size, seed) as a run, nested under one parent run when ``sweep``."""
    experiment_id = client.create_experiment(name)
    parent_id = None
    if sweep:
        parent_id = client.create_run(experiment_id, run_name="sweep", tags={"task": "pawsx"}).info.run_id
    for objective, sizes in configs.items():
        for size in sizes:
            for seed in SEEDS:
                log_run(client, experiment_id, parent_id, objective, size, seed)
    if parent_id is not None:
        print("logged on the sweep run:", ", ".join(log_sweep_plots(client, parent_id)))
        client.set_terminated(parent_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mlflow-uri", required=True)
    parser.add_argument("--experiment", default="pawsx-example")
    parser.add_argument("--plot-dir", default="example-plots")
    parser.add_argument("--img-dir", help="Also copy the pictures docs/comparing.md shows here (docs/img).")
    args = parser.parse_args()
    client = open_client(args.mlflow_uri)
    log_experiment(client, args.experiment, BEST, sweep=False)
    log_experiment(client, f"{args.experiment}-sweep", SWEEP, sweep=True)
    table = compare_runs(client, args.experiment, group_by=["objective"], baseline="erm")
    print(render(table, "markdown"))
    written = write_comparison_plots(client, table, args.plot_dir)
    sweep = compare_runs(client, f"{args.experiment}-sweep", group_by=["objective"])
    written += write_comparison_plots(client, sweep, os.path.join(args.plot_dir, "sweep"))
    print("wrote", len(written), "files under", args.plot_dir)
    if args.img_dir:
        os.makedirs(args.img_dir, exist_ok=True)
        for src, dst in DOC_PICTURES.items():
            shutil.copyfile(os.path.join(args.plot_dir, src), os.path.join(args.img_dir, dst))


if __name__ == "__main__":
    main()
