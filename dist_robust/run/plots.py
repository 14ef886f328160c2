"""Figures from plain data: per-language bars, generalized heatmaps, sweep curves, training curves.

Every figure is built with matplotlib's object API (``Figure`` rendered by the Agg canvas for PNG),
never ``pyplot``: no global state or display, so it is safe inside a training process. Inputs are
dicts of accuracies as fractions (0..1); the figures show percentages.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict

import numpy as np
from matplotlib.figure import Figure

from dist_robust.run.tracking import Tracker

FORMATS = ("png", "svg")
SMOOTH_ABOVE = 50  # curves with more points than this are drawn smoothed
TILT_ABOVE = 12  # bar charts with more columns than this slant their labels
DPI = 110
OBJECTIVE_COLORS = {"erm": "#555555", "pgd": "#1f77b4", "freelb": "#ff7f0e", "gaussian": "#2ca02c",
                    "smart": "#9467bd"}
_CYCLE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]

Series = list[tuple[float, float]]  # [(step, value), ...]


def save_figure(fig: Figure, directory: str, stem: str) -> list[str]:
    """Write ``<stem>.png`` and ``<stem>.svg`` into ``directory``; returns both paths."""
    import matplotlib

    os.makedirs(directory, exist_ok=True)
    paths = []
    # SVG text stays text (searchable, editable, smaller) instead of glyph outlines.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        for fmt in FORMATS:
            path = os.path.join(directory, f"{stem}.{fmt}")
            fig.savefig(path, format=fmt, dpi=DPI, bbox_inches="tight")
            paths.append(path)
    return paths


def color_for(label: str, index: int) -> str:
    """The objective's own colour when the label starts with one ("erm (n=3)"), else the cycle's next."""
    return OBJECTIVE_COLORS.get(label.split(" ")[0], _CYCLE[index % len(_CYCLE)])


def bar_figure(values: dict[str, dict[str, float | None]], errors: dict[str, dict[str, float | None]] | None = None,
               title: str = "", chance: float | None = None) -> Figure:
    """Grouped bars: one group per column (languages, averages), one bar per series (run or group).

    ``values[series][column]`` is an accuracy or None (drawn as an "n/a" mark); ``errors`` the
    matching standard deviations for error bars. Bars start at 0 (a 52% bar must not look
    empty); ``chance`` (a fraction, e.g. 1/3 for three balanced classes) is drawn as a dashed line.
    """
    columns = list(dict.fromkeys(c for row in values.values() for c in row))
    x = np.arange(len(columns))
    width = 0.8 / max(1, len(values))
    inches = max(1.0, 0.3 * len(values)) * len(columns) + 2.5  # at least an inch per column: labels fit
    fig = Figure(figsize=(min(16.0, max(6.0, inches)), 4.2))
    ax = fig.add_subplot()
    floor = 0.0
    for k, (label, row) in enumerate(values.items()):
        ys = np.array([_pct(row.get(c)) for c in columns])
        errs = np.array([_pct((errors or {}).get(label, {}).get(c)) for c in columns])
        offset = x - 0.4 + width * (k + 0.5)
        ax.bar(offset, np.nan_to_num(ys - floor, nan=0.0), width, bottom=floor, label=label,
               color=color_for(label, k), yerr=np.nan_to_num(errs) if np.nansum(errs) > 0 else None, capsize=2,
               ecolor="#333333")
        for pos in offset[np.isnan(ys)]:
            ax.text(pos, floor + 0.5, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="#b00020")
    tilt = len(columns) > TILT_ABOVE  # XNLI's 15 languages: slanted labels, else two-line ones side by side
    labels = [c.replace("_", " " if tilt else "\n") for c in columns]
    ax.set_xticks(x, labels, rotation=40 if tilt else 0, ha="right" if tilt else "center", fontsize=9)
    ax.set_ylim(0, 100)
    if chance is not None:
        ax.axhline(100 * chance, linestyle="--", color="#b00020", linewidth=1, label=f"chance ({100 * chance:.0f}%)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return fig


def heatmap_figure(matrix: dict[str, dict[str, float | None]], title: str = "", diff: bool = False,
                   noise: str | None = None) -> Figure:
    """The L x L generalized matrix: rows sentence1's language, columns sentence2's.

    With ``diff`` the cells are differences in points (see :func:`matrix_difference`) on a
    diverging scale centred at zero: blue better than the baseline, red worse. Accuracies are on a
    scale at least :data:`MIN_SPAN` points wide, so a spread of a point or two does not fill the
    colour range; the colour bar states the scale either way. ``noise`` (the cells' standard error
    or seed spread, in words) is printed under the matrix, so a difference can be read against it.
    """
    langs = list(matrix)
    data = np.array([[_pct(matrix[a].get(b)) for b in langs] for a in langs])
    size = len(langs)
    fig = Figure(figsize=(max(4.5, 0.6 * size + 1.8), max(3.8, 0.55 * size + 1.2) + (0.3 if noise else 0)))
    ax = fig.add_subplot()
    cmap, vmin, vmax = _heatmap_scale(data, diff)
    image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax)
    for i in range(size):
        for j in range(size):
            ax.text(j, i, _cell_text(data[i, j], diff), ha="center", va="center",
                    fontsize=8 if size <= 10 else 6, color=_text_color(data[i, j], vmin, vmax, diff))
    ax.set_xticks(range(size), langs)
    ax.set_yticks(range(size), langs)
    ax.set_xlabel("sentence 2 language")
    ax.set_ylabel("sentence 1 language")
    ax.set_title(title, fontsize=10)
    label = f"difference (points), scale -{vmax:g} to +{vmax:g}" if diff else \
        f"accuracy (%), scale {vmin:g} to {vmax:g}"
    fig.colorbar(image, ax=ax, label=label, shrink=0.85)
    if noise:
        fig.text(0.5, 0.01, noise, ha="center", va="bottom", fontsize=8)
    return fig


MIN_SPAN = 10.0  # points: the narrowest accuracy colour scale


def _heatmap_scale(data: np.ndarray, diff: bool):
    """Colour map and limits: differences symmetric around zero (rounded up to a whole point); accuracies
    from and to multiples of 5, at least :data:`MIN_SPAN` wide, within 0-100."""
    import matplotlib

    finite = data[np.isfinite(data)]
    if diff:
        limit = float(np.ceil(max(float(np.abs(finite).max()) if finite.size else 0.0, 0.5)))
        return matplotlib.colormaps["RdBu"].with_extremes(bad="#dddddd"), -limit, limit
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    low, high = 5 * np.floor(low / 5), 5 * np.ceil(high / 5)
    if high - low < MIN_SPAN:
        grow = (MIN_SPAN - (high - low)) / 2
        low, high = low - grow, high + grow
        if low < 0:
            low, high = 0.0, MIN_SPAN
        elif high > 100:
            low, high = 100 - MIN_SPAN, 100.0
    return matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd"), float(low), float(high)


def cell_standard_error(accuracy: float, pairs: int) -> float:
    """A cell's binomial standard error in points: sqrt(p (1 - p) / n)."""
    return 100 * float(np.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(pairs, 1)))


def _cell_text(value: float, diff: bool) -> str:
    if not np.isfinite(value):
        return "n/a"
    return f"{value:+.1f}" if diff else f"{value:.1f}"


def _text_color(value: float, vmin: float, vmax: float, diff: bool) -> str:
    if not np.isfinite(value):
        return "#b00020"
    position = (value - vmin) / (vmax - vmin)
    if diff:
        return "white" if abs(position - 0.5) > 0.3 else "black"
    return "black" if position > 0.55 else "white"


def matrix_difference(matrix: dict[str, dict[str, float | None]],
                      baseline: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """``matrix - baseline`` cell by cell over ``matrix``'s languages; None where either is missing."""
    out: dict[str, dict[str, float | None]] = {}
    for a, row in matrix.items():
        out[a] = {}
        for b, value in row.items():
            base = baseline.get(a, {}).get(b)
            out[a][b] = None if value is None or base is None else value - base
    return out


def sweep_figure(points: list[dict], metric: str, title: str = "") -> Figure | None:
    """Accuracy against perturbation size: one panel per size parameter, one line per objective.

    ``points``: ``{"objective", "param" (e.g. "objective.epsilon", None for objectives without one),
    "x", "y"}``, one per run. Lines are means over seeds with a +-1 std band and the seeds as dots;
    objectives without a size parameter (erm) are dashed horizontal references. None when no
    objective has a size parameter.
    """
    params = list(dict.fromkeys(p["param"] for p in points if p["param"] and p["x"] is not None))
    # A size that never varies makes no axis: one value is a dot, not a curve.
    params = [q for q in params if len({p["x"] for p in points if p["param"] == q and p["x"] is not None}) > 1]
    if not params:
        return None
    fig = Figure(figsize=(5.2 * len(params), 4.0))
    axes = fig.subplots(1, len(params), squeeze=False)[0]
    references = _by_objective([p for p in points if not p["param"]])
    for ax, param in zip(axes, params):
        lines = _by_objective([p for p in points if p["param"] == param and p["x"] is not None])
        for k, (objective, pts) in enumerate(lines.items()):
            _sweep_line(ax, objective, pts, color_for(objective, k))
        for k, (objective, pts) in enumerate(references.items()):
            _reference_line(ax, objective, [p["y"] for p in pts], color_for(objective, k + len(lines)))
        _sweep_axes(ax, param, metric, [p["x"] for p in points if p["param"] == param and p["x"] is not None])
    fig.suptitle(f"{title}: {metric} against perturbation size" if title else f"{metric} against perturbation size")
    return fig


def _by_objective(points: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for p in points:
        out[p["objective"]].append(p)
    return dict(out)


def _sweep_line(ax, objective: str, points: list[dict], color: str) -> None:
    by_x: dict[float, list[float]] = defaultdict(list)
    for p in points:
        by_x[float(p["x"])].append(100 * p["y"])
    xs = sorted(by_x)
    means = np.array([np.mean(by_x[x]) for x in xs])
    stds = np.array([np.std(by_x[x], ddof=1) if len(by_x[x]) > 1 else 0.0 for x in xs])
    seeds = max(len(v) for v in by_x.values())
    ax.plot(xs, means, marker="o", color=color, label=f"{objective} (up to {seeds} seed(s))")
    ax.fill_between(xs, means - stds, means + stds, color=color, alpha=0.18, linewidth=0)
    ax.scatter([x for x in xs for _ in by_x[x]], [y for x in xs for y in by_x[x]], s=10, color=color, alpha=0.5)


def _reference_line(ax, objective: str, ys: list[float], color: str) -> None:
    values = [100 * y for y in ys]
    mean = float(np.mean(values))
    ax.axhline(mean, linestyle="--", color=color, label=f"{objective} ({len(values)} run(s))")
    if len(values) > 1:
        std = float(np.std(values, ddof=1))
        ax.axhspan(mean - std, mean + std, color=color, alpha=0.1, linewidth=0)


def _sweep_axes(ax, param: str, metric: str, xs: list[float]) -> None:
    positive = [x for x in xs if x > 0]
    if positive and len(positive) == len(xs) and max(positive) / min(positive) >= 20:
        ax.set_xscale("log")
    ax.set_xlabel(param.split(".")[-1])
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def curves_figure(panels: dict[str, dict[str, list[Series]]], title: str = "") -> Figure:
    """Training curves: one panel per quantity, one line per label.

    ``panels[panel][label]`` is a list of runs' ``[(step, value), ...]``; several runs under one
    label (seeds) are drawn as their mean with a +-1 std band. Values are plotted as given.
    """
    fig = Figure(figsize=(5.2 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel, series) in zip(axes, panels.items()):
        for k, (label, runs) in enumerate(series.items()):
            _curve(ax, label, [r for r in runs if r], color_for(label, k))
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not any(any(runs) for runs in series.values()):
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", color="#b00020")
    _curve_legends(axes, [list(series) for series in panels.values()])
    fig.suptitle(title)
    return fig


def _curve_legends(axes, labels: list[list[str]]) -> None:
    """One legend outside the last panel when every panel has the same lines, else one per panel."""
    if all(set(ls) == set(labels[0]) for ls in labels):
        handles = {}
        for ax in axes:
            handles.update(zip(*reversed(ax.get_legend_handles_labels())))
        if len(handles) > 1:
            axes[-1].legend(list(handles.values()), list(handles), fontsize=8, loc="upper left",
                            bbox_to_anchor=(1.02, 1.0), frameon=False)
        return
    for ax, ls in zip(axes, labels):
        if len(ls) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


def _curve(ax, label: str, runs: list[Series], color: str) -> None:
    if not runs:
        return
    by_step: dict[float, list[float]] = defaultdict(list)
    for run in runs:
        for step, value in run:
            by_step[step].append(value)
    steps = sorted(by_step)
    means = np.array([np.mean(by_step[s]) for s in steps])
    name = label if len(runs) == 1 else f"{label} (mean of {len(runs)})"
    if len(steps) > SMOOTH_ABOVE:  # per-step values are noisy: the raw line faint, a moving average on top
        ax.plot(steps, means, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, moving_average(means, max(5, len(steps) // 30)), color=color, label=f"{name}, smoothed")
    else:
        ax.plot(steps, means, color=color, label=name, marker="o" if len(steps) < 15 else None, markersize=3)
    if len(runs) > 1:
        stds = np.array([np.std(by_step[s], ddof=1) if len(by_step[s]) > 1 else 0.0 for s in steps])
        ax.fill_between(steps, means - stds, means + stds, color=color, alpha=0.18, linewidth=0)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values (shorter at the start), same length as ``values``."""
    sums = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (sums[idx] - sums[start]) / (idx - start)


def run_figures(results: dict) -> dict[str, Figure]:
    """A finished training run's own figures from its ``results.json`` dict: heatmap and curves."""
    figures: dict[str, Figure] = {}
    name = f"{results.get('task', '')} / {results.get('objective', '')}".strip(" /")
    if results.get("generalized"):
        figures["generalized"] = heatmap_figure(
            results["generalized"], f"{name}: generalized {results.get('eval_split', '')} accuracy",
            noise=_run_noise(results))
    losses, history = results.get("train_losses") or [], results.get("dev_history") or []
    if losses or history:
        source = f"source ({results.get('source_language', 'en')})"
        dev = {label: [[(h["step"], 100 * h[key]) for h in history if _finite(h.get(key))]]
               for label, key in ((source, "source_acc"), ("standard avg", "standard_avg"))}
        figures["curves"] = curves_figure(
            {"train loss": {"loss": [[(i + 1, v) for i, v in enumerate(losses)]]}, "dev accuracy (%)": dev},
            name)
    if results.get("certify"):
        figures["certified"] = certified_figure(results["certify"], name)
    return figures


def _run_noise(results: dict) -> str | None:
    """One run's cells: their typical binomial standard error, from the pairs each cell holds."""
    sizes = results.get("eval_sizes") or {}
    if not sizes:
        return None
    k = results.get("generalized_examples")
    off = [min(k, n) if k else n for n in sizes.values()]
    accs = [v for a, row in results["generalized"].items() for b, v in row.items() if a != b and _finite(v)]
    p = float(np.median(accs)) if accs else 0.5
    return (f"one run; a cell's standard error is about {cell_standard_error(p, int(np.median(off))):.1f} points "
            f"({int(np.median(off))} pairs off the diagonal)")


def certified_figure(certify: dict, title: str = "") -> Figure:
    """Certified accuracy against the radius (or number of substituted words), one line per language."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    names = list(certify["thresholds"])
    xs = certify["radii"] if certify["method"] == "gaussian" else list(range(len(names)))
    for i, (lang, cell) in enumerate(certify["per_language"].items()):
        ax.plot(xs, [_pct(cell["certified"][n]) for n in names], marker="o", color=_CYCLE[i % len(_CYCLE)],
                label=f"{lang} (abstains {100 * cell['abstain']:.0f}%)")
    if certify["method"] == "gaussian":
        ax.set_xlabel(f"L2 radius ({'relative: RMS coordinates of e(x)' if certify['relative'] else 'embedding units'})")
    else:
        ax.set_xticks(xs, [n[1:] if n.startswith("d") else n for n in names])
        ax.set_xlabel("words substituted by synonyms (at most)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title}: {certify['method']} smoothing, n = {certify['samples']}, alpha = {certify['alpha']:g}",
                 fontsize=10)
    return fig


def log_run_plots(tracker: Tracker, results: dict, artifact_path: str = "plots") -> list[str]:
    """Render :func:`run_figures` and log them as PNG + SVG artifacts of the tracker's run.

    Returns the artifact paths (e.g. ``plots/generalized.png``); nothing is rendered when the
    tracker has no run (``NullTracker``: other ranks, tracking off).
    """
    if getattr(tracker, "run_id", None) is None:
        return []
    logged = []
    with tempfile.TemporaryDirectory() as tmp:
        for stem, fig in run_figures(results).items():
            for path in save_figure(fig, tmp, stem):
                tracker.log_artifact(path, artifact_path)
                logged.append(f"{artifact_path}/{os.path.basename(path)}")
    return logged


def _pct(value: float | None) -> float:
    return 100 * value if _finite(value) else float("nan")


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)
