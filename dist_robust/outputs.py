"""What a finished run leaves behind: results.json, generalized.csv, the printed report, MLflow's final records.

Called on rank 0 only, with the results the trainer assembled; nothing here touches the engine.
"""

from __future__ import annotations

import json
import logging

from dist_robust import evaluate as E
from dist_robust.plots import log_run_plots
from dist_robust.tracking import Tracker

log = logging.getLogger(__name__)


def write_outputs(put, tracker: Tracker, results: dict, step: int) -> None:
    """Print the report, log the final metrics and artifacts, write results.json (and generalized.csv).

    ``put(relative path, text)`` writes a file of the output directory (publishing it when remote).
    """
    print_report(results)
    tracker.log_metrics(final_metrics(results, step), step=step)
    tracker.log_dict(results["config"], "run_config.json")
    tracker.log_dict(results, "results.json")
    try:
        log_run_plots(tracker, results)
    except Exception as err:  # a plot must never fail a finished training run
        log.warning("could not log the run's plots: %s", err)
    if results["generalized"]:
        tracker.log_text(E.matrix_csv(results["generalized"]), "generalized.csv")
    for name, columns in tables(results).items():
        tracker.log_table(columns, name)
    if hasattr(tracker, "ui_link"):
        print(f"MLflow: {tracker.ui_link()}", flush=True)
    put("results.json", json.dumps(results, indent=2))
    if results["generalized"]:
        put("generalized.csv", E.matrix_csv(results["generalized"]))


def tables(results: dict) -> dict[str, dict[str, list]]:
    """The per-language accuracies and the generalized matrix as column -> values tables, in percent."""
    langs = list(results["per_language"])
    out = {"per_language.json": {"language": langs,
                                 "accuracy (%)": [round(100 * results["per_language"][lang], 2) for lang in langs]}}
    matrix = results["generalized"]
    if matrix:
        out["generalized_matrix.json"] = {"sentence1 language": langs,
                                          **{b: [round(100 * matrix[a][b], 2) for a in langs] for b in langs}}
    return out


def final_metrics(results: dict, step: int) -> dict[str, float]:
    """Final accuracies under their MLflow names, plus the last dev evaluation's."""
    final = {f"acc.{lang}": a for lang, a in results["per_language"].items()}
    final.update({f"gen.{a}.{b}": v for a, row in results["generalized"].items() for b, v in row.items()})
    final.update({k: results[k] for k in ("source_acc", "standard_avg", "all_avg", "generalized_avg")
                  if k in results})
    if results["dev_history"]:
        last = results["dev_history"][-1]
        final.update({f"dev_acc.{lang}": a for lang, a in last["per_language"].items()})
        final.update({f"dev_{k}": v for k, v in last.items() if k not in ("step", "per_language")})
    final["skipped_steps"] = results["skipped_steps"]
    final["step"] = step
    return final


def print_report(results: dict) -> None:
    """The per-language table and the generalized matrix, on stdout."""
    print(f"\n{results['task']} / {results['objective']}: {results['eval_split']} accuracy of the model "
          f"selected at step {results['best_step']}")
    summary = {k: results[k] for k in ("standard_avg", "all_avg", "generalized_avg") if k in results}
    print(E.format_table(results["per_language"], summary))
    if results["generalized"]:
        k = results.get("generalized_examples")
        subset = f"; off-diagonal cells on {k} evenly spaced ids" if k else ""
        print(f"\ngeneralized (sentence1 language x sentence2 language{subset}):")
        print(E.format_matrix(results["generalized"]))
    print(flush=True)
