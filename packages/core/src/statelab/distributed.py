"""Data-parallel plumbing for ``torchrun --nproc_per_node=N -m statelab train SPEC``.

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``; with ``WORLD_SIZE > 1`` the trainer initialises a process group (nccl on
CUDA, gloo on CPU), wraps the model in ``DistributedDataParallel``, gives each rank its
slice of the global batch, and lets rank 0 alone log, evaluate, sample and checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_gather_rows", "any_flag", "barrier", "init", "resolve_device", "shutdown"]


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False
    forced: bool = False  # STATELAB_DDP=1: process group and DDP even for one process

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.forced

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(pref)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device is {pref!r} but CUDA is not available here; use device: auto or cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init(device_pref: str = "auto") -> DistInfo:
    """Read torchrun's environment; set up the process group when ``WORLD_SIZE > 1``.

    ``STATELAB_DDP=1`` sets it up for a single process too, which exercises the whole
    data-parallel path (NCCL on a GPU) on a machine with one device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_pref, local)
    info = DistInfo(rank, local, world, device, forced=os.environ.get("STATELAB_DDP", "") == "1")
    if info.enabled:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
            info.initialized_here = True
    return info


def shutdown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def any_flag(info: DistInfo, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (a collective: all ranks call it)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_rows(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's ``t`` along dim 0 in rank order (a collective)."""
    if not info.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, 0)
