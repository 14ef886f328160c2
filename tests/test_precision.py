"""Half precision at the same parameters (bench/precision_probe.py on the tiny config, bf16 on the CPU),
the warning SMART's bf16 ascent gets, and the float32 sum of squares the ZeRO gradient norm uses."""

import importlib.util
from pathlib import Path

import pytest
import torch

from dist_robust.config.run_config import ObjectiveConfig
from dist_robust.objectives import build_objective
from dist_robust.objectives.smart import BF16_CAVEAT, precision_caveat

BENCH = Path(__file__).resolve().parent.parent / "bench" / "precision_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("precision_probe", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.probe


@pytest.mark.parametrize("objective", ["erm", "pgd", "freelb", "gaussian"])
def test_bf16_step_matches_fp32_at_the_same_parameters(probe, objective, tmp_path):
    rows = probe("tiny", objective, "bf16", 2, 0.1, torch.device("cpu"), str(tmp_path / "tok"))
    for r in rows:
        assert abs(r["diff"]) < 0.01, r
        assert r["grad_err"] < 0.1, r  # bf16 carries 8 significant bits: a few percent, not more
        if objective == "pgd":
            assert r["delta_cos"] > 0.999, r  # the CE ascent's direction survives rounding


def test_smart_bf16_attack_direction_is_rounding_noise(probe, tmp_path):
    """The premise of BF16_CAVEAT: the loss agrees, the adversary's direction does not. If a change
    makes SMART's ascent survive bf16, this fails: update the caveat (and the docs) with it."""
    rows = probe("tiny", "smart", "bf16", 2, 0.1, torch.device("cpu"), str(tmp_path / "tok"))
    for r in rows:
        assert abs(r["diff"]) < 0.01, r
        assert r["delta_cos"] < 0.9, r


@pytest.mark.parametrize("name, steps, bf16, warned", [
    ("smart", 2, True, True), ("smart", 0, True, False), ("smart", 2, False, False), ("pgd", 2, True, False)])
def test_precision_caveat(name, steps, bf16, warned):
    objective = build_objective(ObjectiveConfig(name=name, adv_steps=steps))
    caveat = precision_caveat(objective, {"bf16": {"enabled": bf16}})
    assert (caveat == BF16_CAVEAT) if warned else caveat is None


def test_sum_of_squares_keeps_float64_accuracy_where_torchs_cpu_norm_does_not():
    """``zero.sum_of_squares`` (what the ZeRO-1/2 gradient norm is taken with on a CPU host) against
    the same sum in float64, over 32M standard normal float32 values and a few small tensors: within
    1e-6 of it, where torch 2.13's own float32 CPU norm of the big tensor is off by about 1e-3
    (pytorch/pytorch#169237)."""
    from dist_robust.infra.zero import sum_of_squares

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1 << 25, generator=g), torch.randn(300, 7, generator=g), torch.zeros(0), torch.ones(5)]
    exact = sum(t.double().pow(2).sum().item() for t in tensors)
    got = sum_of_squares(tensors)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(exact, rel=1e-6)
    half = torch.randn(1 << 22, generator=g).bfloat16()  # ZeRO-2 in bf16 reduces bf16 gradients
    assert sum_of_squares([half]).item() == pytest.approx(half.double().pow(2).sum().item(), rel=1e-4)
    assert sum_of_squares([]).item() == 0.0
    assert torch.isnan(sum_of_squares([torch.tensor([1.0, float("nan")])]))
