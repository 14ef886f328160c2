"""RS-DA: randomized smoothing by synonym substitution (Huang et al., 2021, Robust-XLT).

A neighbour map (word -> list of synonyms, e.g. counter-fitted word vectors' neighbours)
defines, for every word that has neighbours, the set {word} + neighbours. Augmenting a
sentence splits it on single spaces (so untouched text is kept byte for byte) and replaces
each word with neighbours by a uniform draw from that set, in both sentences of a pair.
Lookup is exact, as in the paper (``Movie`` is not ``movie``).

* Offline, as in the paper: ``dist-robust augment --copies N`` writes a dataset in which every
  English pair appears N times, each copy drawn afresh (paper: N = 10 for PAWS-X, 3 for XNLI).
* On the fly: :class:`SynonymAugmenter` gives fresh substitutes per epoch (or batch), each word
  redrawn with probability ``prob``. A draw is a pure function of (seed, example id, key), so
  every rank, and every resumed run, sees the same augmented pair.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import replace

from dist_robust.infra import storage
from dist_robust.config.run_config import DATA_FORMATS, DataConfig
from dist_robust.data import real_tasks
from dist_robust.data.examples import PairExample
from dist_robust.data.readers import write_pairs

DEFAULT_COPIES = {"pawsx": 10, "xnli": 3}

Neighbors = dict[str, list[str]]


def load_neighbors(uri: str) -> Neighbors:
    """Read a JSON neighbour map ``{word: [neighbour, ...]}`` from a path or URL."""
    try:
        data = json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"--synonyms {uri}: file not found (expected JSON word -> [neighbour, ...], "
                                "e.g. counterfitted_neighbors.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--synonyms {uri}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--synonyms {uri}: expected a JSON object word -> [neighbour, ...], "
                         f"got {type(data).__name__}")
    for word, options in data.items():
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ValueError(f"--synonyms {uri}: entry {word!r} is {options!r}, expected a list of strings")
    return data


def example_rng(seed: int, example_id: str, key: int) -> random.Random:
    """A generator that depends only on (seed, example id, key): no process or rank state."""
    digest = hashlib.sha256(f"{seed}\x1f{example_id}\x1f{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def substitute(sentence: str, neighbors: Neighbors, rng: random.Random, prob: float = 1.0) -> str:
    """Replace each word that has neighbours, with probability ``prob``, by a uniform draw
    from itself and its neighbours. Words without neighbours are never touched."""
    out = []
    for word in sentence.split(" "):
        options = neighbors.get(word)
        if options and (prob >= 1.0 or rng.random() < prob):
            word = rng.choice([word, *options])
        out.append(word)
    return " ".join(out)


class SynonymAugmenter:
    """On-the-fly RS-DA: ``augmenter(example, key)`` with key = epoch (or batch index).

    Deterministic: the same (seed, example id, key) gives the same pair on every rank and
    in every run; a different key gives a fresh draw.
    """

    def __init__(self, neighbors: Neighbors, prob: float = 1.0, seed: int = 0):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"synonym substitution probability {prob!r} must be in [0, 1]")
        self.neighbors, self.prob, self.seed = neighbors, prob, seed

    @classmethod
    def from_config(cls, cfg: DataConfig, seed: int, task_synonyms: Neighbors | None = None
                    ) -> SynonymAugmenter | None:
        """The augmenter ``--augment synonym --synonyms PATH --synonym-prob P`` asks for, else None.
        Without ``--synonyms``, the task's own map (``task_synonyms``), if it has one."""
        if cfg.augment != "synonym":
            return None
        if cfg.synonyms:
            return cls(load_neighbors(cfg.synonyms), cfg.synonym_prob, seed)
        if task_synonyms is None:
            raise ValueError("--augment synonym needs --synonyms PATH_OR_URL (a JSON neighbour map)")
        return cls(task_synonyms, cfg.synonym_prob, seed)

    def __call__(self, example: PairExample, key: int) -> PairExample:
        rng = example_rng(self.seed, example.id, key)
        return replace(example, sentence1=substitute(example.sentence1, self.neighbors, rng, self.prob),
                       sentence2=substitute(example.sentence2, self.neighbors, rng, self.prob))

    def batch(self, examples: Sequence[PairExample], key: int) -> list[PairExample]:
        """Augment a batch of examples with the same key (e.g. the current epoch)."""
        return [self(e, key) for e in examples]

    def substitutable(self, example: PairExample) -> bool:
        """True if at least one word of the pair has neighbours."""
        words = example.sentence1.split(" ") + example.sentence2.split(" ")
        return any(self.neighbors.get(w) for w in words)


def augment_copies(examples: Sequence[PairExample], augmenter: SynonymAugmenter,
                   copies: int) -> list[PairExample]:
    """Offline RS-DA: every example ``copies`` times (copy k drawn with key k), ids ``{id}~{k}``."""
    if copies < 1:
        raise ValueError(f"--copies {copies}: must be >= 1")
    out = []
    for e in examples:
        for k in range(copies):
            out.append(replace(augmenter(e, k), id=f"{e.id}~{k}"))
    return out


def _parser() -> argparse.ArgumentParser:
    from dist_robust.config.parsing import Parser

    p = Parser(prog="dist-robust augment", description="Write an RS-DA synonym-augmented copy of an English "
                                                       "training set.")
    p.add_argument("--task", choices=("pawsx", "xnli"), required=True, help="Task (labels, default --copies).")
    p.add_argument("--input", help="Training file (path or URL; tsv, XTREME tsv, jsonl, parquet). "
                                   "Default: the task's English train split from the hub.")
    p.add_argument("--output", required=True, help="Output file (path or URL) ending in .tsv or .jsonl.")
    p.add_argument("--synonyms", required=True, help="JSON neighbour map word -> [neighbour, ...] (path or URL).")
    p.add_argument("--copies", type=int, default=None,
                   help=f"Copies of every pair (default: {DEFAULT_COPIES} by task, as in the paper).")
    p.add_argument("--synonym-prob", type=float, default=1.0,
                   help="Probability that a word with neighbours is redrawn (1.0 as in the paper).")
    p.add_argument("--seed", type=int, default=42, help="Seed; the output is a pure function of it.")
    p.add_argument("--data-format", choices=DATA_FORMATS, default="auto", help="Format of --input.")
    p.add_argument("--skip-bad-rows", action="store_true", help="Skip (and count) bad input rows.")
    p.add_argument("--cache-dir", default=None, help="Hub download cache (when --input is not given).")
    return p


def augment_main(argv: list[str] | None = None) -> int:
    """``dist-robust augment``: read, augment N copies, write; 0 on success, 2 on bad input."""
    args = _parser().parse_args(argv)
    try:
        summary = _augment_file(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def _augment_file(args: argparse.Namespace) -> str:
    """Do the work of ``augment_main``; return the one-line summary it prints."""
    spec = real_tasks.PAWSX if args.task == "pawsx" else real_tasks.XNLI
    copies = args.copies if args.copies is not None else DEFAULT_COPIES[args.task]
    if copies < 1:
        raise ValueError(f"--copies {copies}: must be >= 1")
    augmenter = SynonymAugmenter(load_neighbors(args.synonyms), args.synonym_prob, args.seed)
    cfg = DataConfig(task=args.task, data_format=args.data_format, skip_bad_rows=args.skip_bad_rows,
                     cache_dir=args.cache_dir)
    source = real_tasks.read_file(args.input, spec, "en", cfg) if args.input else \
        real_tasks.read_hub(spec, "en", "train", cfg)
    rows = augment_copies(source.examples, augmenter, copies)
    write_pairs(args.output, rows, spec.labels)
    touched = sum(augmenter.substitutable(e) for e in source.examples)
    return (f"wrote {len(rows)} pairs ({len(source.examples)} x {copies} copies) to {args.output}; "
            f"{touched} of {len(source.examples)} pairs have at least one word with neighbours"
            + (f"; skipped {len(source.skipped)} bad input row(s)" if source.skipped else ""))
