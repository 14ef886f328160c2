"""How far each language's sentences lie from their English translations, layer by layer.

The method's premise is that languages' representations are misaligned and that the zero-shot gap
follows from it. On a parallel evaluation set (XNLI dev is 15-way parallel by row: row i of every
language is the translation of English row i), every sentence is encoded and mean-pooled over its
real tokens (special tokens left out) at the word-embedding output and after every layer; then,
per language against English and per layer:

- ``relative_distance``: mean over sentences of ||v_L - v_en|| / ||v_en||;
- ``cosine``: mean cosine between a sentence's vector and its translation's;
- ``retrieval``: top-1 accuracy of finding each sentence's translation among the N English
  sentences by cosine (chance 1/N).

The sentences are the hypotheses (``sentence2``: unique per row) of ``--max-sentences`` evenly
spaced rows. Results go to a JSON file, the console, and MLflow (``align.<lang>.<measure>.<layer>``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

MEASURES = ("relative_distance", "cosine", "retrieval")


def parallel_sentences(task: str, data_dir: str | None, languages: list[str], max_sentences: int,
                       source: str = "en") -> dict[str, list[str]]:
    """``max_sentences`` evenly spaced rows of every language's dev set, the same rows in each (by id)."""
    from dist_robust.config.run_config import DataConfig
    from dist_robust.data.tasks import get_task
    from dist_robust.run.evaluate import generalized_sets, spaced_subset

    langs = [source, *(lang for lang in languages if lang != source)]
    data = get_task(DataConfig(task=task, data_dir=data_dir, languages=langs, source_language=source), train=False)
    generalized_sets(data.dev)  # the sets must be parallel: raises ParallelIdError naming the languages otherwise
    ids = [e.id for e in spaced_subset(data.dev[source], max_sentences)]
    by_id = {lang: {e.id: e.sentence2 for e in rows} for lang, rows in data.dev.items()}
    return {lang: [by_id[lang][i] for i in ids] for lang in langs}


@torch.no_grad()
def sentence_vectors(model, tokenizer, sentences: list[str], batch_size: int = 64,
                     max_length: int = 128) -> torch.Tensor:
    """(layers, N, H) mean-pooled vectors: the word-embedding output, then every layer's output."""
    embeddings = model.get_input_embeddings()
    captured: list[torch.Tensor] = []
    handle = embeddings.register_forward_hook(lambda module, args, out: captured.append(out))
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))  # little padding per batch
    pooled: list[torch.Tensor | None] = [None] * len(sentences)
    device = next(model.parameters()).device
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt", return_special_tokens_mask=True)
            keep = (batch.pop("special_tokens_mask") == 0) & (batch["attention_mask"] == 1)  # (B, T)
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                         "token_type_ids")}
            captured.clear()
            out = model(**batch, output_hidden_states=True)
            layers = [captured[0], *out.hidden_states[1:]]  # word embeddings, then each layer: (B, T, H)
            mask = keep.to(device).unsqueeze(-1).float()
            stacked = torch.stack([(h.float() * mask).sum(1) / mask.sum(1).clamp(min=1) for h in layers])
            for k, i in enumerate(idx):
                pooled[i] = stacked[:, k].cpu()  # (layers, H)
    finally:
        handle.remove()
    return torch.stack(pooled, dim=1)  # (layers, N, H)


def measure(english: torch.Tensor, other: torch.Tensor) -> dict[str, list[float]]:
    """Per layer: mean relative distance, mean cosine and top-1 retrieval of ``other`` against ``english``
    (both (layers, N, H), row i of each a translation pair)."""
    rel = ((other - english).norm(dim=-1) / english.norm(dim=-1).clamp(min=1e-12)).mean(dim=1)
    a = torch.nn.functional.normalize(other, dim=-1)
    b = torch.nn.functional.normalize(english, dim=-1)
    cos = (a * b).sum(-1).mean(dim=1)
    sims = a @ b.transpose(1, 2)  # (layers, N, N): other i against english j
    hits = (sims.argmax(dim=-1) == torch.arange(english.shape[1])).float().mean(dim=1)
    return {"relative_distance": rel.tolist(), "cosine": cos.tolist(), "retrieval": hits.tolist()}


def align_report(model_name: str, task: str, data_dir: str | None, languages: list[str],
                 max_sentences: int = 1000, batch_size: int = 64, max_length: int = 128) -> dict[str, Any]:
    """The whole measurement for one model (a folder or hub name)."""
    from transformers import AutoModel, AutoTokenizer

    sentences = parallel_sentences(task, data_dir, languages, max_sentences)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModel.from_pretrained(model_name).eval()
    vectors = {lang: sentence_vectors(model, tokenizer, rows, batch_size, max_length)
               for lang, rows in sentences.items()}
    english = vectors.pop("en")
    layers = ["embeddings"] + [f"layer{i}" for i in range(1, english.shape[0])]
    return {"model": model_name, "task": task, "sentences": english.shape[1], "layers": layers,
            "languages": {lang: measure(english, v) for lang, v in vectors.items()}}


def format_report(report: dict) -> str:
    """A table per measure: languages x (word embeddings, middle layer, last layer)."""
    layers = report["layers"]
    picks = [0, len(layers) // 2, len(layers) - 1]
    lines = [f"{report['model']}: {report['task']} dev, {report['sentences']} parallel sentences per language "
             f"against English (retrieval chance {100 / report['sentences']:.2f}%)"]
    for name, scale in (("relative_distance", 1), ("cosine", 1), ("retrieval", 100)):
        lines.append(f"\n{name + (' (%)' if scale == 100 else ''):<22}" + "".join(f"{layers[k]:>12}" for k in picks))
        for lang, values in report["languages"].items():
            lines.append(f"  {lang:<20}" + "".join(f"{scale * values[name][k]:12.3f}" for k in picks))
    return "\n".join(lines)


def metrics_of(report: dict) -> dict[str, float]:
    """MLflow metrics: ``align.<lang>.<measure>.<layer>`` and, per measure, the mean over languages."""
    out = {}
    for lang, values in report["languages"].items():
        for name in MEASURES:
            for layer, value in zip(report["layers"], values[name]):
                out[f"align.{lang}.{name}.{layer}"] = value
    for name in MEASURES:
        for k, layer in enumerate(report["layers"]):
            out[f"align.mean.{name}.{layer}"] = sum(v[name][k] for v in report["languages"].values()) / \
                max(len(report["languages"]), 1)
    return out


def gap_slope(per_language: dict[str, float], misalignment: dict[str, float], source: str = "en") -> dict:
    """How a run's zero-shot gap (source accuracy minus the language's, in points) grows with misalignment:
    the least-squares slope over the target languages and Spearman's rank correlation."""
    from scipy import stats

    langs = [lang for lang in misalignment if lang != source and lang in per_language]
    x = [misalignment[lang] for lang in langs]
    gaps = [100 * (per_language[source] - per_language[lang]) for lang in langs]
    fit = stats.linregress(x, gaps)
    rho = stats.spearmanr(x, gaps).statistic
    return {"slope": float(fit.slope), "intercept": float(fit.intercept), "spearman": float(rho),
            "languages": langs, "gaps": gaps, "misalignment": x}


def slopes_by_objective(runs: dict[str, dict[int, dict[str, float]]], misalignment: dict[str, float],
                        baseline: str = "erm") -> dict[str, dict]:
    """``runs``: objective -> seed -> per-language accuracy. Per objective: the slope and Spearman's rho over
    seeds (mean, 95% interval), and the slope's paired difference from ``baseline`` on the shared seeds."""
    from dist_robust.analysis.paired import paired

    out: dict[str, dict] = {}
    fits = {obj: {seed: gap_slope(acc, misalignment) for seed, acc in seeds.items()} for obj, seeds in runs.items()}
    for obj, by_seed in fits.items():
        entry = {"seeds": sorted(by_seed), "slope": vars(paired([f["slope"] for f in by_seed.values()])),
                 "spearman": vars(paired([f["spearman"] for f in by_seed.values()]))}
        if obj != baseline and baseline in fits:
            shared = sorted(set(by_seed) & set(fits[baseline]))
            if shared:
                entry["slope_vs_" + baseline] = vars(paired([by_seed[s]["slope"] - fits[baseline][s]["slope"]
                                                             for s in shared]))
        out[obj] = entry
    return out
