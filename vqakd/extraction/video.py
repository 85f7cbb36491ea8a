"""Video decoding for feature extraction: which frames form each clip, and reading them.

The frames reproduce the original VQAKD preprocessing (docs/preprocessing.md), which read videos
with OpenCV's `VideoCapture` (FFmpeg underneath):

* The frame count T is the number of frames actually decoded, in presentation order.
* The container's rotation (display matrix) is applied, by multiples of 90 degrees only, as
  OpenCV does: phone videos come out upright.
* At the first packet the decoder rejects, decoding stops (OpenCV's `read()` fails there and the
  original loop ends). The video is kept with the frames decoded so far and the truncation is
  reported (`ClipFrames.truncated`). `past_damage=True` instead skips rejected packets and goes on,
  like FFmpeg's command line.
* Clips follow the original's index rule (`clip_frame_indices`), quirks included.
* Each kept frame is resized by Pillow (bicubic) with the size tuple given in the original's order.

How it is done quickly, with the same result:

* Decoding is sequential (no seeking: on AVI/mpeg4 a seek lands on key frames with unreliable
  timestamps), and only the frames the clips need are converted to RGB, rotated and resized.
* The clips depend on T, known only once the stream is decoded. The packet count (or the MP4/MOV
  index) is the first guess; the frames that guess needs are converted while the whole stream is
  decoded to learn T. When T differs from the guess (non-coded frames, damage), the clips are
  chosen again from T and the frames still missing are decoded in a second pass.
* The decoder runs single-threaded or with slice threads, never frame threads: with frame
  threads a rejected packet is reported late, so where decoding stops would depend on the
  thread count.

Every problem with one video is a `VideoError` carrying a short reason; the extraction records
it and goes on with the next video.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vqakd.core.errors import UserError
from vqakd.data.annotations import VIDEO_EXTENSIONS, other_containers

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
    """Frame indices (num_clips, frames_per_clip) of each clip, by the original's rule.

    Centres c = linspace(0, T, N+2) as int32, entries 1..N. start = c - F//2, end = c + F//2;
    start < 0 becomes 0, end > T becomes T - 1; the clip is frames[start:end]. When start == 0,
    F - (end - start) copies of frames[start] go in front; then when end == T - 1, F - (end - start)
    copies of frames[end] go at the back; the first F frames are kept. So a clip cut by the end
    of the video leaves frame T-1 out of its slice and gets it back as padding, and a video
    shorter than a clip is padded in front only (the back padding falls beyond F).
    """
    if total_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {total_frames}")
    if num_clips < 1:
        raise ValueError("num_clips must be positive")
    problem = check_frames_per_clip(frames_per_clip)
    if problem:
        raise ValueError(problem)
    half = frames_per_clip // 2
    centres = np.linspace(0, total_frames, num_clips + 2).astype(np.int32)[1:num_clips + 1]
    clips = []
    for centre in centres.tolist():
        start, end = centre - half, centre + half
        if start < 0:
            start = 0
        if end > total_frames:
            end = total_frames - 1
        clip = list(range(start, end))
        if start == 0:
            clip = [start] * (frames_per_clip - (end - start)) + clip
        if end == total_frames - 1:
            clip = clip + [end] * (frames_per_clip - (end - start))
        clips.append(clip[:frames_per_clip])
    return np.asarray(clips, dtype=np.int64).reshape(num_clips, frames_per_clip)


@dataclass(frozen=True)
class ClipFrames:
    """The decoded frames a video's clips need, each stored once.

    `frames[inverse[k, j]]` is frame j of clip k; `indices[k, j]` is its index in the video.
    """
    frames: np.ndarray        # (U, H, W, 3) uint8, U distinct frames in increasing index order
    inverse: np.ndarray       # (N, F) int64 into `frames`
    indices: np.ndarray       # (N, F) int64 frame indices in the video
    total_frames: int         # T: frames decoded (up to a rejected packet, unless past_damage)
    announced_frames: int     # frames the container announces (its index, else its packet count)
    truncated: bool = False   # decoding stopped at a damaged packet (frames after it left out)
    bad_packets: int = 0      # packets rejected (past_damage: skipped; otherwise the one stopped at)
    rotation: int = 0         # counter-clockwise degrees applied (0, 90, 180 or 270)
    # Frames the header says the video has, and how many fewer may decode without it being damage.
    header_frames: int = 0
    header_slack: int = 0

    def clips(self) -> np.ndarray:
        """(N, F, H, W, 3) uint8: the clips with repeated frames materialised."""
        return self.frames[self.inverse]

    def damage(self) -> dict | None:
        """What the failures report says about this video's damage (None: none)."""
        if self.truncated:
            return {"frames_kept": self.total_frames, "frames_announced": self.announced_frames,
                    "reason": f"decoding stopped at a damaged packet after {self.total_frames} of "
                              f"{self.announced_frames} frames (as the original); "
                              "--decode-past-damage decodes past it"}
        if self.bad_packets:
            return {"frames_kept": self.total_frames, "frames_announced": self.announced_frames,
                    "reason": f"{self.bad_packets} damaged packets skipped (--decode-past-damage)"}
        if self.total_frames < self.header_frames - self.header_slack:
            # A file cut short (a download that stopped) decodes cleanly up to its end: only the
            # header's count shows what is missing. The frames kept are the original's.
            return {"frames_kept": self.total_frames, "frames_announced": self.header_frames,
                    "reason": f"{self.total_frames} of the {self.header_frames} frames its header announces "
                              "decoded: the file ends early (cut short?)"}
        return None


def _open(path: str) -> av.container.InputContainer:
    require_decoder()
    # os.path.exists() is False both for a missing file and for one inside a folder the user
    # cannot search; only stat() tells them apart, and the two need different fixes.
    try:
        info = os.stat(path)
    except FileNotFoundError:
        others = other_containers(path)
        hint = (f" ({', '.join(others)} beside it has the same name: give it an extension FFmpeg reads, "
                f"one of {', '.join(VIDEO_EXTENSIONS)})" if others else "")
        raise VideoError(f"file not found{hint}") from None
    except PermissionError:
        raise VideoError("cannot open: Permission denied (a folder on its path is not readable)") from None
    except OSError as exc:
        raise VideoError(f"cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise VideoError("is a directory, not a video file")
    try:
        return av.open(path, mode="r")
    except av.error.FFmpegError as exc:
        raise VideoError(f"cannot open: {_ffmpeg_message(exc)}") from None
    except OSError as exc:
        raise VideoError(f"cannot read: {exc.strerror or exc}") from None


def _ffmpeg_message(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoError("no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise VideoError("unsupported video codec (no decoder for it in this FFmpeg build)")
    return stream


def count_frames(path: str) -> tuple[int, str]:
    """(frames the container announces, where that came from), without decoding any frame."""
    container = _open(path)
    try:
        stream = _video_stream(container)
        format_names = container.format.name.split(",")
        if stream.frames > 0 and any(name in INDEXED_CONTAINERS for name in format_names):
            return int(stream.frames), "container index"
        count = 0
        try:
            for packet in container.demux(stream):
                if packet.size > 0:   # empty packets are the demuxer's end-of-stream markers
                    count += 1
        except av.error.FFmpegError:
            pass   # unreadable rest of the file: it ends here, for decoding as well
        return count, "packets"
    finally:
        container.close()


def header_frames(path: str) -> tuple[int, int]:
    """(frames the container's header announces, how many fewer may decode in a whole file): the
    stream's frame count (AVI's header, MP4's sample table) exactly, else duration x frame rate,
    which is approximate (2% and 2 frames of slack); (0, 0) when the header says neither."""
    container = _open(path)
    try:
        stream = _video_stream(container)
        if stream.frames > 0:
            return int(stream.frames), 0
        if stream.duration and stream.time_base and stream.average_rate:
            estimate = int(round(float(stream.duration * stream.time_base * stream.average_rate)))
            return estimate, max(2, estimate // 50)
        return 0, 0
    finally:
        container.close()


def quarter_turns(rotation: float) -> int:
    """Counter-clockwise quarter turns OpenCV applies for FFmpeg's display rotation (degrees,
    counter-clockwise): only multiples of 90 are applied, any other angle is ignored."""
    degrees = int(round(rotation)) % 360
    return degrees // 90 if degrees % 90 == 0 else 0


@dataclass
class _Decoded:
    kept: dict[int, np.ndarray]   # frame index -> RGB uint8 (H, W, 3)
    decoded: int                  # frames decoded
    at_end: bool                  # decoded up to the end (or the stop), not stopped early
    truncated: bool               # stopped at a rejected packet or an unreadable rest of file
    bad_packets: int              # packets rejected
    turns: int | None             # quarter turns (from the first frame; None: no frame yet)


def _decode_selected(path: str, wanted: np.ndarray, size: tuple[int, int] | None, threads: int,
                     past_damage: bool = False, stop_after_wanted: bool = False) -> _Decoded:
    """Decode `path` in order, converting only the frames whose index is in `wanted`.

    Without `past_damage`, decoding ends at the first packet the decoder rejects, frames still
    buffered in the decoder included (OpenCV's read() fails there). `stop_after_wanted` ends it
    right after the last wanted frame (for a second pass, once the frame count is known).
    """
    wanted_set = set(int(i) for i in wanted)
    last_wanted = max(wanted_set) if wanted_set else -1
    result = _Decoded({}, 0, False, False, 0, None)
    container = _open(path)

    def take(frames) -> bool:
        for frame in frames:
            if result.turns is None:
                # OpenCV reads one rotation for the whole stream; FFmpeg copies the stream's
                # display matrix onto every frame.
                result.turns = quarter_turns(frame.rotation)
            if result.decoded in wanted_set:
                image = frame.to_image()
                if result.turns:
                    image = image.transpose(QUARTER_TURNS[result.turns])
                if size is not None and image.size != size:
                    # The size tuple goes to Pillow as given, (height, width), which Pillow reads
                    # as (width, height): the original's order, the same for square sizes.
                    image = image.resize(size, RESIZE_FILTER)
                result.kept[result.decoded] = np.asarray(image, dtype=np.uint8)
            result.decoded += 1
            if stop_after_wanted and result.decoded > last_wanted:
                return True
        return False

    try:
        stream = _video_stream(container)
        if threads != 1:
            stream.codec_context.thread_type = "SLICE"
        stream.codec_context.thread_count = threads
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError:
                # Unreadable rest of the file: OpenCV (and FFmpeg) end the stream here, flushing
                # what the decoder holds.
                result.truncated = not past_damage
                result.bad_packets += int(past_damage)
                try:
                    take(stream.codec_context.decode(None))
                except av.error.FFmpegError:
                    pass
                break
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
                return result
        result.at_end = True
        return result
    finally:
        container.close()


def read_clip_frames(path: str, num_clips: int, frames_per_clip: int,
                     size: tuple[int, int] | None = None, threads: int = 1,
                     past_damage: bool = False) -> ClipFrames:
    """Decode the frames of `num_clips` clips of `frames_per_clip` frames from the video at `path`.

    `size` is (image_height, image_width), handed to Pillow's bicubic resize in that order as the
    original did: the frames come out image_width rows by image_height columns (the same for
    square sizes). None keeps the decoded size. `threads` is FFmpeg's decoder thread count (1
    inside DataLoader workers, 0 = FFmpeg's choice, slice threads only). `past_damage` skips
    packets the decoder rejects instead of stopping there.
    """
    announced, _ = count_frames(path)
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
        # The decoder gave another number of frames than the container announced: choose the
        # clips again from the true count, and decode the frames the first pass did not keep.
        indices = clip_frame_indices(total, num_clips, frames_per_clip)
        missing = np.array([i for i in np.unique(indices).tolist() if i not in kept], dtype=np.int64)
        if len(missing):
            second = _decode_selected(path, missing, size, threads, past_damage, stop_after_wanted=True)
            kept = {**kept, **second.kept}
    wanted = np.unique(indices)
    missing_frames = [int(i) for i in wanted if int(i) not in kept]
    if missing_frames:   # a second decoding that ended earlier than the first: not deterministic
        raise VideoError(f"decoding the video twice gave different frames (frame {missing_frames[0]} "
                         f"of {total} missing the second time)")
    shapes = {kept[int(i)].shape for i in wanted}
    if len(shapes) != 1:
        raise VideoError(f"frame size changes inside the video {sorted(shapes)}; pass an image size")
    frames = np.stack([kept[int(i)] for i in wanted])
    inverse = np.searchsorted(wanted, indices)
    expected, slack = header_frames(path)
    return ClipFrames(frames, inverse, indices, total, announced, outcome.truncated,
                      outcome.bad_packets, 90 * (outcome.turns or 0), expected, slack)
