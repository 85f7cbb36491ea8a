"""Decoding videos into network inputs in DataLoader worker processes, overlapped with the network;
a video that cannot be decoded comes back with its reason instead of inputs."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np
import torch

from vqakd.data.annotations import Video
from vqakd.extraction.video import VideoError, read_clip_frames


class DecodedVideo(NamedTuple):
    """What a decoding worker hands back for one video."""
    inputs: torch.Tensor | None             # uint8 network inputs (rows, ...), None on failure
    inverse: torch.Tensor | None = None     # (N, F) rows of `inputs` for each clip frame (frame models)
    error: str | None = None
    damage: dict | None = None              # truncation / skipped packets, for the failures report


@dataclasses.dataclass
class VideoDecodeDataset(torch.utils.data.Dataset):
    """The videos, and how a worker turns each file into network inputs (picklable, no network in it)."""
    videos: Sequence[Video]
    num_clips: int
    frames_per_clip: int
    size: tuple[int, int]
    per_frame: bool        # True: distinct frames (U, H, W, 3); False: clips (N, F, H, W, 3)
    threads: int
    past_damage: bool = False  # skip packets the decoder rejects instead of stopping there

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, position: int) -> DecodedVideo:
        try:
            clip_frames = read_clip_frames(self.videos[position].path, self.num_clips, self.frames_per_clip,
                                           self.size, self.threads, self.past_damage)
        except VideoError as exc:
            return DecodedVideo(None, error=exc.reason)
        except Exception as exc:  # one odd file must not stop a day-long run; the reason is reported
            return DecodedVideo(None, error=f"unexpected {type(exc).__name__}: {exc}")
        if self.per_frame:
            return DecodedVideo(torch.from_numpy(clip_frames.frames), torch.from_numpy(clip_frames.inverse),
                                damage=clip_frames.damage())
        return DecodedVideo(torch.from_numpy(np.ascontiguousarray(clip_frames.clips())),
                            damage=clip_frames.damage())
