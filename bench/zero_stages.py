"""What each ZeRO stage costs per optimizer step, and what it saves per rank, on the same batches.

    deepspeed --num_gpus 2 bench/zero_stages.py [--model tiny|xlmr-base-random] [--objective pgd]
        [--ds-configs ds_configs/zero0.json ...] [--rounds 5] [--steps 10]

One launch, one DeepSpeed engine per ds_config in the same ranks, all trained on the same
batches with the same objective. The engines take turns in rounds so machine noise hits them
alike; the report is rank 0's median seconds per step, its ratio to the first ds_config, and
what each rank holds: parameter elements (ZeRO-3 partitions them) and optimizer-state elements
(Adam moments plus fp32 master copies, partitioned from ZeRO-1 on; in fp32 a ZeRO-3 rank's
parameter partition is its master copy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

LABELS = ("a", "b", "c")  # the synthetic task's three classes

REPO = Path(__file__).resolve().parent.parent
STAGES = [str(REPO / "ds_configs" / f"zero{stage}.json") for stage in range(4)]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--objective", default="pgd", choices=("erm", "pgd", "freelb", "gaussian"))
    parser.add_argument("--ds-configs", nargs="+", default=STAGES)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="micro-batch per rank")
    return parser.parse_args([a for a in argv if not a.startswith("--local_rank")])


def _shared_tokenizer(corpus):
    """Rank 0 trains the tokenizer into a directory every rank then loads."""
    import torch.distributed as dist

    from dist_robust.model.build import load_tokenizer, train_tokenizer

    where = [tempfile.mkdtemp(prefix="bench-tokenizer-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(where, src=0)
    if dist.get_rank() == 0:
        train_tokenizer(corpus, 4000, where[0])
    dist.barrier()
    return load_tokenizer(where[0])


def _engine(ds_path: str, args: argparse.Namespace, tokenizer, world: int):
    """(engine, zero3 handle): the handle keeps a ZeRO-3 model's construction context alive."""
    import deepspeed

    from dist_robust.config.run_config import ObjectiveConfig, RunConfig
    from dist_robust.config.ds_config import embedding_blocks, load_ds_config, resolve_ds_config
    from dist_robust.model.build import build_model, split_word_embeddings
    from dist_robust.infra.zero import chunked_zero_grad_norm, share_zero3_master_weights, zero3_context

    cfg = RunConfig(ds_config=load_ds_config(ds_path))
    cfg.objective = ObjectiveConfig(name=args.objective)
    cfg.train.micro_batch_size, cfg.model.name = args.batch, args.model
    ds = resolve_ds_config(cfg, world)
    handle = zero3_context(ds)
    model = build_model(args.model, LABELS, tokenizer, seed=0)
    split_word_embeddings(model, embedding_blocks(cfg, ds, frozen=False), ds)  # as the trainer does (all train)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    share_zero3_master_weights(engine)  # as the trainer does
    chunked_zero_grad_norm(engine)
    return engine, handle


def _held_per_rank(engine) -> tuple[int, int]:
    """(parameter elements, optimizer-state elements) this rank keeps in memory."""
    params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in engine.module.parameters())
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    moments = sum(t.numel() for state in inner.state.values() for t in state.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    # fp32 master copies: ZeRO-1/2 keep one flat partition per group (ZeRO-0 steps the params), and so
    # does ZeRO-3 unless the parameter partition itself serves (fp32: zero.share_zero3_master_weights)
    flat = (getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
            or getattr(engine.optimizer, "single_partition_of_fp32_groups", None) or [])
    own = getattr(engine.optimizer, "fp16_partitioned_groups_flat", None) or []
    shared = {t.data_ptr() for t in own if torch.is_tensor(t)}
    return params, moments + sum(t.numel() for t in flat if t.data_ptr() not in shared)


def main(argv: list[str]) -> None:
    args = _parse(argv)
    import deepspeed
    import torch.distributed as dist

    from dist_robust.infra import distributed as D
    from dist_robust.config.run_config import DataConfig, ObjectiveConfig
    from dist_robust.data.pipeline import Collator, encode, to_device, train_batch_indices
    from dist_robust.data.tasks import get_task
    from dist_robust.model.build import word_embeddings
    from dist_robust.objectives import EmbeddingPerturbation, StepContext, build_objective

    with D.releasing_shm_files():
        deepspeed.init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    data = get_task(DataConfig(synthetic_train_size=2000, synthetic_eval_size=8))
    tokenizer = _shared_tokenizer(data.tokenizer_corpus())
    train = encode(data.train, tokenizer, 128)
    collate = Collator(tokenizer)
    objective = build_objective(ObjectiveConfig(name=args.objective))
    runs = {Path(p).stem: _engine(p, args, tokenizer, world) for p in args.ds_configs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    batch_no = 0
    perturbations = {name: EmbeddingPerturbation(word_embeddings(engine.module)) for name, (engine, _) in runs.items()}
    for _ in range(args.rounds):
        for name, (engine, _) in runs.items():
            perturbation = perturbations[name]
            hidden = engine.module.config.hidden_size
            dist.barrier()
            start = time.perf_counter()
            for i in range(args.steps):
                batch = to_device(collate(train, train_batch_indices(len(train), args.batch, world, rank, 0, batch_no + i)),
                                  engine.device)
                objective.train_step(engine, batch, StepContext(perturbation, hidden,
                                                                torch.Generator().manual_seed(i)))
            times[name].append((time.perf_counter() - start) / args.steps)
        batch_no += args.steps
    held = {name: _held_per_rank(engine) for name, (engine, _) in runs.items()}
    if not D.is_main():
        return
    base = statistics.median(next(iter(times.values())))
    first = next(iter(runs))
    print(f"\nmodel {args.model}, objective {args.objective}, {world} ranks x micro-batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps, {torch.get_num_threads()} threads per rank")
    print(f"{'ds_config':<16} {'s/step':>8} {'x ' + first:>9} {'params/rank':>12} {'optim/rank':>12}")
    for name, t in times.items():
        med = statistics.median(t)
        params, optim = held[name]
        print(f"{name:<16} {med:8.4f} {med / base:9.2f} {params / 1e6:11.2f}M {optim / 1e6:11.2f}M")


if __name__ == "__main__":
    main(sys.argv[1:])
    from dist_robust.infra.distributed import end_process_group

    end_process_group()  # as the trainer's commands do: left to interpreter exit, a rank can abort
