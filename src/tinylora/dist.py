"""Data parallelism over torchrun: prompts are sharded over ranks, v's gradient (u floats) is all-reduced."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """(rank, world_size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # rank 0 evaluates alone (before, during with --eval-every, after) while the others wait in a collective:
        # a timeout of hours, not NCCL's default 10 minutes, lets a long evaluation finish
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=6))
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; NCCL reduces only GPU tensors, so a CPU tensor makes a round trip."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl" and x.device.type == "cpu":
            y = x.cuda()
            dist.all_reduce(y, op=dist.ReduceOp.SUM)
            x.copy_(y.cpu())
        else:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_sum_grads(params) -> None:
    """Sum gradients over ranks (losses are already divided by the global token count)."""
    if dist.is_available() and dist.is_initialized():
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
