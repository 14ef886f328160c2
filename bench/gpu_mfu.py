"""The GPU speed measurement, prepared: dist-robust against what a single-GPU user would run, in one table.

    python bench/gpu_mfu.py                                  # one CUDA GPU, no network; about 8 minutes
    python bench/gpu_mfu.py --device cpu --model tiny --budget 300   # the plumbing, on a CPU

XLM-R-large shapes with random weights (``xlmr-large-random``), bf16, 128 tokens, every approach of
``bench/vs_hf.py`` in its own process on the same batches:

1. at micro-batch 32: the plain PyTorch loop and the HF Trainer without DeepSpeed, each with and
   without ``torch.compile`` (fused AdamW, SDPA), dist-robust at ZeRO-2 (with and without
   ``--compile``) and ZeRO-3, PGD-1 and FreeLB-1 at ZeRO-2;
2. the micro-batch sweep (64, 128, 256 x 128 tokens) for dist-robust at ZeRO-2 and the fastest peer
   of step 1.

Approaches run in that order while ``--budget`` seconds allow (each approach's launch, model build
and compilation included; one round, ``--steps`` timed steps after ``--warmup``); what did not fit is
listed as skipped. The table gives s/step, tokens/s, TFLOP/s and MFU against ``--peak-tflops``
(dense bf16 of an H100/H200 by default), the ratio to the fastest peer, and the peak GPU memory;
then the issue's targets, each met or not. The packages it needs beyond the project's are none: the
HF Trainer is transformers' own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import vs_hf  # noqa: E402  (the approaches, their FLOP counts and the peak)

FIRST = ("ours+zero2", "hf", "hf+compile", "plain", "plain+compile", "ours+zero2+compile", "ours+zero3",
         "ours+zero2+pgd1", "ours+zero2+freelb1")
PEERS = ("plain", "plain+compile", "hf", "hf+compile")
SWEEP = (64, 128, 256)


def run(args, approach: str, batch: int) -> dict | None:
    """One approach in its own process: its result, or None when it failed (the reason printed)."""
    cmd = [sys.executable, os.path.join(HERE, "vs_hf.py"), "--worker", approach, "--model", args.model,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(batch), "--length",
           str(args.length), "--device", args.device] + (["--bf16"] if args.bf16 else [])
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"  {approach} at batch {batch} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}", flush=True)
        return None
    res = json.loads(lines[-1][len("RESULT "):])
    res.update(approach=approach, batch=batch, wall=time.monotonic() - start, s_step=statistics.median(res["times"]))
    print(f"  {approach:<20} batch {batch:<4} {res['s_step']:.4f} s/step ({res['wall']:.0f} s with start-up)",
          flush=True)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="xlmr-large-random")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4, help="untimed steps (compilation happens in these)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for everything (default: 7.5 minutes)")
    p.add_argument("--peak-tflops", type=float, default=vs_hf.H100_BF16_DENSE_TFLOPS)
    args = p.parse_args()
    start = time.monotonic()
    shape = vs_hf._shape(args.model)
    done: list[dict] = []
    skipped: list[str] = []

    def measure(approach: str, batch: int) -> None:
        typical = statistics.median([r["wall"] for r in done]) if done else 0.0
        if time.monotonic() - start + typical > args.budget:
            skipped.append(f"{approach} at batch {batch}")
            return
        res = run(args, approach, batch)
        if res is not None:
            done.append(res)

    for approach in FIRST:
        measure(approach, 32)
    peers = [r for r in done if r["approach"] in PEERS]
    best = min(peers, key=lambda r: r["s_step"])["approach"] if peers else None
    for batch in SWEEP:
        for approach in ("ours+zero2", best):
            if approach:
                measure(approach, batch)
    print()
    rows = []
    for r in done:
        flops = vs_hf.model_flops_per_step(shape, r["batch"], args.length,
                                           vs_hf.PASSES.get(r["approach"].split("+")[-1], 1.0))
        tflops = flops / r["s_step"] / 1e12
        rows.append({**r, "tokens_s": r["batch"] * args.length / r["s_step"], "tflops": tflops,
                     "mfu": tflops / args.peak_tflops})
    fastest_peer = {b: min((r for r in rows if r["approach"] in PEERS and r["batch"] == b),
                           key=lambda r: r["s_step"], default=None) for b in {r["batch"] for r in rows}}
    print(f"{args.model}, {'bf16' if args.bf16 else 'fp32'}, {args.length} tokens, {args.device}, one round of "
          f"{args.steps} steps after {args.warmup}; MFU against {args.peak_tflops:g} TFLOP/s")
    print(f"{'approach':<20} {'batch':>5} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'x fastest peer':>15} {'peak MiB':>9}")
    for r in rows:
        peer = fastest_peer.get(r["batch"])
        ratio = f"{peer['s_step'] / r['s_step']:15.2f}" if peer else f"{'':>15}"
        memory = r["peak_gpu_mib"] if args.device == "cuda" else r["peak_rss_mib"]
        print(f"{r['approach']:<20} {r['batch']:5d} {r['s_step']:8.4f} {r['tokens_s']:10.0f} {r['tflops']:8.2f} "
              f"{r['mfu']:6.1%} {ratio} {memory:9.0f}")
    if skipped:
        print(f"skipped (over --budget {args.budget:g} s): {', '.join(skipped)}")
    print(*targets(rows, fastest_peer), sep="\n")
    print(f"total {time.monotonic() - start:.0f} s")
    return 0


def targets(rows: list[dict], fastest_peer: dict) -> list[str]:
    """The issue's targets, each with what was measured."""
    def get(approach: str, batch: int = 32):
        return next((r for r in rows if r["approach"] == approach and r["batch"] == batch), None)

    out = []
    ours = min((r for r in rows if r["approach"] in ("ours+zero2", "ours+zero2+compile") and r["batch"] == 32),
               key=lambda r: r["s_step"], default=None)
    if ours:
        out.append(f"ERM at 32: {ours['mfu']:.1%} MFU ({ours['approach']}; target >= 25%)")
        peer = fastest_peer.get(32)
        if peer:
            out.append(f"ERM at 32 against the fastest peer ({peer['approach']}): {peer['s_step'] / ours['s_step']:.2f}x "
                       f"(target >= 1.0)")
    big = max((r for r in rows if r["approach"].startswith("ours+zero2") and r["batch"] >= 256),
              key=lambda r: r["mfu"], default=None)
    if big:
        out.append(f"ERM at {big['batch']}: {big['mfu']:.1%} MFU (target >= 38%)")
    two, three = get("ours+zero2"), get("ours+zero3")
    if two and three:
        out.append(f"ZeRO-3 / ZeRO-2 step time: {three['s_step'] / two['s_step']:.2f} (target <= 1.15)")
    for name in ("pgd1", "freelb1"):
        r = get(f"ours+zero2+{name}")
        if r and two:
            floor = two["s_step"] * vs_hf.PASSES[name]
            out.append(f"{name}: {r['s_step'] / floor:.2f}x its pass-count floor (target <= 1.1)")
    return out


if __name__ == "__main__":
    sys.exit(main())
