"""Rank discipline in one place: who prints, who logs, who writes, and how metrics are reduced."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist


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


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer once every rank has mapped it.

    With all ranks on one host, DeepSpeed's CPU all-reduce creates a 66 MB file per rank in
    RAM-backed ``/dev/shm`` while the process group starts, opens its peers' files by name, and
    never removes them: every run would leave its buffers behind, holding memory until reboot.
    After the barrier every rank has opened every peer's buffer, and the mappings outlive the name.
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port and dist.is_initialized()):
        return
    barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank()}")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over ranks (a copy; the input is left as it was)."""
    out = t.detach().clone().to(torch.float64)
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def mean_over_ranks(values: list[float]) -> list[float]:
    """Element-wise mean of a list of floats over ranks."""
    summed = all_reduce_sum(torch.tensor(values, dtype=torch.float64))
    return (summed / world_size()).tolist()


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
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = rank()
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
