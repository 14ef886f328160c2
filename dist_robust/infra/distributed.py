"""Rank discipline in one place: joining the process group, who prints, logs and writes, how metrics are reduced."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

from dist_robust.infra.zero import zero_stage


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def end_process_group() -> None:
    """After a run that ended well on every rank: meet at a barrier, then destroy the process group.

    Left to interpreter exit, the group's gloo worker threads can outlive what they use: now and
    then a rank aborted after its run had finished ("terminate called without an active
    exception", pytorch/pytorch#190489), and the launcher then killed the other ranks. Never
    after an error: another rank may still be inside a collective, and destroying would hang.
    """
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
MPI_ENV = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def default_single_process_env() -> bool:
    """Announce a one-rank world when no launcher did (``python train.py``), as the HF Trainer does.

    Without this DeepSpeed falls back to MPI discovery and fails without mpi4py. The
    rendezvous port is a free one, so several one-process runs can share a host. Returns
    True when it set the environment. Launchers (deepspeed, torchrun, Ray, SLURM via srun
    exports, MPI) are left alone.
    """
    if any(k in os.environ for k in LAUNCHER_ENV + MPI_ENV):
        return False
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        # srun started several copies of the script itself: each would train alone as "rank 0 of 1".
        raise RuntimeError(f"SLURM started {os.environ['SLURM_NTASKS']} tasks but no launcher announced a rank "
                           "(RANK/WORLD_SIZE): run one task per node that starts the ranks with the deepspeed "
                           "launcher or torchrun (see cluster/deepspeed-multinode.sh)")
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1")})
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def accelerator_name() -> str:
    """``cpu``, ``cuda``, ... as DeepSpeed's accelerator sees this host."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def comm_device() -> torch.device:
    """Where collective tensors must live for the process group's backend (gloo: CPU; NCCL: this GPU)."""
    if dist.is_initialized() and dist.get_backend() != "gloo":
        from deepspeed.accelerator import get_accelerator

        return torch.device(get_accelerator().current_device_name())
    return torch.device("cpu")


def _shm_mapped() -> set[str]:
    """The files in ``/dev/shm`` this process has mapped and that still have a name (none without ``/proc``)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = [line.split(None, 5)[5].rstrip("\n") for line in f if len(line.split(None, 5)) == 6]
    except OSError:
        return set()
    return {p for p in paths if p.startswith("/dev/shm/") and not p.endswith("(deleted)")}


@contextmanager
def releasing_shm_files():
    """Around the process group's start: afterwards, unlink the shared-memory files it mapped.

    With all ranks on one host, DeepSpeed's CPU all-reduce creates a 66 MB file per rank in
    RAM-backed ``/dev/shm`` while the process group starts, maps its peers' files, and never
    removes them (nor offers a call that would): every run would leave its buffers behind, holding
    memory until reboot. The files released are those that appeared among this process's own
    mappings meanwhile, so no file name is guessed and no other program's file is touched. They
    are unlinked after a barrier, when every rank has mapped every peer's file (the mappings
    outlive the names); the barrier runs on every rank, whether or not it has files to release.
    """
    before = _shm_mapped()
    yield
    started = _shm_mapped() - before
    if not dist.is_initialized():
        return
    barrier()
    for path in started:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def return_large_frees_to_os(threshold: int = 4 << 20) -> bool:
    """Serve host allocations of ``threshold`` bytes or more from their own mappings (glibc ``mallopt``).

    ZeRO-3 gathers each layer's parameters, uses and frees them, over and over. On a CPU host
    those are heap allocations that glibc keeps for reuse rather than returning, so a rank's
    resident memory grows step after step: XLM-R-large at ZeRO-3 on 2 ranks ran a 24 GiB machine
    out of memory by its third step, and peaked at 9.3 GiB per rank with this setting
    (``bench/ddp_vs_zero.py``; the same as ``MALLOC_MMAP_THRESHOLD_``). True when it was applied.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(name).mallopt(-3, threshold) == 1  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        return False


def settle_zero3_host_memory(ds_config: dict) -> bool:
    """For ZeRO-3 on a CPU host with more than one rank, ``return_large_frees_to_os``; True if applied.

    On one rank ZeRO-3 saves no memory anyway, and every large activation taking fresh pages
    each step cost 1.4x there (bench/vs_hf.py); DDP-like stages would pay it too (10%).
    """
    if zero_stage(ds_config) != 3 or comm_device().type != "cpu":
        return False
    return world_size() > 1 and return_large_frees_to_os()


def init_process_group(timeout_s: int) -> None:
    """Join (or, with no launcher, create) the process group on this host's accelerator."""
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    default_single_process_env()
    on_cpu = get_accelerator().device_name() == "cpu"
    if not on_cpu:
        # Before any collective: an NCCL barrier with no current device guesses one from the rank.
        get_accelerator().set_device(local_rank())
    with releasing_shm_files():  # DeepSpeed's CPU all-reduce buffers (none on GPU hosts)
        deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    if on_cpu:
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size())))
        # Ranks on one CPU host share its cores; oversubscription slows every rank down.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_size)))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in float64 on the backend's device (a copy; the input is left as it was)."""
    out = t.detach().to(device=comm_device(), dtype=torch.float64, copy=True)
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def mean_over_ranks(values: torch.Tensor) -> list[float]:
    """Element-wise mean over ranks of a 1-d tensor (any device), read back to the host once."""
    return (all_reduce_sum(values) / world_size()).tolist()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), on every rank, in rank order."""
    if not dist.is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)  # NCCL: goes through the current CUDA device, set at start-up
    return out


def from_main(obj):
    """Rank 0's ``obj`` (picklable), on every rank."""
    return gather_objects(obj if is_main() else None)[0]


@contextmanager
def main_first(local: bool = False):
    """Run the body on rank 0 (or each node's local rank 0) first, then on the others.

    For work whose result later ranks reuse: tokenizer training, preprocessing caches.
    """
    leader = local_rank() == 0 if local else is_main()
    if not leader:
        barrier()
    yield
    if leader:
        barrier()


class _RankFilter(logging.Filter):
    """Every line carries its rank, and no credential: URL passwords and secret query values are masked
    in the formatted message (a checkpoint root, a --resume location, an error quoting a URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from dist_robust.infra.redaction import redact

        record.rank = rank()
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines carry the rank; ranks other than 0 log warnings and errors only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s [rank%(rank)s] %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root = logging.getLogger("dist_robust")
    root.handlers[:] = [handler]
    root.setLevel(level if is_main() else logging.WARNING)
    root.propagate = False
