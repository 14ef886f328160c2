"""Plain fine-tuning: empirical risk minimization with cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_robust.objectives.base import StepContext, cross_entropy, logits_of
from dist_robust.objectives.options import ObjectiveSpec, register


@dataclass
class ERM:
    """L = CE(f(x), y). The baseline every robust objective reduces to at zero radius/noise."""

    name: str = "erm"
    micro_steps: int = 1

    def train_step(self, engine, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        loss = cross_entropy(logits_of(engine, batch), batch["labels"])
        engine.backward(loss)
        engine.step()
        return {"loss": loss.detach()}


@dataclass
class ERMOptions:
    """ERM has no options."""


register(ObjectiveSpec("erm", ERMOptions, lambda o: ERM()))
