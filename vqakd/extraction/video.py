"""Video decoding for feature extraction, reproducing the original's OpenCV reading (docs/preprocessing.md):
T is the number of frames actually decoded, rotation is applied by quarter turns only, decoding stops at
the first rejected packet (unless `past_damage`), clips follow the original's index rule.

Decoding is sequential (seeks on AVI/mpeg4 are unreliable) and converts only the frames the clips
need; the packet count is the first guess at T, and a second pass fetches frames a different T
needs. No frame threads: they report a rejected packet late, at a thread-dependent place.
"""

from __future__ import annotations

import contextlib
import glob
import os
import stat
from dataclasses import dataclass
from typing import Collection

import numpy as np
from PIL import Image

from vqakd.core.errors import UserError
from vqakd.data.annotations import VIDEO_EXTENSIONS

try:
    import av
except ImportError:   # merging parts and reading features need no decoder
    av = None

# Containers whose index lists every video sample, so `stream.frames` is the packet count.
INDEXED_CONTAINERS = ("mov", "mp4")
RESIZE_FILTER = Image.Resampling.BICUBIC   # the original's Image.resize(size, Image.BICUBIC)
# Counter-clockwise quarter turns (FFmpeg's display rotation / 90) -> Pillow transpose.
QUARTER_TURNS = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180,
                 3: Image.Transpose.ROTATE_270}


class VideoError(Exception):
    """One video cannot be used; `reason` says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def require_decoder() -> None:
    """Fail with one clear line before any work when PyAV is not installed."""
    if av is None:
        raise UserError("video decoding needs PyAV, which is not installed: pip install av "
                        "(see requirements.txt)")
    if not hasattr(av.VideoFrame, "rotation"):
        raise UserError(f"PyAV {av.__version__} is too old: frames must carry the container's rotation "
                        "(VideoFrame.rotation); pip install --upgrade av (see requirements.txt)")


def check_frames_per_clip(frames_per_clip: int) -> str | None:
    """Why `frames_per_clip` cannot be used with the original's clip rule (None: it can)."""
    if frames_per_clip < 2 or frames_per_clip % 2:
        return (f"frames per clip must be even and at least 2, got {frames_per_clip}: the original "
                "clip rule takes F/2 frames each side of the centre, so an odd F gives clips of F-1 frames")
    return None


def clip_frame_indices(total_frames: int, num_clips: int, frames_per_clip: int) -> np.ndarray:
    """Frame indices (num_clips, frames_per_clip) of each clip, by the original's rule (quirks
    included: a clip cut by the end of the video leaves frame T-1 out of its slice and gets it
    back as padding; a video shorter than a clip is padded in front only)."""
    if total_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {total_frames}")
    if num_clips < 1:
        raise ValueError("num_clips must be positive")
    if problem := check_frames_per_clip(frames_per_clip):
        raise ValueError(problem)
    half = frames_per_clip // 2
    centres = np.linspace(0, total_frames, num_clips + 2).astype(np.int32)[1:num_clips + 1]
    clips = []
    for centre in centres.tolist():
        start = max(centre - half, 0)
        end = centre + half if centre + half <= total_frames else total_frames - 1
        clip = list(range(start, end))
        if start == 0:
            clip = [start] * (frames_per_clip - (end - start)) + clip
        if end == total_frames - 1:
            clip = clip + [end] * (frames_per_clip - (end - start))
        clips.append(clip[:frames_per_clip])
    return np.asarray(clips, dtype=np.int64).reshape(num_clips, frames_per_clip)


@dataclass(frozen=True)
class ClipFrames:
    """The decoded frames a video's clips need, each once: frame j of clip k is `frames[inverse[k, j]]`."""
    frames: np.ndarray        # (U, H, W, 3) uint8, U distinct frames in increasing index order
    inverse: np.ndarray       # (N, F) int64 into `frames`
    indices: np.ndarray       # (N, F) int64 frame indices in the video
    total_frames: int         # T: frames decoded (up to a rejected packet, unless past_damage)
    announced_frames: int     # frames the container announces (its index, else its packet count)
    truncated: bool = False   # decoding stopped at a damaged packet (frames after it left out)
    bad_packets: int = 0      # packets rejected (past_damage: skipped; otherwise the one stopped at)
    # Frames the header says the video has, and how many fewer may decode without it being damage.
    header_frames: int = 0
    header_slack: int = 0

    def clips(self) -> np.ndarray:
        """(N, F, H, W, 3) uint8: the clips with repeated frames materialised."""
        return self.frames[self.inverse]

    def damage(self) -> dict | None:
        """What the failures report says about this video's damage (None: none)."""
        announced = self.announced_frames
        if self.truncated:
            reason = (f"decoding stopped at a damaged packet after {self.total_frames} of {announced} frames "
                      "(as the original); --decode-past-damage decodes past it")
        elif self.bad_packets:
            reason = f"{self.bad_packets} damaged packets skipped (--decode-past-damage)"
        elif self.total_frames < self.header_frames - self.header_slack:
            # A file cut short decodes cleanly up to its end: only the header's count shows it.
            announced = self.header_frames
            reason = (f"{self.total_frames} of the {announced} frames its header announces decoded: "
                      "the file ends early (cut short?)")
        else:
            return None
        return {"frames_kept": self.total_frames, "frames_announced": announced, "reason": reason}


def _open(path: str) -> av.container.InputContainer:
    require_decoder()
    try:
        # stat() (unlike os.path.exists()) tells a missing file from one in an unsearchable folder.
        if stat.S_ISDIR(os.stat(path).st_mode):
            raise VideoError("is a directory, not a video file")
        return av.open(path, mode="r")
    except av.error.FFmpegError as exc:     # before the OSErrors: PyAV's errors are OSErrors too
        raise VideoError(f"cannot open: {getattr(exc, 'strerror', None) or exc}") from None
    except FileNotFoundError:
        # Files beside it with its name and another extension (or none).
        stem = os.path.splitext(path)[0]
        others = sorted(os.path.basename(other) for other in glob.glob(glob.escape(stem) + "*")
                        if os.path.splitext(other)[0] == stem and other != path)
        hint = (f" ({', '.join(others)} beside it has the same name: give it an extension FFmpeg reads, "
                f"one of {', '.join(VIDEO_EXTENSIONS)})" if others else "")
        raise VideoError(f"file not found{hint}") from None
    except PermissionError:
        raise VideoError("cannot open: Permission denied (a folder on its path is not readable)") from None
    except OSError as exc:
        raise VideoError(f"cannot read: {exc.strerror or exc}") from None


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoError("no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise VideoError("unsupported video codec (no decoder for it in this FFmpeg build)")
    return stream


def frame_counts(path: str) -> tuple[int, int, int]:
    """(frames the container announces: its index, else its packet count, without decoding a frame;
    frames its header announces; how many fewer may decode in a whole file): the header's count is
    the stream's frame count exactly, else duration x frame rate with 2% (at least 2 frames) of slack."""
    with _open(path) as container:
        stream = _video_stream(container)
        header, slack = 0, 0
        if stream.frames > 0:
            header = int(stream.frames)
            if any(name in INDEXED_CONTAINERS for name in container.format.name.split(",")):
                return header, header, 0
        elif stream.duration and stream.time_base and stream.average_rate:
            header = int(round(float(stream.duration * stream.time_base * stream.average_rate)))
            slack = max(2, header // 50)
        count = 0
        # An unreadable rest of the file ends it here, for decoding as well.
        with contextlib.suppress(av.error.FFmpegError):
            for packet in container.demux(stream):
                if packet.size > 0:   # empty packets are the demuxer's end-of-stream markers
                    count += 1
        return count, header, slack


@dataclass
class _Decoded:
    kept: dict[int, np.ndarray]   # frame index -> RGB uint8 (H, W, 3)
    decoded: int                  # frames decoded
    truncated: bool               # stopped at a rejected packet or an unreadable rest of file
    bad_packets: int              # packets rejected
    turns: int | None             # quarter turns (from the first frame; None: no frame yet)


def _decode_selected(path: str, wanted: Collection[int], size: tuple[int, int] | None, threads: int,
                     past_damage: bool = False, stop_after_wanted: bool = False) -> _Decoded:
    """Decode `path` in order, converting only the frames whose index is in `wanted`. Without
    `past_damage`, decoding ends at the first rejected packet, buffered frames included (as OpenCV).
    `stop_after_wanted` ends it after the last wanted frame (a second pass)."""
    wanted_set = set(int(i) for i in wanted)
    last_wanted = max(wanted_set) if wanted_set else -1
    result = _Decoded({}, 0, False, 0, None)

    def take(frames) -> bool:
        for frame in frames:
            if result.turns is None:
                # OpenCV reads one rotation for the whole stream and applies only multiples of 90 degrees.
                degrees = int(round(frame.rotation)) % 360
                result.turns = degrees // 90 if degrees % 90 == 0 else 0
            if result.decoded in wanted_set:
                image = frame.to_image()
                if result.turns:
                    image = image.transpose(QUARTER_TURNS[result.turns])
                if size is not None and image.size != size:
                    # (height, width) as given, read by Pillow as (width, height): the original's order.
                    image = image.resize(size, RESIZE_FILTER)
                result.kept[result.decoded] = np.asarray(image, dtype=np.uint8)
            result.decoded += 1
            if stop_after_wanted and result.decoded > last_wanted:
                return True
        return False

    with _open(path) as container:
        stream = _video_stream(container)
        if threads != 1:
            stream.codec_context.thread_type = "SLICE"
        stream.codec_context.thread_count = threads
        try:
            for packet in container.demux(stream):
                if past_damage and packet.is_corrupt:
                    result.bad_packets += 1
                    continue
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    result.bad_packets += 1
                    if past_damage:
                        continue
                    result.truncated = True
                    break
                if take(frames):
                    break
        except av.error.FFmpegError:
            # Unreadable rest of the file: the stream ends here, flushing what the decoder holds.
            result.truncated = not past_damage
            result.bad_packets += int(past_damage)
            with contextlib.suppress(av.error.FFmpegError):
                take(stream.codec_context.decode(None))
        return result


def read_clip_frames(path: str, num_clips: int, frames_per_clip: int,
                     size: tuple[int, int] | None = None, threads: int = 1,
                     past_damage: bool = False) -> ClipFrames:
    """Decode the frames of `num_clips` clips of `frames_per_clip` frames from the video at `path`.
    `size` (image_height, image_width) goes to Pillow in that order, as in the original; None keeps
    the decoded size. `threads`: FFmpeg's decoder threads (0: its choice)."""
    announced, expected, slack = frame_counts(path)
    guess = max(announced, 1)
    indices = clip_frame_indices(guess, num_clips, frames_per_clip)
    outcome = _decode_selected(path, np.unique(indices), size, threads, past_damage)
    total = outcome.decoded
    if total == 0:
        if announced == 0:
            raise VideoError("no frames")
        raise VideoError(f"no decodable frames ({announced} announced, "
                         f"{outcome.bad_packets} packets rejected)")
    kept = outcome.kept
    if total != guess:
        # Another frame count than announced: choose the clips again, decode the frames still missing.
        indices = clip_frame_indices(total, num_clips, frames_per_clip)
        missing = set(indices.ravel().tolist()) - kept.keys()
        if missing:
            kept.update(_decode_selected(path, missing, size, threads, past_damage, stop_after_wanted=True).kept)
    wanted = np.unique(indices)
    missing = [i for i in wanted.tolist() if i not in kept]
    if missing:   # a second decoding that ended earlier than the first: not deterministic
        raise VideoError(f"decoding the video twice gave different frames (frame {missing[0]} "
                         f"of {total} missing the second time)")
    shapes = {kept[int(i)].shape for i in wanted}
    if len(shapes) != 1:
        raise VideoError(f"frame size changes inside the video {sorted(shapes)}; pass an image size")
    frames = np.stack([kept[int(i)] for i in wanted])
    inverse = np.searchsorted(wanted, indices)
    return ClipFrames(frames, inverse, indices, total, announced, outcome.truncated,
                      outcome.bad_packets, expected, slack)
