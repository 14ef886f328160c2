"""The interface every training objective implements, and what it works with."""

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
    forward runs, never by calling the embedding from outside.
    """

    def __init__(self, embedding: torch.nn.Module):
        self.delta: torch.Tensor | None = None
        self.last_output_shape: torch.Size | None = None
        self._handle = embedding.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.last_output_shape = output.shape
        if self.delta is None:
            return None
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
    generator: torch.Generator  # perturbation randomness, seeded per (seed, rank, batch)


class Objective(Protocol):
    """One training objective: consumes one data batch, drives the engine, returns stats.

    ``micro_steps`` is how many ``engine.step()`` calls one batch makes (FreeLB: K), so
    the engine's accumulation boundary stays DeepSpeed's decision.
    """

    name: str
    micro_steps: int

    def train_step(self, engine, batch: dict, ctx: StepContext) -> dict[str, float]:
        ...


def logits_of(model, batch: dict, repeat: int = 1) -> torch.Tensor:
    """Forward the classifier (engine or bare module) on a batch repeated ``repeat`` times."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    if repeat > 1:
        ids, attention = ids.repeat(repeat, 1), attention.repeat(repeat, 1)
    return model(input_ids=ids, attention_mask=attention).logits


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, computed in at least fp32 (bf16/fp16 logits are upcast)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, labels)


def delta_shape(batch: dict, ctx: StepContext) -> torch.Size:
    b, t = batch["input_ids"].shape
    return torch.Size((b, t, ctx.hidden_size))
