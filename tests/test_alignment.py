"""Alignment diagnostics: the measures against closed forms, and the command on a real multilingual encoder."""

from __future__ import annotations

import json

import torch

from dist_robust.analysis.alignment import measure, metrics_of


def test_measures_against_closed_forms():
    english = torch.randn(3, 8, 16)  # (layers, N, H)
    same = measure(english, english.clone())
    assert same["relative_distance"] == [0.0, 0.0, 0.0] and same["retrieval"] == [1.0, 1.0, 1.0]
    assert all(abs(c - 1) < 1e-6 for c in same["cosine"])
    opposite = measure(english, -english)
    assert all(abs(c + 1) < 1e-6 for c in opposite["cosine"]) and all(abs(r - 2) < 1e-6 for r in
                                                                       opposite["relative_distance"])
    shifted = measure(english, english.roll(1, dims=1))  # every sentence paired with another's translation
    assert shifted["retrieval"] == [0.0, 0.0, 0.0]
    scaled = measure(english, 1.5 * english)  # same direction, half again as long
    assert all(abs(r - 0.5) < 1e-6 for r in scaled["relative_distance"]) and scaled["retrieval"] == [1.0] * 3


def test_metrics_are_named_by_language_measure_and_layer():
    report = {"layers": ["embeddings", "layer1"], "languages": {
        "de": {"relative_distance": [1.0, 0.5], "cosine": [0.5, 0.9], "retrieval": [0.4, 1.0]},
        "zh": {"relative_distance": [1.0, 0.7], "cosine": [0.3, 0.7], "retrieval": [0.2, 0.8]}}}
    metrics = metrics_of(report)
    assert metrics["align.de.cosine.layer1"] == 0.9 and abs(metrics["align.mean.retrieval.embeddings"] - 0.3) < 1e-12
    assert len(metrics) == 2 * 3 * 2 + 3 * 2
    json.dumps(metrics)


def test_gap_slopes_against_a_constructed_relation():
    """Gaps that grow by exactly 10 points per unit of misalignment (ERM) and 4 (a robust objective):
    the slopes, their paired difference, and a perfect rank correlation."""
    from dist_robust.analysis.alignment import gap_slope, slopes_by_objective

    mis = {"en": 0.0, "de": 0.2, "fr": 0.3, "zh": 0.9}

    def accs(rate: float, offset: float) -> dict[str, float]:
        return {"en": 0.9, **{lang: 0.9 - (rate * m + offset) / 100 for lang, m in mis.items() if lang != "en"}}

    one = gap_slope(accs(10, 1.0), mis)
    assert abs(one["slope"] - 10) < 1e-9 and abs(one["intercept"] - 1.0) < 1e-9 and one["spearman"] == 1.0
    runs = {"erm": {1: accs(10, 1.0), 2: accs(10, 2.0)}, "pgd": {1: accs(4, 1.0), 2: accs(4, 3.0)}}
    out = slopes_by_objective(runs, mis)
    assert abs(out["erm"]["slope"]["mean"] - 10) < 1e-9 and abs(out["pgd"]["slope_vs_erm"]["mean"] + 6) < 1e-9
    assert out["pgd"]["slope_vs_erm"]["n"] == 2
