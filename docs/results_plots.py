"""Draw the plots of docs/results.md from the runs `dist-robust experiment` wrote.

    python docs/results_plots.py --runs runs --out docs/img/results

Reads ``<runs>/synthetic-benchmark/<method>-s<seed>/results.json`` (the main comparison, at the
default misalignment), ``<runs>/misalignment-<m>/<method>-s<seed>/results.json`` (other
misalignments) and the selection sweep's runs; writes PNGs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics

LANGS = ("en", "de", "fr", "es", "zh")


def load(pattern: str) -> dict[str, list[dict]]:
    """method -> results of its seeds, for run directories matching ``pattern``."""
    out: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(pattern, "results.json"))):
        method = re.sub(r"-s\d+$", "", os.path.basename(os.path.dirname(path)))
        out.setdefault(method, []).append(json.load(open(path)))
    return out


def target_avg(result: dict) -> float:
    return 100 * statistics.fmean(result["per_language"][lang] for lang in LANGS[1:])


def misalignment_plot(runs: str, default_m: float, out: str) -> None:
    import matplotlib.pyplot as plt

    points: dict[str, dict[float, list[float]]] = {}
    for m_dir in glob.glob(os.path.join(runs, "misalignment-*")):
        m = float(m_dir.rsplit("-", 1)[1])
        for method, results in load(os.path.join(m_dir, "*")).items():
            points.setdefault(method, {})[m] = [target_avg(r) for r in results]
    for method, results in load(os.path.join(runs, "synthetic-benchmark", "[!s]*")).items():
        if method in points or method in ("pgd", "gaussian"):
            points.setdefault(method, {})[default_m] = [target_avg(r) for r in results]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method, by_m in sorted(points.items()):
        ms = sorted(by_m)
        means = [statistics.fmean(by_m[m]) for m in ms]
        stds = [statistics.stdev(by_m[m]) if len(by_m[m]) > 1 else 0.0 for m in ms]
        ax.errorbar(ms, means, yerr=stds, marker="o", capsize=3, label=method)
        for m in ms:
            ax.scatter([m] * len(by_m[m]), by_m[m], s=8, alpha=0.4, color=ax.lines[-1].get_color())
    ax.set_xlabel("--synthetic-misalignment")
    ax.set_ylabel("zero-shot accuracy, mean of de fr es zh (%)")
    ax.set_title("Accuracy against misalignment (test, mean ± std over seeds)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_misalignment.png"), dpi=120)


def sweep_plot(runs: str, out: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key in zip(axes, ("epsilon", "sigma")):
        by_value: dict[float, list[dict]] = {}
        for method, results in load(os.path.join(runs, "synthetic-benchmark", f"select-{key}-*")).items():
            by_value[float(method.rsplit("-", 1)[1])] = results
        values = sorted(by_value)
        for lang in LANGS:
            ax.plot(values, [100 * statistics.fmean(r["per_language"][lang] for r in by_value[v]) for v in values],
                    marker="o", label=lang)
        ax.plot(values, [100 * statistics.fmean(r["best_dev_source_acc"] for r in by_value[v]) for v in values],
                "k--", marker="s", label="en dev (selects)")
        ax.set_xscale("log")
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.minorticks_off()
        ax.set_xlabel(f"{key} (relative)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{'pgd' if key == 'epsilon' else 'gaussian'}: accuracy against {key}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_epsilon_sigma.png"), dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default="docs/img/results")
    p.add_argument("--default-misalignment", type=float, default=1.0)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    misalignment_plot(args.runs, args.default_misalignment, args.out)
    sweep_plot(args.runs, args.out)


if __name__ == "__main__":
    main()
