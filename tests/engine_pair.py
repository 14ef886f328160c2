"""Launched by tests: a DeepSpeed engine trained as DeepSpeed builds it and with one of the trainer's adjustments.

    deepspeed --num_gpus 2 tests/engine_pair.py OUT.json DS_CONFIG ADJUSTMENT

``ADJUSTMENT`` names a function of :mod:`dist_robust.infra.zero` that the trainer applies to its engine
after ``deepspeed.initialize`` (``share_zero3_master_weights``, ``chunked_zero_grad_norm``). Each
engine (the tiny built-in model, fp32, dropout off, gradients clipped to norm 0.25) trains a few
steps on the same batches; rank 0 writes, per engine, what the adjustment returned, whether every
ZeRO-3 master partition shares its parameter partition's memory, the losses, the gradient norms
before clipping, and the final weights' distance from the start and from the other engine's.
"""

import json
import sys

import torch
import torch.distributed as dist

LABELS = ("entailment", "neutral", "contradiction")
VOCAB, STEPS, BATCH, LENGTH, CLIP = 300, 4, 4, 16, 0.25


class _Tokenizer:
    """What ``build_model`` reads from a tokenizer for a built-in config."""

    pad_token_id, bos_token_id, eos_token_id = 1, 0, 2

    def __len__(self) -> int:
        return VOCAB


def _weights(engine) -> torch.Tensor:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return torch.cat([p.detach().flatten().cpu().clone() for p in params])


def _shares_master(engine) -> bool:
    opt = engine.optimizer
    pairs = list(zip(getattr(opt, "fp16_partitioned_groups_flat", []), getattr(opt, "fp32_partitioned_groups_flat", [])))
    return bool(pairs) and all(m.data_ptr() == p.data_ptr() for p, m in pairs)


def train(ds_path: str, adjustment: str | None) -> dict:
    import deepspeed

    from dist_robust.model import build as models
    from dist_robust.infra import zero
    from dist_robust.config.run_config import RunConfig
    from dist_robust.config.ds_config import load_ds_config, resolve_ds_config

    cfg = RunConfig(ds_config=load_ds_config(ds_path))
    cfg.train.micro_batch_size, cfg.train.lr, cfg.train.max_steps = BATCH, 1e-3, STEPS
    ds = resolve_ds_config(cfg, dist.get_world_size())
    ds.pop("scheduler", None)  # a constant learning rate
    ds["gradient_clipping"] = CLIP  # below every step's gradient norm here, so each update depends on it
    zero3 = zero.zero3_context(ds)
    model = models.build_model("tiny", LABELS, _Tokenizer(), dropout=0.0, seed=0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    returned = getattr(zero, adjustment)(engine) if adjustment else None
    start = _weights(engine)
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    losses, norms = [], []
    for _ in range(STEPS):
        ids = torch.randint(5, VOCAB, (BATCH, LENGTH), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "labels": torch.randint(0, len(LABELS), (BATCH,), generator=g)}
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
    end = _weights(engine)
    out = {"returned": returned, "shares_master": _shares_master(engine), "losses": losses, "norms": norms,
           "moved": (end - start).abs().max().item(), "weights": end}
    engine.destroy()
    zero.forget_zero3_module(engine.module)
    zero3.close()
    return out


def main(out: str, ds_path: str, adjustment: str) -> None:
    import deepspeed

    from dist_robust.infra.distributed import end_process_group, releasing_shm_files

    with releasing_shm_files():  # DeepSpeed's CPU all-reduce buffers, as the trainer releases them
        deepspeed.init_distributed()
    torch.set_num_threads(1)
    runs = {"deepspeed": train(ds_path, None), "adjusted": train(ds_path, adjustment)}
    gap = (runs["deepspeed"].pop("weights") - runs["adjusted"].pop("weights")).abs().max().item()
    if dist.get_rank() == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({**runs, "weight_gap": gap}, f)
    end_process_group()  # as the trainer's commands do: left to interpreter exit, a rank can abort


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
