"""Device and precision discipline of the objectives and the evaluation, checked on the CPU.

A model and batch on PyTorch's ``meta`` device stand in for a GPU: any tensor an objective or
the evaluation creates on the CPU and then mixes with the model's tensors raises, as it would
against CUDA tensors, and any per-batch read back to the host (``.item()``) raises too.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, XLMRobertaConfig, XLMRobertaForSequenceClassification

from dist_robust.data.pipeline import Collator, Encoded, to_device
from dist_robust.run.evaluate import EvalGroups, count_correct
from dist_robust.objectives import ERM, PGD, EmbeddingPerturbation, FreeLB, Gaussian, StepContext, ball
from dist_robust.objectives.base import cross_entropy, logits_of

META = torch.device("meta")


class _PoolingClassifier(torch.nn.Module):
    """Word + position embeddings, masked mean pooling, a linear head: enough of an encoder to
    run every objective, and made only of ops that work on the meta device."""

    def __init__(self, vocab: int = 40, hidden: int = 8, labels: int = 3):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden)
        self.word = torch.nn.Embedding(vocab, hidden)
        self.position = torch.nn.Embedding(64, hidden)
        self.head = torch.nn.Linear(hidden, labels)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.word

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        t = input_ids.shape[1]
        e = self.word(input_ids) + self.position(torch.arange(t, device=input_ids.device))  # (B, T, H)
        m = attention_mask.unsqueeze(-1).to(e.dtype)
        return SimpleNamespace(logits=self.head((e.tanh() * m).sum(1) / m.sum(1)))


class _Engine(torch.nn.Module):
    """The three engine calls an objective makes (forward, backward, step), on the module's device."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.device = next(module.parameters()).device
        self.steps = 0

    def forward(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.steps += 1


def _tokenizer():
    return SimpleNamespace(pad_token_id=1, all_special_ids=[0, 1, 2])


def _encoded(n: int = 10) -> Encoded:
    g = torch.Generator().manual_seed(0)
    rows = [[0, *torch.randint(3, 40, (int(k),), generator=g).tolist(), 2]
            for k in torch.randint(2, 9, (n,), generator=g)]
    return Encoded(rows, [i % 3 for i in range(n)])


def _meta_batch() -> dict:
    return to_device(Collator(_tokenizer())(_encoded(), list(range(4))), META)


OBJECTIVES = [ERM(), PGD(epsilon=0.5, alpha=0.2, steps=2), PGD(0.5, 0.2, 1, norm="linf"),
              FreeLB(epsilon=0.5, alpha=0.2, steps=2), Gaussian(sigma=0.1, samples=3)]


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: f"{o.name}-{getattr(o, 'norm', '')}")
def test_objectives_create_everything_on_the_batch_device(objective):
    with torch.device(META):
        model = _PoolingClassifier()
    engine = _Engine(model)
    batch = _meta_batch()
    assert all(v.device == META for v in batch.values())
    ctx = StepContext(EmbeddingPerturbation(model.get_input_embeddings()), 8, torch.Generator().manual_seed(0))
    stats = objective.train_step(engine, batch, ctx)  # raises if a CPU tensor meets a meta one
    assert engine.steps == objective.micro_steps
    assert set(stats) >= {"loss"}
    for name, value in stats.items():
        assert value.device == META and value.dim() == 0 and not value.requires_grad, name


def test_evaluation_counts_on_the_model_device_without_host_reads():
    with torch.device(META):
        model = _PoolingClassifier()
    data = _encoded(10)
    groups = EvalGroups(["a", "b"], data, [0] * 6 + [1] * 4)
    correct, total = count_correct(model, groups, Collator(_tokenizer()), 3, META)
    assert correct.device == META and total.device == META and correct.shape == (2,)


def test_evaluation_counts_match_a_plain_loop_on_cpu():
    """The same function on the CPU: the weighted counts per group equal a direct computation."""
    torch.manual_seed(0)
    model = _PoolingClassifier()
    data = _encoded(10)
    groups = EvalGroups(["a", "b"], data, [0] * 6 + [1] * 4)
    correct, total = count_correct(model, groups, Collator(_tokenizer()), 3, torch.device("cpu"))
    expected = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for i, row in enumerate(data.input_ids):
            ids = torch.tensor([row])
            pred = model(ids, torch.ones_like(ids)).logits.argmax(-1).item()
            expected[groups.group[i]] += float(pred == data.labels[i])
    assert total.tolist() == [6.0, 4.0]
    assert correct.tolist() == expected.tolist()


def _flat_head_xlmr() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, type_vocab_size=1, num_labels=3,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1)
    model = XLMRobertaForSequenceClassification(cfg).eval()
    with torch.no_grad():  # a nearly flat head: input gradients far below fp16's smallest number
        model.classifier.out_proj.weight.mul_(1e-3)
        model.classifier.dense.weight.mul_(1e-1)
    return model


def _pair_batch():
    ids = torch.tensor([[0, 5, 6, 7, 8, 2, 2, 9, 10, 2], [0, 11, 12, 2, 2, 13, 2, 1, 1, 1]])
    attention = (ids != 1).long()
    return {"input_ids": ids, "attention_mask": attention, "labels": torch.tensor([0, 2]),
            "perturb_mask": attention.bool() & ~torch.isin(ids, torch.tensor([0, 1, 2]))}


def test_fp16_attack_scales_the_loss_so_its_gradient_does_not_underflow():
    """fp16 PGD: with the engine's loss scale the attack moves as the fp32 attack does; without it
    the input gradient underflows to zero and delta never leaves its random start."""
    batch, pgd = _pair_batch(), PGD(epsilon=1.0, alpha=0.3, steps=1)

    def attack(model, scale):
        ctx = StepContext(EmbeddingPerturbation(model.get_input_embeddings()), 16,
                          torch.Generator().manual_seed(7), loss_scale=scale)
        return pgd.attack(model, batch, ctx)

    start = ball.random_start(torch.Size((2, 10, 16)), batch["perturb_mask"], 1.0, "l2",
                              torch.Generator().manual_seed(7))
    half = _flat_head_xlmr().half()
    reference = attack(copy.deepcopy(half).float(), 1.0) - start  # fp32 ascent step, same (rounded) weights
    unscaled = attack(half, 1.0) - start
    scaled = attack(half, 2.0 ** 16) - start
    assert reference.norm() > 0.1
    assert unscaled.norm() == 0  # the bug: nothing but the random start
    cosine = (scaled * reference).sum() / (scaled.norm() * reference.norm())
    assert cosine > 0.999
    assert torch.isfinite(scaled).all()


def test_non_finite_gradient_rows_take_no_step():
    mask = _pair_batch()["perturb_mask"]
    delta = torch.zeros((2, 10, 16))
    grad = torch.ones((2, 10, 16))
    grad[1, 3, 0] = float("inf")  # an fp16 overflow in example 1
    for norm in ("l2", "linf"):
        stepped = ball.ascent_step(delta, grad, mask, 0.1, norm)
        assert torch.isfinite(stepped).all()
        assert stepped[1].abs().sum() == 0
        assert ball.ball_norms(stepped, mask, norm)[0] == pytest.approx(0.1, rel=1e-6)


def test_bert_hook_perturbs_word_embeddings_only():
    """BERT-family: position and token-type embeddings are added after the hooked output, so
    perturbing through the hook equals passing word embeddings + delta as ``inputs_embeds``."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=40, type_vocab_size=2, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg).eval()
    batch = _pair_batch()
    batch["token_type_ids"] = torch.tensor([[0] * 6 + [1] * 4, [0] * 5 + [1] * 2 + [0] * 3])
    delta = torch.randn((2, 10, 16)) * batch["perturb_mask"].unsqueeze(-1)
    perturbation = EmbeddingPerturbation(model.get_input_embeddings())
    with torch.no_grad():
        with perturbation.apply(delta):
            hooked = logits_of(model, batch)
        embeds = model.get_input_embeddings()(batch["input_ids"]) + delta
        reference = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"]).logits
        no_types = logits_of(model, {k: v for k, v in batch.items() if k != "token_type_ids"})
    assert torch.allclose(hooked, reference, atol=1e-6)
    assert not torch.allclose(logits_of(model, batch), no_types)  # token types reach the model
    assert cross_entropy(hooked, batch["labels"]).item() > 0
