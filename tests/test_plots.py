"""Figures from plain data: files exist in both formats, have sensible sizes and are not blank."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from dist_robust.run import plots
from dist_robust.run.tracking import MLflowTracker, NullTracker

MATRIX = {"en": {"en": 0.93, "de": 0.80, "ja": 0.70},
          "de": {"en": 0.81, "de": 0.86, "ja": 0.69},
          "ja": {"en": 0.72, "de": 0.68, "ja": 0.78}}
RESULTS = {"task": "pawsx", "objective": "pgd", "eval_split": "test", "source_language": "en",
           "per_language": {"en": 0.93, "de": 0.86, "ja": 0.78}, "generalized": MATRIX,
           "train_losses": [0.7, 0.6, 0.5, 0.45, 0.4, 0.38],
           "dev_history": [{"step": 3, "source_acc": 0.90, "standard_avg": 0.78},
                           {"step": 6, "source_acc": 0.92, "standard_avg": 0.81}]}


def check_image(png: Path, min_side: int = 300, max_side: int = 2500) -> np.ndarray:
    """The PNG's pixels after checking its size and that it is not a blank canvas."""
    pixels = image.imread(png)[..., :3]  # (H, W, 3) floats in [0, 1]
    height, width = pixels.shape[:2]
    assert min_side <= width <= max_side and min_side <= height <= max_side, (width, height)
    assert pixels.std() > 0.05, "image is (nearly) uniform"
    assert (pixels.max(axis=2) - pixels.min(axis=2) > 0.2).mean() > 0.002, "image has no colour"
    return pixels


def saved(fig, tmp_path: Path, stem: str) -> tuple[Path, str]:
    paths = plots.save_figure(fig, str(tmp_path), stem)
    assert paths == [str(tmp_path / f"{stem}.png"), str(tmp_path / f"{stem}.svg")]
    svg = (tmp_path / f"{stem}.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    return tmp_path / f"{stem}.png", svg


def test_heatmap_shows_every_cell(tmp_path):
    png, svg = saved(plots.heatmap_figure(MATRIX, "pgd"), tmp_path, "heatmap")
    check_image(png)
    assert all(f">{100 * v:.1f}<" in svg for row in MATRIX.values() for v in row.values())
    assert "sentence 1 language" in svg and "accuracy (%)" in svg


def test_difference_heatmap_is_signed_and_marks_missing_cells(tmp_path):
    base = {a: {b: v - 0.02 for b, v in row.items()} for a, row in MATRIX.items()}
    base["ja"]["de"] = None
    diff = plots.matrix_difference(MATRIX, base)
    assert diff["en"]["de"] == pytest.approx(0.02) and diff["ja"]["de"] is None
    png, svg = saved(plots.heatmap_figure(diff, "pgd - erm", diff=True), tmp_path, "diff")
    check_image(png)
    assert ">+2.0<" in svg and ">n/a<" in svg and "difference (points)" in svg


def test_bars_with_error_bars_and_a_missing_value(tmp_path):
    values = {"erm (n=3)": {"en": 0.92, "de": 0.82, "standard_avg": 0.77},
              "pgd (n=3)": {"en": 0.93, "de": None, "standard_avg": 0.81}}
    errors = {"erm (n=3)": {"en": 0.02, "de": 0.02, "standard_avg": 0.01}}
    png, svg = saved(plots.bar_figure(values, errors, "accuracy per language"), tmp_path, "bars")
    check_image(png)
    assert ">n/a<" in svg and "erm (n=3)" in svg


def test_sweep_has_a_panel_per_size_parameter(tmp_path):
    points = [{"objective": "pgd", "param": "objective.epsilon", "x": x, "y": 0.80 + x / 10 + s / 100}
              for x in (0.01, 0.1, 1.0) for s in range(3)]
    points += [{"objective": "gaussian", "param": "objective.sigma", "x": x, "y": 0.79 + x} for x in (0.01, 0.05)]
    points += [{"objective": "erm", "param": None, "x": None, "y": y} for y in (0.80, 0.81)]
    fig = plots.sweep_figure(points, "standard_avg", "sweep")
    assert len(fig.axes) == 2 and fig.axes[0].get_xscale() == "log"
    png, svg = saved(fig, tmp_path, "sweep")
    check_image(png)
    assert "epsilon" in svg and "sigma" in svg and "erm (2 run(s))" in svg
    assert plots.sweep_figure(points[-2:], "standard_avg") is None  # erm alone has nothing to sweep


def test_curves_average_seeds(tmp_path):
    seeds = [[(1, 0.7), (2, 0.5)], [(1, 0.9), (2, 0.7)]]
    fig = plots.curves_figure({"train loss": {"erm": seeds, "pgd": [[(1, 0.6), (2, 0.4)]]},
                               "dev standard avg (%)": {"erm": [[]], "pgd": [[]]}})
    mean_line = fig.axes[0].lines[0]
    assert list(mean_line.get_ydata()) == pytest.approx([0.8, 0.6])
    png, svg = saved(fig, tmp_path, "curves")
    check_image(png)
    assert "not logged" in svg and "erm (mean of 2)" in svg


class RecordingTracker:
    run_id = "r1"

    def __init__(self):
        self.artifacts: list[tuple[str, str | None, int]] = []

    def log_artifact(self, local_path, artifact_path=None):
        self.artifacts.append((Path(local_path).name, artifact_path, Path(local_path).stat().st_size))


def test_run_plots_go_to_the_tracker():
    tracker = RecordingTracker()
    logged = plots.log_run_plots(tracker, RESULTS)
    assert logged == ["plots/generalized.png", "plots/generalized.svg", "plots/curves.png", "plots/curves.svg"]
    assert [(name, where) for name, where, _ in tracker.artifacts] == [
        ("generalized.png", "plots"), ("generalized.svg", "plots"), ("curves.png", "plots"), ("curves.svg", "plots")]
    assert min(size for _, _, size in tracker.artifacts) > 5_000
    assert plots.log_run_plots(NullTracker(), RESULTS) == []
    no_matrix = plots.log_run_plots(RecordingTracker(), {**RESULTS, "generalized": {}})
    assert no_matrix == ["plots/curves.png", "plots/curves.svg"]


def test_run_plots_are_artifacts_of_a_real_mlflow_run(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    tracker = MLflowTracker(mlflow_server, f"plots-{uuid.uuid4().hex[:8]}", "pgd-run")
    plots.log_run_plots(tracker, RESULTS)
    tracker.finish()
    client = MlflowClient(mlflow_server)
    stored = {f.path for f in client.list_artifacts(tracker.run_id, "plots")}
    assert stored == {"plots/generalized.png", "plots/generalized.svg", "plots/curves.png", "plots/curves.svg"}
    local = client.download_artifacts(tracker.run_id, "plots/generalized.png", str(tmp_path))
    check_image(Path(local))


def _tick_boxes(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # lay the figure out as saving it would
    canvas.draw()
    renderer = canvas.get_renderer()
    return [t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels() if t.get_text()]


def test_bars_start_at_zero_mark_chance_and_labels_do_not_overlap():
    values = {"erm": {"en": 0.52, "de": 0.52, "fr": 0.52, "es": 0.52, "zh": 0.52, "standard_avg": 0.52,
                      "generalized_avg": 0.52},
              "pgd": {"en": 0.55, "de": 0.53, "fr": 0.5, "es": 0.51, "zh": 0.49, "standard_avg": 0.51,
                      "generalized_avg": 0.5}}
    fig = plots.bar_figure(values, title="t", chance=1 / 3)
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0  # a 52% bar is half the height, not nothing
    chance = [line for line in ax.lines if line.get_label().startswith("chance")]
    assert [round(line.get_ydata()[0], 3) for line in chance] == [33.333]
    boxes = _tick_boxes(fig)
    assert len(boxes) == 7
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_sweep_with_a_single_value_draws_nothing():
    points = [{"objective": "pgd", "param": "objective.epsilon", "x": 0.1, "y": 0.8},
              {"objective": "pgd", "param": "objective.epsilon", "x": 0.1, "y": 0.82},
              {"objective": "erm", "param": None, "x": None, "y": 0.79}]
    assert plots.sweep_figure(points, "standard_avg") is None
    points.append({"objective": "pgd", "param": "objective.epsilon", "x": 0.2, "y": 0.81})
    assert plots.sweep_figure(points, "standard_avg") is not None


def test_long_curves_are_smoothed_over_a_faint_raw_line():
    assert plots.moving_average(np.array([1.0, 2.0, 3.0, 4.0]), 3).tolist() == [1.0, 1.5, 2.0, 3.0]
    steps = [(i + 1, 1.0 + (i % 2)) for i in range(200)]  # alternating 1, 2: the smoothed line sits near 1.5
    fig = plots.curves_figure({"train loss": {"erm": [steps]}})
    raw, smooth = fig.axes[0].lines
    assert raw.get_alpha() == pytest.approx(0.25) and smooth.get_label() == "erm, smoothed"
    assert np.abs(smooth.get_ydata()[20:] - 1.5).max() < 0.1
    short = plots.curves_figure({"dev": {"erm": [[(10, 80.0), (20, 85.0)]]}})
    assert len(short.axes[0].lines) == 1  # a handful of evaluations is drawn as is


def test_certified_accuracy_plot_has_a_line_per_language(tmp_path):
    """A certified run's own figure: certified accuracy against the radius, one line per language,
    logged beside the heatmap and curves."""
    cell = lambda acc, levels: {"examples": 20, "accuracy": acc, "abstain": 0.05,  # noqa: E731
                                "certified": dict(zip(["r0", "r0.05", "r0.1"], levels))}
    certify = {"method": "gaussian", "samples": 100, "alpha": 0.001, "relative": True, "radii": [0.0, 0.05, 0.1],
               "thresholds": ["r0", "r0.05", "r0.1"], "reference": "r0.1",
               "per_language": {"en": cell(0.9, [0.9, 0.7, 0.4]), "de": cell(0.8, [0.8, 0.5, 0.2]),
                                "ja": cell(0.6, [0.6, 0.3, 0.1])}}
    fig = plots.certified_figure(certify, "pawsx / gaussian")
    ax = fig.axes[0]
    assert [line.get_label().split(" ")[0] for line in ax.get_lines()] == ["en", "de", "ja"]
    assert list(ax.get_lines()[1].get_ydata()) == pytest.approx([80, 50, 20])
    check_image(saved(fig, tmp_path, "certified")[0])
    logged = plots.log_run_plots(RecordingTracker(), {**RESULTS, "certify": certify})
    assert "plots/certified.png" in logged


def test_heatmap_scales_are_stated_symmetric_for_differences_and_never_a_sliver_for_accuracy():
    from dist_robust.run.plots import heatmap_figure

    langs = ("en", "de", "fr")
    narrow = {a: {b: 0.569 + 0.005 * (i + j) for j, b in enumerate(langs)} for i, a in enumerate(langs)}
    fig = heatmap_figure(narrow, "pawsx", noise="one run; a cell's standard error is about 1.1 points")
    image = fig.axes[0].images[0]
    low, high = image.get_clim()
    assert high - low >= 10 and low <= 56.9 and high >= 58.9  # 1.5 points do not fill the colour range
    assert fig.axes[1].get_ylabel() == f"accuracy (%), scale {low:g} to {high:g}"
    assert any("standard error is about 1.1 points" in t.get_text() for t in fig.texts)
    diff = {a: {b: (0.013 if a == b else -0.031) for b in langs} for a in langs}
    fig = heatmap_figure(diff, "pgd - erm", diff=True)
    low, high = fig.axes[0].images[0].get_clim()
    assert low == -high == -4.0  # centred on zero, rounded up to a whole point
    assert fig.axes[1].get_ylabel() == "difference (points), scale -4 to +4"


def test_a_run_s_heatmap_says_how_noisy_its_cells_are():
    from dist_robust.run.plots import run_figures

    langs = ("en", "de")
    results = {"task": "xnli", "objective": "erm", "eval_split": "dev", "generalized_examples": 300,
               "eval_sizes": {"en": 2490, "de": 2490},
               "generalized": {a: {b: 0.5 for b in langs} for a in langs}}
    texts = [t.get_text() for t in run_figures(results)["generalized"].texts]
    assert texts == ["one run; a cell's standard error is about 2.9 points (300 pairs off the diagonal)"]
