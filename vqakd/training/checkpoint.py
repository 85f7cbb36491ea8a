"""Checkpoints: atomic save, safe load (`torch.load(weights_only=True)`), original-code import;
the networks of a run (fresh for a stage, or from a checkpoint) and the checks that a checkpoint
fits this run's data and settings.

Our checkpoint (`build_checkpoint`) is a dict of tensors and plain Python values only, so it loads
with `weights_only=True` (no arbitrary unpickling). A checkpoint of the original DualVGR/VQAKD
code (it has `model_kwargs`) is converted by `model.original.convert_original_checkpoint` and
returned in the same shape, minus the training state.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import shutil
from typing import Any, Mapping

import numpy as np
import torch

import vqakd
from model import DualVGR, ModelConfig
from model.original import OriginalCheckpointError, convert_original_checkpoint
from vqakd.core.config import Config
from vqakd.core.errors import UserError, require_file
from vqakd.core.files import atomic_path
from vqakd.data.batches import DataBundle, glove_matrix_for
from vqakd.extraction.weights import load_state_strict

CHECKPOINT_FORMAT = "vqakd-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
# Free bytes under which a failed checkpoint write is taken for a full disk.
DISK_NEARLY_FULL = 256 << 20


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, in weights_only-loadable types."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": numpy_state["bit_generator"],
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)     # also seeds every CUDA device


def build_checkpoint(*, model: torch.nn.Module, stage: str, epoch: int, optimizer=None, scheduler=None,
                     **record: Any) -> dict[str, Any]:
    """Our checkpoint: the model (config and weights), the training state (optimizer, scheduler,
    RNGs) and the `record` entries given (empty when not): metrics (the epoch's row), history, best,
    vocab, config, inference (inference_record.py: what predict.py needs) and inputs (fingerprints)."""
    module = getattr(model, "module", model)      # unwrap DistributedDataParallel
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "toolkit_version": vqakd.__version__,
        "stage": stage,
        "epoch": epoch,
        "model_config": dataclasses.asdict(module.config),
        "state_dict": module.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": capture_rng_state(),
        "metrics": {}, "history": [], "best": {}, "vocab": {}, "config": {}, "inference": {}, "inputs": {},
        **record,
    }


def save_checkpoint(path: str, checkpoint: Mapping[str, Any]) -> None:
    """Write atomically: a crash never leaves a half-written file at `path`."""
    with atomic_path(path) as tmp:
        try:
            torch.save(dict(checkpoint), tmp)
        except RuntimeError as exc:
            # torch's zip writer reports a full disk without an errno: "file write failed", or
            # "[enforce fail at inline_container.cc] unexpected pos" when the last write was short.
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(tmp))).free
            if any(text in str(exc) for text in ("write failed", "unexpected pos")) and free < DISK_NEARLY_FULL:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp) from None
            raise
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load ours or an original DualVGR/VQAKD checkpoint (the latter converted to our key names);
    always at least {"model_config": dict, "state_dict": dict, "epoch", "stage", "original"}."""
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder; give best.pt or last.pt inside it")
    require_file(path, "checkpoint")
    with open(path, "rb") as handle:
        head = handle.read(2)
    # A zip archive (torch.save) or a pickle (before PyTorch 1.6); anything else would fail in the
    # legacy unpickler with a message about its internals.
    if head != b"PK" and head[:1] != b"\x80":
        raise UserError(f"{path}: not a PyTorch checkpoint (neither the zip archive torch.save writes nor a "
                        "pickle); give a best.pt or last.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle/EOF/runtime errors all mean "not a readable checkpoint"
        raise UserError(f"{path}: cannot read it as a checkpoint ({_first_line(exc)}); the file may be "
                        "truncated, or it holds objects other than tensors and plain values") from None
    if not isinstance(checkpoint, Mapping):
        raise UserError(f"{path}: not a checkpoint (a {type(checkpoint).__name__}, expected a dict)")
    if "model_kwargs" in checkpoint:
        try:
            claimed: dict = {}
            model_config, state_dict = convert_original_checkpoint(checkpoint, path, claimed)
        except OriginalCheckpointError as exc:
            raise UserError(str(exc)) from None
        notes = [f"{path}: model_kwargs claims {key}={value}, but its weights hold {getattr(model_config, key)}; "
                 f"loaded with {key}={getattr(model_config, key)} (the weights decide)" for key, value in claimed.items()]
        return {"format": "original-dualvgr", "original": True, "stage": None, "claimed_model_kwargs": claimed,
                "notes": notes, "epoch": checkpoint.get("epoch"), "model_config": dataclasses.asdict(model_config),
                "state_dict": state_dict, "vocab": {}, "config": {}, "metrics": {}, "history": [], "best": {}}
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a vqakd checkpoint (no 'format': {CHECKPOINT_FORMAT!r}) and not an original "
                        "DualVGR checkpoint (no 'model_kwargs')")
    for key in ("model_config", "state_dict"):
        if not isinstance(checkpoint.get(key), Mapping):
            raise UserError(f"{path}: checkpoint entry {key!r} is missing or not a mapping")
    checkpoint = dict(checkpoint)
    checkpoint["original"] = False
    # Checkpoints saved before the question gates got their name call them "punishment".
    checkpoint["state_dict"] = {key.replace("_punishment.", "_gate."): value
                                for key, value in checkpoint["state_dict"].items()}
    return checkpoint


def model_config_from(checkpoint: Mapping[str, Any], path: str) -> ModelConfig:
    raw = dict(checkpoint["model_config"])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{path}: model_config has unknown field {unknown[0]!r}; written by a newer toolkit?")
    try:
        return ModelConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: invalid model_config ({exc})") from None


def check_sizes(model_config: ModelConfig, state_dict: Mapping[str, Any], path: str) -> None:
    """The sizes in `model_config` are those of the weights in the file, checked on the meta device
    before a real network is built: a damaged size would otherwise try to allocate terabytes."""
    try:
        with torch.device("meta"):
            expected = DualVGR(model_config).state_dict()
    except (RuntimeError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: model_config does not describe a network ({_first_line(exc)})") from None
    sizes = {name: value for name, value in dataclasses.asdict(model_config).items()
             if isinstance(value, int) and not isinstance(value, bool)}
    mismatched = []
    for key, value in expected.items():
        got = state_dict.get(key)
        if isinstance(got, torch.Tensor) and tuple(got.shape) != tuple(value.shape):
            wrong = [size for size in value.shape if size not in got.shape]
            culprits = [f"{name} {number}" for name, number in sizes.items() if number in wrong]
            mismatched.append((key, tuple(got.shape), tuple(value.shape), culprits))
    if not mismatched:
        return              # missing keys and non-tensors are named by load_state_strict
    # Name the size most likely at fault: the first mismatch that shows a model_config value.
    key, got, needed, culprits = next((m for m in mismatched if m[3]), mismatched[0])
    because = f"model_config {culprits[0]} of the file" if culprits else "the file's model_config"
    raise UserError(f"{path}: checkpoint weights do not fit the model: key {key!r} has shape {got}, "
                    f"the model needs {needed} (from {because}; is the file damaged or edited?)")


def model_from_checkpoint(checkpoint: Mapping[str, Any], path: str, device: torch.device) -> DualVGR:
    """The network a (loaded) checkpoint describes, with its weights loaded, on `device`."""
    model_config = model_config_from(checkpoint, path)
    check_sizes(model_config, checkpoint["state_dict"], path)
    model = DualVGR(model_config)
    load_state_strict(model, checkpoint["state_dict"], path)
    return model.to(device)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_config_for_stage(config: Config, stage: str, bundle: DataBundle) -> ModelConfig:
    """The network of `stage` (its graph layers) for this run's vocabulary."""
    try:
        return ModelConfig(question_vocab_size=bundle.vocab.question_size, answer_vocab_size=bundle.vocab.answer_size,
                           graph_layers=config.stage(stage).graph_layers, **dataclasses.asdict(config.model))
    except ValueError as exc:
        raise UserError(f"invalid model settings: {exc}") from None


def build_model_for_stage(config: Config, stage: str, bundle: DataBundle, device: torch.device,
                          progress: bool) -> DualVGR:
    """A freshly initialised network of `stage` for this run's vocabulary, with the GloVe word
    vectors when the config asks for them, on `device`."""
    model = DualVGR(model_config_for_stage(config, stage, bundle))
    glove = glove_matrix_for(config, bundle, progress)
    if glove is not None:
        try:
            model.load_glove(glove)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    return model.to(device)


def check_vocab_match(checkpoint: Mapping[str, Any], path: str, bundle: DataBundle, what: str) -> None:
    """The checkpoint was trained with this run's vocabulary (sizes, and the file's hash when saved)."""
    model_config = checkpoint["model_config"]
    vocab = bundle.vocab
    for key, size, name in (("question_vocab_size", vocab.question_size, "question"),
                            ("answer_vocab_size", vocab.answer_size, "answer")):
        if model_config.get(key) != size:
            raise UserError(f"{path}: {what} was trained with a {name} vocabulary of {model_config.get(key)} "
                            f"entries but {vocab.path} has {size}; use the vocabulary it was trained with")
    saved_hash = (checkpoint.get("vocab") or {}).get("sha256")
    if saved_hash and saved_hash != vocab.sha256:
        raise UserError(f"{path}: {what} was trained with a different vocabulary file (sha256 "
                        f"{saved_hash[:12]}…, {vocab.path} has {vocab.sha256[:12]}…); token indices would not match")


def check_same_model(checkpoint: Mapping[str, Any], path: str, model: DualVGR) -> None:
    """A run being resumed was written for exactly this network."""
    ours = dataclasses.asdict(model.config)
    saved = checkpoint["model_config"]
    changed = [key for key in ours if saved.get(key) != ours[key]]
    if changed:
        raise UserError(f"{path}: written for a different model ({changed[0]} {saved.get(changed[0])} "
                        f"vs {ours[changed[0]]} now); use --overwrite to start again")
