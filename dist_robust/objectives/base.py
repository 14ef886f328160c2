"""The interface every training objective implements, and what it works with.

Device discipline: a batch arrives on the engine's device; everything an objective creates is
made on that device (``batch["input_ids"].device``) in the dtype it meets. Random draws are
the exception that proves the rule: they are drawn on the CPU from the step's seeded
generator and moved once, so the same (seed, rank, batch) gives the same perturbation on a
CPU and on a GPU. Objectives return their statistics as 0-dim tensors on that device; the
trainer reduces them over ranks in one collective and reads them once per step.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from dist_robust.objectives.options import option

SCALES = ("relative", "absolute")


@dataclass
class PerturbationOptions:
    """What every objective that perturbs the word embeddings shares."""

    scale: str = option("relative", "Units of epsilon, alpha and sigma: relative (fractions of each example's "
                        "word-embedding norm ||e(x)||, the same meaning on every model) or absolute (raw "
                        "embedding units).", "--perturbation-scale", choices=SCALES)


class EmbeddingPerturbation:
    """Adds a perturbation to the word-embedding *output* from inside the model's forward.

    A forward hook on the token-embedding module, registered once: under ZeRO-3 the
    embedding weight is partitioned, so the perturbation must enter while the engine's
    forward runs, never by calling the embedding from outside. Only the word embeddings are
    hooked: position and token-type embeddings are added after this output and stay clean.

    ``apply(delta, mask, unit)``: ``mask`` (B, T) marks the real tokens of the batch (its rows
    are repeated to match a stacked delta); with it, every perturbed forward records
    ``last_ratio``, the mean over perturbed rows of ``||delta|| / ||e(x)||`` (L2 over real
    tokens). ``unit`` makes ``delta`` relative to the example's own embeddings: ``"norm"``
    multiplies each row by ``||e(x)||`` (so an L2 ball of radius eps bounds that ratio by eps),
    ``"rms"`` by ``||e(x)|| / sqrt(n H)``, the root-mean-square coordinate of its n real tokens
    (so per-coordinate sizes, L-inf radii and Gaussian sigmas are fractions of a typical
    coordinate, and sigma is the expected ratio). The scale is taken from the clean output and
    not differentiated.
    """

    def __init__(self, embedding: torch.nn.Module):
        self.delta: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.unit: str | None = None
        self.last_output_shape: torch.Size | None = None
        self.last_ratio: torch.Tensor | None = None
        self._handle = embedding.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.last_output_shape = output.shape
        if self.delta is None:
            return None
        # delta lives on the output's device already (objectives create it there); a CPU delta
        # meeting a GPU output is a bug that must raise, not be papered over by a silent copy.
        delta = self.delta
        if self.mask is not None:
            clean = output.detach()
            clean = clean.float() if clean.dtype in (torch.float16, torch.bfloat16) else clean  # >= fp32
            mask = self.mask.repeat(delta.shape[0] // self.mask.shape[0], 1).unsqueeze(-1).to(clean.dtype)  # (R, T, 1)
            norms = (clean * mask).flatten(1).norm(dim=1)  # (R,) ||e(x)||
            if self.unit == "norm":
                delta = delta * norms.view(-1, 1, 1)
            elif self.unit == "rms":
                coords = mask.flatten(1).sum(dim=1) * output.shape[-1]
                delta = delta * (norms / coords.clamp_min(1).sqrt()).view(-1, 1, 1)
            sizes = (delta.detach().to(clean.dtype) * mask).flatten(1).norm(dim=1)
            perturbed = (sizes > 0).to(clean.dtype)
            self.last_ratio = (sizes / norms.clamp_min(1e-12) * perturbed).sum() / perturbed.sum().clamp_min(1)
        return output + delta.to(output.dtype)  # (B, T, H)

    @contextmanager
    def apply(self, delta: torch.Tensor, mask: torch.Tensor | None = None, unit: str | None = None):
        if unit is not None and mask is None:
            raise ValueError("a relative perturbation needs the batch's real-token mask")
        self.delta, self.mask, self.unit = delta, mask, unit
        try:
            yield
        finally:
            self.delta, self.mask, self.unit = None, None, None

    def remove(self) -> None:
        self._handle.remove()


@dataclass
class StepContext:
    """What an objective needs besides the engine and the batch."""

    perturbation: EmbeddingPerturbation
    hidden_size: int
    generator: torch.Generator  # CPU generator for perturbation randomness, seeded per (seed, rank, batch)
    loss_scale: float = 1.0  # fp16: the engine's current loss scale, applied before input-gradient passes
    step: int = 0  # optimizer steps taken before this batch (for --adv-begin-step)
    dropout_seed: int | None = None  # the seed this batch's dropout masks were drawn from

    def same_dropout(self) -> None:
        """Reseed the dropout generators (every device's), so the next forward draws this batch's
        first masks again: every pass of the batch then sees the same dropout masks."""
        if self.dropout_seed is not None:
            torch.manual_seed(self.dropout_seed)


class Objective(Protocol):
    """One training objective: consumes one data batch, drives the engine, returns stats.

    ``micro_steps`` is how many ``engine.step()`` calls one batch makes (FreeLB: K), so
    the engine's accumulation boundary stays DeepSpeed's decision. Stats are detached
    0-dim tensors on the batch's device (``loss`` always; ``loss_clean``, ``loss_adv``,
    ``delta_norm`` where they apply).
    """

    name: str
    micro_steps: int

    def train_step(self, engine, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        ...


def model_inputs(batch: dict, repeat: int = 1) -> dict[str, torch.Tensor]:
    """The tensors the encoder's forward takes, each repeated ``repeat`` times along the batch."""
    keys = ("input_ids", "attention_mask", "token_type_ids")
    inputs = {k: batch[k] for k in keys if k in batch}
    if repeat > 1:
        inputs = {k: v.repeat(repeat, 1) for k, v in inputs.items()}
    return inputs


def logits_of(model, batch: dict, repeat: int = 1) -> torch.Tensor:
    """Forward the classifier (engine or bare module) on a batch repeated ``repeat`` times."""
    return model(**model_inputs(batch, repeat)).logits


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, computed in at least fp32 (bf16/fp16 logits are upcast)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, labels)


def unit_of(objective) -> str | None:
    """The ``EmbeddingPerturbation`` unit of a ball objective: None (absolute), or relative to
    ``||e(x)||`` for an L2 ball and to its root-mean-square coordinate for an L-inf one."""
    if not objective.relative:
        return None
    return "norm" if objective.norm == "l2" else "rms"


def delta_shape(batch: dict, ctx: StepContext) -> torch.Size:
    b, t = batch["input_ids"].shape
    return torch.Size((b, t, ctx.hidden_size))


def draw(kind: str, shape: torch.Size | tuple, ctx_or_generator, device: torch.device) -> torch.Tensor:
    """``randn``/``rand`` of ``shape`` in fp32: drawn on the CPU generator, then moved to ``device``.

    The CPU draw makes a perturbation a function of the seed alone, whatever the device; the
    move is one copy per draw (non-blocking from pinned memory on CUDA).
    """
    gen = getattr(ctx_or_generator, "generator", ctx_or_generator)
    fn = torch.randn if kind == "normal" else torch.rand
    cpu = fn(shape, generator=gen, dtype=torch.float32, device="cpu")
    if device.type == "cuda":
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu.to(device)
