"""Feature extraction split across processes: torchrun ranks, --num-shards runs, merge_features.py.

Every path must give the file a single process gives: the same ids in the same order, bit-identical
features (CPU, one torch thread everywhere) and the same attributes, with the failures of all
ranks in the one report. Random ResNet-101 weights on 32x32 images keep each run to seconds.
"""

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from test_video import make_video
from vqakd.core.errors import UserError, run_cli
from vqakd.extraction import Shard
from vqakd.extraction.plan import launch_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "preprocess", "preprocess_features.py")
sys.path.insert(0, os.path.join(ROOT, "preprocess"))
import merge_features  # noqa: E402
import preprocess_features  # noqa: E402

SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
# id -> (clip name, frames); None: no file (a failure every path must report)
VIDEOS = {1: ("clipA", 20), 2: ("clipB", 9), 3: ("clipC_missing", None), 4: ("clipD", 14),
          5: ("clipE", 11), 6: ("clipF", 3)}
GOOD = [vid for vid, (_, frames) in VIDEOS.items() if frames]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("msvd")
    annotations, clips = root / "annotations", root / "videos" / "YouTubeClips"
    annotations.mkdir()
    clips.mkdir(parents=True)
    (annotations / "youtube_mapping.txt").write_text("".join(f"{name} vid{vid}\n" for vid, (name, _) in VIDEOS.items()))
    for vid, (name, frames) in VIDEOS.items():
        if frames:
            make_video(clips / f"{name}.avi", frames, 48, 32)
    records = [{"question": "what?", "answer": "cat", "video_id": vid, "id": vid} for vid in VIDEOS]
    (annotations / "train_qa.json").write_text(json.dumps(records))
    return {"annotations": str(annotations), "videos": str(root / "videos")}


def arguments(dataset, out, *extra):
    return ["--dataset", "msvd-qa", "--video-dir", dataset["videos"], "--annotation-dir", dataset["annotations"],
            "--model", "resnet101", "--random-weights", "--num-clips", "2", "--frames-per-clip", "2",
            "--image-height", "32", "--image-width", "32", "--batch-size", "3", "--num-workers", "0",
            "--chunk-videos", "1", "--no-progress", "--out", str(out), *extra]


def read(path):
    with h5py.File(path, "r") as h5:
        return {name: h5[name][()] for name in h5}, dict(h5.attrs)


def assert_same_file(path, reference):
    data, attrs = read(path)
    expected_data, expected_attrs = read(reference)
    assert data.keys() == expected_data.keys()
    for name in data:
        assert data[name].dtype == expected_data[name].dtype, name
        assert np.array_equal(data[name], expected_data[name]), name
    assert attrs.keys() == expected_attrs.keys()
    for key in attrs:
        assert np.array_equal(attrs[key], expected_attrs[key]), key
    report = json.loads(open(f"{path}.failures.json").read())
    expected_report = json.loads(open(f"{reference}.failures.json").read())
    assert report["failures"] == expected_report["failures"]
    assert report["damaged_videos"] == expected_report["damaged_videos"]
    assert report["damaged"] == expected_report["damaged"] == len(report["damaged_videos"])
    assert (report["videos"], report["written"]) == (expected_report["videos"], expected_report["written"])


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """A single-process run of the command line."""
    out = tmp_path_factory.mktemp("single") / "msvd-qa_appearance_feat.h5"
    torch.set_num_threads(1)
    assert preprocess_features.main(arguments(dataset, out, "--allow-failures")) == 0
    data, _ = read(out)
    assert data["ids"].tolist() == GOOD
    return out


def test_torchrun_two_ranks_resume_and_merge_equal_single_process(dataset, reference, tmp_path, capsys):
    out = tmp_path / "msvd-qa_appearance_feat.h5"
    # A launch with another world size left chunks 0 and 3 (here: shard 0 of 3) and a chunk
    # being written when it was killed; two ranks take the other chunks between them.
    assert preprocess_features.main(arguments(dataset, out, "--num-shards", "3", "--shard-index", "0",
                                              "--allow-failures")) == 0
    assert "shard 0 of 3: 2 of its 2 videos written" in capsys.readouterr().out
    parts = tmp_path / (out.name + ".parts")
    assert sorted(p.name for p in parts.glob("chunk-*.npz")) == ["chunk-000000.npz", "chunk-000003.npz"]
    (parts / ".chunk-000001.npz.k1ll3d.tmp").write_bytes(b"half a chunk")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               SCRIPT, *arguments(dataset, out)]
    result = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300, cwd=ROOT)
    # a failed video makes the exit status 1 (rank 0's); the summary is printed once
    assert result.returncode == 1, result.stderr[-3000:]
    summary = f"{len(GOOD)} videos written, 1 failed"
    assert result.stdout.count(summary) == 1, result.stdout
    assert_same_file(out, reference)
    assert sorted(os.listdir(tmp_path)) == sorted([out.name, out.name + ".failures.json"])
    # the command again (in this process, to save a launch) finds the work done
    capsys.readouterr()
    assert preprocess_features.main(arguments(dataset, out, "--allow-failures")) == 0
    assert "output already complete" in capsys.readouterr().out


def test_torchrun_failure_on_rank_0_stops_every_rank_and_is_printed_once(dataset, reference, tmp_path):
    """Rank 0 alone checks the output (vqakd.core.distributed.from_main): here one made with other
    settings. Every rank stops; rank 0 prints the reason once, the other exits quietly."""
    out = tmp_path / "msvd-qa_appearance_feat.h5"
    shutil.copy(reference, out)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               SCRIPT, *arguments(dataset, out, "--num-clips", "3")]
    result = subprocess.run(command, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {out} already exists and was made with other settings (num_clips: 2 there, "
                      "3 now); pass --overwrite to replace it or choose another --out (one per model: appearance "
                      "and motion features are separate files)"], result.stderr[-3000:]
    # no traceback through the toolkit (torchrun prints its own summary of the failed worker)
    assert f'File "{SCRIPT}"' not in result.stderr and os.path.join(ROOT, "vqakd") not in result.stderr
    assert not (tmp_path / (out.name + ".parts")).exists()


@pytest.fixture(scope="module")
def shards(dataset, tmp_path_factory):
    """Two --num-shards runs with their own output folders, as on two machines without a shared disk."""
    folders = []
    for index in range(2):
        out = tmp_path_factory.mktemp(f"machine{index}") / "msvd-qa_appearance_feat.h5"
        assert preprocess_features.main(arguments(dataset, out, "--num-shards", "2", "--shard-index",
                                                  str(index), "--allow-failures")) == 0
        assert not out.exists()
        folders.append(out.parent / (out.name + ".parts"))
    return folders


def copy_parts(shards, tmp_path):
    copies = []
    for index, folder in enumerate(shards):
        copies.append(tmp_path / f"machine{index}" / folder.name)
        shutil.copytree(folder, copies[-1])
    return copies


def test_shards_merged_by_hand_equal_single_process(shards, reference, tmp_path, capsys):
    copies = copy_parts(shards, tmp_path)
    assert sorted(p.name for p in copies[1].glob("chunk-*")) == ["chunk-000001.npz", "chunk-000003.npz",
                                                                  "chunk-000005.npz"]
    out = tmp_path / "merged" / "msvd-qa_appearance_feat.h5"
    assert merge_features.main(["--out", str(out), *map(str, copies)]) == 1   # one video failed
    assert f"{len(GOOD)} videos written, 1 failed" in capsys.readouterr().out
    assert_same_file(out, reference)
    assert not copies[0].exists() and not copies[1].exists()
    # run again: nothing to do
    assert merge_features.main(["--out", str(out), "--allow-failures", *map(str, copies)]) == 0
    assert "already holds these features" in capsys.readouterr().out


def test_shards_copied_into_one_parts_folder(shards, reference, tmp_path):
    out = tmp_path / "msvd-qa_appearance_feat.h5"
    target = tmp_path / (out.name + ".parts")
    for folder in shards:
        shutil.copytree(folder, target, dirs_exist_ok=True)
    assert merge_features.main(["--out", str(out), "--keep-parts", "--allow-failures"]) == 0
    assert_same_file(out, reference)
    assert target.is_dir()


def merge_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: merge_features.main(argv))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_merge_refuses_missing_duplicate_and_mismatched_parts(shards, tmp_path, capsys):
    copies = copy_parts(shards, tmp_path)
    out = str(tmp_path / "o.h5")
    line = merge_error(["--out", out, str(copies[0])], capsys)
    assert f"{copies[0]}: 3 of 6 chunks missing (chunk-000001.npz, chunk-000003.npz, chunk-000005.npz" in line
    assert "--num-shards 2 --shard-index 1" in line
    line = merge_error(["--out", out, str(copies[0]), str(copies[1]), str(copies[0])], capsys)
    assert "chunk-000000.npz: chunk 0 is also in" in line

    # a part made with other settings, copied into a folder
    other = json.loads((copies[1] / "settings.json").read_text())
    settings_path = copies[1] / "settings.json"
    settings_path.write_text(json.dumps(dict(other, image_width=64)))
    line = merge_error(["--out", out, *map(str, copies)], capsys)
    assert f"{settings_path}: made with other settings (image_width: 64 there, 32 now)" in line
    settings_path.write_text(json.dumps(other))

    chunk = copies[1] / "chunk-000003.npz"
    with np.load(chunk) as part:
        saved = {name: part[name] for name in part.files}
    np.savez(chunk, **dict(saved, features=saved["features"][:, :, :1]))
    line = merge_error(["--out", out, *map(str, copies)], capsys)
    assert f"{chunk}: features are float32 (1, 2, 1, 2048), expected float32 (1, 2, 2, 2048)" in line
    np.savez(chunk, **dict(saved, identity=np.asarray("0" * 64)))
    assert f"{chunk}: made with other extraction settings" in merge_error(["--out", out, *map(str, copies)], capsys)
    np.savez(chunk, **dict(saved, ids=np.asarray([5])))
    line = merge_error(["--out", out, *map(str, copies)], capsys)
    assert f"{chunk}: does not hold exactly its chunk of the video list" in line and "missing: 4" in line
    chunk.write_bytes(b"not a zip file")
    assert f"{chunk}: unreadable part file" in merge_error(["--out", out, *map(str, copies)], capsys)
    assert not os.path.exists(out)
    assert "parts folder not found" in merge_error(["--out", out, str(tmp_path / "nowhere")], capsys)


def test_shard_and_device_choice(monkeypatch):
    with pytest.raises(UserError, match="--num-shards 2 needs --shard-index"):
        preprocess_features.choose_shard(preprocess_features.parse_args(
            ["--dataset", "msvd-qa", "--video-dir", ".", "--annotation-dir", ".", "--model", "resnet101",
             "--num-shards", "2"]))
    with pytest.raises(UserError, match=r"--shard-index must be in 0..1 for --num-shards 2, got 2"):
        Shard(2, 2)
    assert [k for k in range(7) if Shard(3, 1).owns(k)] == [1, 4]
    # under torchrun, auto/cuda means this rank's GPU (the rule of vqakd.core.distributed.resolve_process_device)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    args = preprocess_features.parse_args(["--dataset", "msvd-qa", "--video-dir", ".", "--annotation-dir", ".",
                                           "--model", "resnet101"])
    assert str(preprocess_features.choose_device(args)) == "cuda:3"
    args.device = "cuda:1"
    with pytest.raises(UserError, match="--device 'cuda:1': under torchrun every process uses cuda:LOCAL_RANK"):
        preprocess_features.choose_device(args)
    args.device, args.gpu_id = None, 1
    with pytest.raises(UserError, match="--gpu_id 'cuda:1': under torchrun"):
        preprocess_features.choose_device(args)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args.gpu_id = None
    assert str(preprocess_features.choose_device(args)) == "cpu"


def test_rank_that_cannot_see_the_parts_folder_is_reported(tmp_path):
    parts = tmp_path / "out.h5.parts"
    parts.mkdir()
    (parts / "launch.json").write_text(json.dumps({"token": "abc"}))
    assert launch_problem(str(parts), "abc") is None
    problem = launch_problem(str(parts), "def")
    assert "cannot see the parts folder" in problem and "--num-shards" in problem
    assert "cannot see" in launch_problem(str(tmp_path / "elsewhere"), "abc")
