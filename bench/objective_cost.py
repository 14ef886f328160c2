"""What a robust objective costs per optimizer step, relative to plain fine-tuning (ERM).

    python bench/objective_cost.py [--model tiny|xlmr-base-random] [--rounds 5] [--steps 10]

One process, one DeepSpeed engine (ZeRO-2, fp32) per objective, all on the same batches.
Objectives take turns in rounds so machine noise hits them alike; the report is the median
seconds per step and its ratio to ERM measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

LABELS = ("a", "b", "c")  # the synthetic task's three classes


def _engines(model_name: str, tokenizer, objectives: dict):
    import deepspeed

    from dist_robust.config import RunConfig
    from dist_robust.ds_config import default_ds_config, resolve_ds_config
    from dist_robust.models import build_model, word_embeddings
    from dist_robust.objectives import EmbeddingPerturbation, build_objective

    out = {}
    for name, obj_cfg in objectives.items():
        cfg = RunConfig()
        cfg.objective = obj_cfg
        cfg.ds_config = default_ds_config()
        ds = resolve_ds_config(cfg, 1)
        model = build_model(model_name, LABELS, tokenizer, seed=0)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        out[name] = (engine, build_objective(obj_cfg), EmbeddingPerturbation(word_embeddings(engine.module)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29533")):
        os.environ.setdefault(key, value)
    import deepspeed

    from dist_robust.config import DataConfig, ObjectiveConfig
    from dist_robust.data.pipeline import Collator, encode, to_device, train_batch_indices
    from dist_robust.data.tasks import get_task
    from dist_robust import distributed as D
    from dist_robust.models import train_tokenizer
    from dist_robust.objectives import StepContext

    deepspeed.init_distributed()
    D.release_shm_buffer()
    torch.set_num_threads(os.cpu_count() or 1)
    data = get_task(DataConfig(synthetic_train_size=2000, synthetic_eval_size=8))
    tokenizer = train_tokenizer(data.tokenizer_corpus(), 4000, tempfile.mkdtemp(prefix="bench-tokenizer-"))
    train = encode(data.train, tokenizer, 128)
    collate = Collator(tokenizer)
    objectives = {
        "erm": ObjectiveConfig(name="erm"),
        "gaussian n=1": ObjectiveConfig(name="gaussian", sigma=0.01, noise_samples=1),
        "gaussian n=4": ObjectiveConfig(name="gaussian", sigma=0.01, noise_samples=4),
        "pgd K=1": ObjectiveConfig(name="pgd", adv_steps=1),
        "pgd K=3": ObjectiveConfig(name="pgd", adv_steps=3),
        "freelb K=3": ObjectiveConfig(name="freelb", adv_steps=3),
    }
    engines = _engines(args.model, tokenizer, objectives)
    times: dict[str, list[float]] = {name: [] for name in objectives}
    batch_no = 0
    for _ in range(args.rounds):
        for name, (engine, objective, perturbation) in engines.items():
            hidden = engine.module.config.hidden_size
            start = time.perf_counter()
            for i in range(args.steps):
                batch = to_device(collate(train, train_batch_indices(len(train), args.batch, 1, 0, 0, batch_no + i)),
                                  engine.device)
                ctx = StepContext(perturbation, hidden, torch.Generator().manual_seed(i))
                objective.train_step(engine, batch, ctx)
            times[name].append((time.perf_counter() - start) / args.steps)
        batch_no += args.steps
    base = statistics.median(times["erm"])
    print(f"\nmodel {args.model}, batch {args.batch}, {args.rounds} rounds x {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    print(f"{'objective':<14} {'s/step':>8} {'x ERM':>7}")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"{name:<14} {med:8.4f} {med / base:7.2f}")


if __name__ == "__main__":
    main()
