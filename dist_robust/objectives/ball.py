"""Perturbation-ball math on word-embedding outputs, as plain functions.

Shapes: ``delta`` and ``grad`` are (B, T, H); ``mask`` is (B, T) and is true only on real
tokens (never padding or special tokens). The L2 ball is per example, over all of its real
tokens; the L-inf ball is per coordinate.
"""

from __future__ import annotations

import torch

_TINY = 1e-12


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x * mask.unsqueeze(-1).to(x.dtype)


def l2_norms(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm over real tokens. (B,)"""
    return _masked(x, mask).flatten(1).norm(dim=1)


def random_start(shape: torch.Size, mask: torch.Tensor, epsilon: float, norm: str,
                 generator: torch.Generator) -> torch.Tensor:
    """A random point inside the ball: uniform radius along a uniform direction (L2) or
    uniform per coordinate (L-inf)."""
    if norm == "linf":
        delta = (torch.rand(shape, generator=generator) * 2 - 1) * epsilon
        return _masked(delta, mask)
    direction = _masked(torch.randn(shape, generator=generator), mask)
    radius = torch.rand(shape[0], generator=generator) * epsilon  # (B,)
    scale = radius / l2_norms(direction, mask).clamp_min(_TINY)
    return direction * scale.view(-1, 1, 1)


def ascent_step(delta: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, alpha: float,
                norm: str) -> torch.Tensor:
    """One step of size alpha along the normalized gradient (L2) or its sign (L-inf)."""
    if norm == "linf":
        step = grad.sign()
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
    """Per-example size of delta in the ball's own norm. (B,)"""
    if norm == "linf":
        return _masked(delta, mask).abs().flatten(1).amax(dim=1)
    return l2_norms(delta, mask)
