"""Objectives as pure tensor math on a tiny XLM-R classifier (no process group needed).

``_Recorder`` stands in for the DeepSpeed engine's three calls (forward, backward, step) so
the math can be checked exactly; the real engines are exercised in test_engine_stages.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

from dist_robust.objectives import ERM, PGD, SMART, EmbeddingPerturbation, FreeLB, Gaussian, StepContext, ball
from dist_robust.objectives.base import cross_entropy, logits_of


@pytest.fixture(autouse=True)
def _float64():
    """Finite differences need double precision; restore the default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class _Recorder(torch.nn.Module):
    """Forward = the model; backward = autograd; records every loss it is given."""

    def __init__(self, model):
        super().__init__()
        self.module = model
        self.losses: list[float] = []
        self.steps = 0

    def forward(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        self.losses.append(loss.item())
        loss.backward()

    def step(self):
        self.steps += 1


def _model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = XLMRobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, type_vocab_size=1, num_labels=3,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1,
                           initializer_range=0.3)  # large weights: a loss surface with some slope
    return XLMRobertaForSequenceClassification(cfg).double().eval()


def _batch():
    # <s>=0, </s>=2, <pad>=1; second row is padded.
    ids = torch.tensor([[0, 5, 6, 7, 8, 2, 2, 9, 10, 2],
                        [0, 11, 12, 2, 2, 13, 2, 1, 1, 1]])
    attention = (ids != 1).long()
    perturb = attention.bool() & ~torch.isin(ids, torch.tensor([0, 1, 2]))
    return {"input_ids": ids, "attention_mask": attention, "labels": torch.tensor([0, 2]),
            "perturb_mask": perturb}


def _ctx(model, seed=0):
    return StepContext(EmbeddingPerturbation(model.get_input_embeddings()), model.config.hidden_size,
                       torch.Generator().manual_seed(seed))


def _floats(stats: dict) -> dict[str, float]:
    """Objectives return 0-dim tensors on the batch's device; read them here."""
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in stats.values())
    return {k: v.item() for k, v in stats.items()}


def _erm_loss(model, batch) -> float:
    return cross_entropy(logits_of(model, batch), batch["labels"]).item()


def _assert_gradient_matches_finite_differences(value_at, delta, mask, abs_tol):
    """autograd's d value / d delta against central differences along 3 random directions on the real tokens."""
    d = delta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(value_at(d), d)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        v = torch.randn(delta.shape, generator=g) * mask.unsqueeze(-1)
        h = 1e-5
        fd = (value_at(delta + h * v) - value_at(delta - h * v)) / (2 * h)
        assert fd.item() == pytest.approx((grad * v).sum().item(), rel=1e-6, abs=abs_tol)
    return grad


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_projection_stays_in_ball_and_off_padding(norm):
    mask = _batch()["perturb_mask"]
    g = torch.Generator().manual_seed(1)
    eps = 0.5
    delta = torch.randn((2, 10, 16), generator=g) * 10  # far outside the ball
    p = ball.project(delta, mask, eps, norm)
    assert (ball.ball_norms(p, mask, norm) <= eps + 1e-12).all()
    assert torch.allclose(ball.ball_norms(p, mask, norm), torch.full((2,), eps))  # it lands on the sphere
    assert (p[~mask] == 0).all()
    inside = ball.project(p * 0.3, mask, eps, norm)
    assert torch.equal(inside, p * 0.3)  # points inside the ball do not move


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_random_start_and_ascent_respect_mask_and_radius(norm):
    mask = _batch()["perturb_mask"]
    g = torch.Generator().manual_seed(2)
    d = ball.random_start(torch.Size((2, 10, 16)), mask, 0.3, norm, g)
    assert (ball.ball_norms(d, mask, norm) <= 0.3 + 1e-12).all() and (d[~mask] == 0).all()
    assert (ball.ball_norms(d, mask, norm) > 0).all()
    step = ball.ascent_step(d, torch.randn((2, 10, 16), generator=g), mask, 0.1, norm)
    assert (step[~mask] == 0).all()
    moved = ball.ball_norms(step - d, mask, norm)
    assert torch.allclose(moved, torch.full((2,), 0.1))  # one alpha-sized step in the ball's own norm


def test_hook_perturbs_word_embedding_output_only():
    model, batch = _model(), _batch()
    delta = torch.randn((2, 10, 16)) * batch["perturb_mask"].unsqueeze(-1)
    ctx = _ctx(model)
    with ctx.perturbation.apply(delta):
        hooked = logits_of(model, batch)
    embeds = model.get_input_embeddings()(batch["input_ids"]) + delta
    reference = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(hooked, logits_of(model, batch))
    # Same as adding delta to the word embeddings by hand: positions are left alone.
    assert torch.allclose(hooked, reference, atol=1e-10)


def test_epsilon_zero_and_sigma_zero_give_erm_loss():
    batch = _batch()
    expected = _erm_loss(_model(), batch)
    for objective in (PGD(epsilon=0.0, alpha=0.1, steps=3, norm="l2"), PGD(0.0, 0.1, 2, "linf", adv_weight=0.3),
                      FreeLB(epsilon=0.0, alpha=0.1, steps=2), Gaussian(sigma=0.0, samples=3), ERM()):
        model = _model()
        engine = _Recorder(model)
        stats = _floats(objective.train_step(engine, batch, _ctx(model)))
        assert stats["loss"] == pytest.approx(expected, abs=1e-12), objective.name
        assert engine.steps == objective.micro_steps


def test_pgd_gradient_matches_finite_differences():
    model, batch = _model(), _batch()
    ctx = _ctx(model)
    mask = batch["perturb_mask"]
    delta = ball.random_start(torch.Size((2, 10, 16)), mask, 0.5, "l2", torch.Generator().manual_seed(3))

    def loss_at(d):
        with ctx.perturbation.apply(d):
            return cross_entropy(logits_of(model, batch), batch["labels"])

    grad = _assert_gradient_matches_finite_differences(loss_at, delta, mask, 1e-9)
    padding = batch["attention_mask"] == 0
    assert (grad[padding] == 0).all()  # attention never reads padding, so it carries no signal


def test_pgd_attack_raises_loss_within_ball():
    model, batch = _model(), _batch()
    pgd = PGD(epsilon=1.0, alpha=0.5, steps=4, norm="l2")
    delta = pgd.attack(model, batch, _ctx(model))
    assert (ball.l2_norms(delta, batch["perturb_mask"]) <= 1.0 + 1e-9).all()
    assert (delta[~batch["perturb_mask"]] == 0).all()
    ctx = _ctx(model)
    with ctx.perturbation.apply(delta):
        adversarial = cross_entropy(logits_of(model, batch), batch["labels"]).item()
    assert adversarial > _erm_loss(model, batch) + 1e-4
    # A random direction of the same size hurts less than the attack's direction.
    mask = batch["perturb_mask"]
    noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(9)) * mask.unsqueeze(-1)
    noise = noise * (ball.l2_norms(delta, mask) / ball.l2_norms(noise, mask)).view(-1, 1, 1)
    with ctx.perturbation.apply(noise):
        random_loss = cross_entropy(logits_of(model, batch), batch["labels"]).item()
    assert adversarial > random_loss


def test_pgd_loss_mixes_clean_and_adversarial():
    batch = _batch()
    model = _model()
    stats = _floats(PGD(epsilon=1.0, alpha=0.5, steps=2, adv_weight=0.25).train_step(_Recorder(model), batch,
                                                                                   _ctx(model)))
    assert stats["loss"] == pytest.approx(0.75 * stats["loss_clean"] + 0.25 * stats["loss_adv"], abs=1e-12)
    assert stats["loss_clean"] == pytest.approx(_erm_loss(_model(), batch), abs=1e-12)
    assert stats["loss_adv"] > stats["loss_clean"]
    assert stats["delta_norm"] <= 1.0 + 1e-9


def test_freelb_accumulates_k_backward_passes_scaled_by_engine():
    batch = _batch()
    model = _model()
    engine = _Recorder(model)
    stats = _floats(FreeLB(epsilon=0.5, alpha=0.2, steps=3).train_step(engine, batch, _ctx(model)))
    assert len(engine.losses) == 3 and engine.steps == 3
    assert stats["loss"] == pytest.approx(sum(engine.losses) / 3)
    assert engine.losses[-1] > engine.losses[0]  # later passes see the ascended perturbation


def test_gaussian_noise_scale_and_mask():
    batch = _batch()
    model = _model()
    ctx = _ctx(model, seed=5)
    seen = {}
    original = ctx.perturbation.apply

    def spy(delta, *args):
        seen["delta"] = delta
        return original(delta, *args)

    ctx.perturbation.apply = spy
    Gaussian(sigma=0.2, samples=4).train_step(_Recorder(model), batch, ctx)
    noise = seen["delta"]
    mask = batch["perturb_mask"].repeat(4, 1)
    assert noise.shape == (8, 10, 16)
    assert (noise[~mask] == 0).all()
    assert noise[mask].std().item() == pytest.approx(0.2, rel=0.1)


def _word_embedding_norms(model, batch) -> torch.Tensor:
    """||e(x)|| per example over its real tokens, straight from the embedding matrix."""
    e = model.get_input_embeddings().weight[batch["input_ids"]]
    return (e * batch["perturb_mask"].unsqueeze(-1)).flatten(1).norm(dim=1)


@pytest.mark.parametrize("scale_embeddings", [1.0, 25.0])
def test_relative_pgd_bounds_the_ratio_on_any_embedding_scale(scale_embeddings):
    """Relative PGD: ||delta|| / ||e(x)|| <= epsilon per example, whatever the embedding scale
    (the same model with embeddings 25x larger gets a 25x larger perturbation)."""
    model, batch = _model(), _batch()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(scale_embeddings)
    ctx = _ctx(model, seed=3)
    pgd = PGD(epsilon=0.2, alpha=0.15, steps=3, relative=True)
    unit = pgd.attack(model, batch, ctx)  # in units of ||e(x)||
    norms = _word_embedding_norms(model, batch)
    actual = unit * norms.view(-1, 1, 1)
    ratio = ball.l2_norms(actual, batch["perturb_mask"]) / norms
    assert (ratio <= 0.2 * (1 + 1e-6)).all() and (ratio > 0.19).all()  # three 0.15 steps reach the sphere
    # what the hook adds is that actual perturbation: the same logits as adding it by hand
    with ctx.perturbation.apply(unit, batch["perturb_mask"], "norm"):
        hooked = logits_of(model, batch)
    embeds = model.get_input_embeddings()(batch["input_ids"]) + actual
    assert torch.allclose(hooked, model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits,
                          atol=1e-9)
    assert ctx.perturbation.last_ratio.item() == pytest.approx(ratio.mean().item(), rel=1e-6)


def test_relative_gaussian_noise_has_expected_ratio_sigma():
    """Relative sigma: noise per coordinate sigma * RMS coordinate, so E||n||^2 = sigma^2 ||e(x)||^2."""
    model = _model()
    ids = torch.randint(3, 50, (64, 30), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(64, dtype=torch.long),
             "perturb_mask": torch.ones_like(ids, dtype=torch.bool)}
    for scale in (1.0, 40.0):
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(scale)
        ctx = _ctx(model, seed=5)
        stats = _floats(Gaussian(sigma=0.3, samples=2, relative=True).train_step(_Recorder(model), batch, ctx))
        # 30 tokens x 16 coordinates per row: the ratio of one row is within a few % of sigma
        assert stats["delta_ratio"] == pytest.approx(0.3, rel=0.03)
        absolute = _floats(Gaussian(sigma=0.3, samples=2).train_step(_Recorder(model), batch, _ctx(model, seed=5)))
        rms = (_word_embedding_norms(model, batch) / (30 * 16) ** 0.5).mean().item()
        assert absolute["delta_ratio"] == pytest.approx(0.3 / rms, rel=0.05)  # absolute noise ignores the scale


def test_freelb_uniform_start_and_normalized_linf_step():
    mask = _batch()["perturb_mask"]
    g = torch.Generator().manual_seed(6)
    d = ball.uniform_start(torch.Size((2, 10, 16)), mask, 0.6, g)
    real = mask.sum(dim=1)  # 7 and 3 real tokens
    for i in range(2):
        bound = 0.6 / (real[i].item() * 16) ** 0.5
        assert d[i].abs().max() <= bound and d[i].abs().max() > 0.9 * bound
    assert (d[~mask] == 0).all()
    grad = torch.randn((2, 10, 16), generator=g)
    step = ball.ascent_step(torch.zeros_like(d), grad, mask, 0.1, "linf", linf_step="normalized") / 0.1
    masked = grad * mask.unsqueeze(-1)
    by_hand = masked / masked.abs().flatten(1).amax(dim=1).view(-1, 1, 1)
    assert torch.allclose(step, by_hand)  # along g, its largest coordinate exactly alpha
    assert not torch.allclose(step, masked.sign())


def _dropout_model():
    model = _model()
    model.config.hidden_dropout_prob = 0.3
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    return model.train()


@pytest.mark.parametrize("same", [True, False])
def test_freelb_same_dropout_masks_in_every_pass(same):
    """At epsilon 0 the K passes differ only by their dropout masks: equal losses iff same_dropout."""
    model, batch = _dropout_model(), _batch()
    ctx = _ctx(model)
    ctx.dropout_seed = 123
    torch.manual_seed(ctx.dropout_seed)
    rec = _Recorder(model)
    FreeLB(epsilon=0.0, alpha=0.1, steps=3, same_dropout=same).train_step(rec, batch, ctx)
    assert len(rec.losses) == 3
    assert (len(set(rec.losses)) == 1) == same


def test_freelb_loss_clean_is_the_loss_without_perturbation():
    model, batch = _model(), _batch()
    stats = _floats(FreeLB(epsilon=1.0, alpha=0.5, steps=2).train_step(_Recorder(model), batch, _ctx(model)))
    assert stats["loss_clean"] == pytest.approx(_erm_loss(model, batch), rel=1e-12)
    assert stats["loss_adv"] != pytest.approx(stats["loss_clean"])  # the passes were perturbed


@pytest.mark.parametrize("objective", ["pgd", "freelb"])
def test_adversarial_warm_up_trains_on_the_clean_loss(objective):
    """Before --adv-begin-step: no perturbation, every backward is the ERM loss (K of them for
    FreeLB, one for PGD); from that step on the perturbation is back."""
    model, batch = _model(), _batch()
    erm = _erm_loss(model, batch)
    make = (lambda: PGD(epsilon=1.0, alpha=0.5, steps=2, adv_begin_step=5)) if objective == "pgd" else \
        (lambda: FreeLB(epsilon=1.0, alpha=0.5, steps=2, adv_begin_step=5))
    ctx = _ctx(model)
    ctx.step = 4
    rec = _Recorder(model)
    stats = _floats(make().train_step(rec, batch, ctx))
    assert rec.losses == pytest.approx([erm] * (1 if objective == "pgd" else 2), rel=1e-12)
    assert stats["delta_norm"] == 0.0
    ctx.step = 5
    rec = _Recorder(model)
    stats = _floats(make().train_step(rec, batch, ctx))
    assert stats["delta_norm"] > 0 and rec.losses[-1] != pytest.approx(erm)


def _kl(p_logits, q_logits):
    """KL(p || q) by torch's own kl_div, per example, averaged (an independent formula)."""
    return torch.nn.functional.kl_div(q_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True,
                                      reduction="batchmean")


def test_symmetric_kl_matches_both_directions_of_torch_kl():
    from dist_robust.objectives.smart import symmetric_kl

    g = torch.Generator().manual_seed(0)
    p, q = torch.randn((5, 3), generator=g) * 2, torch.randn((5, 3), generator=g)
    assert symmetric_kl(p, q).item() == pytest.approx((_kl(p, q) + _kl(q, p)).item(), rel=1e-12)
    assert symmetric_kl(p, q).item() == pytest.approx(symmetric_kl(q, p).item(), rel=1e-12)
    assert symmetric_kl(p, p + 7.0).item() == pytest.approx(0.0, abs=1e-12)  # a shift leaves softmax alone
    half = symmetric_kl(p.to(torch.bfloat16), q.to(torch.bfloat16))
    assert half.dtype == torch.float32  # bf16 logits: the KL itself is computed in fp32


def test_smart_zero_perturbation_gives_exactly_the_clean_loss():
    model, batch = _model(), _batch()
    for steps in (0, 2):
        stats = _floats(SMART(epsilon=0.0, alpha=0.0, steps=steps, noise_scale=0.0, smart_lambda=5.0)
                        .train_step(_Recorder(model), batch, _ctx(model)))
        assert stats["loss"] == pytest.approx(_erm_loss(model, batch), abs=1e-12)
        assert stats["loss_kl"] == 0.0 and stats["delta_norm"] == 0.0


def test_smart_divergence_gradient_matches_finite_differences():
    from dist_robust.objectives.smart import symmetric_kl

    model, batch = _model(), _batch()
    ctx = _ctx(model)
    mask = batch["perturb_mask"]
    clean = logits_of(model, batch).detach()
    delta = ball.random_start(torch.Size((2, 10, 16)), mask, 0.5, "l2", torch.Generator().manual_seed(3))

    def divergence_at(d):
        with ctx.perturbation.apply(d):
            return symmetric_kl(clean, logits_of(model, batch))

    _assert_gradient_matches_finite_differences(divergence_at, delta, mask, 1e-12)


@pytest.mark.parametrize("relative", [False, True])
def test_smart_ascent_raises_the_divergence_within_the_ball(relative):
    from dist_robust.objectives.smart import symmetric_kl

    model, batch = _model(), _batch()
    mask = batch["perturb_mask"]
    smart = SMART(epsilon=0.5, alpha=0.25, steps=3, noise_scale=0.01, relative=relative)
    delta = smart.attack(model, batch, _ctx(model))
    assert (delta[~mask] == 0).all()
    assert (ball.l2_norms(delta, mask) <= 0.5 * (1 + 1e-6)).all()  # drawn and projected in fp32
    ctx = _ctx(model)
    clean = logits_of(model, batch)
    unit = "norm" if relative else None
    with ctx.perturbation.apply(delta, mask, unit):
        ascended = symmetric_kl(clean, logits_of(model, batch)).item()
    if relative:
        assert ctx.perturbation.last_ratio.item() <= 0.5 * (1 + 1e-6)
    noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(9)) * mask.unsqueeze(-1)
    noise = noise * (ball.l2_norms(delta, mask) / ball.l2_norms(noise, mask)).view(-1, 1, 1)
    with ctx.perturbation.apply(noise, mask, unit):
        random = symmetric_kl(clean, logits_of(model, batch)).item()
    assert ascended > random > 0


@pytest.mark.parametrize("noise_type, expected", [("normal", 1.0), ("uniform", 3 ** -0.5)])
def test_r3f_start_size_and_training_loss(noise_type, expected):
    """steps = 0 (R3F): delta is the random start alone; its size is noise_scale (uniform:
    / sqrt(3)) on average, and the loss is CE + lambda * SKL at that start, by torch's KL."""
    model, batch = _model(), _batch()
    mask = batch["perturb_mask"]
    smart = SMART(epsilon=1.0, alpha=0.5, steps=0, smart_lambda=2.0, noise_type=noise_type, noise_scale=0.3)
    sizes = torch.cat([ball.l2_norms(smart.random_start(batch, _ctx(model, seed)), mask) for seed in range(200)])
    assert sizes.mean().item() == pytest.approx(0.3 * expected, rel=0.05)
    stats = _floats(smart.train_step(_Recorder(model), batch, _ctx(model, seed=11)))
    delta = smart.attack(model, batch, _ctx(model, seed=11))  # the same seed draws the same start
    ctx = _ctx(model)
    with ctx.perturbation.apply(delta):
        perturbed = logits_of(model, batch)
    clean = logits_of(model, batch)
    expected_loss = cross_entropy(clean, batch["labels"]) + 2.0 * (_kl(clean, perturbed) + _kl(perturbed, clean))
    assert stats["loss"] == pytest.approx(expected_loss.item(), rel=1e-10)
    assert stats["loss_kl"] > 0
