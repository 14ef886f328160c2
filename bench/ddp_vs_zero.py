"""DeepSpeed ZeRO against plain PyTorch DDP: seconds per step and peak memory per rank, same model and batches.

    python bench/ddp_vs_zero.py [--model xlmr-large-random] [--length 32] [--batch 2] [--steps 4]
        [--approaches ddp ds_configs/zero2.json ds_configs/zero3.json] [--nproc 2] [--repeat 1]

Each approach is its own ``torchrun --nproc_per_node N`` launch (so each peak is its own), one
after another, ERM in fp32 with torch AdamW (lr 1e-5, weight decay 0.01) and gradient clipping 1.0:

* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` on gloo (``gradient_as_bucket_view=True``,
  the memory-saving setting), the model built whole on every rank, torch AdamW as constructed by
  default (what a plain script writes); ``ddp-fused``: the same with ``fused=True``, the kernel
  the shipped ds_configs select;
* a ds_config: a DeepSpeed engine built the way the trainer builds it (ZeRO-3 models are created
  already partitioned, and in fp32 their parameter partitions serve as the master weights; at
  ZeRO-1/2 on a CPU host the gradient norm is taken in chunks of float32, not float64 copies),
  ``engine.backward`` / ``engine.step``, with the word embedding in 8 row blocks where the trainer
  splits it (a ZeRO-3 config that releases layers after use, as ``zero3.json``);
  ``CONFIG+as-deepspeed``: the same engine as DeepSpeed alone builds it (its second fp32 copy at
  ZeRO-3, its float64 gradient norm at ZeRO-1/2, one embedding matrix); ``CONFIG+one-matrix``: the
  trainer's engine with ``--embedding-blocks 1``.

Dropout is off, so every approach computes the same losses (printed: the largest gap to the
first) and gradient norms before clipping (printed: the largest relative gap to the first; DDP's
come from ``clip_grad_norm_``, torch's own float32 norm). Every rank trains on its own micro-batches of exactly ``--length`` random token ids (the same
ids for every approach), one thread per core share. Reported by rank 0: the median seconds per
step after the first (and its forward, backward and optimizer-step parts, as rank 0 saw them), the peak resident memory (``ru_maxrss``, the largest over ranks; also as
it stood once the model and engine were built), their ratios to the first approach, rank 0's
resident memory between steps and at the end of the forward pass (medians after the first step),
and the model-state bound
16 x parameters / ranks that ZeRO-3's partitioning aims at (fp32 weights, gradients, Adam's two
moments). Run it with nothing else on the machine: at XLM-R-large size a launch peaks near 22 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LABELS = ("entailment", "neutral", "contradiction")
DEFAULT = ["ddp", "ds_configs/zero2.json", "ds_configs/zero3.json"]
DDP = {"ddp": False, "ddp-fused": True}  # plain DDP, with torch AdamW's default or its fused kernel
AS_DEEPSPEED = "as-deepspeed"  # CONFIG+as-deepspeed: without the trainer's adjustments to DeepSpeed's engine
ONE_MATRIX = "one-matrix"  # CONFIG+one-matrix: the trainer's engine with the word embedding not in blocks


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="xlmr-large-random")
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--batch", type=int, default=2, help="micro-batch per rank")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps; the first is not timed")
    p.add_argument("--approaches", nargs="+", default=DEFAULT)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1,
                   help="launch the list of approaches this many times in turn, and summarise each approach over "
                        "its launches (one launch's step time can be 25%% off the next one's on a shared machine)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # inside a launch: the approach to run
    return p.parse_args(argv)


def _batches(args, vocab: int, rank: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(args.steps):
        ids = torch.randint(5, vocab, (args.batch, args.length), generator=g)
        ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, len(LABELS), (args.batch,), generator=g)})
    return out


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from dist_robust.infra import distributed as D
    from dist_robust.model.build import BUILTIN_CONFIGS, build_model

    with D.releasing_shm_files():
        if args.worker in DDP:
            dist.init_process_group("gloo")
        else:
            import deepspeed

            deepspeed.init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    vocab = BUILTIN_CONFIGS[args.model]["vocab_size"] or 8000  # (a tokenizer-sized vocabulary: tiny)
    tokenizer = _Tok(vocab)
    start, keep_alive, after_forward, norms = time.perf_counter(), [], [], []
    if args.worker in DDP:
        model = build_model(args.model, LABELS, tokenizer, dropout=0.0, seed=0)
        model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, fused=DDP[args.worker])

        def step(batch, phases):
            loss = ddp(**batch).loss
            phases.append(time.perf_counter())
            after_forward.append(_resident())
            loss.backward()
            phases.append(time.perf_counter())
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
        params = sum(p.numel() for p in model.parameters())
    else:
        import deepspeed

        from dist_robust.config.run_config import RunConfig
        from dist_robust.config.ds_config import embedding_blocks, load_ds_config, resolve_ds_config
        from dist_robust.model.build import split_word_embeddings
        from dist_robust.infra.zero import chunked_zero_grad_norm, share_zero3_master_weights, zero3_context

        path, _, suffix = args.worker.partition("+")
        if suffix not in ("", AS_DEEPSPEED, ONE_MATRIX):
            sys.exit(f"approach {args.worker}: the suffixes are +{AS_DEEPSPEED} and +{ONE_MATRIX}")
        as_deepspeed = suffix == AS_DEEPSPEED
        cfg = RunConfig(ds_config=load_ds_config(str(REPO / path)))
        cfg.train.micro_batch_size, cfg.model.name, cfg.train.lr = args.batch, args.model, 1e-5
        cfg.train.max_steps = args.steps
        ds = resolve_ds_config(cfg, world)
        ds.pop("scheduler", None)  # a constant learning rate, as in the DDP loop, so the losses can be compared
        D.settle_zero3_host_memory(ds)  # as the trainer does
        keep_alive.append(zero3_context(ds))  # while the engine exists (ZeRO-3)
        model = build_model(args.model, LABELS, tokenizer, dropout=0.0, seed=0)
        if suffix == ONE_MATRIX:
            cfg.model.embedding_blocks = 1
        if not as_deepspeed:  # as the trainer splits it (every parameter trains here)
            blocks = split_word_embeddings(model, embedding_blocks(cfg, ds, frozen=False), ds)
            print(f"rank {rank}: word embedding in {blocks} block(s)", file=sys.stderr, flush=True)
        params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        if not as_deepspeed:  # the project's adjustments, as the trainer makes them
            share_zero3_master_weights(engine)
            chunked_zero_grad_norm(engine)
        engine.train()

        def step(batch, phases):
            loss = engine(**batch).loss
            phases.append(time.perf_counter())
            after_forward.append(_resident())
            engine.backward(loss)
            phases.append(time.perf_counter())
            engine.step()
            norms.append(float(engine.get_global_grad_norm()))
            return loss
    built = time.perf_counter() - start
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    print(f"rank {rank}: {args.worker} built in {built:.0f} s, peak RSS so far {build_peak / 2 ** 30:.2f} GiB",
          file=sys.stderr, flush=True)
    times, losses, split, resting = [], [], [], []
    for batch in _batches(args, vocab, rank):
        dist.barrier()
        phases = [time.perf_counter()]
        losses.append(step(batch, phases).item())
        phases.append(time.perf_counter())
        times.append(phases[-1] - phases[0])
        resting.append(_resident())
        print(f"rank {rank}: step {len(times)} {times[-1]:.1f} s, peak RSS so far "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB", file=sys.stderr, flush=True)
        split.append([b - a for a, b in zip(phases, phases[1:])])  # forward, backward, optimizer step
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, build_peak])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        print("RESULT " + json.dumps({"approach": args.worker, "times": times, "peak_bytes": peak[0].item(),
                                      "build_peak_bytes": peak[1].item(),
                                      "params": params, "world": world, "build_s": built,
                                      "losses": losses, "norms": norms, "phases": split, "after_forward": after_forward,
                                      "resting": resting}), flush=True)
    D.end_process_group()  # as the trainer's commands do: left to interpreter exit, a rank can abort


def _resident() -> float:
    """This process's resident memory now, in bytes (0 without /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0.0


class _Tok:
    """What ``build_model`` reads from a tokenizer for a built-in config: special ids and the length."""

    pad_token_id, bos_token_id, eos_token_id = 1, 0, 2

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def driver(args: argparse.Namespace) -> None:
    from dist_robust.infra.distributed import free_port

    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MALLOC_ARENA_MAX": "2"}
    results = []
    for approach in [a for _ in range(args.repeat) for a in args.approaches]:
        flags = [f"--{k}={v}" for k, v in (("model", args.model), ("length", args.length), ("batch", args.batch),
                                            ("steps", args.steps))]
        cmd = [exe, "--nproc_per_node", str(args.nproc), "--master_port", str(free_port()), __file__, *flags,
               "--worker", approach]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{approach} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        result["wall_s"] = time.perf_counter() - t0
        results.append(result)
        print(f"{approach}: {json.dumps(result)}", file=sys.stderr, flush=True)
    base = results[0]
    step0 = statistics.median(base["times"][1:])
    params, world = base["params"], base["world"]
    print(f"\n{args.model} ({params / 1e6:.1f}M parameters), {world} ranks x micro-batch {args.batch} x "
          f"{args.length} tokens, fp32, {args.steps} steps (the first not timed)")
    print(f"model-state bound 16 x params / ranks = {16 * params / world / 2 ** 30:.2f} GiB per rank\n")
    print(f"| approach | s/step | x {base['approach']} | forward / backward / step s | peak RSS/rank GiB | "
          f"x {base['approach']} | of which by the end of model and engine set-up | between steps GiB | "
          "at the end of the forward GiB | launch s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        med = statistics.median(r["times"][1:])
        phases = " / ".join(f"{statistics.median(p[i] for p in r['phases'][1:]):.2f}" for i in range(3))
        print(f"| {r['approach']} | {med:.2f} | {med / step0:.2f} | {phases} | {r['peak_bytes'] / 2 ** 30:.2f} | "
              f"{r['peak_bytes'] / base['peak_bytes']:.2f} | {r['build_peak_bytes'] / 2 ** 30:.2f} | "
              f"{statistics.median(r['resting'][1:]) / 2 ** 30:.2f} | "
              f"{statistics.median(r['after_forward'][1:]) / 2 ** 30:.2f} | {r['wall_s']:.0f} |")
    gap = max(abs(a - b) for r in results for a, b in zip(r["losses"], base["losses"]))
    norm_gap = max(abs(a - b) / b for r in results for a, b in zip(r["norms"], base["norms"]))
    print(f"\nrank 0's losses agree with {base['approach']}'s to {gap:.1e} (dropout off; same weights and batches), "
          f"the gradient norms to {norm_gap:.1e} of theirs")
    if args.repeat > 1:
        _summarise_rounds(results, len(args.approaches))


def _summarise_rounds(results: list[dict], per_round: int) -> None:
    """Each approach over its launches: the median s/step and, round by round, its ratio to the first approach."""
    rounds = [results[i:i + per_round] for i in range(0, len(results), per_round)]
    print(f"\nover {len(rounds)} rounds (each approach launched once per round, in the order given):\n")
    print(f"| approach | median s/step | x {rounds[0][0]['approach']} | per round x {rounds[0][0]['approach']} |")
    print("|---|---:|---:|---|")
    step = [[statistics.median(r["times"][1:]) for r in rnd] for rnd in rounds]
    base = statistics.median(s[0] for s in step)
    for j, r in enumerate(rounds[0]):
        med = statistics.median(s[j] for s in step)
        ratios = ", ".join(f"{s[j] / s[0]:.2f}" for s in step)
        print(f"| {r['approach']} | {med:.2f} | {med / base:.2f} | {ratios} |")


def main(argv: list[str]) -> None:
    args = _parse(argv)
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main(sys.argv[1:])
