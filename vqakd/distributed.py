"""Process-group helpers that are no-ops in a single process and work under `torchrun`.

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE; `init_distributed()` starts the default
process group from them (NCCL when the device is CUDA, else gloo). Without them everything
here behaves as rank 0 of a world of size 1, so callers never branch on "am I distributed".
Metrics are kept as sums and counts so that `all_reduce_sum` gives the figures of the whole
split, not of one rank's share.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_world_size() -> int:
    """The world size `torchrun` announced (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device | None = None) -> bool:
    """Start the process group when launched with several processes; returns whether it did."""
    if env_world_size() <= 1 or is_initialized():
        return is_initialized()
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    """Only the main process writes files and logs."""
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (and return it); identity in a single process."""
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
