"""What a task builder returns: English training pairs and per-language evaluation sets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from dist_robust.data.examples import PairExample
from dist_robust.data.synthetic import Anchor


@dataclass
class TaskData:
    """Everything a run reads: English training pairs and per-language evaluation sets.

    ``dev`` selects checkpoints; ``test`` is reported for the selected model (empty: the
    trainer reports dev). Both map a language to examples that are parallel across
    languages (same ids). ``sources`` names where each part came from (``train``,
    ``dev.{lang}``, ``test.{lang}`` -> URI or hub location); ``skipped_rows`` counts the bad
    rows skipped per file under ``--skip-bad-rows``. A task that models a pretrained
    lexicon (the synthetic one) also gives ``anchors`` (where the embeddings of built-in models
    start), ``words`` (its lexicon, each word one token of a local tokenizer) and ``synonyms``
    (its own RS-DA neighbour map).
    """

    name: str
    label_names: tuple[str, ...]
    train: list[PairExample]
    dev: dict[str, list[PairExample]]
    test: dict[str, list[PairExample]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    skipped_rows: dict[str, int] = field(default_factory=dict)
    anchors: list[Anchor] = field(default_factory=list)
    words: list[str] = field(default_factory=list)
    synonyms: dict[str, list[str]] | None = None

    @property
    def languages(self) -> list[str]:
        return list(self.dev)

    def tokenizer_corpus(self) -> Iterator[str]:
        """Text a locally trained tokenizer learns from: training pairs and evaluation-language text."""
        for e in self.train:
            yield e.sentence1
            yield e.sentence2
        for sets in (self.dev, self.test):
            for rows in sets.values():
                for e in rows:
                    yield e.sentence1
                    yield e.sentence2
