"""Smoothness-inducing adversarial regularisation (SMART; R3F is its noise-only special case)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_robust.objectives import ball
from dist_robust.objectives.base import StepContext, cross_entropy, delta_shape, draw, logits_of
from dist_robust.objectives.options import ObjectiveSpec, option, register

NOISE_TYPES = ("normal", "uniform")


# Measured with bench/precision_probe.py (docs/benchmarks.md, "Half precision at the same parameters").
BF16_CAVEAT = (
    "smart in bf16: the ascent follows the gradient of a KL between the clean prediction and one at a small random "
    "start, two predictions closer together than bf16 rounding, so its direction is mostly rounding noise "
    "(xlmr-base-random, cosine with the fp32 attack: -0.28 to 0.49 at the default --noise-scale 0.001, 0.57 to "
    "0.92 at 0.1; PGD's 0.9999). Train SMART with bf16 off (fp32), measure fp16 on your GPU with "
    "bench/precision_probe.py --precisions fp16, or use pgd, whose ascent survives bf16")


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Mean over examples of KL(p || q) + KL(q || p) between two categorical predictions, in fp32
    at least (bf16/fp16 logits are upcast before the log-softmax)."""
    wide = (torch.float16, torch.bfloat16)
    p = F.log_softmax(p_logits.float() if p_logits.dtype in wide else p_logits, dim=-1)
    q = F.log_softmax(q_logits.float() if q_logits.dtype in wide else q_logits, dim=-1)
    return ((p.exp() - q.exp()) * (p - q)).sum(-1).mean()  # KL(p||q) + KL(q||p), summed term by term


@dataclass
class SMART:
    """Jiang et al. (ACL 2020), on word-embedding outputs:
    ``L = CE(f(e(x)), y) + lambda * SKL(f(e(x)), f(e(x) + delta))`` with SKL the symmetric KL.

    delta starts at small random noise (``noise_type`` normal or uniform, of size ``noise_scale``:
    ``||delta_0||`` is about ``noise_scale`` for normal noise, ``noise_scale / sqrt(3)`` for
    uniform, in the units of ``relative``) and takes ``steps`` normalized ascent steps of size
    ``alpha`` on ``SKL(stop_grad(f(e(x))), f(e(x) + delta))``, projected onto the L2 ball of
    radius ``epsilon`` per example. ``steps = 0`` is R3F (Aghajanyan et al., ICLR 2021): noise
    only, no ascent.

    Passes per batch: with ascent, one forward without gradients for the clean prediction the
    ascent compares against, then ``steps`` input-gradient passes through ``engine.module``
    (as PGD's attack, so no engine backward hook fires); always one ``engine`` forward on the
    clean and perturbed batch stacked, whose loss gets the single ``engine.backward``. With
    ``delta = 0`` and no dropout the KL term is exactly 0 and L is the ERM loss; under dropout
    the clean and perturbed rows draw different masks, so the term also penalises dropout noise.
    """

    epsilon: float
    alpha: float
    steps: int = 1
    smart_lambda: float = 1.0
    noise_type: str = "normal"
    noise_scale: float = 1e-3
    relative: bool = False
    name: str = "smart"
    micro_steps: int = 1

    def _unit(self) -> str | None:
        return "norm" if self.relative else None

    def random_start(self, batch: dict, ctx: StepContext) -> torch.Tensor:
        mask = batch["perturb_mask"]
        shape = delta_shape(batch, ctx)
        if self.noise_type == "uniform":
            return ball.uniform_start(shape, mask, self.noise_scale, ctx.generator)
        noise = draw("normal", shape, ctx, mask.device) * mask.unsqueeze(-1).to(torch.float32)
        dims = (mask.sum(dim=1).float() * shape[-1]).clamp_min(1).sqrt()  # sqrt(L * H) per example
        return noise * (self.noise_scale / dims).view(-1, 1, 1)

    def attack(self, module, batch: dict, ctx: StepContext) -> torch.Tensor:
        """delta after the ascent steps (the random start when ``steps`` is 0). (B, T, H)"""
        mask = batch["perturb_mask"]
        delta = self.random_start(batch, ctx)
        if self.steps == 0:
            return delta
        with torch.no_grad():
            clean = logits_of(module, batch)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            with ctx.perturbation.apply(delta, mask, self._unit()):
                divergence = symmetric_kl(clean, logits_of(module, batch))
            (grad,) = torch.autograd.grad(divergence * ctx.loss_scale, delta)
            delta = ball.ascent_step(delta.detach(), grad, mask, self.alpha, "l2")
            delta = ball.project(delta, mask, self.epsilon, "l2")
        return delta.detach()

    def train_step(self, engine, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        delta = self.attack(engine.module, batch, ctx)
        b = delta.shape[0]
        with ctx.perturbation.apply(torch.cat([torch.zeros_like(delta), delta]), batch["perturb_mask"], self._unit()):
            logits = logits_of(engine, batch, repeat=2)  # rows [0, B) clean, [B, 2B) perturbed
        clean = cross_entropy(logits[:b], batch["labels"])
        divergence = symmetric_kl(logits[:b], logits[b:])
        loss = clean + self.smart_lambda * divergence
        engine.backward(loss)
        engine.step()
        norms = ball.l2_norms(delta, batch["perturb_mask"])
        return {"loss": loss.detach(), "loss_clean": clean.detach(), "loss_kl": divergence.detach(),
                "delta_norm": norms.max(), "delta_ratio": ctx.perturbation.last_ratio}


@dataclass
class SMARTOptions(ball.RadiusOptions):
    adv_steps: int = option(2, "number of ascent steps K (smart: 0 is R3F, noise only).", "--adv-steps", low=0)
    smart_lambda: float = option(1.0, "weight of the symmetric KL between clean and perturbed predictions.",
                                 "--smart-lambda", low=0)
    noise_type: str = option("normal", "distribution of the random start (normal or uniform).", "--noise-type",
                             choices=NOISE_TYPES)
    noise_scale: float = option(1e-3, "size of the random start, ||delta_0|| (uniform: / sqrt(3)), in epsilon's "
                                "units.", "--noise-scale", low=0)


register(ObjectiveSpec("smart", SMARTOptions,
                       lambda o: SMART(o.epsilon, o.alpha, o.adv_steps, o.smart_lambda, o.noise_type, o.noise_scale,
                                       o.scale == "relative")))


def precision_caveat(objective, ds_config: dict) -> str | None:
    """A warning for a SMART ascent in bf16 (see ``BF16_CAVEAT``); None for anything else."""
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    return BF16_CAVEAT if isinstance(objective, SMART) and objective.steps > 0 and bf16 else None
