"""Video decoding for feature extraction (SPEC §1.3): which frames form each clip, and reading them.

Clip sampling is a pure function of the frame count (`clip_frame_indices`), so tests can check
the exact frames. Reading (`read_clip_frames`) decodes the file sequentially with PyAV and keeps
only the frames the clips need:

* Seeking is not used: on AVI/mpeg4 (MSVD) seeking lands on key frames with unreliable
  timestamps, so "frame k" after a seek is not always the k-th frame. Sequential decoding is
  exact, and it stops right after the last needed frame (about 1/(N+1) of the video is never
  decoded).
* Frames the clips do not use are never converted to RGB nor resized, which is most of the cost
  after decoding itself.
* The clips depend on the true frame count, which must be known before decoding. MP4/MOV files
  list every sample in their index, so the stream's frame count is the number of packets. AVI
  headers (MSVD) are often wrong, so for every other container the video packets are counted
  first with a demux-only pass (no decoding: a few milliseconds). A decoder can still emit fewer
  frames than there are packets (e.g. non-coded mpeg4 frames); when decoding reaches the end of
  the stream before the last needed frame, the decoded count is the true one and the clips are
  chosen again from it. (A shortfall of a frame or two that never reaches the last needed frame
  goes unseen: the price of not decoding the tail of every video.)
* Like FFmpeg's command line, packets the decoder rejects (or that a cut-short file truncated)
  are skipped; after such a packet the frame count is not trusted and decoding runs to the end
  of the stream to learn the true count.

Every problem with one video is a `VideoError` carrying a short reason; the extraction records
it and goes on with the next video.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vqakd.errors import UserError

try:
    import av
except ImportError:   # merging parts and reading features need no decoder
    av = None

# Containers whose index lists every video sample, so `stream.frames` is the packet count.
INDEXED_CONTAINERS = ("mov", "mp4")
RESIZE_FILTER = Image.Resampling.BICUBIC   # what scipy.misc.imresize(interp="bicubic") used


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


def clip_frame_indices(total_frames: int, num_clips: int, frames_per_clip: int) -> np.ndarray:
    """Frame indices (num_clips, frames_per_clip) of each clip, per SPEC §1.3.

    Centres are `linspace(0, total_frames, N+2)[1:N+1]` truncated to integers; clip k covers
    [centre − F//2, centre − F//2 + F), and indices outside [0, total_frames) are clamped, which
    pads a clip cut by the start or the end of the video with copies of its first or last frame.
    """
    if total_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {total_frames}")
    if num_clips < 1 or frames_per_clip < 1:
        raise ValueError("num_clips and frames_per_clip must be positive")
    centres = np.linspace(0, total_frames, num_clips + 2)[1:num_clips + 1].astype(np.int64)
    starts = centres - frames_per_clip // 2
    indices = starts[:, None] + np.arange(frames_per_clip, dtype=np.int64)[None, :]
    return np.clip(indices, 0, total_frames - 1)


@dataclass(frozen=True)
class ClipFrames:
    """The decoded frames a video's clips need, each stored once.

    `frames[inverse[k, j]]` is frame j of clip k; `indices[k, j]` is its index in the video.
    """
    frames: np.ndarray        # (U, H, W, 3) uint8, U distinct frames in increasing index order
    inverse: np.ndarray       # (N, F) int64 into `frames`
    indices: np.ndarray       # (N, F) int64 frame indices in the video
    total_frames: int
    frame_count_source: str   # "container index", "packets" or "decoded"
    bad_packets: int = 0      # packets skipped (truncated or rejected by the decoder)

    def clips(self) -> np.ndarray:
        """(N, F, H, W, 3) uint8: the clips with repeated frames materialised."""
        return self.frames[self.inverse]


def _open(path: str) -> av.container.InputContainer:
    require_decoder()
    # os.path.exists() is False both for a missing file and for one inside a folder the user
    # cannot search; only stat() tells them apart, and the two need different fixes.
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise VideoError("file not found") from None
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
    """(frame count, where it came from), without decoding any frame."""
    container = _open(path)
    try:
        stream = _video_stream(container)
        format_names = container.format.name.split(",")
        if stream.frames > 0 and any(name in INDEXED_CONTAINERS for name in format_names):
            return int(stream.frames), "container index"
        count = 0
        try:
            for packet in container.demux(stream):
                # Empty packets are the demuxer's end-of-stream markers; corrupt ones were cut
                # short by the end of the file and are skipped when decoding too.
                if packet.size > 0 and not packet.is_corrupt:
                    count += 1
        except av.error.FFmpegError:
            pass   # unreadable rest of the file: it ends here, for decoding as well
        return count, "packets"
    finally:
        container.close()


@dataclass
class _Decoded:
    kept: dict[int, np.ndarray]   # frame index -> RGB uint8 (H, W, 3)
    decoded: int                  # frames decoded
    at_end: bool                  # reached the end of the stream (no early stop)
    bad_packets: int              # packets skipped: truncated, or rejected by the decoder


def _decode_selected(path: str, wanted: np.ndarray, size: tuple[int, int] | None,
                     threads: int) -> _Decoded:
    """Decode `path` in order, converting only frames whose index is in `wanted` (sorted).

    Like FFmpeg's command line, a packet the decoder rejects is skipped and decoding goes on. A
    skipped packet makes the packet count wrong, so after one no early stop is made: the stream
    is decoded to its end, which gives the true frame count.
    """
    wanted_set = set(int(i) for i in wanted)
    last_wanted = int(wanted[-1])
    result = _Decoded({}, 0, False, 0)
    container = _open(path)

    def take(frames) -> bool:
        for frame in frames:
            if result.decoded in wanted_set:
                image = frame.to_image()
                if size is not None and (image.height, image.width) != size:
                    image = image.resize((size[1], size[0]), RESIZE_FILTER)
                result.kept[result.decoded] = np.asarray(image, dtype=np.uint8)
            result.decoded += 1
            if result.decoded > last_wanted and result.bad_packets == 0:
                return True
        return False

    try:
        stream = _video_stream(container)
        if threads != 1:
            stream.codec_context.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError:
                result.bad_packets += 1   # unreadable rest of the file: flush what is buffered
                try:
                    take(stream.codec_context.decode(None))
                except av.error.FFmpegError:
                    pass
                break
            if packet.is_corrupt:
                result.bad_packets += 1
                continue
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                result.bad_packets += 1
                continue
            if take(frames):
                return result
        result.at_end = True
        return result
    finally:
        container.close()


def read_clip_frames(path: str, num_clips: int, frames_per_clip: int,
                     size: tuple[int, int] | None = None, threads: int = 1) -> ClipFrames:
    """Decode the frames of `num_clips` clips of `frames_per_clip` frames from the video at `path`.

    `size` is (height, width) for a bicubic resize (None keeps the decoded size); `threads` is
    FFmpeg's decoder thread count (1 inside DataLoader workers, 0 = FFmpeg's choice).
    """
    total, source = count_frames(path)
    if total == 0:
        raise VideoError("no frames")
    indices = clip_frame_indices(total, num_clips, frames_per_clip)
    wanted = np.unique(indices)
    outcome = _decode_selected(path, wanted, size, threads)
    if outcome.at_end and outcome.decoded != total:
        # The decoder emitted another number of frames than the packets promised (non-coded
        # frames, skipped bad packets). The decoded count is the true one: choose the clips
        # again from it and decode them again.
        if outcome.decoded == 0:
            raise VideoError(f"no decodable frames ({total} packets, {outcome.bad_packets} rejected)")
        total, source = outcome.decoded, "decoded"
        indices = clip_frame_indices(total, num_clips, frames_per_clip)
        wanted = np.unique(indices)
        outcome = _decode_selected(path, wanted, size, threads)
    missing = [int(i) for i in wanted if int(i) not in outcome.kept]
    if missing:
        raise VideoError(f"stream ended at frame {outcome.decoded} of {total} (needed frame {missing[0]})")
    shapes = {frame.shape for frame in outcome.kept.values()}
    if len(shapes) != 1:
        raise VideoError(f"frame size changes inside the video {sorted(shapes)}; pass an image size")
    frames = np.stack([outcome.kept[int(i)] for i in wanted])
    inverse = np.searchsorted(wanted, indices)
    return ClipFrames(frames, inverse, indices, total, source, outcome.bad_packets)
