"""Perturbation-ball math on word-embedding outputs, as plain functions.

Shapes: ``delta`` and ``grad`` are (B, T, H); ``mask`` is (B, T) and is true only on real
tokens (never padding or special tokens). The L2 ball is per example, over all of its real
tokens; the L-inf ball is per coordinate. Norms and steps are computed in fp32 whatever the
dtype of the gradient (an fp16 gradient squared overflows long before its norm does), and
everything is made on ``mask``'s device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_robust.objectives.base import PerturbationOptions, draw
from dist_robust.objectives.options import option

NORMS = ("l2", "linf")
LINF_STEPS = ("sign", "normalized")


@dataclass
class RadiusOptions(PerturbationOptions):
    """A perturbation ball and the ascent inside it (PGD, FreeLB, SMART)."""

    epsilon: float = option(0.01, "radius of the perturbation ball on word-embedding outputs (relative: the most "
                            "||delta|| / ||e(x)|| may reach). The default is what English dev chose for a "
                            "pretrained BERT on XNLI (0.1 kept it from learning; docs/results.md).", "--epsilon",
                            low=0)
    alpha: float = option(0.005, "ascent step size (in epsilon's units).", "--alpha", low=0)
    adv_steps: int = option(2, "number of ascent steps K (smart: 0 is R3F, noise only).", "--adv-steps", low=1)


@dataclass
class BallOptions(RadiusOptions):
    """Adversarial training in a norm ball (PGD, FreeLB)."""

    norm: str = option("l2", "ball norm (l2 per example over real tokens, or linf).", "--norm", choices=NORMS)
    linf_step: str = option("sign", "with --norm linf: ascent along sign(g) or g / ||g||_inf (normalized, the "
                            "FreeLB code's).", "--linf-step", choices=LINF_STEPS)
    adv_begin_step: int = option(0, "train without perturbation (the ERM gradient) for this many optimizer steps "
                                 "first.", "--adv-begin-step", low=0)

_TINY = 1e-12


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x * mask.unsqueeze(-1).to(x.dtype)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (fp16/bf16 are upcast; fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def l2_norms(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm over real tokens, in at least fp32. (B,)"""
    return _masked(_wide(x), mask).flatten(1).norm(dim=1)


def random_start(shape: torch.Size, mask: torch.Tensor, epsilon: float, norm: str,
                 generator: torch.Generator) -> torch.Tensor:
    """A random point inside the ball: uniform radius along a uniform direction (L2) or
    uniform per coordinate (L-inf). Drawn from the CPU ``generator``, returned in fp32 on
    ``mask``'s device."""
    if norm == "linf":
        delta = (draw("uniform", shape, generator, mask.device) * 2 - 1) * epsilon
        return _masked(delta, mask)
    direction = _masked(draw("normal", shape, generator, mask.device), mask)
    radius = draw("uniform", shape[:1], generator, mask.device) * epsilon  # (B,)
    scale = radius / l2_norms(direction, mask).clamp_min(_TINY)
    return direction * scale.view(-1, 1, 1)


def uniform_start(shape: torch.Size, mask: torch.Tensor, init_mag: float, generator: torch.Generator) -> torch.Tensor:
    """FreeLB's start: U(-1, 1) * init_mag / sqrt(L * H) on the real tokens, L of them per
    example, H coordinates each (so ||delta|| is about init_mag / sqrt(3) whatever the length)."""
    delta = _masked(draw("uniform", shape, generator, mask.device) * 2 - 1, mask)
    dims = (mask.sum(dim=1).float() * shape[-1]).clamp_min(1).sqrt()  # (B,)
    return delta * (init_mag / dims).view(-1, 1, 1)


def ascent_step(delta: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, alpha: float,
                norm: str, linf_step: str = "sign") -> torch.Tensor:
    """One step of size alpha along the normalized gradient (L2) or, for L-inf, its sign
    (``linf_step="sign"``, PGD's) or ``g / ||g||_inf`` per example (``"normalized"``, the FreeLB code's).

    The step is scale-free, so a loss-scaled (fp16) gradient gives the same step. An example
    whose gradient is not finite (an fp16 overflow) takes no step instead of poisoning delta.
    """
    grad = _masked(_wide(grad), mask)
    finite = torch.isfinite(grad).flatten(1).all(dim=1).view(-1, 1, 1)  # (B, 1, 1)
    grad = torch.where(finite, grad, torch.zeros_like(grad))
    if norm == "linf" and linf_step == "sign":
        step = grad.sign()
    elif norm == "linf":
        step = grad / grad.abs().flatten(1).amax(dim=1).clamp_min(_TINY).view(-1, 1, 1)
    else:
        step = grad / l2_norms(grad, mask).clamp_min(_TINY).view(-1, 1, 1)
    return _masked(delta + alpha * step, mask)


def project(delta: torch.Tensor, mask: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """Closest point of the epsilon-ball (and zero off the real tokens)."""
    if norm == "linf":
        return _masked(delta.clamp(-epsilon, epsilon), mask)
    norms = l2_norms(delta, mask)
    factor = torch.where(norms > epsilon, epsilon / norms.clamp_min(_TINY), torch.ones_like(norms))
    return _masked(delta * factor.view(-1, 1, 1), mask)


def ball_norms(delta: torch.Tensor, mask: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example size of delta in the ball's own norm, in at least fp32. (B,)"""
    if norm == "linf":
        return _masked(_wide(delta), mask).abs().flatten(1).amax(dim=1)
    return l2_norms(delta, mask)
