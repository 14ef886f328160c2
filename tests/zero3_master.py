"""Launched by tests: ZeRO-3 engines with and without ``share_zero3_master_weights``, on the same batches.

    deepspeed --num_gpus 2 tests/zero3_master.py OUT.json DS_CONFIG

Each engine (the tiny built-in model, fp32, dropout off) trains a few steps; rank 0 writes, per
engine, the bytes spared, whether every master partition shares its parameter partition's memory,
the losses and the final weights' distance from the start and from the other engine's.
"""

import json
import sys

import torch
import torch.distributed as dist

LABELS = ("entailment", "neutral", "contradiction")
VOCAB, STEPS, BATCH, LENGTH = 300, 4, 4, 16


class _Tokenizer:
    """What ``build_model`` reads from a tokenizer for a built-in config."""

    pad_token_id, bos_token_id, eos_token_id = 1, 0, 2

    def __len__(self) -> int:
        return VOCAB


def _weights(engine) -> torch.Tensor:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().flatten().cpu().clone() for p in params])


def train(ds_path: str, share: bool) -> dict:
    import deepspeed

    from dist_robust.config import RunConfig
    from dist_robust.ds_config import load_ds_config, resolve_ds_config
    from dist_robust.models import build_model, forget_zero3_module, share_zero3_master_weights, zero3_context

    cfg = RunConfig(ds_config=load_ds_config(ds_path))
    cfg.train.micro_batch_size, cfg.train.lr, cfg.train.max_steps = BATCH, 1e-3, STEPS
    ds = resolve_ds_config(cfg, dist.get_world_size())
    ds.pop("scheduler", None)  # a constant learning rate
    zero3 = zero3_context(ds)
    model = build_model("tiny", LABELS, _Tokenizer(), dropout=0.0, seed=0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    spared = share_zero3_master_weights(engine) if share else 0
    opt = engine.optimizer
    shared = all(m.data_ptr() == p.data_ptr()
                 for p, m in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat))
    start = _weights(engine)
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(5, VOCAB, (BATCH, LENGTH), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "labels": torch.randint(0, len(LABELS), (BATCH,), generator=g)}
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    end = _weights(engine)
    engine.destroy()
    forget_zero3_module(engine.module)
    zero3.close()
    return {"spared": spared, "shared": shared, "losses": losses, "moved": (end - start).abs().max().item(),
            "weights": end}


def main(out: str, ds_path: str) -> None:
    import deepspeed

    from dist_robust.distributed import releasing_shm_files

    with releasing_shm_files():  # DeepSpeed's CPU all-reduce buffers, as the trainer releases them
        deepspeed.init_distributed()
    torch.set_num_threads(1)
    runs = {"copy": train(ds_path, share=False), "shared": train(ds_path, share=True)}
    gap = (runs["copy"].pop("weights") - runs["shared"].pop("weights")).abs().max().item()
    if dist.get_rank() == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({**runs, "weight_gap": gap}, f)
    dist.barrier()


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
