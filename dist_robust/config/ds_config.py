"""The DeepSpeed JSON of a run: loading it, the built-in default, and filling its "auto" values.

The JSON holds engine settings only (ZeRO stage, precision, optimizer, scheduler, clipping). Batch
sizes, learning rate and schedule length marked ``"auto"`` come from the run config, the way the
Hugging Face integration fills them; FreeLB's K ascent passes are K engine micro-steps per batch.
"""

from __future__ import annotations

import copy
import json

from dist_robust.config.run_config import BUILTIN_MODELS, ZERO_STAGES, ConfigError, RunConfig
from dist_robust.infra.zero import zero_stage
from dist_robust.objectives import ObjectiveConfig, micro_steps_per_batch


def load_ds_config(path: str | None) -> dict:
    """Read a DeepSpeed JSON config, or return the built-in ZeRO-2 default."""
    if not path:
        return default_ds_config()
    from dist_robust.config.run_config import read_config_text

    try:
        text = read_config_text(path, "--deepspeed")
    except ConfigError as e:
        raise ConfigError([e.problems[0] + (" (the repository ships ds_configs/zero0.json ... zero3.json)"
                                            if "not found" in e.problems[0] else "")]) from None
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError([f"--deepspeed {path}: not valid JSON ({e})"]) from None
    except RecursionError:
        raise ConfigError([f"--deepspeed {path}: nested too deeply to be a DeepSpeed config"]) from None
    if not isinstance(ds, dict):
        raise ConfigError([f"--deepspeed {path}: expected a JSON object of DeepSpeed settings, got "
                           f"{type(ds).__name__}"])
    return ds


def default_ds_config() -> dict:
    """``ds_configs/zero2.json``: ZeRO-2, fp32, torch's fused AdamW, warm-up then linear decay (CPU and GPU)."""
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.01, "torch_adam": True, "fused": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto",
                                                          "warmup_num_steps": "auto",
                                                          "total_num_steps": "auto"}},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 1000000,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
    }


def resolve_ds_config(cfg: RunConfig, world_size: int) -> dict:
    """Fill "auto" values from the run config; FreeLB multiplies accumulation by K."""
    ds = copy.deepcopy(cfg.ds_config)
    t = cfg.train
    lr = t.lr if t.lr is not None else default_lr(cfg.model.name)
    k = micro_steps_per_batch(cfg.objective)
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    if ds.get("gradient_accumulation_steps", "auto") == "auto":
        ds["gradient_accumulation_steps"] = t.grad_accum
    ds["gradient_accumulation_steps"] = int(ds["gradient_accumulation_steps"]) * k
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    opt = ds.get("optimizer", {}).get("params", {})
    if opt.get("lr") == "auto":
        opt["lr"] = lr
    sched = ds.get("scheduler", {}).get("params", {})
    # DeepSpeed's warm-up schedulers refuse 0 steps (and warm up over at least 2): a ratio of 0
    # gets the least warm-up they allow.
    warmup = max(1, int(t.warmup_ratio * t.max_steps))
    for key, value in (("warmup_max_lr", lr), ("warmup_num_steps", warmup), ("total_num_steps", t.max_steps),
                       ("cos_min_ratio", 0.0)):
        if sched.get(key) == "auto":
            sched[key] = value
    return ds


def default_lr(model_name: str) -> float:
    """Training a built-in config from scratch wants a far larger step than fine-tuning."""
    return 2e-3 if model_name in BUILTIN_MODELS else 1e-5


def user_grad_accum(ds: dict, obj: ObjectiveConfig) -> int:
    """Data batches per optimizer step (the resolved accumulation divided by FreeLB's K)."""
    return ds["gradient_accumulation_steps"] // micro_steps_per_batch(obj)


ZERO3_EMBEDDING_BLOCKS = 8  # the word embedding's row blocks by default under a releasing ZeRO-3
RELEASING = 1e8  # ZeRO-3 live-parameter and reuse-distance limits at or below which layers are released


def embedding_blocks(cfg: RunConfig, ds: dict, frozen: bool) -> int:
    """Row blocks for the word embedding: as asked; by default 8 when ZeRO-3 releases what it gathers.

    With the layers released after use (``stage3_max_live_parameters`` and
    ``stage3_max_reuse_distance`` at most 1e8, as in ds_configs/zero3.json), the word embedding's
    backward is a ZeRO-3 step's memory peak at XLM-R scale, and in blocks it is about an eighth of
    it, with the same losses (``models.RowBlockEmbedding``). With DeepSpeed's default limits every
    layer stays gathered into the backward anyway, and 8 lookups only slow the forward
    (docs/benchmarks.md). Frozen embeddings have no gradient to split."""
    if cfg.model.embedding_blocks is not None:
        return cfg.model.embedding_blocks
    zero = ds.get("zero_optimization", {})
    releases = all(float(zero.get(key, 1e9)) <= RELEASING
                   for key in ("stage3_max_live_parameters", "stage3_max_reuse_distance"))
    return ZERO3_EMBEDDING_BLOCKS if zero_stage(ds) == 3 and releases and not frozen else 1


_SECTIONS = ("zero_optimization", "fp16", "bf16", "optimizer", "scheduler")


def ds_config_problems(cfg: RunConfig, world_size: int) -> list[str]:
    """What is wrong with the run's DeepSpeed config, one message per problem (config.validate reports them)."""
    ds = cfg.ds_config
    src = cfg.ds_config_path or "built-in ds_config"
    if not isinstance(ds, dict):
        return [f"{src}: expected a JSON object of DeepSpeed settings, got {type(ds).__name__}"]
    p = [f"{src}: {key} = {ds[key]!r}: must be an object ({{...}})" for key in _SECTIONS
         if key in ds and not isinstance(ds[key], dict)]
    p += [f"{src}: {key}.params = {ds[key]['params']!r}: must be an object ({{...}})" for key in ("optimizer", "scheduler")
          if isinstance(ds.get(key), dict) and "params" in ds[key] and not isinstance(ds[key]["params"], dict)]
    if p:
        return p
    opt = ds.get("optimizer", {}).get("params", {})
    if "fused" in opt and not (opt["fused"] in (True, False) and opt.get("torch_adam")):
        p.append(f"{src}: optimizer.params.fused = {opt['fused']!r}: only torch's AdamW takes it, as true or "
                 "false; set optimizer.params.torch_adam to true as well, or remove fused")
    stage = zero_stage(ds)
    if stage not in ZERO_STAGES:
        p.append(f"{src}: zero_optimization.stage = {stage!r}: accepted stages: 0, 1, 2, 3")
    blocks = cfg.model.embedding_blocks
    if blocks is not None and blocks > 1 and stage != 3:
        p.append(f"model.embedding_blocks (--embedding-blocks) = {blocks}: only ZeRO-3 holds the word embedding in "
                 f"blocks ({src} is stage {stage}); leave it unset or 1, or use a stage-3 ds_config")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        p.append(f"{src}: fp16.enabled and bf16.enabled are both true: enable at most one")
    sizes = {k: ds.get(k, "auto") for k in
             ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")}
    bad_sizes = [f"{src}: {k} = {v!r}: must be a positive integer or \"auto\"" for k, v in sizes.items()
                 if v != "auto" and (not isinstance(v, int) or isinstance(v, bool) or v < 1)]
    if bad_sizes:
        return p + bad_sizes
    micro, accum, total = sizes.values()
    micro = cfg.train.micro_batch_size if micro == "auto" else micro
    accum = cfg.train.grad_accum if accum == "auto" else accum
    if total != "auto" and total != micro * accum * world_size:
        p.append(f"{src}: train_batch_size = {total}: must equal train_micro_batch_size_per_gpu ({micro}) x "
                 f"gradient_accumulation_steps ({accum}) x world size ({world_size}) = "
                 f"{micro * accum * world_size}; set it to \"auto\" or fix one of the three")
    return p
