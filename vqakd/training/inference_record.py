"""What a checkpoint records so that a new video can be answered exactly as the training data was:
the extraction settings the feature files' own attributes hold (written by
preprocess/preprocess_features.py; None for files made by other code, whose settings predict.py
then needs as flags) and the vocabulary's tokens.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Optional

from vqakd.core.errors import UserError
from vqakd.extraction.networks import FEATURE_KINDS
from vqakd.extraction.settings import FEATURE_SETTINGS, identity

RECORD_FORMAT = 1
RECORDED_KEYS = FEATURE_SETTINGS + ("feature_dataset", "normalisation", "weights", "dataset", "toolkit_version")
# How the extractors name the "weights hash" of a randomly initialised network.
RANDOM_WEIGHTS = re.compile(r"^random \(seed (-?\d+)\)$")


def _plain(value: Any) -> Any:
    """HDF5 attributes come back as numpy scalars; checkpoints want plain Python values."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return value


def read_extraction_settings(path: str) -> Optional[dict[str, Any]]:
    """The extraction settings stored in one feature file, or None when it has none."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            attrs = {key: _plain(value) for key, value in handle.attrs.items()}
    except OSError as exc:
        raise UserError(f"{path}: cannot open as HDF5 ({exc})") from None
    manifest = attrs.get("manifest")
    if isinstance(manifest, str):
        try:
            attrs.update(json.loads(manifest))
        except ValueError:
            raise UserError(f"{path}: its 'manifest' attribute is not valid JSON") from None
    if "model" not in attrs or "weights_sha256" not in attrs:
        return None
    settings = {key: attrs[key] for key in RECORDED_KEYS if key in attrs and key != "random_seed"}
    for key in ("random_weights", "kinetics_mean", "decode_past_damage"):
        settings[key] = bool(settings.get(key, False))
    # Files from before the normalisation option: ResNet-101 inputs used torchvision's constants.
    settings.setdefault("normalization", "torchvision" if settings["model"] == "resnet101" else "original")
    settings["random_seed"] = random_seed_of(settings, path)
    for key in ("num_clips", "frames_per_clip", "image_height", "image_width"):
        if key in settings:
            settings[key] = int(settings[key])
    return settings


def random_seed_of(settings: Mapping[str, Any], where: str) -> Optional[int]:
    if not settings.get("random_weights"):
        return None
    if settings.get("random_seed") is not None:
        return int(settings["random_seed"])
    match = RANDOM_WEIGHTS.match(str(settings.get("weights_sha256", "")))
    if match is None:
        raise UserError(f"{where}: random weights but no seed in weights_sha256 "
                        f"({settings.get('weights_sha256')!r})")
    return int(match.group(1))


def inference_record(appearance_path: str, motion_path: str, vocab) -> dict[str, Any]:
    """What `build_checkpoint(inference=...)` stores: {"format", "features": {kind: settings or None},
    "vocabulary": {question/answer token_to_idx, sha256}}; `vocab`: a vqakd.data.batches.Vocabulary."""
    return {
        "format": RECORD_FORMAT,
        "features": {kind: read_extraction_settings(path)
                     for kind, path in zip(FEATURE_KINDS, (appearance_path, motion_path))},
        "vocabulary": {"question_token_to_idx": dict(vocab.question_token_to_idx),
                       "answer_token_to_idx": dict(vocab.answer_token_to_idx),
                       "sha256": vocab.sha256},
    }


def recorded_features(checkpoint: Mapping[str, Any], where: str) -> dict[str, dict]:
    """The extraction settings of the features `checkpoint` was trained on, for each kind it records
    (none for a checkpoint made before the record or by the original code)."""
    record = (checkpoint.get("inference") or {}).get("features") or {}
    return {kind: dict(record[kind], random_seed=random_seed_of(record[kind], where))
            for kind in FEATURE_KINDS if record.get(kind)}


def feature_differences(checkpoint: Mapping[str, Any], paths: Mapping[str, str]) -> list[str]:
    """How the feature files at `paths` ({kind: path}) were made differently from those the
    checkpoint was trained on, as recorded in it (one entry per difference)."""
    found = []
    for kind, settings in recorded_features(checkpoint, "the checkpoint").items():
        trained = identity(settings, FEATURE_SETTINGS)
        given = identity(read_extraction_settings(paths[kind]), FEATURE_SETTINGS)
        if given is None:
            found.append(f"{paths[kind]} records no extraction settings; the {kind} features the checkpoint was "
                         "trained on do")
            continue
        found += [f"{kind} {key} {given.get(key)!r} in {paths[kind]}, {value!r} in training"
                  for key, value in trained.items() if given.get(key) != value]
    return found
