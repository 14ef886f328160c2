"""Randomized smoothing with random perturbation: Gaussian noise on word embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_robust.objectives.base import (PerturbationOptions, StepContext, cross_entropy, delta_shape, draw,
                                         logits_of)
from dist_robust.objectives.options import ObjectiveSpec, option, register


@dataclass
class Gaussian:
    """Huang et al. (EMNLP 2021, Sec. 3.2, RS-RP): train on ``e(x) + n`` with
    ``n ~ N(0, sigma^2 I)`` on real tokens, n noise draws per example:
    ``L = (1/n) sum_i CE(f(e(x) + n_i), y)``. sigma = 0 gives the ERM loss.

    The n copies go through one ``engine`` forward (the batch stacked n times). ``relative``:
    sigma is a fraction of the example's root-mean-square embedding coordinate, so the noise's
    expected norm is sigma * ||e(x)|| on any model.
    """

    sigma: float
    samples: int = 1
    relative: bool = False
    name: str = "gaussian"
    micro_steps: int = 1

    def train_step(self, engine, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        b, t, h = delta_shape(batch, ctx)
        mask = batch["perturb_mask"]
        noise = draw("normal", (self.samples * b, t, h), ctx, mask.device) * self.sigma
        noise = noise * mask.repeat(self.samples, 1).unsqueeze(-1)  # (nB, T, H)
        with ctx.perturbation.apply(noise, mask, "rms" if self.relative else None):
            logits = logits_of(engine, batch, repeat=self.samples)
        loss = cross_entropy(logits, batch["labels"].repeat(self.samples))
        engine.backward(loss)
        engine.step()
        return {"loss": loss.detach(), "delta_ratio": ctx.perturbation.last_ratio}


@dataclass
class GaussianOptions(PerturbationOptions):
    sigma: float = option(0.1, "standard deviation of the noise on word-embedding outputs (relative: a fraction "
                          "of the example's root-mean-square coordinate, i.e. the expected ||noise|| / ||e(x)||).",
                          "--sigma", low=0)
    noise_samples: int = option(1, "noisy copies of every example per step.", "--noise-samples", low=1)


register(ObjectiveSpec("gaussian", GaussianOptions,
                       lambda o: Gaussian(o.sigma, o.noise_samples, o.scale == "relative")))
