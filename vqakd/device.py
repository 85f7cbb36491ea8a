"""`--device auto|cpu|cuda|cuda:N` resolution, shared by every script."""

from __future__ import annotations

import torch

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
