"""What one extraction is: its settings, how its work is split, what it returns, and the
identity (the settings that determine the numbers) stored with every part and output."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Mapping, NamedTuple, Sequence

from vqakd.data.annotations import Video
from vqakd.core.errors import UserError

FEATURE_DIM = 2048
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_NUM_CLIPS = 8
DEFAULT_FRAMES_PER_CLIP = 16
DEFAULT_CHUNK_VIDEOS = 16
DEFAULT_RANDOM_SEED = 0
MANIFEST_FORMAT = 1
# The settings that determine a video's features (recorded in feature files and checkpoints).
FEATURE_SETTINGS = ("model", "num_clips", "frames_per_clip", "image_height", "image_width", "kinetics_mean",
                    "precision", "random_weights", "random_seed", "weights_sha256", "normalization",
                    "decode_past_damage")
# What resuming and merging compare: also the video list, the chunks and the toolkit (not the weights path).
RUN_SETTINGS = FEATURE_SETTINGS + ("format", "toolkit_version", "dataset", "feature_dataset", "normalisation",
                                   "chunk_videos", "videos", "videos_sha256")


@dataclasses.dataclass(frozen=True)
class ExtractionSettings:
    """Everything that determines the extracted numbers."""
    dataset: str
    model: str
    num_clips: int = DEFAULT_NUM_CLIPS
    frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP
    image_height: int | None = None     # None: the model's default size
    image_width: int | None = None
    weights: str | None = None          # None: look in the default places (see weights.find_weights)
    random_weights: bool = False
    random_seed: int = DEFAULT_RANDOM_SEED
    kinetics_mean: bool = False
    precision: str = "fp32"
    chunk_videos: int = DEFAULT_CHUNK_VIDEOS
    normalization: str = "original"     # resnet101: a key of networks.NORMALIZATIONS
    decode_past_damage: bool = False    # skip packets the decoder rejects instead of stopping

    @classmethod
    def from_record(cls, record: Mapping) -> "ExtractionSettings":
        """The settings a feature file recorded (or the command line's flags name): other keys are
        ignored; an entry it lacks or holds as None takes its default."""
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{"dataset": "msvd-qa", **{key: value for key, value in record.items()
                                               if key in known and value is not None}})


class ExtractionResult(NamedTuple):
    output: str
    report: str
    videos: int
    written: int
    failures: list[dict]
    already_complete: bool
    merged: bool = True          # False: one shard's parts, to be merged with merge_parts
    damaged: list[dict] = []     # videos written from damaged files (truncated or packets skipped)


@dataclasses.dataclass(frozen=True)
class Shard:
    """One of `count` separate runs of one extraction: it makes the chunks k with k % count == index."""
    count: int = 1
    index: int = 0

    def __post_init__(self):
        if self.count < 1:
            raise UserError(f"--num-shards must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise UserError(f"--shard-index must be in 0..{self.count - 1} for --num-shards {self.count}, "
                            f"got {self.index}")

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index


def videos_digest(videos: Sequence[Video]) -> str:
    digest = hashlib.sha256()
    for video in videos:
        digest.update(f"{video.video_id}\t{video.name}\n".encode("utf-8"))
    return digest.hexdigest()


def identity(settings: Mapping | None, keys: Sequence[str] = RUN_SETTINGS) -> dict | None:
    """The entries of `settings` (a manifest, or recorded settings with FEATURE_SETTINGS) that count."""
    return None if settings is None else {key: settings[key] for key in keys if key in settings}


def identity_digest(settings: Mapping, keys: Sequence[str] = RUN_SETTINGS) -> str:
    """Hash of `identity`: stored in every chunk of a run; names predict.py's cached features."""
    return hashlib.sha256(json.dumps(identity(settings, keys), sort_keys=True).encode("utf-8")).hexdigest()


def difference(saved: dict | None, manifest: dict) -> str:
    """How `saved` was made differently from `manifest`, for messages ("made <difference>")."""
    if saved is None:
        return "by something else (no readable extraction settings in it)"
    # The most telling first: the manifest lists the model before the sizes and the hashes.
    differing = [f"{key}: {saved.get(key)!r} there, {value!r} now" for key, value in manifest.items()
                 if key in RUN_SETTINGS and saved.get(key) != value]
    if not differing:
        return "with other settings"
    more = f"; and {len(differing) - 3} more" if len(differing) > 3 else ""
    return f"with other settings ({'; '.join(differing[:3])}{more})"
