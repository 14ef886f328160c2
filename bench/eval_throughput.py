"""Evaluation pairs/s: dist-robust's evaluation against a plain ``torch.inference_mode()`` loop.

    python bench/eval_throughput.py [--model PATH_OR_BUILTIN] [--data-dir DIR] [--task xnli|pawsx]
                                    [--languages en de] [--max-pairs 1000] [--rounds 3]

The same model and the same pairs (real dev sets: the diagonal and off-diagonal cells of the
generalized matrix over ``--languages``, at most ``--max-pairs`` per cell, evenly spaced), one
process. ``ours`` is ``dist_robust.run.evaluate.accuracy`` on a DeepSpeed engine (ZeRO-2, the
trainer's collator and batching); ``plain`` sorts the same encoded pairs by length, pads each
batch to its longest row and runs the Hugging Face model under ``torch.inference_mode()``.
The two take turns for ``--rounds``; both must count the same correct pairs. The report is
pairs/s, the ratio, and what the full generalized matrix of the dev sets of PAWS-X (7 x 7) and
XNLI (15 x 15) would take at the measured rate (extrapolated, not run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.vs_hf import _env, _tokenizer, default_model  # noqa: E402

# Distinct pairs of the full generalized matrix on dev (the diagonal is the per-language sets).
FULL = {"pawsx 7x7": 7 * 7 * 2000, "xnli 15x15": 15 * 15 * 2490}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data"))
    p.add_argument("--task", default="xnli", choices=("xnli", "pawsx"))
    p.add_argument("--languages", nargs="+", default=["en", "de"])
    p.add_argument("--max-pairs", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    args = p.parse_args()
    args.model = args.model or default_model()
    _env()
    import deepspeed
    import torch

    from dist_robust.run import evaluate as E
    from dist_robust.config.run_config import DataConfig, RunConfig
    from dist_robust.data.pipeline import Collator
    from dist_robust.data.tasks import get_task
    from dist_robust.infra.distributed import releasing_shm_files
    from dist_robust.config.ds_config import default_ds_config, resolve_ds_config
    from dist_robust.model.build import build_model, load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    with releasing_shm_files():
        deepspeed.init_distributed()
    train = {"xnli": "xnli/en/test.tsv", "pawsx": "paws_wiki_en/test.tsv"}[args.task]  # read, not used
    data = get_task(DataConfig(task=args.task, data_dir=args.data_dir, languages=args.languages,
                               train_file=os.path.join(args.data_dir, train), max_train_examples=8))
    sets = {("gen", a, b): E.spaced_subset(rows, args.max_pairs)
            for (a, b), rows in E.generalized_sets(data.dev).items()}
    tokenizer = load_tokenizer(_tokenizer(args.model))  # a built-in config's: a small one trained here
    groups = E.prepare(sets, tokenizer, args.length)
    collator = Collator(tokenizer)
    cfg = RunConfig()
    cfg.ds_config = default_ds_config()
    cfg.train.micro_batch_size = args.batch
    model = build_model(args.model, data.label_names, tokenizer, seed=0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=resolve_ds_config(cfg, 1))
    n = len(groups.data)

    def ours() -> float:
        correct, _ = E.count_correct(engine, groups, collator, args.batch, engine.device)
        return float(correct.sum())

    def plain() -> float:
        net = engine.module.eval()
        order = sorted(range(n), key=lambda i: len(groups.data.input_ids[i]))
        hits = 0
        with torch.inference_mode():
            for start in range(0, n, args.batch):
                idx = order[start:start + args.batch]
                enc = tokenizer.pad({"input_ids": [groups.data.input_ids[i] for i in idx],
                                     **({"token_type_ids": [groups.data.token_type_ids[i] for i in idx]}
                                        if groups.data.token_type_ids is not None else {})},
                                    return_tensors="pt")
                pred = net(**enc).logits.argmax(-1)
                hits += int((pred == torch.tensor([groups.data.labels[i] for i in idx])).sum())
        return float(hits)

    times: dict[str, list[float]] = {"ours": [], "plain": []}
    counts: dict[str, float] = {}
    for r in range(args.rounds):
        for name, fn in (("ours", ours), ("plain", plain)):
            start = time.perf_counter()
            counts[name] = fn()
            times[name].append(time.perf_counter() - start)
            print(f"round {r + 1}/{args.rounds} {name:<6} {n / times[name][-1]:7.1f} pairs/s", flush=True)
    if counts["ours"] != counts["plain"]:
        sys.exit(f"the two evaluations disagree: {counts['ours']:.0f} vs {counts['plain']:.0f} correct pairs")
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    mean_len = sum(len(r) for r in groups.data.input_ids) / n
    print(f"\nmodel {args.model}, {args.task} dev, {len(sets)} cells of {' '.join(args.languages)}, {n} pairs "
          f"(mean {mean_len:.1f} tokens), batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds; both counted {counts['ours']:.0f} correct")
    print(f"{'':<8} {'pairs/s':>8} {'x plain':>8}")
    for k in ("ours", "plain"):
        print(f"{k:<8} {rate[k]:8.1f} {rate[k] / rate['plain']:8.2f}")
    for name, pairs in FULL.items():
        print(f"full generalized matrix, {name} dev: {pairs} pairs, about {pairs / rate['ours'] / 60:.0f} min "
              f"at this rate (extrapolated)")


if __name__ == "__main__":
    main()
    from dist_robust.infra.distributed import end_process_group

    end_process_group()  # as the trainer's commands do: left to interpreter exit, a rank can abort
