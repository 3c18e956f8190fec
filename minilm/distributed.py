"""torch.distributed for train.py under torchrun: joining the process group, and the few collective calls the loop
makes. Outside torchrun (one process) each is the plain single-process answer."""

import gc
import os

import torch
import torch.distributed as dist


def setup_distributed():
    """Join the process group when torchrun started us (WORLD_SIZE > 1). -> (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), world


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def global_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all ranks (itself outside torch.distributed)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on one (a signal may reach the ranks at different steps)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([float(flag)])
    dist.all_reduce(value)
    return bool(value.item())


def tear_down() -> None:
    """Destroy the process group once nothing else holds it. Call it after the objects that used the group are
    released (train.py drops its run first): a DDP reducer still alive would drop the group's last reference
    itself, destroying gloo's group with the GIL held while gloo's threads may wait for the GIL (a deadlock seen
    at exit under load); gc.collect frees one kept only by a reference cycle."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
