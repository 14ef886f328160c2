"""FreeLB: adversarial training whose ascent steps also accumulate parameter gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_robust.objectives import ball
from dist_robust.objectives.base import StepContext, cross_entropy, delta_shape, logits_of, unit_of


@dataclass
class FreeLB:
    """Zhu et al., "FreeLB" (ICLR 2020), on word-embedding outputs.

    For k = 1..K: forward with delta_{k-1}, backward ``CE / K`` (parameter gradients
    accumulate), then ``delta_k = Proj_eps(delta_{k-1} + alpha * g / ||g||)``; one optimizer
    step after the K passes, i.e. the parameters descend on
    ``(1/K) sum_k CE(f(e(x) + delta_{k-1}), y)``.

    Every pass is a real ``engine`` forward/backward/step: the run's
    ``gradient_accumulation_steps`` is multiplied by K, so DeepSpeed scales each backward
    by 1/(K * accumulation) and steps the optimizer on its own boundary. ``delta.grad`` then
    carries the engine's fp16 loss scale, which the normalized ascent step ignores.
    """

    epsilon: float
    alpha: float
    steps: int
    norm: str = "l2"
    relative: bool = False  # epsilon and alpha as fractions of ||e(x)|| (see PGD)
    name: str = "freelb"

    @property
    def micro_steps(self) -> int:
        return self.steps

    def train_step(self, engine, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        mask = batch["perturb_mask"]
        delta = ball.random_start(delta_shape(batch, ctx), mask, self.epsilon, self.norm, ctx.generator)
        losses = []
        for k in range(self.steps):
            delta.requires_grad_(True)
            with ctx.perturbation.apply(delta, mask, unit_of(self)):
                loss = cross_entropy(logits_of(engine, batch), batch["labels"])
            engine.backward(loss)
            grad = delta.grad
            engine.step()
            losses.append(loss.detach())
            if k + 1 < self.steps:
                delta = ball.project(ball.ascent_step(delta.detach(), grad, mask, self.alpha, self.norm),
                                     mask, self.epsilon, self.norm)
        norms = ball.ball_norms(delta.detach(), mask, self.norm)
        return {"loss": torch.stack(losses).mean(), "loss_clean": losses[0], "loss_adv": losses[-1],
                "delta_norm": norms.max(), "delta_ratio": ctx.perturbation.last_ratio}
