"""What a robust objective costs per optimizer step, relative to plain fine-tuning (ERM).

    python bench/objective_cost.py [--model tiny|xlmr-base-random|PATH] [--task synthetic|xnli]
                                   [--rounds 5] [--steps 10] [--only synonym pgd ...]

One process, one DeepSpeed engine (ZeRO-2, fp32) per objective, all on the same batches.
Objectives take turns in rounds so machine noise hits them alike; the report is the median
seconds per step, its ratio to ERM measured in the same run, and that ratio against the
objective's pass-count floor: how many batch-sized forward+backward passes it needs at least
(PGD-K: K input-gradient passes plus one clean+adversarial pass of twice the batch, K + 2;
FreeLB-K: K; Gaussian with n draws: one pass of n times the batch, n; SMART-K: a forward
without gradients, about a third of a pass, K input-gradient passes and one double pass;
on-the-fly synonym substitution: 1, the substitution and tokenization being the overhead).
The last column is the padded input tokens per step against ERM's: substituted pairs can be
longer than the originals, and the model pays for every token.
``--task xnli`` takes English XNLI pairs (``--data-dir``, the offline files) and a pretrained
model's own tokenizer (``--model PATH``), so the synonym row substitutes real words from the
counter-fitted map.
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

    from dist_robust.config.run_config import RunConfig
    from dist_robust.config.ds_config import default_ds_config, resolve_ds_config
    from dist_robust.model.build import build_model, word_embeddings
    from dist_robust.objectives import EmbeddingPerturbation, build_objective
    from dist_robust.infra.zero import chunked_zero_grad_norm

    out = {}
    for name, obj_cfg in objectives.items():
        cfg = RunConfig()
        cfg.objective = obj_cfg
        cfg.ds_config = default_ds_config()
        ds = resolve_ds_config(cfg, 1)
        model = build_model(model_name, LABELS, tokenizer, seed=0)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        chunked_zero_grad_norm(engine)  # as the trainer does
        engine.train()  # dropout on, as in training (a pretrained model arrives in eval mode)
        out[name] = (engine, build_objective(obj_cfg), EmbeddingPerturbation(word_embeddings(engine.module)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--task", default="synthetic", choices=("synthetic", "xnli"))
    parser.add_argument("--data-dir", default=os.path.join(os.path.dirname(os.path.dirname(__file__)), "..", "shared",
                                                           "data"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--only", nargs="+", metavar="ROW",
                        help="measure these rows alone (ERM is always measured), e.g. --only synonym pgd: "
                             "rows whose name starts with a word given")
    args = parser.parse_args()
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29533")):
        os.environ.setdefault(key, value)
    import deepspeed

    from dist_robust.config.run_config import DataConfig, ObjectiveConfig
    from dist_robust.data.augment import SynonymAugmenter, load_neighbors
    from dist_robust.data.pipeline import Collator, encode, to_device, train_batch_indices
    from dist_robust.data.tasks import get_task
    from dist_robust.infra import distributed as D
    from dist_robust.model.build import is_builtin, load_tokenizer, train_tokenizer
    from dist_robust.objectives import StepContext

    with D.releasing_shm_files():
        deepspeed.init_distributed()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.task == "xnli":
        data = get_task(DataConfig(task="xnli", data_dir=args.data_dir, languages=["en"],
                                   train_file=os.path.join(args.data_dir, "xnli", "en", "test.tsv"),
                                   max_eval_examples=8))
        neighbors = load_neighbors(os.path.join(args.data_dir, "synonyms", "counterfitted_neighbors.json"))
    else:
        data = get_task(DataConfig(synthetic_train_size=2000, synthetic_eval_size=8))
        neighbors = data.synonyms
    tokenizer = train_tokenizer(data.tokenizer_corpus(), 4000, tempfile.mkdtemp(prefix="bench-tokenizer-")) \
        if is_builtin(args.model) else load_tokenizer(args.model)
    train = encode(data.train, tokenizer, 128)
    collate = Collator(tokenizer)
    augmenter = SynonymAugmenter(neighbors or {}, 1.0, 0)
    # name: (objective, passes of the floor, on-the-fly synonym substitution)
    objectives = {
        "erm": (ObjectiveConfig(name="erm"), 1.0, False),
        "synonym (on the fly)": (ObjectiveConfig(name="erm"), 1.0, True),
        "gaussian n=1": (ObjectiveConfig(name="gaussian", sigma=0.01, noise_samples=1), 1.0, False),
        "gaussian n=4": (ObjectiveConfig(name="gaussian", sigma=0.01, noise_samples=4), 4.0, False),
        "pgd K=1": (ObjectiveConfig(name="pgd", adv_steps=1), 3.0, False),
        "pgd K=3": (ObjectiveConfig(name="pgd", adv_steps=3), 5.0, False),
        "freelb K=3": (ObjectiveConfig(name="freelb", adv_steps=3), 3.0, False),
        "smart K=1": (ObjectiveConfig(name="smart", adv_steps=1), 3.0 + 1 / 3, False),
    }
    if args.only:
        objectives = {name: row for name, row in objectives.items()
                      if name == "erm" or name.split(" ")[0] in args.only}
    engines = _engines(args.model, tokenizer, {name: cfg for name, (cfg, _, _) in objectives.items()})
    times: dict[str, list[float]] = {name: [] for name in objectives}
    tokens = dict.fromkeys(objectives, 0)  # padded input tokens, all rounds
    batch_no = 0
    for _ in range(args.rounds):
        for name, (engine, objective, perturbation) in engines.items():
            hidden = engine.module.config.hidden_size
            on_the_fly = objectives[name][2]
            start = time.perf_counter()
            for i in range(args.steps):
                idx = train_batch_indices(len(train), args.batch, 1, 0, 0, batch_no + i)
                if on_the_fly:  # what the trainer does with --augment synonym: substitute, encode, collate
                    rows = augmenter.batch([data.train[j] for j in idx], batch_no + i)
                    batch = collate(encode(rows, tokenizer, 128), list(range(len(rows))))
                else:
                    batch = collate(train, idx)
                tokens[name] += batch["input_ids"].numel()
                ctx = StepContext(perturbation, hidden, torch.Generator().manual_seed(i))
                objective.train_step(engine, to_device(batch, engine.device), ctx)
            times[name].append((time.perf_counter() - start) / args.steps)
        batch_no += args.steps
    base = statistics.median(times["erm"])
    lengths = [len(r) for r in train.input_ids]
    print(f"\nmodel {args.model}, task {args.task} (mean {sum(lengths) / len(lengths):.1f} tokens), batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps, {torch.get_num_threads()} threads")
    print(f"{'objective':<22} {'s/step':>8} {'x ERM':>7} {'floor':>6} {'x floor':>8} {'tokens x ERM':>13}")
    for name, t in times.items():
        med = statistics.median(t)
        floor = objectives[name][1]
        print(f"{name:<22} {med:8.4f} {med / base:7.2f} {floor:6.2f} {med / base / floor:8.2f} "
              f"{tokens[name] / tokens['erm']:13.3f}")


if __name__ == "__main__":
    main()
    from dist_robust.infra.distributed import end_process_group

    end_process_group()  # as the trainer's commands do: left to interpreter exit, a rank can abort
