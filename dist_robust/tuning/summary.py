"""A finished sweep in words and tables: every trial's outcome, the best trial, the terminal summary.

The table is Tune's own (``ResultGrid.get_dataframe``), completed with the trials that never
reported and each trial's status. The best trial is chosen here rather than by
``ResultGrid.get_best_result``, which would also consider a trial that reported and then failed.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
from typing import Any

from dist_robust.tuning.space_checks import selection_note
from dist_robust.tuning.spec import SweepSpec


def trial_table(grid, spec: SweepSpec):
    """Tune's table of the trials' last results (``ResultGrid.get_dataframe``), with each trial's outcome.

    ``status``: finished (its final evaluation reported), stopped_early (by the scheduler) or error.
    """
    import pandas as pd

    table = grid.get_dataframe()
    if table.empty:  # no trial reported anything
        table = pd.DataFrame(columns=["trial_id", "step"])
    errors = {_trial_id(r): r.error for r in grid}
    reported = set(table["trial_id"])
    silent = [{"trial_id": _trial_id(r), **{f"config/{k}": v for k, v in r.config.items()}}
              for r in grid if _trial_id(r) not in reported]  # failed before any report
    if silent:
        table = pd.concat([table, pd.DataFrame(silent)], ignore_index=True)
    # only the final evaluation reports standard_avg
    finished = table["standard_avg"].notna() if "standard_avg" in table else pd.Series(False, index=table.index)
    table["status"] = "stopped_early"
    table.loc[finished, "status"] = "finished"
    table.loc[table["trial_id"].map(lambda t: errors.get(t) is not None), "status"] = "error"
    table["error"] = table["trial_id"].map(lambda t: _cause(errors.get(t)))
    if spec.metric not in table:
        table[spec.metric] = math.nan
    return table


def _trial_id(result) -> str:
    """A result's trial id (its directory is named after it, see ``cli._trial_name``)."""
    return (result.metrics or {}).get("trial_id") or os.path.basename(result.path)


def _cause(error: BaseException | None) -> str | None:
    """What went wrong in a trial, in words: the original exception, not Ray's wrapper around it."""
    if error is None:
        return None
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}"[:2000]


def best_row(table, spec: SweepSpec):
    """The trial whose last reported ``metric`` is best; errored trials and missing values left out."""
    scored = table[(table["status"] != "error") & table[spec.metric].map(_finite)]
    if scored.empty:
        return None
    return scored.loc[scored[spec.metric].idxmax() if spec.mode == "max" else scored[spec.metric].idxmin()]


def trial_record(row, spec: SweepSpec) -> dict[str, Any]:
    """One trial as plain data (trials.json, best_trial.json on the sweep's MLflow run)."""
    from dist_robust.tuning.trial import plain

    config = {k: row.get(f"config/{k}") for k in spec.params}
    metrics = {k: v for k, v in row.items() if not k.startswith("config/") and _finite(v)}
    return {"trial_id": row["trial_id"], "status": row["status"], "config": plain(config),
            "step": int(row["step"]) if _finite(row.get("step")) else None,
            "mlflow_run_id": row.get("mlflow_run_id") or None, "metrics": plain(metrics), "error": row["error"]}


def _finite(value: Any) -> bool:
    """A finite number (numpy's included; numpy's bools are not Real), not a flag."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def print_summary(table, best, spec: SweepSpec) -> None:
    columns = ["trial_id", "status", "step", spec.metric, *(f"config/{k}" for k in spec.params)]
    shown = table[[c for c in columns if c in table]].rename(columns=lambda c: c.removeprefix("config/"))
    print()
    print(shown.to_string(index=False, na_rep="-", float_format="{:.4g}".format))
    print(f"\n{selection_note(spec.metric)}")
    if best is not None:
        record = trial_record(best, spec)
        print(f"best trial {record['trial_id']}: {spec.metric} = {best[spec.metric]:.4g}, "
              f"config {json.dumps(record['config'])}" +
              (f", MLflow run {record['mlflow_run_id']}" if record["mlflow_run_id"] else ""))
    for _, row in table[table["status"] == "error"].iterrows():
        print(f"trial {row['trial_id']} failed: {row['error'].splitlines()[0]}", file=sys.stderr)
