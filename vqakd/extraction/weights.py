"""Weights files of the two networks: where they are found, what identifies them, and how
they are read (tensors only) and loaded strictly. Nothing is ever downloaded."""

from __future__ import annotations

import os
from typing import Mapping, NamedTuple

import torch
from torch import nn

from vqakd.core.errors import UserError
from vqakd.core.files import REPO_ROOT


class WeightsIdentity(NamedTuple):
    """The weights of one run: the file's absolute path and SHA-256, or "random" and the seed."""
    path: str
    sha256: str


def find_weights(given: str | None, file_names: tuple[str, ...], what: str, how_to_get: str) -> str:
    """The weights file: `given` (--weights), else one of `file_names` in data/weights or torch's cache
    folder (`torch.hub.get_dir()` only names $TORCH_HOME/hub: it is looked in, nothing is downloaded)."""
    if given:
        if not os.path.isfile(given):
            raise UserError(f"{what} file not found: {given}; {how_to_get}")
        return given
    folders = [os.path.join(REPO_ROOT, "data", "weights"), os.path.join(torch.hub.get_dir(), "checkpoints")]
    for folder in folders:
        for name in file_names:
            candidate = os.path.join(folder, name)
            if os.path.isfile(candidate):
                return candidate
    looked = ", ".join(os.path.join(folder, file_names[0]) for folder in folders)
    raise UserError(f"no {what} file given (--weights) or found (looked for {looked}); {how_to_get}")


def load_weights(network: nn.Module, path: str, what: str) -> None:
    """Load the tensors (only: weights_only) of the state dict or checkpoint file `path`, any `module.`
    prefix removed, into `network`, strictly (an error names the first bad key)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, zipfile errors...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot read {what} (truncated or not a PyTorch weights file: "
                        f"{first_line})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: {what} holds no state dict (found {type(obj).__name__})")
    # What is not a tensor of the model is refused by `load_state_strict`, naming the key.
    state_dict = {str(key).removeprefix("module."): value for key, value in obj.items()}
    load_state_strict(network, state_dict, path, what=what.removesuffix(" weights"))


def load_state_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str,
                      what: str = "checkpoint") -> None:
    """`load_state_dict(strict=True)` with a one-line error naming `path`, `what` it holds and the
    first missing, unexpected or misshapen key. A missing BatchNorm `num_batches_tracked` is allowed
    (files saved before PyTorch 0.4.1 lack it; eval mode never uses it): the model's own is kept.
    """
    expected = model.state_dict()
    problem = f"{path}: {what} weights do not fit the model"
    missing = [key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            count = f" ({len(keys)} {label})" if len(keys) > 1 else ""
            raise UserError(f"{problem}: {label} key {keys[0]!r}{count}")
    state_dict = {**expected, **state_dict}     # the missing counters: the model's own
    for key, value in expected.items():
        got = state_dict[key]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(value.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise UserError(f"{problem}: key {key!r} has shape {shape}, the model needs {tuple(value.shape)}")
    model.load_state_dict(state_dict, strict=True)
