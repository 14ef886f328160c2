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


class EmbeddingPerturbation:
    """Adds a perturbation to the word-embedding *output* from inside the model's forward.

    A forward hook on the token-embedding module, registered once: under ZeRO-3 the
    embedding weight is partitioned, so the perturbation must enter while the engine's
    forward runs, never by calling the embedding from outside. Only the word embeddings are
    hooked: position and token-type embeddings are added after this output and stay clean.
    """

    def __init__(self, embedding: torch.nn.Module):
        self.delta: torch.Tensor | None = None
        self.last_output_shape: torch.Size | None = None
        self._handle = embedding.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.last_output_shape = output.shape
        if self.delta is None:
            return None
        # delta lives on the output's device already (objectives create it there); a CPU delta
        # meeting a GPU output is a bug that must raise, not be papered over by a silent copy.
        return output + self.delta.to(output.dtype)  # (B, T, H)

    @contextmanager
    def apply(self, delta: torch.Tensor):
        self.delta = delta
        try:
            yield
        finally:
            self.delta = None

    def remove(self) -> None:
        self._handle.remove()


@dataclass
class StepContext:
    """What an objective needs besides the engine and the batch."""

    perturbation: EmbeddingPerturbation
    hidden_size: int
    generator: torch.Generator  # CPU generator for perturbation randomness, seeded per (seed, rank, batch)
    loss_scale: float = 1.0  # fp16: the engine's current loss scale, applied before input-gradient passes


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
