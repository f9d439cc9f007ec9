"""Data parallelism over torchrun: prompts are sharded over ranks, v's gradient (u floats) is all-reduced."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init(device_type: str = "cpu") -> tuple[int, int]:
    """(rank, world_size); starts the process group when launched by torchrun: NCCL with one GPU per rank when
    the model trains on CUDA, gloo otherwise (a CPU run works on a GPU machine too)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = device_type == "cuda"
        if cuda:
            local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local_rank >= gpus:
                raise RuntimeError(f"torchrun started local rank {local_rank} but this machine has {gpus} GPU(s): "
                                   f"start at most {gpus} per machine (--nproc_per_node {gpus}), or pass --device cpu")
            torch.cuda.set_device(local_rank)
        # rank 0 evaluates alone (before, during with --eval-every, after) while the others wait in a collective:
        # a timeout of hours, not NCCL's default 10 minutes, lets a long evaluation finish
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
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
