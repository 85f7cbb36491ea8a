"""Feature extraction end to end: weights files, numbers, HDF5 layout, failures, resume.

Networks run on tiny inputs (32x32 images, a few frames) so the full-size ResNet-101 and 3D
ResNeXt-101 stay fast on CPU. Torch uses one thread here: on a loaded 2-core machine OpenMP
with two threads is an order of magnitude slower, and one thread keeps results bit-identical
from run to run (needed by the kill-and-resume comparison).
"""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from test_video import make_corrupt_video, make_unsupported_codec_video, make_video
from vqakd.extraction import weights as weights_module
from vqakd.data.annotations import Video
from vqakd.core.errors import UserError, run_cli
from vqakd.core.files import file_sha256
from vqakd.extraction import KINETICS_MEAN, ExtractionSettings, make_extractor
from vqakd.extraction.resnext3d import resnext101
from vqakd.extraction.video import read_clip_frames
from vqakd.extraction.weights import load_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "preprocess", "preprocess_features.py")
sys.path.insert(0, os.path.join(ROOT, "preprocess"))
import preprocess_features  # noqa: E402

SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
SMALL = ["--num-clips", "2", "--frames-per-clip", "4", "--image-height", "32", "--image-width", "32"]

# MSVD-QA test set: id -> (clip name, how to make it); None = no file at all.
MSVD_VIDEOS = {
    1: ("clipA", ("video", 40, 64, 48, 25, 0)),
    2: ("clipB_bframes", ("video", 33, 96, 64, 30, 2)),
    3: ("clipC_short", ("video", 3, 64, 48, 25, 0)),        # shorter than one 4-frame clip
    4: ("clipD_corrupt", ("corrupt",)),
    5: ("clipE_missing", None),
    6: ("clipF_zero", ("video", 0, 64, 48, 25, 0)),
    7: ("clipG", ("video", 50, 64, 48, 15, 0)),
    8: ("clipH", ("video", 20, 80, 48, 25, 0)),
    9: ("clipI_codec", ("unsupported",)),
    10: ("clipJ", ("video", 25, 64, 48, 25, 0)),
}
MSVD_FAILURES = {4: "cannot open", 5: "file not found", 6: "no frames", 9: "unsupported video codec"}
MSVD_GOOD = [vid for vid in MSVD_VIDEOS if vid not in MSVD_FAILURES]


def write_qa(folder, split, video_ids):
    records = [{"question": f"what is in video {vid}?", "answer": "cat", "video_id": vid, "id": i}
               for i, vid in enumerate(video_ids)]
    (folder / f"{split}_qa.json").write_text(json.dumps(records))


@pytest.fixture(scope="module")
def msvd(tmp_path_factory):
    """An MSVD-QA layout: annotations with youtube_mapping.txt, YouTubeClips/<clip>.avi."""
    root = tmp_path_factory.mktemp("msvd")
    annotations, clips = root / "annotations", root / "videos" / "YouTubeClips"
    annotations.mkdir()
    clips.mkdir(parents=True)
    (annotations / "youtube_mapping.txt").write_text(
        "".join(f"{name} vid{vid}\n" for vid, (name, _) in MSVD_VIDEOS.items()))
    for vid, (name, recipe) in MSVD_VIDEOS.items():
        path = clips / f"{name}.avi"
        if recipe is None:
            continue
        if recipe[0] == "video":
            make_video(path, *recipe[1:5], codec="mpeg4", max_b_frames=recipe[5])
        elif recipe[0] == "corrupt":
            make_corrupt_video(path)
        else:
            make_unsupported_codec_video(path)
    write_qa(annotations, "train", [1, 2, 3, 4, 5, 6])
    write_qa(annotations, "val", [7, 8])
    write_qa(annotations, "test", [9, 10, 1])
    return {"annotations": str(annotations), "videos": str(root / "videos"), "root": root}


def msvd_command(msvd, out, *extra):
    return [sys.executable, SCRIPT, "--dataset", "msvd-qa", "--video-dir", msvd["videos"],
            "--annotation-dir", msvd["annotations"], "--model", "resnet101", "--random-weights",
            *SMALL, "--batch-size", "5", "--num-workers", "2", "--chunk-videos", "2",
            "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def resnet_run(msvd, tmp_path_factory):
    """One uninterrupted appearance-feature run of the command line on the MSVD-QA test set."""
    out = tmp_path_factory.mktemp("resnet_out") / "msvd-qa_appearance_feat.h5"
    result = subprocess.run(msvd_command(msvd, out), capture_output=True, text=True,
                            env=SUBPROCESS_ENV, timeout=300)
    return {"out": out, "result": result}


def read_h5(path):
    with h5py.File(path, "r") as h5:
        return {name: h5[name][()] for name in h5}, dict(h5.attrs)


# ----- weights files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """A torchvision ResNet-101 state dict, as torchvision publishes resnet101-63fe2227.pth."""
    import torchvision
    torch.manual_seed(1)
    network = torchvision.models.resnet101(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet101-63fe2227.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def resnext_weights(tmp_path_factory):
    """A checkpoint in the layout of resnext-101-kinetics.pth: `state_dict` of a DataParallel
    model (keys `module.*`), saved before BatchNorm had `num_batches_tracked`."""
    torch.manual_seed(2)
    network = resnext101()
    with torch.no_grad():   # non-trivial BatchNorm statistics, so a wrong load would show
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = {f"module.{key}": value for key, value in network.state_dict().items()
             if not key.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("weights") / "resnext-101-kinetics.pth"
    torch.save({"epoch": 200, "arch": "resnext-101", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}, path)
    return path, network.state_dict()


def load_resnext101(path):
    """The 3D ResNeXt-101 with the weights file `path`, loaded as the extractor loads it."""
    network = resnext101()
    load_weights(network, str(path), "3D ResNeXt-101 weights")
    return network


def test_resnext_loads_published_layout(resnext_weights):
    path, expected = resnext_weights
    network = load_resnext101(path)
    loaded = network.state_dict()
    for key, value in expected.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key
    assert sum(p.numel() for p in network.parameters()) == 48_340_816
    network.eval()
    with torch.no_grad():
        assert network.features(torch.rand(2, 3, 4, 32, 32) * 255).shape == (2, 2048)
        assert network(torch.rand(1, 3, 4, 32, 32)).shape == (1, 400)


def test_resnext_layout_is_hara_layout():
    """Published 16x112x112 clips leave a (1, 4, 4) volume before the pool, as in Hara et al."""
    network = resnext101().eval()
    names = dict(network.named_modules())
    assert names["conv1"].kernel_size == (7, 7, 7) and names["conv1"].stride == (1, 2, 2)
    assert names["layer3.22.conv2"].groups == 32 and len(network.layer3) == 23
    assert names["layer4.0.downsample.0"].stride == (2, 2, 2)
    assert names["fc"].in_features == 2048 and names["fc"].out_features == 400
    volume = []
    network.layer4.register_forward_hook(lambda module, inputs, output: volume.append(output.shape))
    with torch.no_grad():
        network.features(torch.zeros(1, 3, 16, 112, 112))
    assert tuple(volume[0]) == (1, 2048, 1, 4, 4)


def test_weights_errors_are_clear(resnext_weights, resnet_weights, tmp_path):
    path, _ = resnext_weights
    with pytest.raises(UserError, match="not found: .*nowhere.pth; .*kenshohara/3D-ResNets-PyTorch"):
        make_extractor(ExtractionSettings("msvd-qa", "resnext101", weights=str(tmp_path / "nowhere.pth")))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:1_000_000])
    with pytest.raises(UserError, match=f"{truncated}: cannot read .*truncated"):
        load_resnext101(truncated)
    with pytest.raises(UserError, match=f"{resnet_weights}: .*key 'conv1.weight' has shape \\(64, 3, 7, 7\\)"):
        load_resnext101(resnet_weights)
    partial = tmp_path / "partial.pth"
    state = torch.load(path, weights_only=True)["state_dict"]
    del state["module.layer2.1.bn2.running_var"]
    torch.save({"state_dict": state}, partial)
    with pytest.raises(UserError, match="missing key 'layer2.1.bn2.running_var'"):
        load_resnext101(partial)
    settings = ExtractionSettings("msvd-qa", "resnet101", weights=str(path))
    with pytest.raises(UserError, match=f"{path}: .*key 'conv1.weight' has shape \\(64, 3, 7, 7, 7\\), "
                                        r".* \(64, 3, 7, 7\)"):
        _ = make_extractor(settings).network


def test_resnet_weights_found_in_torchvision_cache(resnet_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(weights_module, "REPO_ROOT", str(tmp_path / "toolkit"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    settings = ExtractionSettings("msvd-qa", "resnet101")
    with pytest.raises(UserError, match="no ResNet-101 weights file given .* download https://download.pytorch.org"):
        make_extractor(settings)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    os.symlink(resnet_weights, cache / "resnet101-63fe2227.pth")
    extractor = make_extractor(settings)
    assert extractor.weights.path == str(cache / "resnet101-63fe2227.pth")
    assert len(extractor.weights.sha256) == 64


# ----- the numbers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    return [Video(11, "first", make_video(folder / "first.avi", 30, 64, 48, 25)),
            Video(12, "second", make_video(folder / "second.mp4", 7, 80, 64, 30, codec="libx264"))]


def test_resnet_features_equal_frame_by_frame_reference(resnet_weights, two_videos, tmp_path):
    import torchvision
    settings = ExtractionSettings("msvd-qa", "resnet101", num_clips=2, frames_per_clip=4,
                                  image_height=32, image_width=32, weights=str(resnet_weights))
    extractor = make_extractor(settings, "cpu", batch_size=4, num_workers=0, progress=False)
    result = extractor.run(two_videos, str(tmp_path / "app.h5"))
    assert result.written == 2 and result.failures == []
    data, attrs = read_h5(tmp_path / "app.h5")
    assert data["resnet_features"].shape == (2, 2, 4, 2048) and data["resnet_features"].dtype == np.float32
    assert data["ids"].tolist() == [11, 12] and data["ids"].dtype == np.int64
    assert attrs["weights"] == str(resnet_weights) and attrs["random_weights"] == np.False_
    assert attrs["weights_sha256"] == file_sha256(str(resnet_weights))

    reference = torchvision.models.resnet101(weights=None)
    reference.load_state_dict(torch.load(resnet_weights, weights_only=True))
    reference.fc = torch.nn.Identity()
    reference.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.224]).view(1, 3, 1, 1)
    for row, video in enumerate(two_videos):
        clips = read_clip_frames(video.path, 2, 4, (32, 32)).clips()       # (N, F, H, W, 3)
        images = torch.from_numpy(clips.reshape(-1, 32, 32, 3)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            expected = reference((images - mean) / std).reshape(2, 4, 2048).numpy()
        np.testing.assert_allclose(data["resnet_features"][row], expected, rtol=1e-4, atol=1e-4)


def test_resnext_features_equal_clip_by_clip_reference(resnext_weights, two_videos, tmp_path):
    path, state = resnext_weights
    settings = ExtractionSettings("msvd-qa", "resnext101", num_clips=2, frames_per_clip=4,
                                  image_height=32, image_width=32, weights=str(path), kinetics_mean=True)
    extractor = make_extractor(settings, "cpu", batch_size=3, num_workers=0, progress=False)
    extractor.run(two_videos, str(tmp_path / "mot.h5"))
    data, attrs = read_h5(tmp_path / "mot.h5")
    assert data["resnext_features"].shape == (2, 2, 2048) and data["ids"].tolist() == [11, 12]
    assert attrs["kinetics_mean"] == np.True_ and attrs["model"] == "resnext101"

    reference = resnext101()
    reference.load_state_dict(state)
    reference.eval()
    mean = torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1, 1)
    for row, video in enumerate(two_videos):
        clips = torch.from_numpy(read_clip_frames(video.path, 2, 4, (32, 32)).clips())
        with torch.no_grad():
            expected = reference.features(clips.permute(0, 4, 1, 2, 3).float() - mean).numpy()
        np.testing.assert_allclose(data["resnext_features"][row], expected, rtol=1e-4, atol=1e-4)


# ----- the command line ------------------------------------------------------------------------

def test_cli_writes_layout_reports_failures_and_exit_status(resnet_run, msvd, capsys):
    result, out = resnet_run["result"], resnet_run["out"]
    assert result.returncode == 1, result.stderr
    report_path = f"{out}.failures.json"
    assert f"6 videos written, 4 failed (see {report_path})" in result.stdout
    data, attrs = read_h5(out)
    assert set(data) == {"resnet_features", "ids"}
    assert data["ids"].tolist() == MSVD_GOOD
    features = data["resnet_features"]
    assert features.shape == (6, 2, 4, 2048) and features.dtype == np.float32
    assert np.isfinite(features).all()
    # the 3-frame video, by the original clip rule: clips [0, 0, 1, 2] and [0, 0, 0, 1]
    short = features[MSVD_GOOD.index(3)]
    assert np.array_equal(short[0, 0], short[0, 1]) and np.array_equal(short[0, 0], short[1, 2])
    assert np.array_equal(short[0, 2], short[1, 3]) and not np.array_equal(short[0, 2], short[0, 3])
    assert not np.array_equal(short[0, 1], short[0, 2])
    expected_attrs = {"model": "resnet101", "dataset": "msvd-qa", "num_clips": 2, "frames_per_clip": 4,
                      "image_height": 32, "image_width": 32, "random_weights": True, "weights": "random",
                      "precision": "fp32", "kinetics_mean": False, "failed_videos": 4}
    for key, value in expected_attrs.items():
        assert attrs[key] == value, key
    import vqakd
    assert attrs["toolkit_version"] == vqakd.__version__
    report = json.loads(open(report_path).read())
    assert report["written"] == 6 and report["videos"] == 10
    reasons = {failure["video_id"]: failure["reason"] for failure in report["failures"]}
    assert set(reasons) == set(MSVD_FAILURES)
    for vid, reason in MSVD_FAILURES.items():
        assert reason in reasons[vid], (vid, reasons[vid])
    assert sorted(os.listdir(out.parent)) == sorted([out.name, os.path.basename(report_path)])
    assert all(failure["file"] is None or failure["file"]["size"] > 0 for failure in report["failures"])

    # the same command again finds the work done; --allow-failures turns the status to 0
    assert preprocess_features.main(msvd_command(msvd, out, "--allow-failures")[2:]) == 0
    assert preprocess_features.main(msvd_command(msvd, out)[2:]) == 1
    printed = capsys.readouterr().out
    assert "already complete" in printed and "6 videos written, 4 failed" in printed
    assert "to retry the failed videos, fix or add their files and run the same command again" in printed


def test_failed_videos_are_retried_once_their_file_appears_or_changes(msvd, tmp_path, capsys):
    import shutil

    videos = tmp_path / "videos"
    shutil.copytree(msvd["videos"], videos)
    layout = dict(msvd, videos=str(videos))
    out = tmp_path / "appearance.h5"
    assert preprocess_features.main(msvd_command(layout, out)[2:]) == 1
    assert "6 videos written, 4 failed" in capsys.readouterr().out
    before = read_h5(out)[0]["resnet_features"]
    clips = videos / "YouTubeClips"
    shutil.copy(clips / "clipA.avi", clips / "clipE_missing.avi")        # the missing video arrives
    shutil.copy(clips / "clipJ.avi", clips / "clipF_zero.avi")           # the empty one is replaced
    assert preprocess_features.main(msvd_command(layout, out)[2:]) == 1   # two still fail
    printed = capsys.readouterr().out
    assert "8 videos written, 2 failed" in printed and "already complete" not in printed
    data = read_h5(out)[0]
    assert data["ids"].tolist() == sorted(MSVD_GOOD + [5, 6])
    # The videos not retried keep their features bit for bit; the new ones equal their sources'.
    rows = {vid: row for row, vid in enumerate(data["ids"].tolist())}
    for old_row, vid in enumerate(MSVD_GOOD):
        assert np.array_equal(data["resnet_features"][rows[vid]], before[old_row])
    assert np.array_equal(data["resnet_features"][rows[5]], data["resnet_features"][rows[1]])
    assert sorted(os.listdir(tmp_path)) == sorted(["videos", out.name, out.name + ".failures.json"])   # no parts left
    # Nothing changed since: the output is complete.
    assert preprocess_features.main(msvd_command(layout, out)[2:]) == 1
    assert "already complete" in capsys.readouterr().out
    # --overwrite discards every part: all videos are made again.
    assert preprocess_features.main(msvd_command(layout, out, "--overwrite")[2:]) == 1
    assert "8 videos written, 2 failed" in capsys.readouterr().out


def test_kill_and_resume_equals_uninterrupted_run(resnet_run, msvd, tmp_path, capsys):
    out = tmp_path / "msvd-qa_appearance_feat.h5"
    parts = tmp_path / (out.name + ".parts")
    process = subprocess.Popen(msvd_command(msvd, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=SUBPROCESS_ENV, start_new_session=True)
    deadline = time.time() + 240
    while not list(parts.glob("chunk-*.npz")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)   # the script and its decoding workers, mid-run
    process.wait()
    assert process.returncode == -signal.SIGKILL
    finished = list(parts.glob("chunk-*.npz"))
    assert 1 <= len(finished) < 5 and not out.exists()
    # what a kill in the middle of an atomic write leaves behind
    (parts / ".chunk-000004.npz.x1y2.tmp").write_bytes(b"half a chunk")
    (tmp_path / f".{out.name}.z9.tmp").write_bytes(b"half an hdf5 file")

    with pytest.raises(UserError, match=r"other settings \(num_clips: 2 there, 3 now\).*--overwrite"):
        preprocess_features.main(msvd_command(msvd, out, "--num-clips", "3")[2:])

    # the same command again (here in this process, one torch thread like the reference run)
    assert preprocess_features.main(msvd_command(msvd, out)[2:]) == 1
    assert "6 videos written, 4 failed" in capsys.readouterr().out
    data, attrs = read_h5(out)
    reference_data, reference_attrs = read_h5(resnet_run["out"])
    assert np.array_equal(data["ids"], reference_data["ids"])
    assert np.array_equal(data["resnet_features"], reference_data["resnet_features"])
    assert attrs.keys() == reference_attrs.keys()
    for key in attrs:
        assert np.array_equal(attrs[key], reference_attrs[key]), key
    assert sorted(os.listdir(tmp_path)) == sorted([out.name, out.name + ".failures.json"])


def test_cli_motion_features_msrvtt_layout(tmp_path, capsys):
    annotations, videos = tmp_path / "annotations", tmp_path / "videos"
    annotations.mkdir()
    (videos / "TrainValVideo").mkdir(parents=True)
    (videos / "TestVideo").mkdir()
    make_video(videos / "TrainValVideo" / "video0.mp4", 30, 80, 64, 30, codec="libx264")
    make_video(videos / "TrainValVideo" / "video3.mp4", 12, 64, 48, 24, codec="libx264")
    make_video(videos / "TestVideo" / "video7000.mp4", 18, 96, 64, 25, codec="libx264")
    write_qa(annotations, "train", [3, 0])
    write_qa(annotations, "val", [3])
    write_qa(annotations, "test", [7000])
    out = tmp_path / "out" / "msrvtt-qa_motion_feat.h5"
    status = preprocess_features.main(
        ["--dataset", "msrvtt-qa", "--video_dir", str(videos), "--annotation_dir", str(annotations),
         "--model", "resnext101", "--random-weights", "--num_clips", "2", "--frames_per_clip", "4",
         "--image_height", "32", "--image_width", "32", "--num-workers", "1", "--no-progress",
         "--out", str(out)])
    assert status == 0
    assert "3 videos written, 0 failed" in capsys.readouterr().out
    data, attrs = read_h5(out)
    assert data["ids"].tolist() == [0, 3, 7000]
    assert data["resnext_features"].shape == (3, 2, 2048) and data["resnext_features"].dtype == np.float32
    assert attrs["normalisation"] == "raw 0-255 RGB" and attrs["random_weights"] == np.True_


def test_cli_bad_weights_file_is_one_line_error(resnext_weights, msvd, tmp_path, capsys):
    truncated = tmp_path / "resnext-101-kinetics.pth"
    truncated.write_bytes(resnext_weights[0].read_bytes()[:2_000_000])
    out = tmp_path / "out.h5"
    argv = ["--dataset", "msvd-qa", "--video-dir", msvd["videos"], "--annotation-dir", msvd["annotations"],
            "--model", "resnext101", "--weights", str(truncated), *SMALL, "--num-workers", "0",
            "--no-progress", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: preprocess_features.main(argv))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {truncated}: cannot read")
    assert not out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--fp16"], "--fp16 needs a CUDA device"),
    (["--kinetics-mean"], "--kinetics-mean applies to the resnext101"),
    (["--weights", "w.pth"], "--weights and --random-weights exclude each other"),
    (["--num-clips", "0"], "--num-clips must be at least 1"),
    (["--device", "cpu", "--gpu_id", "0"], "either --device or --gpu_id"),
])
def test_cli_setting_errors(msvd, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        preprocess_features.main(msvd_command(msvd, tmp_path / "o.h5", *extra)[2:])


def test_cli_checks_folders_before_work(msvd, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="output folder is not writable"):
        preprocess_features.main(msvd_command(msvd, blocker / "sub" / "o.h5")[2:])
    command = msvd_command(msvd, tmp_path / "o.h5")[2:]
    command[command.index("--video-dir") + 1] = str(tmp_path / "no_such_folder")
    with pytest.raises(UserError, match="video folder not found"):
        preprocess_features.main(command)
    if os.geteuid() != 0:   # root reads any folder
        unreadable = tmp_path / "locked"
        unreadable.mkdir(mode=0)
        command[command.index("--video-dir") + 1] = str(unreadable)
        with pytest.raises(UserError, match="video folder is not readable"):
            preprocess_features.main(command)


def test_existing_output_with_other_settings_is_kept(resnet_run, msvd, tmp_path):
    out = tmp_path / "o.h5"
    out.write_bytes(open(resnet_run["out"], "rb").read())
    with pytest.raises(UserError, match=r"already exists .*num_clips: 2 there, 3 now.*--overwrite"):
        preprocess_features.main(msvd_command(msvd, out, "--num-clips", "3")[2:])
    assert out.read_bytes() == open(resnet_run["out"], "rb").read()


def test_no_usable_video_is_an_error_with_report(tmp_path):
    annotations, videos = tmp_path / "annotations", tmp_path / "videos"
    annotations.mkdir()
    (videos / "TrainValVideo").mkdir(parents=True)
    make_corrupt_video(videos / "TrainValVideo" / "video1.mp4")
    write_qa(annotations, "train", [1, 2])
    out = tmp_path / "o.h5"
    with pytest.raises(UserError, match=r"no video could be used \(e.g. .*video1.mp4: cannot open"):
        preprocess_features.main(["--dataset", "msrvtt-qa", "--video-dir", str(videos),
                                  "--annotation-dir", str(annotations), "--model", "resnext101",
                                  "--random-weights", *SMALL, "--num-workers", "0", "--no-progress",
                                  "--out", str(out)])
    assert not out.exists()
    report = json.loads((tmp_path / "o.h5.failures.json").read_text())
    assert report["written"] == 0 and [f["reason"] for f in report["failures"]][1] == "file not found"
