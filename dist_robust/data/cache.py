"""Tokenize pair examples with ``datasets.map``, cached on disk by data, tokenizer and length.

The cache file is named by a key that hashes (1) the data fingerprint (``datasets`` hashes
the ids, sentences and labels), (2) the tokenizer (its serialized vocabulary, model,
normalizer and pair template; not its mutable truncation/padding state) and (3)
``max_length``. Change any one and the pairs are tokenized again; change none and every
later run (and every other rank) reads the cached arrow file.

No padding happens here: :class:`dist_robust.data.pipeline.Collator` pads each batch to its
longest row (dynamic padding).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from typing import Any

from dist_robust.infra import distributed as D
from dist_robust.data.examples import PairExample
from dist_robust.data.pipeline import Encoded

_FORMAT = "v2"  # columns of a cache file (v2: token_type_ids where the tokenizer makes them)


def encode_cached(examples: list[PairExample], tokenizer: Any, max_length: int,
                  cache_dir: str | None = None) -> Encoded:
    """Token ids of ``examples`` (same result as ``pipeline.encode``), via a batched ``datasets.map``.

    With ``cache_dir`` (a local directory) the result is cached there. Under
    torch.distributed the call is collective: each node's local rank 0 tokenizes first and
    writes the cache, the other ranks wait at a barrier and then load it.
    """
    import datasets

    if not examples:  # (an evaluation-only run's training set) datasets.map would give no columns
        return Encoded([], [], None)
    ds = _as_dataset(examples)
    key = cache_key(ds._fingerprint, tokenizer, max_length)
    kwargs = dict(function=_tokenize, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                  batched=True, batch_size=1000, remove_columns=["id", "sentence1", "sentence2"],
                  new_fingerprint=key)
    with _quiet(datasets):
        if cache_dir is None:
            out = ds.map(keep_in_memory=True, **kwargs)
        else:
            os.makedirs(cache_dir, exist_ok=True)
            with D.main_first(local=True):
                out = ds.map(cache_file_name=os.path.join(cache_dir, f"tokenized-{key}.arrow"),
                             load_from_cache_file=True, **kwargs)
    types = out.data.column("token_type_ids").to_pylist() if "token_type_ids" in out.column_names else None
    return Encoded(out.data.column("input_ids").to_pylist(), out.data.column("label").to_pylist(), types)


def cache_key(data_fingerprint: str, tokenizer: Any, max_length: int) -> str:
    """A short hex key naming one (data, tokenizer, max_length) combination."""
    h = hashlib.sha256()
    for part in (_FORMAT, data_fingerprint, tokenizer_fingerprint(tokenizer), str(max_length)):
        h.update(part.encode())
        h.update(b"\x1f")
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids, stable across calls that change truncation settings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = type(tokenizer).__name__ + json.dumps(spec, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()
    from datasets.fingerprint import Hasher

    return Hasher.hash(tokenizer)


def _as_dataset(examples: list[PairExample]) -> Any:
    import datasets

    return datasets.Dataset.from_dict({
        "id": [e.id for e in examples],
        "sentence1": [e.sentence1 for e in examples],
        "sentence2": [e.sentence2 for e in examples],
        "label": [e.label for e in examples],
    })


def _tokenize(batch: dict[str, list], tokenizer: Any, max_length: int) -> dict[str, list]:
    enc = tokenizer(batch["sentence1"], batch["sentence2"], truncation=True, max_length=max_length)
    out = {"input_ids": enc["input_ids"]}
    if enc.get("token_type_ids") is not None:
        out["token_type_ids"] = enc["token_type_ids"]
    return out


@contextmanager
def _quiet(datasets: Any):
    """No per-map progress bars (the trainer has its own output); restore the setting after."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
