"""Accuracy per language, the generalized language x language matrix, and their averages."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from dist_robust.infra import distributed as D
from dist_robust.data.examples import PairExample
from dist_robust.data.cache import encode_cached
from dist_robust.data.pipeline import Collator, Encoded, eval_shard, to_device
from dist_robust.objectives.base import model_inputs


class ParallelIdError(ValueError):
    """Two languages' evaluation sets are not parallel (ids differ)."""


def generalized_sets(per_language: dict[str, list[PairExample]]) -> dict[tuple[str, str], list[PairExample]]:
    """Mixed-language sets: sentence1 from language A, sentence2 from language B, same id.

    The label is language A's. Every pair of languages must hold the same ids; a mismatch
    is an error naming the languages and some of the ids, never a silent drop.
    """
    by_id = {lang: {e.id: e for e in rows} for lang, rows in per_language.items()}
    langs = list(per_language)
    reference = langs[0]
    for lang in langs[1:]:
        missing = set(by_id[reference]) ^ set(by_id[lang])
        if missing:
            sample = ", ".join(sorted(missing)[:5])
            raise ParallelIdError(f"evaluation sets of {reference!r} and {lang!r} are not parallel: "
                                  f"{len(missing)} id(s) in only one of them (e.g. {sample})")
    out = {}
    for a, b in itertools.product(langs, langs):
        out[(a, b)] = [PairExample(e.id, e.sentence1, by_id[b][e.id].sentence2, e.label, a, b)
                       for e in per_language[a]]
    return out


def spaced_subset(rows: list[PairExample], k: int | None) -> list[PairExample]:
    """``k`` rows evenly spaced over ``rows`` (all of them when ``k`` is None or not smaller).

    Even spacing rather than the first ``k``: evaluation files are often ordered by genre or
    source, so a prefix would be a biased sample.
    """
    n = len(rows)
    if k is None or k >= n:
        return list(rows)
    return [rows[(i * n) // k] for i in range(k)]


@dataclass
class EvalGroups:
    """Several evaluation sets flattened into one encoded list with a group index per row."""

    keys: list
    data: Encoded
    group: list[int]


def prepare(sets: dict, tokenizer, max_length: int, cache_dir: str | None = None) -> EvalGroups:
    keys = list(sets)
    rows: list[PairExample] = []
    group: list[int] = []
    for g, key in enumerate(keys):
        rows.extend(sets[key])
        group.extend([g] * len(sets[key]))
    return EvalGroups(keys, encode_cached(rows, tokenizer, max_length, cache_dir), group)


def accuracy(engine, groups: EvalGroups, collator: Collator, batch_size: int, progress=None) -> dict:
    """Accuracy of every group, computed on this rank's shard and summed over ranks.

    Every rank runs the same number of forward passes (shards are padded), which ZeRO-3's
    collective parameter gathering requires.
    """
    correct, total = count_correct(engine, groups, collator, batch_size, device_of(engine), progress)
    correct, total = D.all_reduce_sum(correct), D.all_reduce_sum(total)
    correct, total = correct.tolist(), total.tolist()  # the one host read of the evaluation
    return {key: correct[i] / total[i] if total[i] > 0 else float("nan") for i, key in enumerate(groups.keys)}


@torch.no_grad()
def count_correct(model, groups: EvalGroups, collator: Collator, batch_size: int, device: torch.device,
                  progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted correct, weighted total) per group on this rank's shard, as float64 tensors on ``device``.

    Nothing is read back to the host per batch: the counts stay on the device until the caller
    reduces them.
    """
    indices, weights = eval_shard(len(groups.data), D.world_size(), D.rank())
    # Sort this rank's rows by length so batches pad little.
    order = sorted(range(len(indices)), key=lambda k: len(groups.data.input_ids[indices[k]]))
    indices = [indices[k] for k in order]
    weights = [weights[k] for k in order]
    correct = torch.zeros(len(groups.keys), dtype=torch.float64, device=device)
    total = torch.zeros(len(groups.keys), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for start in range(0, len(indices), batch_size):
        idx, w = indices[start:start + batch_size], weights[start:start + batch_size]
        cpu = collator(groups.data, idx, w)
        cpu["group"] = torch.tensor([groups.group[i] for i in idx])  # host side, like the collator's; moved below
        batch = to_device(cpu, device)
        logits = model(**model_inputs(batch)).logits
        weight = batch["weight"].double()
        hit = (logits.argmax(-1) == batch["labels"]).double() * weight
        correct.index_add_(0, batch["group"], hit)
        total.index_add_(0, batch["group"], weight)
        if progress is not None:
            progress.update(1)
    if was_training:
        model.train()
    return correct, total


def device_of(engine) -> torch.device:
    device = getattr(engine, "device", None)
    return torch.device(device) if device is not None else next(engine.parameters()).device


def num_batches(groups: EvalGroups, batch_size: int) -> int:
    per_rank = -(-len(groups.data) // D.world_size())
    return -(-per_rank // batch_size)


def summarize(per_language: dict[str, float], generalized: dict[str, dict[str, float]] | None,
              source: str) -> dict[str, float]:
    """Averages reported everywhere.

    ``standard_avg``: mean accuracy over the target (non-source) languages, i.e. zero-shot
    transfer; ``all_avg``: over all languages; ``generalized_avg``: mean of the off-diagonal
    cells of the language x language matrix (the two sentences in different languages).
    """
    targets = [acc for lang, acc in per_language.items() if lang != source]
    out = {
        "source_acc": per_language.get(source, float("nan")),
        "standard_avg": sum(targets) / len(targets) if targets else float("nan"),
        "all_avg": sum(per_language.values()) / len(per_language),
    }
    if generalized:
        off = [acc for a, row in generalized.items() for b, acc in row.items() if a != b]
        out["generalized_avg"] = sum(off) / len(off) if off else float("nan")
    return out


def matrix_from_cells(cells: dict[tuple[str, str], float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for (a, b), acc in cells.items():
        out.setdefault(a, {})[b] = acc
    return out


def format_table(per_language: dict[str, float], summary: dict[str, float]) -> str:
    """A per-language accuracy table for the terminal."""
    langs = list(per_language)
    head = "  ".join(f"{lang:>6}" for lang in langs)
    row = "  ".join(f"{100 * per_language[lang]:6.2f}" for lang in langs)
    lines = [f"{'':<10}{head}", f"{'accuracy':<10}{row}"]
    lines.append("  ".join(f"{k} {100 * v:.2f}" for k, v in summary.items()))
    return "\n".join(lines)


def format_matrix(matrix: dict[str, dict[str, float]]) -> str:
    """The generalized matrix: rows are sentence1's language, columns sentence2's."""
    langs = list(matrix)
    lines = ["s1 \\ s2   " + "  ".join(f"{lang:>6}" for lang in langs)]
    for a in langs:
        lines.append(f"{a:<10}" + "  ".join(f"{100 * matrix[a][b]:6.2f}" for b in langs))
    return "\n".join(lines)


def matrix_csv(matrix: dict[str, dict[str, float]]) -> str:
    langs = list(matrix)
    lines = ["s1_lang," + ",".join(langs)]
    for a in langs:
        lines.append(a + "," + ",".join(f"{matrix[a][b]:.6f}" for b in langs))
    return "\n".join(lines) + "\n"
