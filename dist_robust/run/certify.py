"""Prediction by a smoothed classifier, and its certificate, per language and generalized cell.

Two smoothings, each of the model ``f`` (the base classifier) the run trained or loaded:

* ``gaussian`` (Cohen, Rosenfeld and Kolter, ICML 2019), on word-embedding outputs:
  ``g(x) = argmax_c P(f(e(x) + n) = c)``, ``n ~ N(0, s^2 I)`` on the real tokens, ``s`` the
  run's ``--sigma`` in its units (relative: a fraction of the example's root-mean-square clean
  coordinate, which depends on the tokens only, so the certificate holds for any perturbation
  of the embeddings of those tokens). CERTIFY: ``n0`` draws choose the class ``c_A``; ``n`` fresh
  draws count it, ``p_A`` is the one-sided Clopper-Pearson lower bound at confidence
  ``1 - alpha``; abstain unless ``p_A > 1/2``, else ``g`` is constant within the L2 radius
  ``R = s * Phi^-1(p_A)``. Radii are reported in ``s``'s units (relative: root-mean-square
  coordinates of ``e(x)``, so ``R / sqrt(L * H)`` is the radius as a fraction of ``||e(x)||``).
* ``synonym`` (SAFER, Ye, Gong and Liu, ACL 2020), on words: every word with neighbours is
  replaced by a uniform draw from ``S(w) = {w} + neighbours(w)`` (the RS-DA map). Replacing
  word ``w`` by a synonym ``w'`` moves the vote distribution by at most (total variation)
  ``1 - prod_j |S(w_j) & S(w'_j)| / max(|S(w_j)|, |S(w'_j)|)``, so ``g`` keeps its prediction
  against every substitution of at most ``d`` words when ``p_A - 1/2 > Delta_d``, with
  ``Delta_d`` that bound for the ``d`` words whose worst synonym overlaps least.

The certified accuracy at radius ``r`` (or ``d`` substitutions) is the share of examples the
smoothed classifier gets right with a certificate of at least ``r``; at ``r = 0`` it is the
smoothed classifier's accuracy, abstentions counted wrong.

Distributed like evaluation: the (set, example) rows are sharded over ranks, every rank runs
the same number of forward passes (ZeRO-3 gathers parameters collectively), and the counts are
summed in one all-reduce. Every random draw comes from a generator seeded by (seed, set, example
id), so the counts do not depend on the number of ranks. The ``n0 + n`` copies of one example
go through the model together, ``--eval-batch-size`` rows per forward pass.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from dist_robust.infra import distributed as D
from dist_robust.config.run_config import RunConfig
from dist_robust.data.augment import Neighbors, SynonymAugmenter, load_neighbors
from dist_robust.data.examples import PairExample
from dist_robust.data.pipeline import Collator, encode, eval_shard, to_device
from dist_robust.run.evaluate import device_of
from dist_robust.objectives.base import draw, model_inputs

SUBSTITUTIONS = (1, 2, 4)  # synonym: certified accuracy against at most d substituted words (and all of them)


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound on a binomial proportion, at confidence 1 - alpha."""
    if successes <= 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(alpha, successes, trials - successes + 1))


def gaussian_radius(p_lower: float, sigma: float) -> float | None:
    """Cohen et al.'s certified L2 radius, or None (abstain) when p_A <= 1/2."""
    if p_lower <= 0.5:
        return None
    from scipy.stats import norm

    return sigma * float(norm.ppf(p_lower))


def synonym_set(word: str, neighbors: Neighbors) -> set[str]:
    """S(w): the word and its neighbours, what smoothing draws from at its position."""
    return {word, *neighbors.get(word, ())}


def worst_overlaps(words: list[str], neighbors: Neighbors) -> list[float]:
    """For every word with neighbours: the smallest |S(w) & S(w')| / max(|S(w)|, |S(w')|) over its synonyms w'
    (one minus the total variation between uniform draws from the two sets)."""
    out = []
    for w in words:
        own = synonym_set(w, neighbors)
        if len(own) < 2:
            continue
        out.append(min(len(own & synonym_set(s, neighbors)) / max(len(own), len(synonym_set(s, neighbors)))
                       for s in own - {w}))
    return out


def substitution_bound(overlaps: list[float], d: int) -> float:
    """Delta_d: total variation the d least-overlapping substitutions can cause."""
    worst = sorted(overlaps)[:d]
    return 1.0 - math.prod(worst)


def certified_substitutions(p_lower: float, overlaps: list[float]) -> int:
    """The largest d (up to every substitutable word) with p_A - 1/2 > Delta_d; -1 when abstaining."""
    if p_lower <= 0.5:
        return -1
    d = 0
    while d < len(overlaps) and p_lower - 0.5 > substitution_bound(overlaps, d + 1):
        d += 1
    return d


def example_generator(seed: int, key: str, example_id: str, stream: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\x1f{key}\x1f{example_id}\x1f{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") % (2 ** 63))


@dataclass
class Smoothing:
    """What a certification run needs besides the model and the sets."""

    method: str  # "gaussian" or "synonym"
    selection: int  # n0
    samples: int  # n
    alpha: float
    seed: int
    batch_size: int
    sigma: float = 0.0
    relative: bool = True
    neighbors: Neighbors | None = None
    radii: tuple[float, ...] = ()

    @property
    def thresholds(self) -> list[str]:
        """Names of the certified-accuracy columns: radii, or substitution counts."""
        if self.method == "gaussian":
            return [f"r{r:g}" for r in self.radii]
        return [f"d{d}" for d in SUBSTITUTIONS] + ["all"]


def smoothing_for(cfg: RunConfig, task_neighbors: Neighbors | None = None) -> Smoothing:
    """The smoothing a run's ``certify`` section asks for.

    Gaussian: sigma is ``--certify-sigma``, else the training noise ``--sigma``; radii are
    ``--certify-radii``, else 0, 0.5, 1 and 1.5 sigma. Synonym: the ``--synonyms`` map, else the
    task's own (``task_neighbors``, the synthetic task's).
    """
    c = cfg.certify
    sigma = c.sigma if c.sigma is not None else cfg.objective.sigma
    radii = tuple(float(r) for r in c.radii) or tuple(m * sigma for m in (0.0, 0.5, 1.0, 1.5))
    neighbors = None
    if c.method == "synonym":
        neighbors = load_neighbors(cfg.data.synonyms) if cfg.data.synonyms else task_neighbors
    return Smoothing(c.method, c.selection, c.samples, c.alpha, cfg.train.seed, cfg.train.eval_batch_size,
                     sigma, cfg.objective.scale == "relative", neighbors, radii)


def report(cfg: RunConfig, smoothing: Smoothing, split: str, cells: dict[tuple[str, str], dict]) -> dict:
    """A run's ``certify`` results from each (sentence1 language, sentence2 language) cell's :func:`certify_sets` entry.

    ``reference`` names the threshold summaries lead with: the radius equal to sigma (else the
    first positive one) for gaussian, one substituted word for synonym.
    """
    s, c = smoothing, cfg.certify
    thresholds = s.thresholds
    if s.method == "gaussian":
        positive = [f"r{r:g}" for r in s.radii if r > 0]
        reference = f"r{s.sigma:g}" if s.sigma in s.radii else (positive[0] if positive else thresholds[0])
    else:
        reference = "d1"
    matrix: dict[str, dict[str, dict]] = {}
    for (a, b), acc in cells.items():
        matrix.setdefault(a, {})[b] = acc
    return {"method": s.method, "split": split, "selection": s.selection, "samples": s.samples, "alpha": s.alpha,
            "sigma": s.sigma if s.method == "gaussian" else None, "relative": s.relative,
            "radii": list(s.radii) if s.method == "gaussian" else None, "thresholds": thresholds,
            "reference": reference, "examples": c.examples,
            "per_language": {a: matrix[a][a] for a in matrix},
            "generalized": matrix if cfg.train.generalized else {}}


class Certifier:
    """Votes of the smoothed classifier for one example at a time, on this rank."""

    def __init__(self, engine, perturbation, tokenizer, collator: Collator, max_length: int, smoothing: Smoothing):
        self.engine, self.perturbation, self.tokenizer = engine, perturbation, tokenizer
        self.collator, self.max_length, self.s = collator, max_length, smoothing
        self.num_labels = engine.module.config.num_labels
        self.hidden = engine.module.config.hidden_size
        self.device = device_of(engine)

    @torch.no_grad()
    def votes(self, example: PairExample, key: str, stream: int, copies: int) -> torch.Tensor:
        """Counts (num_labels,) of the base classifier's predictions on ``copies`` smoothed copies, on the device."""
        counts = torch.zeros(self.num_labels, dtype=torch.long, device=self.device)
        gen = example_generator(self.s.seed, key, example.id, stream) if self.s.method == "gaussian" else None
        if self.s.method == "synonym":
            augmenter = SynonymAugmenter(self.s.neighbors or {}, 1.0, int.from_bytes(
                hashlib.sha256(f"{self.s.seed}\x1f{key}\x1f{stream}".encode()).digest()[:4], "big"))
            data = encode([augmenter(example, k) for k in range(copies)], self.tokenizer, self.max_length)
        else:
            data = encode([example], self.tokenizer, self.max_length)
        for start in range(0, copies, self.s.batch_size):
            k = min(self.s.batch_size, copies - start)
            rows = list(range(start, start + k)) if self.s.method == "synonym" else [0] * k
            batch = to_device(self.collator(data, rows), self.device)
            if self.s.method == "gaussian":
                mask = batch["perturb_mask"]
                b, t = mask.shape
                noise = draw("normal", (b, t, self.hidden), gen, self.device) * self.s.sigma
                noise = noise * mask.unsqueeze(-1)
                with self.perturbation.apply(noise, mask, "rms" if self.s.relative else None):
                    logits = self.engine(**model_inputs(batch)).logits
            else:
                logits = self.engine(**model_inputs(batch)).logits
            counts += torch.bincount(logits.argmax(-1), minlength=self.num_labels)
        return counts

    def outcome(self, example: PairExample, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(selection counts, estimation counts) for one example."""
        return (self.votes(example, key, 0, self.s.selection), self.votes(example, key, 1, self.s.samples))


def certify_sets(certifier: Certifier, sets: dict, progress=None) -> dict:
    """Certified accuracies of every set: ``{key: {"accuracy", "abstain", "certified": {threshold: acc}}}``.

    ``sets`` maps a key (any hashable; its ``str`` seeds the draws) to its examples. Rows are
    sharded over ranks; the counts of all ranks are summed once at the end.
    """
    keys = list(sets)
    rows = [(g, e) for g, key in enumerate(keys) for e in sets[key]]
    indices, weights = eval_shard(len(rows), D.world_size(), D.rank())
    s = certifier.s
    was_training = certifier.engine.training
    certifier.engine.eval()
    picks, tallies = [], []
    for i in indices:
        g, example = rows[i]
        first, second = certifier.outcome(example, str(keys[g]))
        picks.append(first)
        tallies.append(second)
        if progress is not None:
            progress.update(1)
    if was_training:
        certifier.engine.train()
    # One host read of this rank's votes.
    picks_host = torch.stack(picks).tolist() if picks else []
    tallies_host = torch.stack(tallies).tolist() if tallies else []
    columns = 3 + len(s.thresholds)  # weight, correct (smoothed), abstained, certified per threshold
    sums = torch.zeros((len(keys), columns), dtype=torch.float64)
    for i, w, first, second in zip(indices, weights, picks_host, tallies_host):
        if w == 0:
            continue
        g, example = rows[i]
        chosen = max(range(len(first)), key=lambda c: (first[c], -c))  # most votes; ties: the lower class
        p_lower = lower_confidence_bound(second[chosen], s.samples, s.alpha)
        row = sums[g]
        row[0] += w
        if p_lower <= 0.5:
            row[2] += w
            continue
        correct = chosen == example.label
        row[1] += w * correct
        if not correct:
            continue
        if s.method == "gaussian":
            radius = gaussian_radius(p_lower, s.sigma)
            for j, r in enumerate(s.radii):
                row[3 + j] += w * (radius >= r)
        else:
            overlaps = worst_overlaps(example.sentence1.split(" ") + example.sentence2.split(" "), s.neighbors or {})
            d = certified_substitutions(p_lower, overlaps)
            for j, need in enumerate(SUBSTITUTIONS):  # an example with m < need substitutable words: all m
                row[3 + j] += w * (d >= min(need, len(overlaps)))
            row[3 + len(SUBSTITUTIONS)] += w * (d == len(overlaps))
    device = certifier.device
    total = D.all_reduce_sum(sums.to(device)).cpu()
    out = {}
    for g, key in enumerate(keys):
        n = float(total[g, 0]) or float("nan")
        out[key] = {"examples": int(total[g, 0]), "accuracy": float(total[g, 1]) / n,
                    "abstain": float(total[g, 2]) / n,
                    "certified": {name: float(total[g, 3 + j]) / n for j, name in enumerate(s.thresholds)}}
    return out
