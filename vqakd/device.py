"""`--device auto|cpu|cuda|cuda:N` resolution, shared by every script; `resolve_process_device`
adds the rule for processes launched by torchrun."""

from __future__ import annotations

import torch

from vqakd.distributed import env_world_size, launched_by_torchrun, local_rank
from vqakd.errors import UserError


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a user's device string into a torch.device, checking that it exists."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {spec!r} requested but only {torch.cuda.device_count()} "
                            "CUDA device(s) are visible")
    elif device.type != "cpu":
        raise UserError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:N")
    return device


def under_torchrun() -> bool:
    """This process is one of a launch by torchrun (even a launch of one process)."""
    return env_world_size() > 1 or launched_by_torchrun()


def resolve_process_device(spec: str = "auto", what: str = "--device") -> torch.device:
    """The device of this process, for training and feature extraction alike.

    Run alone, this is `resolve_device(spec)`. Under torchrun, where every process needs a GPU
    of its own, the rule is:

    * auto (with CUDA available) and cuda mean cuda:LOCAL_RANK, the GPU of this process on
      its own node; a LOCAL_RANK beyond the visible GPUs is an error (too many processes
      per node);
    * cpu (or auto without CUDA) is the CPU of every process;
    * cuda:N is refused: it would put every process on the same GPU. The GPUs a launch uses
      are chosen with CUDA_VISIBLE_DEVICES.

    A chosen GPU with an index also becomes the current CUDA device, so that stray
    allocations (the pin-memory thread, library workspaces) follow it instead of opening a
    context on GPU 0. `what` names the setting in messages (--device, train.device, ...).
    """
    if not under_torchrun():
        device = resolve_device(spec)
    else:
        spec = (spec or "auto").strip().lower()
        if spec.startswith("cuda:"):
            raise UserError(f"{what} {spec!r}: under torchrun every process uses cuda:LOCAL_RANK; set {what} "
                            "to auto or cuda (and pick GPUs with CUDA_VISIBLE_DEVICES)")
        device = resolve_device(spec)
        if device.type == "cuda":
            index = local_rank()
            if index >= torch.cuda.device_count():
                raise UserError(f"LOCAL_RANK {index} but only {torch.cuda.device_count()} CUDA device(s) are "
                                "visible; use --nproc_per_node at most the number of GPUs per node")
            device = torch.device("cuda", index)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device
