"""How far half precision moves one training step of an objective, at the same parameters.

    python bench/precision_probe.py                                    # xlmr-base-random, every objective, bf16
    python bench/precision_probe.py --objectives smart --noise-scales 0.001 0.02 0.1 0.5
    python bench/precision_probe.py --precisions bf16 fp16             # on a GPU (fp16 on a CPU is not meaningful)

A trajectory comparison (``bench/gpu_check.py``) cannot tell a precision bug from ordinary drift:
two runs that differ by rounding leave each other's path, and an objective that amplifies
small differences leaves it faster. This probe is *teacher-forced*: it trains the model in fp32
for ``--steps`` steps and, before each step, runs the same step (same batch, same perturbation
draws) on a half-precision copy of the current fp32 weights, which is what DeepSpeed's bf16/fp16
engines compute with (fp32 master weights, half-precision module). Per step it prints

* the loss difference, half - fp32;
* the relative error of the parameter gradient, ``||g_half - g_fp32|| / ||g_fp32||``;
* for objectives with an attack (pgd, smart), the cosine between the half-precision and the fp32
  perturbation the attack returns: how well the adversary's direction survives rounding.

It runs the objectives' own code on the bare model (no DeepSpeed), on the GPU when there is one,
else on the CPU, with the settings of ``bench/gpu_check.py`` (relative epsilon 0.5, alpha 0.2,
2 ascent steps, sigma 1.0 with 2 draws, SMART noise scale 0.1) and dropout 0.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OBJECTIVES = ("erm", "pgd", "freelb", "gaussian", "smart")
# A fixed fp16 loss scale (no dynamic scaler here): large enough that small gradients do not
# underflow, small enough that a loss of about 1 does not overflow them.
FP16_LOSS_SCALE = 2.0 ** 10


class ProbeEngine:
    """Just enough of a DeepSpeed engine for an objective: forward, backward, and ``step``, which
    accumulates like an engine with ``gradient_accumulation_steps = micro_steps`` (FreeLB's K
    passes make one update; each backward is scaled by 1 / micro_steps, as DeepSpeed does) and at
    the boundary keeps the gradient, then applies the optimizer, if any."""

    def __init__(self, module, micro_steps: int, optimizer=None, loss_scale: float = 1.0):
        self.module, self.micro_steps, self.optimizer, self.loss_scale = module, micro_steps, optimizer, loss_scale
        self.grad, self._calls = None, 0

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss):
        (loss * self.loss_scale / self.micro_steps).backward()

    def step(self):
        import torch

        self._calls += 1
        if self._calls % self.micro_steps:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        self.grad = torch.cat([p.grad.double().flatten() for p in params]) / self.loss_scale
        if self.optimizer is not None:
            self.optimizer.step()
        self.module.zero_grad(set_to_none=True)


@functools.lru_cache(maxsize=2)
def _start(model_name: str, tokenizer_dir: str):
    """The task, its encoded training pairs, the collator and the initial fp32 model (built once per model)."""
    from dist_robust.config.run_config import DataConfig
    from dist_robust.data.pipeline import Collator, encode
    from dist_robust.data.tasks import get_task
    from dist_robust.model.build import build_model, load_tokenizer, train_tokenizer

    data = get_task(DataConfig(synthetic_train_size=512, synthetic_eval_size=16))
    if not os.path.isdir(tokenizer_dir):
        train_tokenizer(data.tokenizer_corpus(), 4000, tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    return data, encode(data.train, tokenizer, 64), Collator(tokenizer), build_model(model_name, data.label_names,
                                                                                    tokenizer, 0.0, 7)


def probe(model_name: str, objective: str, precision: str, steps: int, noise_scale: float, device,
          tokenizer_dir: str, adv_steps: int = 2) -> list[dict]:
    """Per step: fp32 loss, half - fp32 loss, gradient relative error, attack cosine (None without an attack)."""
    import torch

    from dist_robust.config.run_config import ObjectiveConfig
    from dist_robust.data.pipeline import to_device
    from dist_robust.model.build import word_embeddings
    from dist_robust.objectives import EmbeddingPerturbation, StepContext, build_objective

    data, encoded, collate, initial = _start(model_name, tokenizer_dir)
    model = copy.deepcopy(initial).to(device).train()
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    obj = build_objective(ObjectiveConfig(name=objective, epsilon=0.5, alpha=0.2, adv_steps=adv_steps, sigma=1.0,
                                          noise_samples=2, noise_scale=noise_scale))
    engine = ProbeEngine(model, obj.micro_steps, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0))
    perturbation = EmbeddingPerturbation(word_embeddings(model))
    hidden = model.config.hidden_size
    loss_scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(7)).tolist()
    rows = []
    for step in range(1, steps + 1):
        batch = to_device(collate(encoded, order[(step - 1) * 8: step * 8]), device)

        def ctx(p, scale=1.0):  # the same perturbation draws for both precisions
            return StepContext(p, hidden, torch.Generator().manual_seed(1000 + step), scale, step - 1, None)

        low = copy.deepcopy(model).to(half)
        low_engine = ProbeEngine(low, obj.micro_steps, loss_scale=loss_scale)
        low_perturbation = EmbeddingPerturbation(word_embeddings(low))
        t0 = time.perf_counter()
        low_stats = obj.train_step(low_engine, batch, ctx(low_perturbation, loss_scale))
        seconds = time.perf_counter() - t0
        cosine = None
        if hasattr(obj, "attack"):
            d_low = obj.attack(low, batch, ctx(low_perturbation, loss_scale)).double().flatten()
            d_ref = obj.attack(model, batch, ctx(perturbation)).double().flatten()
            cosine = torch.nn.functional.cosine_similarity(d_low, d_ref, dim=0).item()
        low_perturbation.remove()
        stats = obj.train_step(engine, batch, ctx(perturbation))
        g, g_low = engine.grad, low_engine.grad
        loss = stats["loss"].item()
        rows.append({"step": step, "loss": loss, "diff": low_stats["loss"].item() - loss,
                     "grad_err": ((g_low - g).norm() / g.norm()).item(), "delta_cos": cosine, "seconds": seconds})
        del low, low_engine
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="xlmr-base-random")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--precisions", nargs="+", default=["bf16"], choices=["bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--adv-steps", type=int, default=2, help="ascent steps of pgd, freelb and smart (0: R3F)")
    parser.add_argument("--noise-scales", nargs="+", type=float, default=[0.1],
                        help="SMART's random start, relative (its default is 1e-3)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be fp32
        torch.backends.cudnn.allow_tf32 = False
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"{args.model} on {where}, torch {torch.__version__}")
    tokenizer_dir = os.path.join(tempfile.mkdtemp(prefix="precision-probe-"), "tokenizer")
    print("| objective | precision | step | fp32 loss | half - fp32 | gradient rel. error | attack cosine |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for precision in args.precisions:
        for objective in args.objectives:
            for noise in args.noise_scales if objective == "smart" else [0.1]:
                label = f"smart (noise {noise:g})" if objective == "smart" else objective
                for r in probe(args.model, objective, precision, args.steps, noise, device, tokenizer_dir,
                                 args.adv_steps):
                    cos = "" if r["delta_cos"] is None else f"{r['delta_cos']:.4f}"
                    print(f"| {label} | {precision} | {r['step']} | {r['loss']:.4f} | {r['diff']:+.4f} | "
                          f"{r['grad_err']:.3f} | {cos} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
