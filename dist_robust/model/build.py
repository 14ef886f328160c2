"""Build the encoder and its tokenizer from a built-in config, a hub name or a local directory."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaForSequenceClassification)

from dist_robust.infra.zero import zero_stage

log = logging.getLogger(__name__)

# Built-in random-init configurations in the XLM-R architecture. ``vocab_size=None`` takes
# the size of the (locally trained) tokenizer; the large shapes keep XLM-R's real 250002
# so memory and speed match the pretrained model.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 max_position_embeddings=258, vocab_size=None),
    "xlmr-base-random": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072, max_position_embeddings=514, vocab_size=250002),
    "xlmr-large-random": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096, max_position_embeddings=514, vocab_size=250002),
}
SPECIAL_TOKENS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                  "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>"}


def is_builtin(name: str) -> bool:
    return name in BUILTIN_CONFIGS


def train_tokenizer(texts: Iterable[str], vocab_size: int, save_dir: str,
                    words: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Train a Unigram tokenizer (the model family XLM-R's SentencePiece uses) and save it.

    Pairs are encoded as XLM-R does: ``<s> A </s></s> B </s>``. A Unigram vocabulary must hold
    every character of the text (CJK text brings thousands), so ``vocab_size`` is raised, with a
    log line, when the text needs more. ``words`` (a task's lexicon, e.g. the synthetic one's)
    are not learnt but given: the vocabulary is then those words, each one piece, and every
    character of the text, so anything else still tokenizes.
    """
    import unicodedata

    from tokenizers import Tokenizer, models, trainers

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    texts = list(texts)
    alphabet = {c for text in texts for c in unicodedata.normalize("NFKC", text)} | {"\u2581"}  # + Metaspace's mark
    if words:
        pieces = sorted({"\u2581" + unicodedata.normalize("NFKC", w) for w in words})
        vocab = ([(p, 0.0) for p in specials] + [(p, -1.0) for p in pieces]
                 + [(c, -20.0) for c in sorted(alphabet)])
        tok = _with_metaspace(Tokenizer(models.Unigram(vocab, unk_id=specials.index("<unk>"))))
    else:
        needed = len(alphabet) + len(specials)
        if vocab_size < needed + 1:
            raised = needed + max(100, vocab_size // 4)  # every character, and room for some longer pieces
            log.info("tokenizer vocabulary raised from %d to %d: the text has %d distinct characters",
                     vocab_size, raised, len(alphabet))
            vocab_size = raised
        tok = _with_metaspace(Tokenizer(models.Unigram()))
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        tok = _with_metaspace(_canonical_unigram(tok, len(specials)))
    return _save_fast(tok, save_dir)


def _with_metaspace(tok):
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return tok


def _save_fast(tok, save_dir: str) -> PreTrainedTokenizerFast:
    from tokenizers import processors

    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512,
                                   model_input_names=["input_ids", "attention_mask"], **SPECIAL_TOKENS)
    os.makedirs(save_dir, exist_ok=True)
    fast.save_pretrained(save_dir)
    return fast


def _canonical_unigram(tok, n_specials: int):
    """The same vocabulary, in an order that does not depend on the trainer's hash maps.

    The Unigram trainer sums piece scores in hash-map order, so two trainings on the same text
    differ in the last bits of the scores and order tied pieces differently: token ids, and with
    them every run's trajectory, would change from one process to the next. Scores rounded well
    above that noise, and ties broken by the piece itself, give the same ids every time.
    """
    import json

    from tokenizers import Tokenizer

    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    unk = vocab[state["model"]["unk_id"]][0]
    pieces = sorted(([p, round(s, 9)] for p, s in vocab[n_specials:]), key=lambda ps: (-ps[1], ps[0]))
    state["model"]["vocab"] = vocab[:n_specials] + pieces
    state["model"]["unk_id"] = [p for p, _ in state["model"]["vocab"]].index(unk)
    return Tokenizer.from_str(json.dumps(state))


def load_tokenizer(name_or_path: str):
    return AutoTokenizer.from_pretrained(name_or_path)


def build_model(name: str, label_names: Sequence[str], tokenizer, dropout: float | None = None,
                seed: int = 0) -> torch.nn.Module:
    """A sequence-pair classifier whose config names the task's labels (``id2label``/``label2id``).

    Under ZeRO-3 the model is created already partitioned: transformers sees the live
    ``HfDeepSpeedConfig`` the caller keeps (see :class:`dist_robust.infra.zero.zero3_context`) and constructs the
    weights inside ``deepspeed.zero.Init`` itself. Weights that a checkpoint does not provide
    (a pretrained encoder's new classification head) and built-in configs are initialized by
    parameter name, so they are the same at every ZeRO stage and world size. Parameters are
    fp32: DeepSpeed makes its bf16/fp16 copies itself.
    """
    overrides: dict[str, Any] = {"num_labels": len(label_names),
                                 "id2label": dict(enumerate(label_names)),
                                 "label2id": {label: i for i, label in enumerate(label_names)}}
    if dropout is not None:
        overrides.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if is_builtin(name):
        shape = dict(BUILTIN_CONFIGS[name])
        if shape["vocab_size"] is None:
            shape["vocab_size"] = len(tokenizer)
        cfg = XLMRobertaConfig(**shape, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               layer_norm_eps=1e-5, **overrides)
        model = XLMRobertaForSequenceClassification._from_config(cfg)
        init_by_name(model, seed, cfg.initializer_range)
        return model
    cfg = AutoConfig.from_pretrained(name, **overrides)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        name, config=cfg, dtype=torch.float32, ignore_mismatched_sizes=True, output_loading_info=True)
    fresh = set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())}
    if fresh:
        log.info("%s: %d tensor(s) not in the checkpoint, initialized by name: %s", name, len(fresh),
                 ", ".join(sorted(fresh)[:6]))
        init_by_name(model, seed, getattr(cfg, "initializer_range", 0.02), only=fresh)
    return model


def init_by_name(model: torch.nn.Module, seed: int, std: float, only: set[str] | None = None) -> None:
    """Initialize a random-init model from per-parameter generators seeded by name.

    The weights then do not depend on how the model was constructed: built whole, or
    partitioned under ZeRO-3 (whose construction draws random numbers in another order),
    on any number of ranks. Linear and embedding weights ~ N(0, std), padding rows and
    biases 0, LayerNorm weights 1, as BERT/XLM-R initialize. ``only``: the full parameter
    names to initialize (default: all).
    """
    import zlib

    import deepspeed

    for module_name, module in model.named_modules():
        params = [(name, p) for name, p in module.named_parameters(recurse=False)
                  if only is None or _full_name(module_name, name) in only]
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            for name, p in params:
                full = _full_name(module_name, name)
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(full.encode()))
                with torch.no_grad():
                    if isinstance(module, torch.nn.LayerNorm):
                        p.fill_(1.0 if name == "weight" else 0.0)
                    elif name == "bias":
                        p.zero_()
                    else:
                        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32, device="cpu").to(p) * std)
                        pad = getattr(module, "padding_idx", None)
                        if pad is not None:
                            p[pad].zero_()


def align_word_embeddings(model: torch.nn.Module, tokenizer, anchors, seed: int) -> tuple[int, int]:
    """Start each anchored word's embedding at its anchor's plus noise of relative norm ``distance``.

    For every ``Anchor(word, anchor, distance)``, in order (an anchor may itself have been
    anchored before), whose word and anchor are single tokens:
    ``E[word] = E[anchor] + distance * ||E[anchor]|| * u`` with ``u`` a uniform unit direction
    drawn from a generator seeded by (seed, word), so the result depends neither on the ZeRO
    stage nor on the world size. Returns (aligned, skipped).
    """
    import zlib

    import deepspeed

    texts = sorted({w for a in anchors for w in (a.word, a.anchor)})
    ids = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]))  # one batched call
    rows = [(a.word, ids[a.word][0], ids[a.anchor][0], a.distance) for a in anchors
            if len(ids[a.word]) == 1 and len(ids[a.anchor]) == 1 and ids[a.word] != ids[a.anchor]]
    weight = word_embeddings(model).weight
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=0), torch.no_grad():
        table = weight.detach().float().cpu().clone()
        for text, row, anchor, distance in rows:
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(text.encode()))
            u = torch.randn(table.shape[1], generator=g, dtype=torch.float32)
            base = table[anchor]
            table[row] = base + distance * base.norm() * u / u.norm()
        weight.copy_(table.to(weight))
    return len(rows), len(anchors) - len(rows)


def _full_name(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name


class RowBlockEmbedding(torch.nn.Module):
    """A word embedding held as blocks of consecutive rows, one ``nn.Embedding`` each.

    ZeRO-3 gathers a parameter whole, so one word embedding's backward holds the gathered matrix,
    its dense gradient and the copy the gradient is reduced from: at XLM-R-large 3 x 0.95 GiB, the
    peak of a step. In blocks, each is gathered, and its gradient made and reduced, on its own.
    Every token is looked up in its own block (the others look up row 0) and the blocks' outputs
    are added, each multiplied by its 0/1 mask of tokens: the output, the gradients and the losses
    are exactly one embedding's, since every sum adds zeros. ``bounds``: the first row of each
    block and the end, e.g. ``[0, 31250, ..., 250002]``.
    """

    def __init__(self, blocks: Sequence[torch.nn.Embedding], bounds: Sequence[int]):
        super().__init__()
        if len(bounds) != len(blocks) + 1:
            raise ValueError(f"{len(blocks)} blocks need {len(blocks) + 1} bounds, got {len(bounds)}")
        self.blocks = torch.nn.ModuleList(blocks)
        self.bounds = list(bounds)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = None
        for start, end, block in zip(self.bounds, self.bounds[1:], self.blocks):
            inside = (ids >= start) & (ids < end)
            looked = block(torch.where(inside, ids - start, 0))
            part = looked * inside.unsqueeze(-1).to(looked.dtype)
            out = part if out is None else out + part
        return out


def split_word_embeddings(model: torch.nn.Module, blocks: int, ds_config: dict) -> int:
    """Replace the model's word embedding by a :class:`RowBlockEmbedding` of ``blocks`` row blocks.

    Under ZeRO-3 (``ds_config``'s stage 3) the matrix is gathered once and each block is made
    partitioned. The blocks keep the embedding's padding row, dtype and ``requires_grad``. Returns
    the number of blocks made (at most one per row); 1 leaves the model as it is, as does an
    embedding that is not a plain ``nn.Embedding`` (a subclass may scale or reshape its output,
    which the blocks would not repeat). Checkpoints then
    name the blocks' parameters (``...word_embeddings.blocks.<i>.weight``);
    :func:`join_word_embedding_blocks` turns a state dict back into the model's own names.
    """
    import deepspeed

    embedding = word_embeddings(model)
    if isinstance(embedding, RowBlockEmbedding):
        raise ValueError("the word embedding is in blocks already")
    if blocks > 1 and (type(embedding) is not torch.nn.Embedding or embedding.max_norm is not None
                       or embedding.scale_grad_by_freq or embedding.sparse):
        log.warning("word embedding kept as one matrix: blocks replace a plain nn.Embedding only, and this "
                    "model's is a %s%s", type(embedding).__name__,
                    " with max_norm, scale_grad_by_freq or sparse set" if type(embedding) is torch.nn.Embedding else "")
        return 1
    rows = embedding.weight.ds_shape[0] if hasattr(embedding.weight, "ds_shape") else embedding.weight.shape[0]
    blocks = max(1, min(blocks, rows))
    if blocks == 1:
        return 1
    zero3 = zero_stage(ds_config) == 3
    bounds = [round(i * rows / blocks) for i in range(blocks + 1)]
    pad, trainable = embedding.padding_idx, embedding.weight.requires_grad
    with deepspeed.zero.GatheredParameters([embedding.weight]):
        full = embedding.weight.detach()
        made = deepspeed.zero.Init(config_dict_or_path=ds_config) if zero3 else contextlib.nullcontext()
        with made:  # under ZeRO-3 each block is partitioned as it is made
            parts = [torch.nn.Embedding.from_pretrained(
                full[start:end].clone(), freeze=not trainable,
                padding_idx=pad - start if pad is not None and start <= pad < end else None)
                for start, end in zip(bounds, bounds[1:])]
    model.set_input_embeddings(RowBlockEmbedding(parts, bounds))
    return blocks


def embedding_block_count(model: torch.nn.Module) -> int:
    """How many row blocks the model's word embedding is held in (1: a plain embedding)."""
    embedding = word_embeddings(model)
    return len(embedding.blocks) if isinstance(embedding, RowBlockEmbedding) else 1


def join_word_embedding_blocks(model: torch.nn.Module, state: dict) -> dict:
    """``state`` (a state dict of ``model``) with its row blocks' weights joined under the plain name.

    ``...word_embeddings.blocks.<i>.weight`` become one ``...word_embeddings.weight``, as a model
    built without blocks (and ``from_pretrained``) names it. Nothing changes without blocks.
    """
    for name, module in model.named_modules():
        if isinstance(module, RowBlockEmbedding):
            keys = [f"{name}.blocks.{i}.weight" for i in range(len(module.blocks))]
            state = dict(state)
            state[f"{name}.weight"] = torch.cat([state.pop(k) for k in keys])
    return state


def word_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """The token-embedding module whose *output* the objectives perturb."""
    return model.get_input_embeddings()


def count_parameters(model: torch.nn.Module) -> int:
    """Parameter count, correct for ZeRO-3 partitioned parameters too."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
