"""Adversarial training with projected gradient ascent in the word-embedding space."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_robust.objectives import ball
from dist_robust.objectives.base import StepContext, cross_entropy, delta_shape, logits_of, unit_of
from dist_robust.objectives.options import ObjectiveSpec, option, register


@dataclass
class PGD:
    """Madry et al. (2018) PGD on word-embedding outputs, as used for cross-lingual
    robustness by Huang et al. (EMNLP 2021, Sec. 3.1).

    delta_0 is a random point of the epsilon-ball; then K times
    ``delta <- Proj_eps(delta + alpha * g / ||g||)`` (L2; ``sign(g)`` for L-inf) with
    ``g = d CE(f(e(x) + delta), y) / d delta``. The training loss mixes clean and
    adversarial cross-entropy: ``L = (1 - w) CE(f(e(x)), y) + w CE(f(e(x) + delta_K), y)``.
    At epsilon = 0, delta stays 0 and L is the ERM loss for any w.

    The K ascent passes only need d/d delta, so they run through ``engine.module`` (the
    engine's backward hooks would reduce gradients that do not exist yet: ZeRO-0/2 raise,
    ZeRO-3 silently corrupts training). The final clean+adversarial pass is one
    ``engine(...)`` call on the batch stacked twice, then ``engine.backward``/``engine.step``.

    ``relative``: epsilon and alpha are fractions of the example's word-embedding norm
    ``||e(x)||`` (L2; of its root-mean-square coordinate for L-inf), so one value means the
    same on every model (see ``EmbeddingPerturbation``).

    Under fp16 the attack loss is multiplied by the engine's loss scale before
    ``autograd.grad`` (otherwise the input gradient underflows in the fp16 backward and the
    attack never leaves its random start); the normalized step does not depend on the scale.
    """

    epsilon: float
    alpha: float
    steps: int
    norm: str = "l2"
    adv_weight: float = 0.5
    relative: bool = False
    linf_step: str = "sign"  # or "normalized": g / ||g||_inf (see ball.ascent_step)
    adv_begin_step: int = 0  # plain ERM steps before the first adversarial one
    name: str = "pgd"
    micro_steps: int = 1

    def attack(self, module, batch: dict, ctx: StepContext) -> torch.Tensor:
        """The adversarial perturbation delta_K for this batch. (B, T, H)"""
        mask = batch["perturb_mask"]
        delta = ball.random_start(delta_shape(batch, ctx), mask, self.epsilon, self.norm, ctx.generator)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            with ctx.perturbation.apply(delta, mask, unit_of(self)):
                loss = cross_entropy(logits_of(module, batch), batch["labels"])
            (grad,) = torch.autograd.grad(loss * ctx.loss_scale, delta)
            delta = ball.ascent_step(delta.detach(), grad, mask, self.alpha, self.norm, self.linf_step)
            delta = ball.project(delta, mask, self.epsilon, self.norm)
        return delta.detach()

    def train_step(self, engine, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        if ctx.step < self.adv_begin_step:  # warm-up: the ERM step, one pass
            loss = cross_entropy(logits_of(engine, batch), batch["labels"])
            engine.backward(loss)
            engine.step()
            zero = torch.zeros((), device=loss.device)
            return {"loss": loss.detach(), "loss_clean": loss.detach(), "loss_adv": loss.detach(),
                    "delta_norm": zero, "delta_ratio": zero}
        delta = self.attack(engine.module, batch, ctx)
        b = delta.shape[0]
        with ctx.perturbation.apply(torch.cat([torch.zeros_like(delta), delta]), batch["perturb_mask"],
                                    unit_of(self)):
            logits = logits_of(engine, batch, repeat=2)  # rows [0, B) clean, [B, 2B) adversarial
        clean = cross_entropy(logits[:b], batch["labels"])
        adv = cross_entropy(logits[b:], batch["labels"])
        loss = (1 - self.adv_weight) * clean + self.adv_weight * adv
        engine.backward(loss)
        engine.step()
        norms = ball.ball_norms(delta, batch["perturb_mask"], self.norm)
        return {"loss": loss.detach(), "loss_clean": clean.detach(), "loss_adv": adv.detach(),
                "delta_norm": norms.max(), "delta_ratio": ctx.perturbation.last_ratio}


@dataclass
class PGDOptions(ball.BallOptions):
    adv_weight: float = option(0.5, "loss = (1 - w) * clean CE + w * adversarial CE.", "--adv-weight", low=0, high=1)


register(ObjectiveSpec("pgd", PGDOptions, lambda o: PGD(o.epsilon, o.alpha, o.adv_steps, o.norm, o.adv_weight,
                                                         o.scale == "relative", o.linf_step, o.adv_begin_step)))
