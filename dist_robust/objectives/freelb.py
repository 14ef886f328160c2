"""FreeLB: adversarial training whose ascent steps also accumulate parameter gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_robust.objectives import ball
from dist_robust.objectives.base import StepContext, cross_entropy, delta_shape, logits_of, unit_of
from dist_robust.objectives.options import ObjectiveSpec, option, register


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

    As its authors run it (each an option; the defaults keep the behaviour above):
    ``init_mag`` starts from ``U(-1, 1) * init_mag / sqrt(L * H)`` on the real tokens instead
    of a random point of the ball; ``linf_step="normalized"`` steps along ``g / ||g||_inf``
    (the FreeLB code) instead of ``sign(g)``; ``same_dropout`` gives all K passes of a batch the
    same dropout masks; ``adv_begin_step`` trains with delta = 0 (the ERM gradient, K passes)
    for the first steps. ``loss_clean`` is the loss at delta = 0: the first pass's when the
    start is 0, else one more forward without gradient.
    """

    epsilon: float
    alpha: float
    steps: int
    norm: str = "l2"
    relative: bool = False  # epsilon and alpha as fractions of ||e(x)|| (see PGD)
    init_mag: float | None = None
    linf_step: str = "sign"
    same_dropout: bool = False
    adv_begin_step: int = 0
    name: str = "freelb"

    @property
    def micro_steps(self) -> int:
        return self.steps

    def start(self, batch: dict, ctx: StepContext) -> torch.Tensor:
        mask, shape = batch["perturb_mask"], delta_shape(batch, ctx)
        if ctx.step < self.adv_begin_step:
            return torch.zeros(shape, device=mask.device)
        if self.init_mag is not None:
            return ball.uniform_start(shape, mask, self.init_mag, ctx.generator)
        return ball.random_start(shape, mask, self.epsilon, self.norm, ctx.generator)

    def clean_loss(self, engine, batch: dict, ctx: StepContext) -> torch.Tensor:
        """CE at delta = 0, without gradient; the dropout generators are left as they were, so the
        K training passes draw the masks they would without this measurement."""
        device = batch["input_ids"].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                   device_type=device.type), torch.no_grad():
            if self.same_dropout:
                ctx.same_dropout()
            return cross_entropy(logits_of(engine.module, batch), batch["labels"])

    def train_step(self, engine, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        mask = batch["perturb_mask"]
        warm_up = ctx.step < self.adv_begin_step
        delta = self.start(batch, ctx)
        clean = None if warm_up or self.init_mag == 0 else self.clean_loss(engine, batch, ctx)
        losses = []
        for k in range(self.steps):
            delta.requires_grad_(True)
            if self.same_dropout:
                ctx.same_dropout()
            with ctx.perturbation.apply(delta, mask, unit_of(self)):
                loss = cross_entropy(logits_of(engine, batch), batch["labels"])
            engine.backward(loss)
            grad = delta.grad
            engine.step()
            losses.append(loss.detach())
            delta = delta.detach()
            if k + 1 < self.steps and not warm_up:
                delta = ball.project(ball.ascent_step(delta, grad, mask, self.alpha, self.norm, self.linf_step),
                                     mask, self.epsilon, self.norm)
        norms = ball.ball_norms(delta, mask, self.norm)
        return {"loss": torch.stack(losses).mean(), "loss_clean": losses[0] if clean is None else clean,
                "loss_adv": losses[-1], "delta_norm": norms.max(), "delta_ratio": ctx.perturbation.last_ratio}


@dataclass
class FreeLBOptions(ball.BallOptions):
    init_mag: float | None = option(None, "start from U(-1, 1) * init_mag / sqrt(L * H) on the L real tokens "
                                    "(FreeLB's init, in epsilon's units; 0: start at delta = 0). Default: a random "
                                    "point of the epsilon-ball.", "--init-mag", low=0)
    same_dropout: bool = option(False, "the same dropout masks in all K passes of a batch (as FreeLB does).",
                                "--same-dropout")


register(ObjectiveSpec("freelb", FreeLBOptions,
                       lambda o: FreeLB(o.epsilon, o.alpha, o.adv_steps, o.norm, o.scale == "relative", o.init_mag,
                                        o.linf_step, o.same_dropout, o.adv_begin_step),
                       micro_steps=lambda o: o.adv_steps))  # a real engine backward per ascent pass
