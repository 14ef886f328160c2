"""Refuse to train on pairs of the evaluation sets.

PAWS-Wiki's dev split holds every English PAWS-X dev/test pair, and the other languages'
PAWS-X and XNLI sets are translations of the English pairs, so a careless training file
silently leaks the evaluation data. Before training, the training set is compared with
the source-language (English) side of every evaluation set on normalized text:

* pairs: the same two sentences (in either order);
* sentence1: the same first sentence (premise), whatever the second; sentences shorter than
  :data:`MIN_WORDS` words are ignored here, as short stock phrases recur by chance.

Any overlap stops the run with a message naming the files and counts, unless allowed.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from dist_robust.data.examples import PairExample

log = logging.getLogger(__name__)

MIN_WORDS = 5
_SPACE = re.compile(r"\s+")


class LeakageError(RuntimeError):
    """The training set overlaps an evaluation set."""


@dataclass(frozen=True)
class Overlap:
    """How much of one evaluation set the training set contains."""

    reference: str
    reference_size: int
    pairs: int
    sentence1: int
    sentence1_size: int

    def describe(self) -> str:
        return (f"{self.reference}: {self.pairs} of its {self.reference_size} pairs and {self.sentence1} of its "
                f"{self.sentence1_size} distinct sentence1s are in the training set")


def normalize(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _pair_key(e: PairExample) -> tuple[str, str]:
    a, b = normalize(e.sentence1), normalize(e.sentence2)
    return (a, b) if a <= b else (b, a)


def _sentence1_keys(rows: Iterable[PairExample]) -> set[str]:
    keys = (normalize(e.sentence1) for e in rows)
    return {k for k in keys if len(k.split()) >= MIN_WORDS}


def find_overlaps(train: list[PairExample], references: dict[str, list[PairExample]]) -> list[Overlap]:
    """Overlap of ``train`` with every reference set (name -> rows); only non-zero ones."""
    train_pairs = {_pair_key(e) for e in train}
    train_s1 = _sentence1_keys(train)
    out = []
    for name, rows in references.items():
        pairs = sum(_pair_key(e) in train_pairs for e in rows)
        ref_s1 = _sentence1_keys(rows)
        s1 = len(ref_s1 & train_s1)
        if pairs or s1:
            out.append(Overlap(name, len(rows), pairs, s1, len(ref_s1)))
    return out


def check_leakage(train: list[PairExample], train_name: str, references: dict[str, list[PairExample]],
                  allow: bool = False) -> list[Overlap]:
    """Raise :class:`LeakageError` if ``train`` overlaps a reference set (only warn if ``allow``)."""
    overlaps = find_overlaps(train, references)
    if not overlaps:
        return overlaps
    detail = "; ".join(o.describe() for o in overlaps)
    message = (f"training set {train_name} ({len(train)} pairs) overlaps the evaluation data: {detail}. "
               "Its accuracy would be inflated (PAWS-Wiki dev holds the PAWS-X dev/test pairs; other "
               "languages are translations of the English pairs).")
    if allow:
        log.warning("%s Continuing because --allow-leakage is set.", message)
        return overlaps
    raise LeakageError(f"{message} Train on a disjoint file (offline: paws_wiki_en/test.tsv for PAWS-X, "
                       "xnli/en/test.tsv with dev evaluation for XNLI), or pass --allow-leakage to only warn.")
