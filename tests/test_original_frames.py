"""The network inputs equal the original VQAKD preprocessing (docs/preprocessing.md), restated
here independently of vqakd.extraction.video, on generated videos: odd sizes, 1 to more than N*F frames,
clips longer than the video, rotated containers and a damaged file.

The restatement decodes with PyAV (whose colour conversion the toolkit keeps) following OpenCV's
rules: every frame in order, the display rotation applied by quarter turns, an end at the first
packet the decoder rejects. `test_opencv_agrees_with_the_restated_decoding` checks those rules
against OpenCV's own VideoCapture (requirements-test.txt).
"""

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from test_video import barcode_frame
from test_video import make_video as make_barcode_video
from vqakd.data.annotations import Video
from vqakd.core.errors import UserError
from vqakd.extraction import ExtractionSettings, make_extractor
from vqakd.extraction.decoding import VideoDecodeDataset
from vqakd.extraction.video import read_clip_frames

ORIGINAL_MEAN = (0.485, 0.456, 0.406)
ORIGINAL_STD = (0.229, 0.224, 0.224)
TORCHVISION_STD = (0.229, 0.224, 0.225)


# ----- the original preprocessing, restated ----------------------------------------------------

def original_decode(path: str) -> list[np.ndarray]:
    """Every frame in presentation order until the stream ends or a packet is rejected; frames
    turned upright by the container's rotation when it is a multiple of 90 degrees."""
    frames = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        turns = None
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    if turns is None:
                        degrees = round(frame.rotation) % 360
                        turns = degrees // 90 if degrees % 90 == 0 else 0
                    frames.append(np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), turns)))
        except av.error.FFmpegError:
            pass
    return frames


def original_clips(frames: list, num_clips: int, frames_per_clip: int) -> list[list]:
    total = len(frames)
    clips = []
    for centre in np.linspace(0, total, num_clips + 2).astype(np.int32)[1:num_clips + 1]:
        start, end = centre - frames_per_clip // 2, centre + frames_per_clip // 2
        if start < 0:
            start = 0
        if end > total:
            end = total - 1
        clip = frames[start:end]
        if start == 0:
            clip = [frames[start]] * (frames_per_clip - len(clip)) + clip
        if end == total - 1:
            clip = clip + [frames[end]] * (frames_per_clip - (end - start))
        clips.append(clip[:frames_per_clip])
    return clips


def original_resize(frame: np.ndarray, image_height: int, image_width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(frame).resize((image_height, image_width), Image.BICUBIC))


def original_inputs(path, num_clips, frames_per_clip, image_height, image_width) -> np.ndarray:
    """(N, F, H, W, 3) uint8 frames the original fed to its networks."""
    clips = original_clips(original_decode(path), num_clips, frames_per_clip)
    return np.stack([np.stack([original_resize(f, image_height, image_width) for f in clip])
                     for clip in clips])


def original_appearance(clips: np.ndarray, std=ORIGINAL_STD) -> np.ndarray:
    """(N*F, 3, H, W) float32: (x / 255 - mean) / std in float64, then float32."""
    images = clips.reshape((-1,) + clips.shape[2:]).astype(np.float64) / 255
    return ((images - np.array(ORIGINAL_MEAN)) / np.array(std)).astype(np.float32).transpose(0, 3, 1, 2)


def original_motion(clips: np.ndarray) -> np.ndarray:
    """(N, 3, F, H, W) float32 raw 0-255 values."""
    return clips.astype(np.float32).transpose(0, 4, 1, 2, 3)


# ----- generated videos ------------------------------------------------------------------------

def pattern(index: int, height: int, width: int) -> np.ndarray:
    """A bar code of the index over colour ramps and a corner mark: no symmetry, so a wrong
    rotation or frame shows."""
    frame = barcode_frame(index % 256, height, width).astype(np.int32)
    y, x = np.mgrid[0:height, 0:width]
    frame[..., 0] = (frame[..., 0] + 3 * x) % 256
    frame[..., 1] = (frame[..., 1] + 5 * y + index) % 256
    frame[:height // 3, :width // 4, 2] = 255
    return frame.astype(np.uint8)


def make_video(path, num_frames, width, height, codec="libx264", rotation=None) -> str:
    path = str(path)
    container = av.open(path, "w")
    stream = container.add_stream(codec, rate=25)
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"
    stream.codec_context.bit_rate = 2_000_000
    if codec == "mpeg4":
        stream.codec_context.max_b_frames = 0
    if rotation is not None:
        stream.set_display_rotation(rotation)   # the display matrix phones write
    for index in range(num_frames):
        for packet in stream.encode(av.VideoFrame.from_ndarray(pattern(index, height, width), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


# name: (frames, width, height, codec, rotation)
VIDEOS = {
    "one_frame.mp4": (1, 66, 50, "libx264", None),
    "two_frames.avi": (2, 98, 38, "mpeg4", None),
    "five.mp4": (5, 66, 50, "libx264", None),
    "fifteen_odd_size.avi": (15, 63, 47, "mpeg4", None),
    "sixteen.avi": (16, 98, 38, "mpeg4", None),
    "seventeen.mp4": (17, 66, 50, "libx264", None),
    "forty.avi": (40, 98, 38, "mpeg4", None),
    "beyond_n_f.mp4": (131, 66, 50, "libx264", None),
    "rotated_90.mp4": (20, 64, 48, "libx264", 90),
    "rotated_180.mp4": (20, 64, 48, "libx264", 180),
    "rotated_270.mp4": (20, 64, 48, "libx264", -90),
    "rotated_45.mp4": (20, 64, 48, "libx264", 45),   # not a quarter turn: left as it is
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("original_videos")
    return {name: make_video(folder / name, *spec) for name, spec in VIDEOS.items()}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A 50-frame mp4 with 200 random bytes in its data, at the first place tried (from the
    middle out) where the decoder rejects a packet."""
    folder = tmp_path_factory.mktemp("damaged")
    source = make_barcode_video(folder / "source.mp4", 50, 96, 64, codec="libx264")
    data = open(source, "rb").read()
    for fraction in (0.5, 0.45, 0.55, 0.4, 0.6, 0.35, 0.65):
        damaged = bytearray(data)
        place = int(len(data) * fraction)
        damaged[place:place + 200] = np.random.default_rng(1).bytes(200)
        path = folder / f"damaged_{fraction}.mp4"
        path.write_bytes(bytes(damaged))
        if 0 < len(original_decode(str(path))) < 50:
            return str(path)
    pytest.fail("no damage made the decoder reject a packet")


def opencv_frames(path: str) -> list[np.ndarray]:
    cv2 = pytest.importorskip("cv2", reason="OpenCV is a test requirement (requirements-test.txt)")
    capture = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


# ----- the tests -------------------------------------------------------------------------------

def test_opencv_agrees_with_the_restated_decoding(videos, damaged):
    for name, path in {**videos, "damaged.mp4": damaged}.items():
        ours, theirs = original_decode(path), opencv_frames(path)
        assert len(ours) == len(theirs), name
        for mine, cv in zip(ours, theirs):
            assert mine.shape == cv.shape, name
            difference = np.abs(mine.astype(int) - cv.astype(int))
            if name.startswith("fifteen_odd"):
                # odd sizes: OpenCV's YUV->RGB conversion rounds chroma otherwise than PyAV's
                # (measured: mean 1.2, at most 29 levels); the toolkit keeps PyAV's
                assert difference.mean() < 2.0, name
            else:
                assert difference.max() == 0, name
    assert original_decode(videos["rotated_90.mp4"])[0].shape == (64, 48, 3)


@pytest.mark.parametrize("name", sorted(VIDEOS))
@pytest.mark.parametrize("num_clips,frames_per_clip,size", [(8, 16, (112, 112)), (3, 4, (40, 24))])
def test_frames_fed_to_the_networks_equal_the_original(videos, name, num_clips, frames_per_clip, size):
    expected = original_inputs(videos[name], num_clips, frames_per_clip, *size)
    clip_frames = read_clip_frames(videos[name], num_clips, frames_per_clip, size)
    assert clip_frames.total_frames == VIDEOS[name][0] and clip_frames.damage() is None
    assert np.array_equal(clip_frames.clips(), expected)
    # what the decoding workers hand the appearance (distinct frames) and motion (clips) models
    for per_frame, threads in ((True, 1), (False, 0)):
        item = VideoDecodeDataset([Video(1, name, videos[name])], num_clips, frames_per_clip, size, per_frame,
                                  threads)[0]
        assert item.error is None
        fed = item.inputs[item.inverse] if per_frame else item.inputs
        assert np.array_equal(fed.numpy(), expected)


def test_full_size_square_frames(videos):
    path = videos["fifteen_odd_size.avi"]
    assert np.array_equal(read_clip_frames(path, 2, 16, (224, 224)).clips(), original_inputs(path, 2, 16, 224, 224))


@pytest.mark.parametrize("normalization,std", [("original", ORIGINAL_STD), ("torchvision", TORCHVISION_STD)])
def test_appearance_tensors_equal_the_original(videos, normalization, std):
    settings = ExtractionSettings("msvd-qa", "resnet101", num_clips=3, frames_per_clip=4, image_height=40,
                                  image_width=24, random_weights=True, normalization=normalization)
    extractor = make_extractor(settings, "cpu", progress=False)
    clips = original_inputs(videos["forty.avi"], 3, 4, 40, 24)
    prepared = extractor.model.prepare(torch.from_numpy(clips.reshape((-1,) + clips.shape[2:]))).numpy()
    np.testing.assert_allclose(prepared, original_appearance(clips, std), rtol=0, atol=1e-6)
    assert extractor.manifest([Video(1, "v", "v")])["normalization"] == normalization


def test_motion_tensors_equal_the_original(videos):
    settings = ExtractionSettings("msvd-qa", "resnext101", num_clips=3, frames_per_clip=4, random_weights=True)
    extractor = make_extractor(settings, "cpu", progress=False)
    clips = original_inputs(videos["forty.avi"], 3, 4, 112, 112)
    assert np.array_equal(extractor.model.prepare(torch.from_numpy(clips)).numpy(), original_motion(clips))


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.mark.parametrize("model", ["resnet101", "resnext101"])
def test_random_network_features_equal_the_original(videos, tmp_path, model):
    names = ["two_frames.avi", "rotated_90.mp4", "seventeen.mp4"]
    chosen = [Video(i, name, videos[name]) for i, name in enumerate(names)]
    settings = ExtractionSettings("msvd-qa", model, num_clips=2, frames_per_clip=4, image_height=32,
                                  image_width=32, random_weights=True)
    extractor = make_extractor(settings, "cpu", batch_size=5, progress=False)
    out = tmp_path / f"{model}.h5"
    assert extractor.run(chosen, str(out)).written == 3
    import h5py
    with h5py.File(out, "r") as h5:
        features = h5[extractor.model.feature_dataset][()]
        assert h5.attrs["normalization"] == "original" and not h5.attrs["decode_past_damage"]
    for row, video in enumerate(chosen):
        clips = original_inputs(video.path, 2, 4, 32, 32)
        with torch.inference_mode():
            if model == "resnet101":
                expected = extractor.network(torch.from_numpy(original_appearance(clips))).reshape(2, 4, -1)
            else:
                expected = extractor.network.features(torch.from_numpy(original_motion(clips)))
        assert relative_difference(features[row], expected.numpy()) < 1e-5, video.name


def test_decoding_stops_at_damage_and_the_report_says_so(damaged, videos, tmp_path):
    announced = 50
    stopped = read_clip_frames(damaged, 2, 4, (32, 32))
    kept = len(opencv_frames(damaged))
    assert 0 < kept < announced
    assert stopped.total_frames == kept and stopped.truncated
    # where it stops does not depend on the decoder's threads (workers: 1, main process: 0)
    assert read_clip_frames(damaged, 2, 4, (32, 32), threads=0).total_frames == kept
    assert np.array_equal(stopped.clips(), original_inputs(damaged, 2, 4, 32, 32))
    past = read_clip_frames(damaged, 2, 4, (32, 32), past_damage=True)
    assert kept < past.total_frames <= announced and past.bad_packets > 0 and not past.truncated

    chosen = [Video(1, "damaged", damaged), Video(2, "clean", videos["forty.avi"])]
    for past_damage, frames in ((False, kept), (True, past.total_frames)):
        settings = ExtractionSettings("msvd-qa", "resnext101", num_clips=2, frames_per_clip=4,
                                      image_height=32, image_width=32, random_weights=True,
                                      decode_past_damage=past_damage)
        out = tmp_path / f"past{past_damage}.h5"
        result = make_extractor(settings, "cpu", progress=False).run(chosen, str(out))
        assert result.written == 2 and result.failures == []
        report = json.loads(open(f"{out}.failures.json").read())
        assert report["damaged"] == 1
        entry = report["damaged_videos"][0]
        assert entry["video_id"] == 1 and entry["frames_kept"] == frames
        assert entry["frames_announced"] == announced
        assert ("--decode-past-damage" in entry["reason"]) and ("stopped" in entry["reason"]) != past_damage
        assert [d["video_id"] for d in result.damaged] == [1]


def test_settings_the_original_rule_cannot_use():
    with pytest.raises(UserError, match="even"):
        make_extractor(ExtractionSettings("msvd-qa", "resnet101", frames_per_clip=5, random_weights=True))
    with pytest.raises(UserError, match="resnet101"):
        make_extractor(ExtractionSettings("msvd-qa", "resnext101", normalization="torchvision",
                                          random_weights=True))
    with pytest.raises(UserError, match="unknown normalization"):
        make_extractor(ExtractionSettings("msvd-qa", "resnet101", normalization="imagenet",
                                          random_weights=True))
