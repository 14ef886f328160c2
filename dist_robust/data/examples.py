"""The one example shape every task reader produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PairExample:
    """A labelled sentence pair.

    ``lang1``/``lang2`` are the languages of the two sentences: equal for the standard
    per-language sets, different in the generalized (mixed-language) setting. ``id`` is
    shared by the translations of one example across languages.
    """

    id: str
    sentence1: str
    sentence2: str
    label: int
    lang1: str
    lang2: str

    @property
    def pair(self) -> str:
        return self.lang1 if self.lang1 == self.lang2 else f"{self.lang1}-{self.lang2}"
