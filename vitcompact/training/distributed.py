"""DistributedDataParallel plumbing for runs under `torchrun` (gloo on CPU, NCCL on GPU).

Outside `torchrun` (no WORLD_SIZE > 1 in the environment) everything here is a no-op, so the
same code path serves one process and many.
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

Masks = TypeVar("Masks")


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> None:
    """Join the process group torchrun describes (once per process)."""
    if launched() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the process group's, or torchrun's RANK before the group is joined."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around `model` when several processes run; construction broadcasts rank 0's weights."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def epoch_loader(loader: DataLoader, seed: int, epoch: int) -> DataLoader:
    """The training loader for one epoch, its order fixed by (seed, epoch) and sharded by rank.

    Re-created per epoch so a resumed run sees exactly the order an uninterrupted one would.
    """
    if active():
        sampler = DistributedSampler(loader.dataset, num_replicas=world_size(), rank=rank(),
                                     shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(loader.dataset, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=False,
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory)


def mean_across_ranks(value: float, device: torch.device) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def broadcast_masks(masks: Masks) -> Masks:
    """Rank 0's masks (a `PruneMasks`, rebuilt by its own type so that training does not import
    pruning) on every rank: every rank must cut exactly the same units."""
    if not active():
        return masks
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = {}
    for name in masks.layout.weight_names():
        t = masks.masks[name].to(device=device, dtype=torch.uint8).contiguous()
        dist.broadcast(t, src=0)
        out[name] = t.bool().to(masks.masks[name].device)
    return type(masks)(out, masks.layout)


def barrier() -> None:
    if active():
        dist.barrier()
