"""The networks of a run: a fresh model for a stage, and the checks that a checkpoint fits this
run's data and settings."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from model import DualVGR, ModelConfig
from vqakd.core.config import Config
from vqakd.data.batches import DataBundle, glove_matrix_for
from vqakd.core.errors import UserError


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
