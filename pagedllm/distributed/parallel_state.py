"""The process groups of one engine replica: the world of tp x pp ranks and each stage's tensor-parallel group.

Rank = stage * tp + tp_rank; rank 0 (the engine's process) is stage 0's first tensor-parallel rank.
The layers shard over the tensor-parallel group; a single process is a group of one.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pagedllm.config import ParallelConfig

COLLECTIVE_TIMEOUT = timedelta(seconds=120)  # upper bound; a dead peer's closed socket fails a collective at once


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


_TP = TPGroup()


def get_tp_group() -> TPGroup:
    return _TP


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def local_init_method() -> str:
    """A TCP rendezvous on a free local port, for ranks this process spawns itself."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """CUDA ranks take the GPU torchrun assigns (LOCAL_RANK), or their rank's; CPU ranks share the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


def init_parallel_groups(rank: int, parallel: ParallelConfig, init_method: str, device: torch.device) -> None:
    """Join the world (gloo on CPU, NCCL on CUDA) and this rank's stage's tensor-parallel group; every rank
    creates every group, as torch.distributed requires."""
    global _TP
    tp = parallel.tensor_parallel_size
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=parallel.world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(parallel.pipeline_parallel_size)]
    stage, tp_rank = divmod(rank, tp)
    _TP = TPGroup(tp_rank, tp, groups[stage]) if tp > 1 else TPGroup()


@contextlib.contextmanager
def single_rank_group():
    """Build a model for this process alone (a draft model beside a tensor-parallel target's rank 0): layers take
    their group when built, so these hold a group of one and never join the target's collectives."""
    global _TP
    saved, _TP = _TP, TPGroup()
    try:
        yield
    finally:
        _TP = saved


def destroy_parallel_groups() -> None:
    """Leave the groups, so that another engine in this process can form its own."""
    global _TP
    _TP = TPGroup()
    if dist.is_initialized():
        dist.destroy_process_group()
