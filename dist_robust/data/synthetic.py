"""A built-in multilingual sentence-pair task that needs no download.

Each example is a pair of sentences over a shared concept inventory. Every sentence holds
filler concepts and exactly one *cue* concept of positive or negative polarity; the label
counts the positive cues across the two sentences (0, 1 or 2), so a model must read both
sentences, like NLI's three classes. Languages render concepts with their own words, except for a share of
"cognates" spelt as in English; that share sets how well a model trained on English alone
transfers (high for ``de``, low for ``zh``, which writes its own words in CJK characters).
Dev and test sets are parallel across languages (same id, same concepts, same label), so
the generalized setting pairs sentence1 of one language with sentence2 of another.
"""

from __future__ import annotations

import random

from dist_robust.data.examples import PairExample

LANGUAGES = ("en", "de", "fr", "es", "zh")
LABELS = ("both_negative", "mixed", "both_positive")
# Share of concepts a language spells exactly as English does.
COGNATE_SHARE = {"en": 1.0, "de": 0.7, "fr": 0.55, "es": 0.55, "zh": 0.3}
_SYLLABLES = {
    "en": ("ba", "ko", "ri", "ta", "mu", "le", "po", "si", "na", "de", "fu", "gi"),
    "de": ("sch", "ei", "ku", "ber", "zan", "lo", "wu", "tre", "hof", "gel", "mi", "rau"),
    "fr": ("bou", "ier", "lé", "qua", "mon", "tis", "char", "eau", "vin", "ré", "gne", "pa"),
    "es": ("ca", "llo", "rra", "ño", "ve", "ji", "dor", "que", "tal", "me", "cio", "bu"),
}
_N_CONCEPTS = 400
_N_CUES = 24  # per polarity
_DATA_SEED = 20211107


class SyntheticWorld:
    """Lexicons of every language, drawn once from a fixed seed."""

    def __init__(self, seed: int = _DATA_SEED):
        rng = random.Random(seed)
        self.cues_pos = list(range(_N_CUES))
        self.cues_neg = list(range(_N_CUES, 2 * _N_CUES))
        self.fillers = list(range(2 * _N_CUES, _N_CONCEPTS))
        english = _pseudo_words(rng, "en", _N_CONCEPTS, taken=set())
        self.lexicon: dict[str, list[str]] = {"en": english}
        taken = set(english)
        for lang in LANGUAGES[1:]:
            own = (_cjk_words(rng, _N_CONCEPTS, taken) if lang == "zh"
                   else _pseudo_words(rng, lang, _N_CONCEPTS, taken))
            taken.update(own)
            shared = [rng.random() < COGNATE_SHARE[lang] for _ in range(_N_CONCEPTS)]
            self.lexicon[lang] = [e if s else w for e, w, s in zip(english, own, shared)]

    def render(self, concepts: list[int], lang: str) -> str:
        words = [self.lexicon[lang][c] for c in concepts]
        sep = "" if lang == "zh" else " "
        return sep.join(words) + ("。" if lang == "zh" else " .")

    def sample_concepts(self, rng: random.Random, positive: bool) -> list[int]:
        fillers = rng.sample(self.fillers, rng.randint(4, 8))
        cue = rng.choice(self.cues_pos if positive else self.cues_neg)
        fillers.insert(rng.randint(0, len(fillers)), cue)
        return fillers


def _pseudo_words(rng: random.Random, lang: str, n: int, taken: set[str]) -> list[str]:
    syl = _SYLLABLES[lang]
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(syl) for _ in range(rng.randint(2, 3)))
        if w not in taken and w not in out:
            out.append(w)
    return out


def _cjk_words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = "".join(chr(0x4E00 + rng.randrange(600)) for _ in range(2))
        if w not in taken and w not in out:
            out.append(w)
    return out


def _split_seed(split: str) -> int:
    return {"train": 1, "dev": 2, "test": 3}[split] * 7919 + _DATA_SEED


def generate(split: str, size: int, languages: tuple[str, ...] | list[str],
             world: SyntheticWorld | None = None) -> dict[str, list[PairExample]]:
    """Parallel examples of one split: language -> examples with the same ids and labels."""
    world = world or SyntheticWorld()
    rng = random.Random(_split_seed(split))
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown:
        raise ValueError(f"synthetic task has no language(s) {unknown}; it has {', '.join(LANGUAGES)}")
    out: dict[str, list[PairExample]] = {lang: [] for lang in languages}
    for i in range(size):
        p1, p2 = rng.random() < 0.5, rng.random() < 0.5
        c1, c2 = world.sample_concepts(rng, p1), world.sample_concepts(rng, p2)
        label = int(p1) + int(p2)
        for lang in languages:
            out[lang].append(PairExample(f"{split}-{i}", world.render(c1, lang), world.render(c2, lang),
                                         label, lang, lang))
    return out
