"""torch AdamW's default implementation against its fused kernel, on the shapes a DeepSpeed engine steps.

    python bench/adamw_kernel.py [--model xlmr-base-random] [--threads 2] [--rounds 5]

ZeRO-1/2/3 keep each rank's fp32 master weights as one flat partition and step it with the
ds_config's optimizer; ZeRO-0 steps the model's own parameter tensors. Both shapes are timed
here: one flat tensor of half the model (a rank's share at two ranks) and the model's parameter
list, with torch AdamW as constructed by default and with ``fused=True`` (what the shipped
ds_configs select), taking turns in rounds; the median seconds per step and the ratio are
printed. The two must also land on the same weights (to float32 rounding), or the script stops.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _params(model: str, flat: bool) -> list[torch.nn.Parameter]:
    """The model's parameter shapes (built on the meta device), or half their total as one tensor."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    from dist_robust.model.build import BUILTIN_CONFIGS

    shape = {k: v or 8000 for k, v in BUILTIN_CONFIGS[model].items()}  # tiny: a tokenizer-sized vocabulary
    with torch.device("meta"):
        net = XLMRobertaForSequenceClassification(XLMRobertaConfig(**shape, num_labels=3))
    shapes = [q.shape for q in net.parameters()]
    if flat:
        shapes = [torch.Size([sum(s.numel() for s in shapes) // 2])]
    g = torch.Generator().manual_seed(0)
    out = []
    for s in shapes:
        q = torch.nn.Parameter(torch.randn(s, generator=g))
        q.grad = torch.randn(s, generator=g) * 1e-3
        out.append(q)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="xlmr-base-random")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.model}, {args.threads} thread(s), {args.rounds} rounds, lr 1e-5, weight decay 0.01")
    print("| parameters stepped | elements | default s/step | fused s/step | default / fused |")
    print("|---|---:|---:|---:|---:|")
    for flat, label in ((True, "one flat partition (ZeRO-1/2/3, 2 ranks)"), (False, "every tensor (ZeRO-0, DDP)")):
        runs = {}
        for fused in (False, True):
            params = _params(args.model, flat)
            runs[fused] = (params, torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=fused), [])
        for _ in range(args.rounds):
            for fused, (_, opt, times) in runs.items():
                t = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t)
        gap = max((a - b).abs().max().item() for a, b in zip(runs[False][0], runs[True][0]))
        if gap > 1e-6:
            raise SystemExit(f"the fused step landed {gap:.1e} away from the default one")
        default, fused = (statistics.median(runs[f][2]) for f in (False, True))
        n = sum(q.numel() for q in runs[False][0])
        print(f"| {label} | {n / 1e6:.1f}M | {default:.4f} | {fused:.4f} | {default / fused:.1f}x |")


if __name__ == "__main__":
    main()
