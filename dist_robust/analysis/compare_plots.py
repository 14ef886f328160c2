"""The comparison's figures: a :class:`~dist_robust.analysis.compare.Table` and its runs as plain data for plots.

``dist-robust compare --plot-dir`` writes them; a sweep logs its accuracy-against-size plots on its
parent run with :func:`log_sweep_plots`.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import tempfile
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from dist_robust.run import plots
from dist_robust.analysis.compare_table import AVERAGES, Row, Table, columns_for, rerun_groups
from dist_robust.data.tasks import task_num_labels
from dist_robust.analysis.mlflow_runs import RunRecord, fetch_children, metric_histories, open_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

# The size parameter each objective is swept over; objectives without one are reference lines.
STRENGTH_PARAMS = {"pgd": "objective.epsilon", "freelb": "objective.epsilon", "gaussian": "objective.sigma",
                   "smart": "objective.smart_lambda"}
MAX_BAR_SERIES = 12
MAX_HEATMAPS = 12
MAX_CURVE_RUNS = 60  # one metric-history request per run and key
CURVE_KEYS = {"train/loss": ("train loss", 1.0), "dev_standard_avg": ("dev standard avg (%)", 100.0)}


def objective_of(record: RunRecord) -> str | None:
    """The run's objective, from its param or, failing that, its tag."""
    return record.params.get("objective.name") or record.tags.get("objective")


def sweep_points(records: list[RunRecord], metric: str) -> list[dict]:
    """Plain points for :func:`dist_robust.run.plots.sweep_figure`, one per run that logged ``metric``."""
    points = []
    for r in records:
        objective = objective_of(r)
        if objective is None or metric not in r.metrics:
            continue
        param = STRENGTH_PARAMS.get(objective)
        points.append({"objective": objective, "param": param, "x": _float(r.params.get(param)) if param else None,
                       "y": r.metrics[metric], "seed": r.params.get("train.seed")})
    return points


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def generalized_matrix(records: list[RunRecord]) -> dict[str, dict[str, float | None]]:
    """Mean ``gen.<l1>.<l2>`` over the runs (reruns averaged first, as in the table), languages in
    table order; {} when none logged it."""
    cells: dict[tuple[str, str], list[float]] = {}
    for runs in rerun_groups(records):
        mine: dict[tuple[str, str], list[float]] = {}
        for r in runs:
            for key, value in r.metrics.items():
                parts = key.split(".")
                if len(parts) == 3 and parts[0] == "gen":
                    mine.setdefault((parts[1], parts[2]), []).append(value)
        for pair, values in mine.items():
            cells.setdefault(pair, []).append(statistics.fmean(values))
    if not cells:
        return {}
    present = {lang for pair in cells for lang in pair}
    langs = [c[4:] for c in columns_for(records) if c[4:] in present]
    langs += sorted(present - set(langs))
    return {a: {b: statistics.fmean(cells[(a, b)]) if (a, b) in cells else None for b in langs} for a in langs}


def slug(label: str) -> str:
    """A file-name-safe form of a row label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")[:60] or "run"


def bars(table: Table) -> Figure:
    """Per-language bars of the first :data:`MAX_BAR_SERIES` rows (mean, std as error bars)."""
    rows = table.rows[:MAX_BAR_SERIES]
    if len(table.rows) > MAX_BAR_SERIES:
        log.warning("per-language bars show the first %d of %d rows; narrow with --runs, --filter or --group-by",
                    MAX_BAR_SERIES, len(table.rows))
    values = {_series_label(row): {table.headers[k]: row.cells[c].mean for k, c in enumerate(table.columns)}
              for row in rows}
    errors = {_series_label(row): {table.headers[k]: row.cells[c].std for k, c in enumerate(table.columns)}
              for row in rows}
    tasks = {r.params.get("data.task") for row in rows for r in row.records}
    classes = task_num_labels(tasks.pop()) if len(tasks) == 1 else None
    return plots.bar_figure(values, errors, f"{table.experiment}: accuracy per language",
                            chance=1 / classes if classes else None)


def _series_label(row: Row) -> str:
    n = row.samples
    return row.label if n == 1 else f"{row.label} (n={n})"


def heatmaps(table: Table) -> dict[str, Figure]:
    """The generalized heatmap of each row and, with a baseline, its difference heatmap."""
    figures: dict[str, Figure] = {}
    base = generalized_matrix(table.baseline.records) if table.baseline is not None else {}
    for row in table.rows[:MAX_HEATMAPS]:
        matrix = generalized_matrix(row.records)
        if not matrix:
            continue
        name = _unique(f"generalized_{slug(row.label)}", figures)
        figures[name] = plots.heatmap_figure(matrix, f"{row.label}: generalized accuracy ({row.samples} run(s))",
                                             noise=_seed_noise(row, "generalized_avg"))
        if base and not row.is_baseline:
            figures[_unique(f"generalized_diff_{slug(row.label)}", figures)] = plots.heatmap_figure(
                plots.matrix_difference(matrix, base), f"{row.label} - {table.baseline.label}", diff=True,
                noise=_paired_noise(table, row))
    if len(table.rows) > MAX_HEATMAPS:
        log.warning("heatmaps drawn for the first %d of %d rows", MAX_HEATMAPS, len(table.rows))
    return figures


def _seed_noise(row: Row, column: str) -> str | None:
    """The seed spread of a row's generalized average, in words (None for a single run)."""
    cell = row.cells.get(column)
    if cell is None or cell.std is None:
        return f"{row.samples} run: no seed spread to read the cells against" if row.samples == 1 else None
    return f"mean of {row.samples} runs; the generalized average's seed std is {100 * cell.std:.1f} points"


def _paired_noise(table: Table, row: Row) -> str | None:
    """The spread of the row's paired differences from the baseline over seeds, when --paired computed it."""
    paired = table.paired.get(row.label, {}).get("generalized_avg")
    if paired is None:
        return "differences of means; pair the runs by seed (--paired) for their spread"
    if paired.low is None:
        return f"generalized average {100 * paired.mean:+.2f} points on one seed: no spread to read it against"
    return (f"generalized average {100 * paired.mean:+.2f} points, 95% interval {100 * paired.low:+.2f} to "
            f"{100 * paired.high:+.2f} over {paired.n} seeds")


def _unique(stem: str, taken: dict) -> str:
    k, name = 1, stem
    while name in taken:
        k += 1
        name = f"{stem}_{k}"
    return name


def sweeps(records: list[RunRecord], title: str) -> dict[str, Figure]:
    """Accuracy against epsilon / sigma for each average, when some objective has a size parameter."""
    figures = {}
    for metric in AVERAGES:
        fig = plots.sweep_figure(sweep_points(records, metric), metric, title)
        if fig is not None:
            figures[f"sweep_{metric}"] = fig
    return figures


def curves(client: MlflowClient, table: Table) -> Figure | None:
    """Training loss and dev accuracy against step, one line (mean +- std over seeds) per row."""
    budget, panels = MAX_CURVE_RUNS, {title: {} for title, _ in CURVE_KEYS.values()}
    if sum(len(row.records) for row in table.rows) > MAX_CURVE_RUNS:
        log.warning("training curves drawn from the first %d runs only", MAX_CURVE_RUNS)
    for row in table.rows:
        records = row.records[:budget]
        budget -= len(records)
        histories = metric_histories(client, [r.run_id for r in records], list(CURVE_KEYS))
        for key, (panel, scale) in CURVE_KEYS.items():
            panels[panel][row.label] = [[(s, scale * v) for s, v in histories[r.run_id].get(key, [])]
                                        for r in records]
        if budget <= 0:
            break
    if not any(any(runs) for series in panels.values() for runs in series.values()):
        return None
    return plots.curves_figure(panels, f"{table.experiment}: training curves")


def write_comparison_plots(client: MlflowClient, table: Table, plot_dir: str) -> list[str]:
    """Every comparison figure as PNG + SVG in ``plot_dir``; returns the written paths."""
    records = list({r.run_id: r for row in table.rows for r in row.records}.values())
    figures = {"per_language": bars(table), **heatmaps(table), **sweeps(records, table.experiment)}
    curve = curves(client, table)
    if curve is not None:
        figures["curves"] = curve
    return [path for stem, fig in figures.items() for path in plots.save_figure(fig, plot_dir, stem)]


def log_sweep_plots(tracking: str | MlflowClient, parent_run_id: str, artifact_path: str = "plots") -> list[str]:
    """Plot a sweep's trials (the runs nested under ``parent_run_id``) and log the plots on the parent.

    ``tracking`` is a tracking URI or an ``MlflowClient``. Logs ``sweep_standard_avg`` and
    ``sweep_generalized_avg`` (PNG + SVG): accuracy against epsilon / sigma, one line per objective
    with its seed spread. Returns the artifact paths logged (none when no trial logged accuracy).
    """
    client = open_client(tracking) if isinstance(tracking, str) else tracking
    children = fetch_children(client, parent_run_id)
    figures = sweeps(children, f"sweep {client.get_run(parent_run_id).info.run_name or parent_run_id}")
    logged = []
    with tempfile.TemporaryDirectory() as tmp:
        for stem, fig in figures.items():
            for path in plots.save_figure(fig, tmp, stem):
                client.log_artifact(parent_run_id, path, artifact_path)
                logged.append(f"{artifact_path}/{os.path.basename(path)}")
    return logged
