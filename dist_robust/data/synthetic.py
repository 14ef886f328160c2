"""A built-in multilingual sentence-pair task that needs no download, with misalignment as a knob.

Each example is a pair of sentences over a shared concept inventory. Every sentence holds
filler concepts and exactly one *cue* concept of positive or negative polarity; the label
counts the positive cues across the two sentences (0, 1 or 2), so a model must read both
sentences, like NLI's three classes. Dev and test sets are parallel across languages (same
id, same concepts, same label), so the generalized setting pairs sentence1 of one language
with sentence2 of another.

What a pretrained multilingual encoder brings to zero-shot transfer is modelled by two
things, both set by the world:

* **vocabulary overlap**: a share of concepts (``COGNATE_SHARE``) is spelt as in English, so
  those words *are* English tokens;
* **embedding alignment**: every other word of a target language is a token of its own whose
  embedding starts at its concept's English embedding plus Gaussian noise of norm
  ``misalignment x DISTANCE[lang] x ||e(english word)||`` (see :meth:`SyntheticWorld.anchors`).
  ``misalignment = 0`` is a perfectly aligned lexicon; large values leave the target words
  unrelated to English, as for a model that was never pretrained.

English also has two synonyms per concept, never used in the task's sentences: their embeddings
start near their concept's (``SYNONYM_DISTANCE``), and :meth:`SyntheticWorld.neighbors` is the
synonym map ``--augment synonym`` substitutes from (RS-DA), so randomized smoothing by data
augmentation has something to work with. Built-in models realise the alignment at
initialisation (``models.align_word_embeddings``) and keep the word embeddings frozen by
default (``--freeze-embeddings``), as the lexicon of a pretrained model that fine-tuning on
a few thousand English pairs should not rewrite. ``docs/synthetic.md`` has the construction and
the measured effect of the knob.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dist_robust.data.examples import PairExample

LANGUAGES = ("en", "de", "fr", "es", "zh")
LABELS = ("both_negative", "mixed", "both_positive")
# Share of concepts a language spells exactly as English does (vocabulary overlap).
COGNATE_SHARE = {"en": 1.0, "de": 0.3, "fr": 0.2, "es": 0.2, "zh": 0.0}
# How far a language's own words start from English, in units of --synthetic-misalignment.
DISTANCE = {"en": 0.0, "de": 0.75, "fr": 1.0, "es": 1.0, "zh": 1.5}
SYNONYM_DISTANCE = 0.25  # relative distance of an English synonym from its concept's embedding
# What pretraining taught: English words of one semantic class (positive cue, negative cue,
# filler) start around a shared class vector, each WORD_SPREAD (relative norm) away from it.
CLASS_WORDS = ("POSITIVE", "NEGATIVE", "OTHER")
WORD_SPREAD = 1.0
SYNONYMS_PER_CONCEPT = 2
_SYLLABLES = {
    "en": ("ba", "ko", "ri", "ta", "mu", "le", "po", "si", "na", "de", "fu", "gi"),
    "de": ("sch", "ei", "ku", "ber", "zan", "lo", "wu", "tre", "hof", "gel", "mi", "rau"),
    "fr": ("bou", "ier", "lé", "qua", "mon", "tis", "char", "eau", "vin", "ré", "gne", "pa"),
    "es": ("ca", "llo", "rra", "ño", "ve", "ji", "dor", "que", "tal", "me", "cio", "bu"),
}
_N_CONCEPTS = 400
_N_CUES = 24  # per polarity
_DATA_SEED = 20211107


@dataclass(frozen=True)
class Anchor:
    """Start the embedding of ``word`` at ``anchor``'s plus noise of relative norm ``distance``."""

    word: str
    anchor: str
    distance: float


class SyntheticWorld:
    """Lexicons of every language, drawn once from a fixed seed."""

    def __init__(self, seed: int = _DATA_SEED):
        rng = random.Random(seed)
        self.cues_pos = list(range(_N_CUES))
        self.cues_neg = list(range(_N_CUES, 2 * _N_CUES))
        self.fillers = list(range(2 * _N_CUES, _N_CONCEPTS))
        english = _pseudo_words(rng, "en", _N_CONCEPTS, taken=set())
        taken = set(english)
        synonyms = _pseudo_words(rng, "en", _N_CONCEPTS * SYNONYMS_PER_CONCEPT, taken)
        taken.update(synonyms)
        self.synonyms = [synonyms[c * SYNONYMS_PER_CONCEPT:(c + 1) * SYNONYMS_PER_CONCEPT]
                         for c in range(_N_CONCEPTS)]
        self.lexicon: dict[str, list[str]] = {"en": english}
        self.cognate: dict[str, list[bool]] = {"en": [True] * _N_CONCEPTS}
        for lang in LANGUAGES[1:]:
            own = (_cjk_words(rng, _N_CONCEPTS, taken) if lang == "zh"
                   else _pseudo_words(rng, lang, _N_CONCEPTS, taken))
            taken.update(own)
            shared = [rng.random() < COGNATE_SHARE[lang] for _ in range(_N_CONCEPTS)]
            self.cognate[lang] = shared
            self.lexicon[lang] = [e if s else w for e, w, s in zip(english, own, shared)]

    def render(self, concepts: list[int], lang: str) -> str:
        end = "。" if lang == "zh" else "."
        return " ".join([self.lexicon[lang][c] for c in concepts] + [end])

    def sample_concepts(self, rng: random.Random, positive: bool) -> list[int]:
        fillers = rng.sample(self.fillers, rng.randint(4, 8))
        cue = rng.choice(self.cues_pos if positive else self.cues_neg)
        fillers.insert(rng.randint(0, len(fillers)), cue)
        return fillers

    def concept_class(self, c: int) -> str:
        return CLASS_WORDS[0] if c in self.cues_pos else CLASS_WORDS[1] if c in self.cues_neg else CLASS_WORDS[2]

    def anchors(self, misalignment: float, languages: tuple[str, ...] | list[str]) -> list[Anchor]:
        """Where each word's embedding starts, in order: English words around their semantic
        class's vector, English synonyms near their concept, the target languages' own words
        ``misalignment x DISTANCE[lang]`` away from their English translation."""
        english = self.lexicon["en"]
        out = [Anchor(w, self.concept_class(c), WORD_SPREAD) for c, w in enumerate(english)]
        out += [Anchor(s, english[c], SYNONYM_DISTANCE) for c, syns in enumerate(self.synonyms) for s in syns]
        for lang in languages:
            if lang == "en":
                continue
            out += [Anchor(w, english[c], misalignment * DISTANCE[lang])
                    for c, w in enumerate(self.lexicon[lang]) if not self.cognate[lang][c]]
        return out

    def neighbors(self) -> dict[str, list[str]]:
        """The English synonym map (word -> its concept's other English words), for RS-DA."""
        out: dict[str, list[str]] = {}
        for c, syns in enumerate(self.synonyms):
            group = [self.lexicon["en"][c], *syns]
            for w in group:
                out[w] = [o for o in group if o != w]
        return out

    def words(self) -> list[str]:
        """Every word of the world (synonyms too, which the task's sentences never use): a local
        tokenizer keeps each one a single token, so the lexicon's embeddings are per word."""
        return ([".", "。", *CLASS_WORDS] + [w for lang in LANGUAGES for w in self.lexicon[lang]]
                + [w for syns in self.synonyms for w in syns])


def _pseudo_words(rng: random.Random, lang: str, n: int, taken: set[str]) -> list[str]:
    syl = _SYLLABLES[lang]
    out: list[str] = []
    seen = set(taken)
    while len(out) < n:
        w = "".join(rng.choice(syl) for _ in range(rng.randint(2, 3)))
        if w not in seen:
            out.append(w)
            seen.add(w)
    return out


def _cjk_words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    seen = set(taken)
    while len(out) < n:
        w = "".join(chr(0x4E00 + rng.randrange(600)) for _ in range(2))
        if w not in seen:
            out.append(w)
            seen.add(w)
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
