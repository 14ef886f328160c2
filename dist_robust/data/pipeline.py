"""Tokenize pair examples, order training batches per rank, and collate with dynamic padding.

Training order is a pure function of (seed, global batch index, rank): resuming at batch
``b`` reproduces exactly the batches an uninterrupted run would have seen, with no sampler
state to save. Evaluation shards are padded to equal length on every rank (ZeRO-3 gathers
parameters collectively, so every rank must run the same number of forward passes); the
padding rows carry weight 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_robust.data.examples import PairExample


@dataclass
class Encoded:
    """Token ids of a list of examples, ready to be batched.

    ``token_type_ids`` is kept only for tokenizers that produce it (BERT-family pairs mark
    sentence B with type 1); XLM-R-family tokenizers do not.
    """

    input_ids: list[list[int]]
    labels: list[int]
    token_type_ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def encode(examples: list[PairExample], tokenizer, max_length: int) -> Encoded:
    """Tokenize pairs as the model family expects (``<s> A </s></s> B </s>`` for XLM-R)."""
    enc = tokenizer([e.sentence1 for e in examples], [e.sentence2 for e in examples],
                    truncation=True, max_length=max_length)
    types = enc.get("token_type_ids")
    return Encoded(list(enc["input_ids"]), [e.label for e in examples], list(types) if types is not None else None)


class Collator:
    """Pad a list of rows to the longest one; mark which tokens objectives may perturb."""

    def __init__(self, tokenizer):
        self.pad_id = tokenizer.pad_token_id
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def __call__(self, data: Encoded, indices: list[int], weights: list[float] | None = None) -> dict:
        rows = [data.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        attention = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
        # Real tokens only: never padding, never <s>/</s>/... (B, T)
        perturb = attention.bool() & ~torch.isin(ids, self.special_ids)
        batch = {
            "input_ids": ids,
            "attention_mask": attention,
            "labels": torch.tensor([data.labels[i] for i in indices], dtype=torch.long),
            "perturb_mask": perturb,
            "weight": torch.tensor(weights if weights is not None else [1.0] * len(rows)),
        }
        if data.token_type_ids is not None:
            types = torch.zeros((len(rows), width), dtype=torch.long)
            for i, k in enumerate(indices):
                types[i, : len(rows[i])] = torch.tensor(data.token_type_ids[k])
            batch["token_type_ids"] = types
        return batch


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of a collated batch on ``device`` (the engine's), copied once.

    CPU batches are pinned first on CUDA so the copy does not block the host.
    """
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def batches_per_epoch(n: int, micro_batch_size: int, world_size: int) -> int:
    per = n // (micro_batch_size * world_size)
    if per < 1:
        raise ValueError(f"{n} training examples cannot fill one batch of {micro_batch_size} x "
                         f"{world_size} ranks; lower --micro-batch-size or add data")
    return per


def micro_batch_number(n: int, micro_batch_size: int, world_size: int, rank: int, batch_index: int) -> int:
    """Which micro-batch of the run this rank's data batch ``batch_index`` is, counted across all
    ranks in the order the epochs' permutations are read: the same number on any number of ranks
    (while the layouts' epochs have the same length), and ``batch_index`` itself on one rank."""
    per_epoch = batches_per_epoch(n, micro_batch_size, world_size)
    epoch, j = divmod(batch_index, per_epoch)
    return (epoch * per_epoch + j) * world_size + rank


def continue_batch_index(n: int, micro_batch_size: int, old_world: int, new_world: int,
                         batch_index: int) -> tuple[int, int]:
    """The per-rank batch index on ``new_world`` ranks that continues where ``old_world`` ranks stopped.

    Returns (batch index, micro-batches seen again). Both layouts read the same permutation of
    each epoch, micro-batch after micro-batch across ranks, so the position carries over
    exactly when it is a whole number of new rows (the case whenever the global batch is kept
    and both layouts drop the same tail of an epoch); otherwise it is rounded back and that
    many micro-batches are read again.
    """
    epoch, j = divmod(batch_index, batches_per_epoch(n, micro_batch_size, old_world))
    slots, per_new = j * old_world, batches_per_epoch(n, micro_batch_size, new_world)
    if slots // new_world >= per_new:  # past what the new layout reads of this epoch: the next one
        return (epoch + 1) * per_new, 0
    return epoch * per_new + slots // new_world, slots % new_world


def train_batch_indices(n: int, micro_batch_size: int, world_size: int, rank: int, seed: int,
                        batch_index: int) -> list[int]:
    """Example indices of data batch ``batch_index`` (counted from 0 over the run) on ``rank``."""
    per_epoch = batches_per_epoch(n, micro_batch_size, world_size)
    epoch, j = divmod(batch_index, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    start = (j * world_size + rank) * micro_batch_size
    return perm[start: start + micro_batch_size].tolist()


def eval_shard(n: int, world_size: int, rank: int) -> tuple[list[int], list[float]]:
    """This rank's strided share of ``n`` rows, padded so every rank has the same count."""
    per_rank = -(-n // world_size)
    idx = [rank + k * world_size for k in range(per_rank)]
    return [i % n for i in idx], [1.0 if i < n else 0.0 for i in idx]
