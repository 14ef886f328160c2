"""encode_cached: same ids as pipeline.encode, cached by data, tokenizer and max_length."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_robust.data import cache
from dist_robust.data.cache import encode_cached, tokenizer_fingerprint
from dist_robust.data.examples import PairExample
from dist_robust.data.pipeline import encode
from dist_robust.data.readers import PAWSX_LABELS, read_pairs
from dist_robust.model.build import train_tokenizer


@pytest.fixture(scope="module")
def examples(shared_data: Path) -> list[PairExample]:
    return read_pairs(str(shared_data / "pawsx" / "de" / "dev.tsv"), PAWSX_LABELS, "de").examples[:120]


@pytest.fixture(scope="module")
def tokenizer(examples, tmp_path_factory):
    texts = [s for e in examples for s in (e.sentence1, e.sentence2)]
    return train_tokenizer(texts, 400, str(tmp_path_factory.mktemp("tok")))


def test_same_result_as_plain_encode(examples, tokenizer, tmp_path: Path):
    plain = encode(examples, tokenizer, 48)
    for cache_dir in (None, str(tmp_path)):
        got = encode_cached(examples, tokenizer, 48, cache_dir)
        assert got.input_ids == plain.input_ids and got.labels == plain.labels
    assert max(len(r) for r in plain.input_ids) == 48  # truncated, not padded (padding is per batch)
    assert min(len(r) for r in plain.input_ids) < 48


def test_second_call_reads_the_cache(examples, tokenizer, tmp_path: Path, monkeypatch):
    first = encode_cached(examples, tokenizer, 48, str(tmp_path))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].startswith("tokenized-")

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds this data")

    monkeypatch.setattr(cache, "_tokenize", must_not_run)
    again = encode_cached(examples, tokenizer, 48, str(tmp_path))
    assert again.input_ids == first.input_ids


def test_key_changes_with_data_tokenizer_and_length(examples, tokenizer, tmp_path: Path):
    encode_cached(examples, tokenizer, 48, str(tmp_path))
    encode_cached(examples, tokenizer, 32, str(tmp_path))
    encode_cached(examples[:-1], tokenizer, 48, str(tmp_path))
    other = train_tokenizer([s for e in examples for s in (e.sentence1, e.sentence2)], 300,
                            str(tmp_path.parent / "tok300"))
    encode_cached(examples, other, 48, str(tmp_path))
    encode_cached(examples, tokenizer, 48, str(tmp_path))  # the first one again: no new file
    assert len(list(tmp_path.glob("tokenized-*.arrow"))) == 4


def test_tokenizer_fingerprint_ignores_truncation_state(tokenizer):
    before = tokenizer_fingerprint(tokenizer)
    tokenizer("a b c", "d e", truncation=True, max_length=9)
    tokenizer("a b c", padding="max_length", max_length=12)
    assert tokenizer_fingerprint(tokenizer) == before


def test_locally_trained_tokenizer_fits_any_alphabet(tmp_path):
    """CJK text has more distinct characters than a small vocabulary: the size grows to hold them all."""
    from dist_robust.model.build import train_tokenizer

    chars = [chr(0x4E00 + i) for i in range(900)]  # 900 distinct CJK ideographs
    texts = ["".join(chars[i:i + 12]) + " and some english words" for i in range(0, 900, 3)]
    tok = train_tokenizer(texts, 600, str(tmp_path / "tok"))
    assert len(tok) >= 900
    ids = tok(texts[0])["input_ids"]
    assert tok.unk_token_id not in ids  # every character is in the vocabulary


def test_locally_trained_tokenizer_is_the_same_in_every_process(tmp_path):
    """Token ids must not depend on the process: the Unigram trainer's hash-map order moves its scores.

    Two fresh interpreters train on the same small text, full of equally frequent pieces (the
    case where ties decided the order); the saved tokenizers must be byte for byte the same.
    """
    import random
    import subprocess
    import sys

    rng = random.Random(0)
    words = [f"w{i:02d}" for i in range(40)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(500)))
    code = ("import sys; from dist_robust.model.build import train_tokenizer; "
            "train_tokenizer(open(sys.argv[1]).read().splitlines(), 200, sys.argv[2])")
    saved = []
    for i in range(2):
        subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / f"tok{i}")], check=True,
                       capture_output=True)
        saved.append((tmp_path / f"tok{i}" / "tokenizer.json").read_bytes())
    assert saved[0] == saved[1]
