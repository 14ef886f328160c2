"""Paired differences against a baseline over seeds: the effect and its uncertainty.

Two methods run with the same seeds share the seed's data order and initialisation, so the
difference per seed removes that part of the noise. For every column, the differences
``method - baseline`` over the seeds both have give a mean, a 95% Student-t confidence
interval, the two-sided Wilcoxon signed-rank p-value (exact for these sample sizes), and how
many seeds the method won. With 5 seeds the smallest possible Wilcoxon p is 0.0625: read the
interval first.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass
class Paired:
    mean: float
    low: float | None  # 95% confidence interval of the mean difference (None with one pair)
    high: float | None
    n: int  # seeds paired
    wins: int  # seeds where the method beat the baseline
    p: float | None  # Wilcoxon signed-rank, two-sided (1.0 when every difference is 0)


def paired(diffs: list[float]) -> Paired:
    """Statistics of per-seed differences."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.fmean(diffs)
    low = high = p = None
    if n > 1:
        half = stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
        low, high = mean - half, mean + half
        p = 1.0 if all(d == 0 for d in diffs) else float(stats.wilcoxon(diffs, zero_method="zsplit").pvalue)
    return Paired(mean, low, high, n, sum(d > 0 for d in diffs), p)


def per_seed(records, column: str) -> dict[str, float]:
    """seed -> the column's value (mean over reruns of that seed) in these runs."""
    out: dict[str, list[float]] = {}
    for r in records:
        if column in r.metrics and "train.seed" in r.params:
            out.setdefault(r.params["train.seed"], []).append(r.metrics[column])
    return {seed: statistics.fmean(vs) for seed, vs in out.items()}


def paired_against(records, baseline_records, columns: list[str]) -> dict[str, Paired | None]:
    """column -> paired statistics of these runs against the baseline's, over the seeds both have."""
    out: dict[str, Paired | None] = {}
    for column in columns:
        mine, base = per_seed(records, column), per_seed(baseline_records, column)
        seeds = sorted(set(mine) & set(base))
        out[column] = paired([mine[s] - base[s] for s in seeds]) if seeds else None
    return out


def paired_text(p: Paired | None) -> str:
    """``+1.20 [+0.40, +2.00] 5/5 p=0.06`` in points."""
    if p is None:
        return "n/a"
    text = f"{100 * p.mean:+.2f}"
    if p.low is not None:
        text += f" [{100 * p.low:+.2f}, {100 * p.high:+.2f}]"
    text += f" {p.wins}/{p.n}"
    if p.p is not None:
        text += f" p={p.p:.2g}"
    return text
