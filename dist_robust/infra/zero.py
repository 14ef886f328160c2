"""What the trainer does to DeepSpeed's ZeRO engines beyond their config, each with its reason.

* :class:`zero3_context`: the ZeRO-3 config transformers must see while a model is built, so its
  weights are made partitioned;
* :func:`forget_zero3_module`: what a destroyed ZeRO-3 engine leaves at module level;
* :func:`share_zero3_master_weights`: the second fp32 master copy ZeRO-3 keeps by mistake;
* :func:`chunked_zero_grad_norm` (with :func:`sum_of_squares`, :func:`foreach_sum_of_squares`):
  ZeRO-1/2's float64 copy of every gradient for the norm;
* :func:`norm_overflow_check`: the non-finite check of a half-precision step on the global norm
  instead of a scan of every gradient tensor;
* :func:`save_checkpoint_or_failure`: a save that fails on some ranks (a full disk) without leaving
  the others waiting in the barrier DeepSpeed's save ends with.

The last three reach into DeepSpeed's attributes, since it offers no public call for them: each
says which DeepSpeed version it answers, does nothing where the attributes are gone, and has a
test that fails when DeepSpeed changes (``tests/engine_pair.py`` trains an engine with and
without the last two on the same batches).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def zero_stage(ds: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it names none, as DeepSpeed reads it)."""
    return ds.get("zero_optimization", {}).get("stage", 0)


class zero3_context:
    """Keep an ``HfDeepSpeedConfig`` alive while a ZeRO-3 model is built and trained.

    transformers consults a weak global reference to decide whether to construct weights
    partitioned; dropping the object would silently build the full model on every rank.
    """

    def __init__(self, ds_config: dict):
        self.handle = None
        if zero_stage(ds_config) == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self.handle = HfDeepSpeedConfig(ds_config)

    def close(self) -> None:
        """Forget the ZeRO-3 config, so a later run in this process builds its model whole."""
        if self.handle is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self.handle = None


def forget_zero3_module(module: torch.nn.Module) -> None:
    """Drop what DeepSpeed's ZeRO-3 keeps of a destroyed engine's model at module level.

    ``engine.destroy()`` removes ZeRO-3's hooks but leaves the model in two process-wide places
    (DeepSpeed 0.19, issue deepspeedai/DeepSpeed#7204): the forward-module stack, to which every
    ZeRO-3 engine pushes its top module for good, and an unbounded ``lru_cache`` on a method of
    the parameter coordinator, keyed by submodule. Either keeps the whole model, its gradients
    and optimizer states alive after the run. Clearing the cache only costs other live ZeRO-3
    engines a recomputation of what it held. Where a later DeepSpeed moves these, nothing is done.
    """
    try:
        from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator
    except ImportError:
        return
    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack[:] = [m for m in stack if m is not module]
    coordinator = getattr(partitioned_param_coordinator, "PartitionedParameterCoordinator", None)
    method = getattr(coordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    # The cache sits under DeepSpeed's nvtx decorator, which keeps it in its closure.
    for cached in [method, *(c.cell_contents for c in getattr(method, "__closure__", None) or ())]:
        if callable(getattr(cached, "cache_clear", None)):
            cached.cache_clear()


def share_zero3_master_weights(engine) -> int:
    """Let ZeRO-3 update each rank's parameter partition in place when it can serve as the master copy.

    Returns the bytes per rank this frees. In fp32 training a ZeRO-3 rank's parameter partition
    is already fp32 on the optimizer's device, and DeepSpeed means to use it as the optimizer's
    master weights (``_create_fp32_partitions`` has a branch that does exactly that), but in
    DeepSpeed 0.19 it decides by comparing ``tensor.device`` with a device *name* ("cpu",
    "cuda:0"), which torch never finds equal, so it keeps a second fp32 copy: 4 x parameters /
    ranks bytes, 1.04 GiB per rank at XLM-R-large on 2 ranks (docs/benchmarks.md). This points each
    master partition at its parameter partition's memory, as that branch would have: the optimizer
    and its states keep the same tensor objects, and DeepSpeed's copy of the updated master into
    the partition after each step becomes a copy onto itself. Nothing is done in half precision
    (the master copy is needed there), at other stages, with the optimizer offloaded, or where a
    later DeepSpeed shares them already or has moved these attributes.
    """
    if engine.zero_optimization_stage() != 3 or getattr(engine.optimizer, "offload_optimizer", False):
        return 0
    partitions = getattr(engine.optimizer, "fp16_partitioned_groups_flat", None) or []
    masters = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or []
    freed = 0
    for part, master in zip(partitions, masters) if len(partitions) == len(masters) else ():
        if (isinstance(part, torch.Tensor) and part.shape == master.shape and part.dtype == master.dtype
                and part.device == master.device and part.data_ptr() != master.data_ptr() and part.numel()):
            freed += master.numel() * master.element_size()
            master.data = part.data
    return freed


NORM_CHUNK = 1 << 16  # elements per partial norm in sum_of_squares


def sum_of_squares(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of every element squared, as a float64 scalar, from float32 norms of 65,536-element chunks.

    torch's CPU norm kernel (torch 2.13, pytorch/pytorch#169237) accumulates a whole float32
    tensor in float32 lanes, and loses what it adds once the running sum is large: 1.4% low for
    128M standard normal values, 0.06% for 16M. Chunks keep each partial sum small (error about
    1e-7 of the total at XLM-R-large size) at the speed of the plain kernel; the chunks' squared
    norms are added in float64. Half-precision tensors are normed in float32 (a bf16 norm per
    chunk would be 1e-3 off).
    """
    norms = [torch.linalg.vector_norm(chunk, dtype=torch.float32)  # half-precision chunks upcast, not rounded
             for t in tensors for chunk in t.detach().reshape(-1).split(NORM_CHUNK)]
    if not norms:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(norms).double().pow(2).sum()


def foreach_sum_of_squares(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The sum of every element squared, as a float64 scalar on the tensors' device: one ``_foreach_norm``
    (float32 results, a few fused kernels on a GPU) instead of a float64 copy and a norm per tensor."""
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack(norms).double().pow(2).sum()


def chunked_zero_grad_norm(engine) -> bool:
    """ZeRO-1/2: take the global gradient norm from float32 norms, not DeepSpeed's float64 copies.

    DeepSpeed 0.19's ``get_grad_norm_direct`` copies every gradient of the rank's partition to
    float64 before taking its norm (``get_norm_dtype``): on a CPU host that is a fresh 8-byte
    allocation per element every step, 1.9 s of a ZeRO-2 step at XLM-R-large on 2 ranks
    (docs/benchmarks.md), where the chunked float32 norm takes 0.09 s and agrees with it to about
    1e-7. It does what DeepSpeed's does for plain data parallelism: the L2 norm over the rank's
    gradients (padding left out), summed over the data-parallel group, and -1 where it is not
    finite (DeepSpeed then skips the step). On an accelerator the float64 copies are one kernel
    pair per gradient tensor (about 400 per step at XLM-R-large, host-bound), and
    :func:`foreach_sum_of_squares` takes the norm in a few. Returns whether it was installed: not
    at other stages, with model or pipeline parallelism, mixture-of-experts layers or optimizer
    offload, or where a later DeepSpeed has moved these attributes.
    """
    opt = engine.optimizer
    original = getattr(opt, "get_grad_norm_direct", None)
    if (engine.zero_optimization_stage() not in (1, 2)
            or original is None or not hasattr(opt, "dp_process_group")
            or getattr(opt, "model_parallel_world_size", None) != 1 or getattr(opt, "has_moe_layers", True)
            or getattr(opt, "cpu_offload", True) or getattr(engine, "pipeline_parallelism", False)):
        return False
    import torch.distributed as dist

    squares = sum_of_squares if torch.device(engine.device).type == "cpu" else foreach_sum_of_squares

    def grad_norm(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return original(gradients, params, norm_type)
        total = squares([g for g in gradients if not getattr(g, "_zero_padding", False)])
        total = total.to(engine.device)  # (the collective's device)
        dist.all_reduce(total, group=opt.dp_process_group)
        norm = total.sqrt().float()
        return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, -1.0))

    opt.get_grad_norm_direct = grad_norm
    return True


def norm_overflow_check(engine) -> str | None:
    """ZeRO-1/2 in half precision: decide a step's overflow from the one global norm, not a scan of every tensor.

    DeepSpeed 0.19.3 turned ``bf16.check_grad_overflow`` on by default: an amax, an amin and two
    isfinite per gradient tensor, an all-reduce and a host read every step. With it off (the shipped
    ``zero2_bf16.json``), DeepSpeed 0.19 also stops treating a non-finite norm as an overflow, so the
    norm is checked here instead: a NaN or inf anywhere makes the norm non-finite (-1 from DeepSpeed's
    norm helpers), and the step is skipped exactly as before. In fp16 the per-tensor scan before the
    norm is dropped: DeepSpeed checks the norm right after it, and lowers the loss scale on the same
    overflows. Returns ``"bf16"`` or ``"fp16"`` for what it changed, None elsewhere.
    """
    opt = engine.optimizer
    if engine.zero_optimization_stage() not in (1, 2) or not hasattr(opt, "scaled_global_norm") \
            or not getattr(opt, "compute_grad_norm", False):
        return None
    if engine.bfloat16_enabled() and getattr(opt, "check_grad_overflow", True) is False:
        original = opt.scaled_global_norm

        def checked_norm(*args, **kwargs):
            norm = original(*args, **kwargs)
            if not bool(torch.isfinite(torch.as_tensor(norm)).all()) or float(norm) < 0:  # one host read a step
                opt.overflow = True
            return norm

        opt.scaled_global_norm = checked_norm
        return "bf16"
    if engine.fp16_enabled() and hasattr(opt, "check_overflow"):
        opt.check_overflow = lambda *args, **kwargs: None  # DeepSpeed checks the norm next
        return "fp16"
    return None


def disk_failure(err: BaseException) -> bool:
    """An error of writing a file: ``OSError`` (ENOSPC, EDQUOT, EIO, ...), or torch's zip writer failing on one
    (torch 2.13 on a full disk: ``[enforce fail at inline_container.cc] unexpected pos``)."""
    text = str(err)
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and (
        "inline_container" in text or "PytorchStreamWriter" in text or "write" in text.lower()))


def save_checkpoint_or_failure(engine, save_dir: str, tag: str, client_state: dict) -> str | None:
    """``engine.save_checkpoint``; a failed write on this rank is returned as text instead of raised.

    DeepSpeed 0.19's ``save_checkpoint`` is bracketed by two barriers: ranks that wrote their files
    wait in the closing one. A rank whose write failed (a full disk) meets them there, so every rank
    leaves the save together and the caller can decide, collectively, what to do. Other errors
    are raised as before. (Checked by ``tests/test_disk_full.py``: a disk that fills mid-save.)
    """
    import torch.distributed as dist

    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    except Exception as err:  # noqa: BLE001 - only write failures are answered here
        if not disk_failure(err):
            raise
        if dist.is_initialized():
            dist.barrier()  # the one save_checkpoint ends with, where the ranks that did not fail wait
        return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return None


def optimizer_name(engine) -> str:
    """The torch optimizer that updates the weights, under DeepSpeed's wrappers: "AdamW (fused)".

    Read from its parameter groups, which a resumed checkpoint's settings replace."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    fused = isinstance(opt, torch.optim.Optimizer) and any(g.get("fused") for g in opt.param_groups)
    return type(opt).__name__ + (" (fused)" if fused else "")
