"""Certification against closed forms: a linear classifier of the embeddings, hand-counted synonym sets.

For ``z(e) = w . sum_t e_t + b`` over the perturbed tokens, Gaussian noise of scale s on each
of the L perturbed tokens makes ``z`` normal with mean ``z(e)`` and standard deviation
``s sqrt(L) ||w||``: the smoothed classifier predicts ``sign(z(e))``, its vote share is
``Phi(|z| / (s sqrt(L) ||w||))`` and its exact certified radius is the distance to the decision
boundary, ``|z| / (sqrt(L) ||w||)``. A certificate from n draws must come close to it from below.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dist_robust.run import certify as C
from dist_robust.data.examples import PairExample
from dist_robust.data.pipeline import Collator, encode
from dist_robust.model.build import train_tokenizer
from dist_robust.objectives import EmbeddingPerturbation

WORDS = ["good", "fine", "nice", "great", "film", "movie", "bad", "plot"]


class Linear(torch.nn.Module):
    """Two classes; logit difference ``w . sum of the perturbable tokens' embeddings + b``."""

    def __init__(self, vocab: int, hidden: int, special_ids: list[int], bias: float):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embeddings = torch.nn.Embedding(vocab, hidden)
        self.embeddings.weight.data = torch.randn((vocab, hidden), generator=g) * 0.3
        self.w = torch.randn(hidden, generator=g)
        self.b = bias
        self.special = torch.tensor(special_ids)
        self.config = SimpleNamespace(num_labels=2, hidden_size=hidden)

    def get_input_embeddings(self):
        return self.embeddings

    def z(self, input_ids, attention_mask, embeds=None):
        e = self.embeddings(input_ids) if embeds is None else embeds
        real = (attention_mask.bool() & ~torch.isin(input_ids, self.special)).unsqueeze(-1)
        return (e * real).sum(1) @ self.w + self.b

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        z = self.z(input_ids, attention_mask, self.embeddings(input_ids))  # the hook perturbs this output
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(z), z], dim=-1))


class Engine(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kw):
        return self.module(**kw)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer([" ".join(WORDS)], 60, str(tmp_path_factory.mktemp("tok")), words=WORDS)


def _setup(tokenizer, example: PairExample, bias_to: float, method="gaussian", sigma=0.5, samples=2000,
           neighbors=None):
    """A linear model whose clean logit difference on ``example`` is exactly ``bias_to``."""
    model = Linear(len(tokenizer), 8, sorted(set(tokenizer.all_special_ids)), 0.0)
    collator = Collator(tokenizer)
    batch = collator(encode([example], tokenizer, 32), [0])
    model.b = bias_to - model.z(batch["input_ids"], batch["attention_mask"]).item()
    perturbed = int(batch["perturb_mask"].sum())
    smoothing = C.Smoothing(method, 100, samples, 0.001, seed=1, batch_size=500, sigma=sigma, relative=False,
                            neighbors=neighbors, radii=(0.0, 0.1, 0.2, 0.4))
    engine = Engine(model)
    certifier = C.Certifier(engine, EmbeddingPerturbation(model.embeddings), tokenizer, collator, 32, smoothing)
    return certifier, perturbed, float(model.w.norm())


def test_gaussian_vote_share_and_radius_match_the_closed_form(tokenizer):
    from scipy.stats import norm

    example = PairExample("7", "good film", "nice plot", 1, "en", "en")
    certifier, L, wnorm = _setup(tokenizer, example, bias_to=1.5)
    sd = 0.5 * math.sqrt(L) * wnorm
    share = norm.cdf(1.5 / sd)  # exact probability of class 1 under the noise
    first, second = certifier.outcome(example, "en>en")
    assert int(first.argmax()) == 1
    n = int(second.sum())
    assert n == 2000
    assert second[1].item() / n == pytest.approx(share, abs=4 * math.sqrt(share * (1 - share) / n))
    p_lower = C.lower_confidence_bound(int(second[1]), n, 0.001)
    radius = C.gaussian_radius(p_lower, 0.5)
    exact = 1.5 / (math.sqrt(L) * wnorm)  # distance from e(x) to the decision boundary
    # Below the exact radius (the bound holds with probability 1 - alpha), and no further below
    # than the certificate of a count 4 standard errors under the expected one.
    low_count = int(share * n - 4 * math.sqrt(n * share * (1 - share)))
    floor = C.gaussian_radius(C.lower_confidence_bound(low_count, n, 0.001), 0.5)
    assert floor < radius < exact
    assert floor > 0.5 * exact  # the band is narrow enough to catch a radius off by a factor


def test_lower_confidence_bound_is_clopper_pearson():
    from scipy.stats import binomtest

    for k, n in ((95, 100), (50, 100), (1, 10), (10, 10)):
        exact = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * 0.01, method="exact").low  # two-sided 98%
        assert C.lower_confidence_bound(k, n, 0.01) == pytest.approx(exact, rel=1e-9)
    assert C.lower_confidence_bound(0, 10, 0.01) == 0.0
    assert C.lower_confidence_bound(10, 10, 0.01) == pytest.approx(0.01 ** (1 / 10))  # all successes: alpha^(1/n)


def test_split_vote_abstains_and_certified_accuracy_falls_with_radius(tokenizer):
    boundary = PairExample("3", "good film", "bad plot", 1, "en", "en")
    certifier, _, _ = _setup(tokenizer, boundary, bias_to=0.0, samples=400)
    out = C.certify_sets(certifier, {"en>en": [boundary]})["en>en"]
    assert out["abstain"] == 1.0 and out["accuracy"] == 0.0  # a 50/50 vote certifies nothing
    examples = [PairExample(str(i), "good film", "nice plot", 1, "en", "en") for i in range(6)]
    certifier, _, _ = _setup(tokenizer, examples[0], bias_to=1.2, samples=400)
    out = C.certify_sets(certifier, {"en>en": examples})["en>en"]
    levels = [out["certified"][k] for k in certifier.s.thresholds]
    assert levels == sorted(levels, reverse=True) and levels[0] == out["accuracy"] == 1.0


def test_synonym_overlaps_and_substitution_bound_by_hand():
    neighbors = {"good": ["fine", "nice"], "fine": ["good"], "nice": ["good", "fine", "great"], "film": ["movie"],
                 "movie": ["film"]}
    # good: S = {good, fine, nice}; fine: {fine, good} -> 2/3; nice: {nice, good, fine, great} -> 3/4. Worst 2/3.
    # film: {film, movie}; movie: {movie, film} -> 1. "plot" has no neighbours.
    assert C.worst_overlaps(["good", "film", "plot"], neighbors) == pytest.approx([2 / 3, 1.0])
    assert C.substitution_bound([2 / 3, 1.0], 1) == pytest.approx(1 / 3)
    assert C.substitution_bound([2 / 3, 1.0, 0.5], 2) == pytest.approx(1 - 0.5 * 2 / 3)
    assert C.certified_substitutions(0.9, [2 / 3, 1.0]) == 2  # 0.4 > 1/3, and the film swap costs nothing
    assert C.certified_substitutions(0.8, [2 / 3, 0.5]) == 0  # 0.3 < Delta_1 = 1/2: not even one word
    assert C.certified_substitutions(0.5, [1.0]) == -1  # abstains


def test_synonym_smoothing_of_a_model_blind_to_synonyms_certifies_every_word(tokenizer):
    """Substitutes that keep the logit (the model ignores them) give an all-one vote: p_A = alpha^(1/n)."""
    neighbors = {"good": ["fine"], "fine": ["good"]}
    example = PairExample("5", "good film", "good plot", 1, "en", "en")
    certifier, _, _ = _setup(tokenizer, example, bias_to=2.0, method="synonym", samples=200, neighbors=neighbors)
    model = certifier.engine.module
    model.embeddings.weight.data[tokenizer.convert_tokens_to_ids("\u2581fine")] = \
        model.embeddings.weight.data[tokenizer.convert_tokens_to_ids("\u2581good")]
    out = C.certify_sets(certifier, {"en>en": [example]})["en>en"]
    # p_A = 0.001^(1/200) = 0.966; both words overlap fully (S(good) = S(fine)), so Delta = 0 at any d.
    assert out["accuracy"] == 1.0 and out["certified"]["all"] == 1.0 and out["certified"]["d2"] == 1.0
