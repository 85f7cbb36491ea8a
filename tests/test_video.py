"""Clip sampling (the original's rule) and PyAV decoding, checked on generated videos whose frames carry their index.

Each generated frame shows its index as an 8-bit bar code of large black/white blocks (4 x 2
grid), which survives lossy mpeg4/h264 coding and a bicubic resize to a small size, so the test
reads back exactly which frame of the file ended up in each clip position.
"""

import os

import av
import numpy as np
import pytest

from vqakd.extraction import video as video_module
from vqakd.extraction.video import VideoError, clip_frame_indices, frame_counts, read_clip_frames

BARCODE_COLUMNS, BARCODE_ROWS = 4, 2
BLACK, WHITE = 16, 235


def barcode_frame(index: int, height: int, width: int) -> np.ndarray:
    """An RGB frame whose 4 x 2 blocks spell `index` in binary (most significant bit first)."""
    assert 0 <= index < 2 ** (BARCODE_COLUMNS * BARCODE_ROWS)
    frame = np.full((height, width, 3), BLACK, np.uint8)
    for bit in range(BARCODE_COLUMNS * BARCODE_ROWS):
        if index >> (BARCODE_COLUMNS * BARCODE_ROWS - 1 - bit) & 1:
            row, column = divmod(bit, BARCODE_COLUMNS)
            top, left = row * height // BARCODE_ROWS, column * width // BARCODE_COLUMNS
            bottom, right = (row + 1) * height // BARCODE_ROWS, (column + 1) * width // BARCODE_COLUMNS
            frame[top:bottom, left:right] = WHITE
    return frame


def read_barcode(frame: np.ndarray) -> int:
    """The index spelled by a (possibly resized, lossy) bar-code frame, read at block centres."""
    height, width = frame.shape[:2]
    gray = frame.astype(np.float64).mean(axis=2)
    value = 0
    for bit in range(BARCODE_COLUMNS * BARCODE_ROWS):
        row, column = divmod(bit, BARCODE_COLUMNS)
        cy = int((row + 0.5) * height / BARCODE_ROWS)
        cx = int((column + 0.5) * width / BARCODE_COLUMNS)
        patch = gray[max(cy - 1, 0):cy + 2, max(cx - 1, 0):cx + 2]
        value = value * 2 + int(patch.mean() > (BLACK + WHITE) / 2)
    return value


def make_video(path, num_frames: int, width: int, height: int, fps: int = 25,
               codec: str = "mpeg4", max_b_frames: int | None = None) -> str:
    """Write `num_frames` bar-code frames with PyAV (`mpeg4` in .avi, `libx264` in .mp4)."""
    path = os.fspath(path)
    container = av.open(path, "w")
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"
    stream.codec_context.bit_rate = 2_000_000
    if max_b_frames is not None:
        stream.codec_context.max_b_frames = max_b_frames
    if num_frames == 0:
        container.start_encoding()
    for index in range(num_frames):
        frame = av.VideoFrame.from_ndarray(barcode_frame(index, height, width), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def make_unsupported_codec_video(path, num_frames: int = 10) -> str:
    """An AVI whose stream's FourCC no FFmpeg decoder knows."""
    source = make_video(str(path) + ".src.avi", num_frames, 64, 48)
    data = open(source, "rb").read()
    os.remove(source)
    assert data.count(b"FMP4") >= 1
    with open(path, "wb") as handle:
        handle.write(data.replace(b"FMP4", b"QQQQ"))
    return os.fspath(path)


def make_corrupt_video(path) -> str:
    with open(path, "wb") as handle:
        handle.write(np.random.default_rng(7).bytes(4096))
    return os.fspath(path)


def reference_clip_indices(total: int, num_clips: int, frames_per_clip: int) -> list[list[int]]:
    """The original's clip rule restated on a list of frames (here: their indices)."""
    frames = list(range(total))
    clips = []
    for centre in np.linspace(0, total, num_clips + 2).astype(np.int32)[1:num_clips + 1]:
        start, end = int(centre) - frames_per_clip // 2, int(centre) + frames_per_clip // 2
        start = 0 if start < 0 else start
        end = total - 1 if end > total else end
        clip = frames[start:end]
        if start == 0:
            clip = [frames[start]] * (frames_per_clip - len(frames[start:end])) + clip
        if end == total - 1:
            clip = clip + [frames[end]] * (frames_per_clip - len(frames[start:end]))
        clips.append(clip[:frames_per_clip])
    return clips


# ----- clip sampling ---------------------------------------------------------------------------

def test_clip_indices_hand_computed():
    # centres of linspace(0, 100, 10)[1:9]: 11.1, 22.2, ... 88.9 -> 11, 22, ..., 88
    indices = clip_frame_indices(100, 8, 16)
    assert indices.shape == (8, 16) and indices.dtype == np.int64
    assert indices[:, 8].tolist() == [11, 22, 33, 44, 55, 66, 77, 88]
    assert indices[0].tolist() == list(range(3, 19))
    assert indices[7].tolist() == list(range(80, 96))
    # a 10-frame video, clips of 16: centres 3 and 6; start clamped to 0 and end to 9: the slice
    # 0..8 gets 7 copies of frame 0 in front, and the back padding falls beyond 16 frames
    assert clip_frame_indices(10, 2, 16).tolist() == [[0] * 7 + list(range(9))] * 2
    # end clamped: T=20, centres 6 and 13; the second slice is 5..18, frame 19 comes back twice
    assert clip_frame_indices(20, 2, 16)[1].tolist() == list(range(5, 19)) + [19, 19]
    assert clip_frame_indices(20, 2, 16)[0].tolist() == [0, 0] + list(range(14))
    assert clip_frame_indices(1, 3, 4).tolist() == [[0] * 4] * 3


@pytest.mark.parametrize("num_clips,frames_per_clip", [(8, 16), (16, 16), (3, 4), (2, 6), (1, 2)])
def test_clip_indices_match_the_original_rule(num_clips, frames_per_clip):
    for total in list(range(1, 60)) + [97, 250, 301, 1000, 4799]:
        expected = reference_clip_indices(total, num_clips, frames_per_clip)
        assert clip_frame_indices(total, num_clips, frames_per_clip).tolist() == expected, total


def test_clip_indices_reject_empty_video_and_odd_clips():
    with pytest.raises(ValueError):
        clip_frame_indices(0, 8, 16)
    for odd in (1, 3, 5):   # the rule takes F//2 frames each side: F-1 frames for odd F
        with pytest.raises(ValueError, match="even"):
            clip_frame_indices(30, 2, odd)


# ----- decoding --------------------------------------------------------------------------------

VIDEOS = {
    # name: (frames, width, height, fps, codec, max_b_frames)
    "msvd_like.avi": (47, 64, 48, 25, "mpeg4", 0),
    "bframes.avi": (40, 96, 64, 30, "mpeg4", 2),
    "msrvtt_like.mp4": (61, 80, 64, 30, "libx264", None),
    "slow.mp4": (23, 64, 64, 12, "libx264", None),
    "shorter_than_clip.avi": (6, 64, 48, 25, "mpeg4", 0),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    made = {}
    for name, (frames, width, height, fps, codec, b_frames) in VIDEOS.items():
        made[name] = make_video(folder / name, frames, width, height, fps, codec, b_frames)
    return made


def test_barcode_survives_coding(videos):
    for name, path in videos.items():
        with av.open(path) as container:
            values = [read_barcode(frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]
        assert values == list(range(VIDEOS[name][0])), name


def test_frame_count_matches_decoded_frames(videos):
    """Packet count (AVI) / container index (MP4) equals the number of decoded frames, and so does
    the count in the header of a whole file (without slack: each of these headers has one)."""
    for name, path in videos.items():
        assert frame_counts(path) == (VIDEOS[name][0], VIDEOS[name][0], 0), name


@pytest.mark.parametrize("name", sorted(VIDEOS))
@pytest.mark.parametrize("num_clips,frames_per_clip", [(8, 16), (3, 4)])
def test_decoded_clips_hold_the_right_frames(videos, name, num_clips, frames_per_clip):
    clip_frames = read_clip_frames(videos[name], num_clips, frames_per_clip, size=(32, 40))
    total = VIDEOS[name][0]
    expected = clip_frame_indices(total, num_clips, frames_per_clip)
    assert clip_frames.total_frames == total and not clip_frames.truncated
    assert np.array_equal(clip_frames.indices, expected)
    clips = clip_frames.clips()
    # (height 32, width 40) handed to Pillow as (width, height), as the original did
    assert clips.shape == (num_clips, frames_per_clip, 40, 32, 3) and clips.dtype == np.uint8
    shown = np.array([[read_barcode(frame) for frame in clip] for clip in clips])
    assert np.array_equal(shown, expected)
    # each needed frame is decoded and resized once
    assert len(clip_frames.frames) == len(np.unique(expected))


def test_native_size_and_resize(videos):
    native = read_clip_frames(videos["msrvtt_like.mp4"], 2, 2)
    assert native.frames.shape[1:] == (64, 80, 3)
    resized = read_clip_frames(videos["msrvtt_like.mp4"], 2, 2, size=(112, 112))
    assert resized.frames.shape[1:] == (112, 112, 3)
    assert read_clip_frames(videos["msrvtt_like.mp4"], 2, 2, size=(30, 50)).frames.shape[1:] == (50, 30, 3)


def test_second_pass_stops_after_last_needed_frame(videos):
    outcome = video_module._decode_selected(videos["bframes.avi"], np.array([2, 9]), None, 1,
                                            stop_after_wanted=True)
    assert sorted(outcome.kept) == [2, 9] and outcome.decoded == 10
    assert [read_barcode(outcome.kept[i]) for i in (2, 9)] == [2, 9]


def test_overstated_frame_count_falls_back_to_decoded_count(videos, monkeypatch):
    """When the stream ends before a needed frame, clips are chosen again from the decoded count."""
    path = videos["msvd_like.avi"]
    counts = video_module.frame_counts
    monkeypatch.setattr(video_module, "frame_counts", lambda p: (2 * VIDEOS["msvd_like.avi"][0],) + counts(p)[1:])
    clip_frames = read_clip_frames(path, 4, 8, size=(32, 32))
    assert clip_frames.total_frames == 47 and clip_frames.announced_frames == 94
    assert np.array_equal(clip_frames.indices, clip_frame_indices(47, 4, 8))
    assert [[read_barcode(f) for f in clip] for clip in clip_frames.clips()] == clip_frames.indices.tolist()


def test_truncated_avi_stops_at_the_cut(videos, tmp_path):
    """A file cut short (a download that stopped): decoding ends where the file does, as OpenCV's
    does; the clips are chosen from the frames decoded and the truncation is reported."""
    data = open(videos["msvd_like.avi"], "rb").read()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(data[:len(data) * 9 // 10])
    decoded = 0
    with av.open(str(truncated)) as container:
        try:
            for packet in container.demux(video=0):
                decoded += len(packet.decode())
        except av.error.FFmpegError:
            pass
    assert 0 < decoded < 47
    clip_frames = read_clip_frames(str(truncated), 4, 8, size=(32, 32))
    assert clip_frames.total_frames == decoded and clip_frames.truncated
    assert clip_frames.damage()["frames_kept"] == decoded
    assert clip_frames.damage()["frames_announced"] == frame_counts(str(truncated))[0]
    assert [[read_barcode(f) for f in clip] for clip in clip_frames.clips()] == \
        clip_frame_indices(decoded, 4, 8).tolist()


@pytest.mark.parametrize("kind,reason", [
    ("missing", "file not found"),
    ("corrupt", "cannot open"),
    ("zero_frames", "no frames"),
    ("unsupported_codec", "unsupported video codec"),
    ("directory", "is a directory"),
    ("no_video_stream", "no video stream"),
])
def test_unusable_videos_raise_video_error(tmp_path, kind, reason):
    path = tmp_path / f"{kind}.avi"
    if kind == "corrupt":
        make_corrupt_video(path)
    elif kind == "zero_frames":
        make_video(path, 0, 64, 48)
    elif kind == "unsupported_codec":
        make_unsupported_codec_video(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "no_video_stream":
        path = tmp_path / "empty.mp4"
        make_video(path, 0, 64, 48, codec="libx264")   # an MP4 with no samples keeps no stream
    with pytest.raises(VideoError) as info:
        read_clip_frames(str(path), 8, 16, size=(32, 32))
    assert reason in info.value.reason
