"""``dist-robust trim-vocab``: a model folder cut down to the vocabulary a task's files use, exactly.

A multilingual encoder's word embedding is most of its parameters (96M of multilingual-e5-small's
118M; 256M of XLM-R-large's 560M), yet a task's files use a fraction of its 250k pieces. Keeping
only the pieces the given files tokenize to (plus the special pieces) makes CPU runs cheaper and
the folder small enough to carry where transfers are limited.

Exact for those files: a unigram tokenizer picks the highest-scoring segmentation among its
pieces, and the kept set contains every piece of each file text's best segmentation, so the best
segmentation over the kept pieces is the same one (the lowest-scoring piece is kept too, so the
penalty for unknown characters does not move). The new ids are the old ones renumbered in order,
the embedding keeps the same rows, and every corpus text is re-encoded and checked against the
original before the folder is written. Texts outside the corpus may tokenize differently (into
fewer, shorter pieces, or ``<unk>``). Works for any Hugging Face folder with a unigram
(SentencePiece) ``tokenizer.json`` and safetensors weights.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import shutil
import sys

from dist_robust.infra import storage

log = logging.getLogger(__name__)

TRIM_RECORD = "vocab_trim.json"


class TrimError(ValueError):
    """A folder or corpus this command cannot trim for (the reason, and what it takes)."""


def corpus_texts(paths: list[str]) -> list[str]:
    """Every text in the files: each field of each line of text / TSV files, every string of JSON / JSONL."""
    texts: list[str] = []
    csv.field_size_limit(sys.maxsize)
    for path in paths:
        if not os.path.isfile(path):
            raise TrimError(f"--corpus {path}: no such file")
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                texts.extend(_strings(json.load(f)))
            elif path.endswith(".jsonl"):
                for line in f:
                    if line.strip():
                        texts.extend(_strings(json.loads(line)))
            else:
                for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                    texts.extend(field for field in row if field)
    return texts


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _unigram(tokenizer_json: dict, source: str) -> dict:
    model = tokenizer_json.get("model", {})
    if model.get("type") != "Unigram":
        raise TrimError(f"{source}: the tokenizer is {model.get('type')!r}; trimming is exact for unigram "
                        f"(SentencePiece) tokenizers only")
    return model


def kept_ids(tokenizer_json: dict, texts: list[str]) -> list[int]:
    """Old ids to keep, ascending: the pieces the texts encode to, the special pieces, the lowest-scoring one."""
    from tokenizers import Tokenizer

    model = _unigram(tokenizer_json, "tokenizer.json")
    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    used = set()
    for start in range(0, len(texts), 4096):
        for enc in tok.encode_batch(texts[start:start + 4096], add_special_tokens=False):
            used.update(enc.ids)
    scores = [score for _, score in model["vocab"]]
    special = {t["id"] for t in tokenizer_json.get("added_tokens", [])}
    return sorted(used | special | {model["unk_id"], min(range(len(scores)), key=scores.__getitem__)})


def _remap_tokenizer(tokenizer_json: dict, keep: list[int]) -> dict:
    new_id = {old: new for new, old in enumerate(keep)}
    out = json.loads(json.dumps(tokenizer_json))
    model = out["model"]
    model["vocab"] = [model["vocab"][i] for i in keep]
    model["unk_id"] = new_id[model["unk_id"]]
    for t in out.get("added_tokens", []):
        t["id"] = new_id[t["id"]]
    post = out.get("post_processor")
    for proc in (post.get("processors", [post]) if post else []):
        if proc["type"] == "TemplateProcessing":
            for special in proc["special_tokens"].values():
                special["ids"] = [new_id[i] for i in special["ids"]]
        elif proc["type"] in ("RobertaProcessing", "BertProcessing"):
            for key in ("sep", "cls"):
                proc[key] = [proc[key][0], new_id[proc[key][1]]]
        elif proc["type"] not in ("ByteLevel",):
            raise TrimError(f"tokenizer.json: post-processor {proc['type']} holds ids this command does not remap")
    return out


def _remap_config(config: dict, keep: list[int]) -> dict:
    new_id = {old: new for new, old in enumerate(keep)}
    out = dict(config, vocab_size=len(keep))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                "decoder_start_token_id"):
        if out.get(key) is not None:
            out[key] = new_id.get(out[key], out[key])
    return out


def trim_vocabulary(model_dir: str, out_dir: str, corpus: list[str]) -> dict:
    """Write ``out_dir``: ``model_dir`` with the vocabulary the ``corpus`` files use; return the trim record."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    tok_path, cfg_path = os.path.join(model_dir, "tokenizer.json"), os.path.join(model_dir, "config.json")
    weights = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    for path, what in ((tok_path, "a tokenizer.json"), (cfg_path, "a config.json")):
        if not os.path.isfile(path):
            raise TrimError(f"{model_dir}: no {os.path.basename(path)} (trimming needs {what})")
    if not weights:
        raise TrimError(f"{model_dir}: no *.safetensors weights (save the model with safe_serialization=True)")
    if os.path.abspath(out_dir) == os.path.abspath(model_dir):
        raise TrimError(f"{out_dir}: write the trimmed model to another folder than the one it comes from")
    with open(tok_path, encoding="utf-8") as f:
        tokenizer_json = json.load(f)
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    texts = corpus_texts(corpus)
    keep = kept_ids(tokenizer_json, texts)
    trimmed_json = _remap_tokenizer(tokenizer_json, keep)
    _check_exact(Tokenizer.from_str(json.dumps(tokenizer_json)), Tokenizer.from_str(json.dumps(trimmed_json)),
                 keep, texts)
    rows = config.get("vocab_size")
    if not rows or rows < len(tokenizer_json["model"]["vocab"]):
        raise TrimError(f"{cfg_path}: vocab_size {rows!r} is smaller than the tokenizer's "
                        f"{len(tokenizer_json['model']['vocab'])} pieces")
    index = torch.tensor(keep)
    os.makedirs(out_dir, exist_ok=True)
    sliced = []
    for path in weights:
        state = load_file(path)
        for name, tensor in state.items():
            if tensor.dim() >= 1 and tensor.shape[0] == rows:  # the embedding (and a tied output layer, if any)
                state[name] = tensor.index_select(0, index).contiguous()
                sliced.append(name)
        save_file(state, os.path.join(out_dir, os.path.basename(path)), metadata={"format": "pt"})
    if not sliced:
        raise TrimError(f"{model_dir}: no weight has {rows} rows (config vocab_size); nothing to trim")
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(trimmed_json, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(_remap_config(config, keep), f, indent=2)
    _copy_tokenizer_config(model_dir, out_dir, keep)
    for name in os.listdir(model_dir):  # the rest of the folder (a model card, a sharded index), as it is
        src = os.path.join(model_dir, name)
        if (os.path.isfile(src) and not name.endswith(".safetensors") and not os.path.exists(os.path.join(out_dir, name))
                and name != TRIM_RECORD):
            shutil.copy(src, os.path.join(out_dir, name))
    record = {"source": os.path.abspath(model_dir), "pieces_before": len(tokenizer_json["model"]["vocab"]),
              "rows_before": rows, "pieces_after": len(keep), "sliced": sorted(set(sliced)),
              "corpus": {os.path.abspath(p): storage.file_sha256(p) for p in corpus}, "texts": len(texts),
              "kept_ids": keep}
    with open(os.path.join(out_dir, TRIM_RECORD), "w", encoding="utf-8") as f:
        json.dump(record, f)
    log.info("%s -> %s: %d of %d pieces kept for %d texts", model_dir, out_dir, len(keep),
             record["pieces_before"], len(texts))
    return record


def _check_exact(before, after, keep: list[int], texts: list[str]) -> None:
    """Every corpus text encodes to the same pieces before and after (ids mapped back)."""
    for start in range(0, len(texts), 4096):
        chunk = texts[start:start + 4096]
        for text, a, b in zip(chunk, before.encode_batch(chunk, add_special_tokens=False),
                              after.encode_batch(chunk, add_special_tokens=False)):
            if a.ids != [keep[i] for i in b.ids]:
                raise TrimError(f"the trimmed tokenizer segments {text[:80]!r} differently ({a.tokens[:8]} vs "
                                f"{b.tokens[:8]}); nothing was written")


def _copy_tokenizer_config(model_dir: str, out_dir: str, keep: list[int]) -> None:
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    new_id = {old: new for new, old in enumerate(keep)}
    if "added_tokens_decoder" in cfg:
        cfg["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
