"""The shared helpers every script relies on: atomic writes, restricted unpickling,
device resolution, annotation reading and the one-line CLI error."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from vqakd.data.annotations import list_videos, load_qa
from vqakd.core.distributed import resolve_device, resolve_process_device
from vqakd.core.errors import UserError
from vqakd.core.files import atomic_open, ensure_writable_dir, write_json
from vqakd.core.safe_pickle import safe_load


def test_atomic_open_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as handle:
            handle.write("{half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert os.listdir(tmp_path) == []
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}


def test_safe_load_reads_numpy_and_refuses_code(tmp_path):
    good = tmp_path / "good.pt"
    obj = {"questions": np.arange(6, dtype=np.int32).reshape(2, 3), "answers": [1, 2], "glove": None}
    good.write_bytes(pickle.dumps(obj))
    loaded = safe_load(good)
    assert np.array_equal(loaded["questions"], obj["questions"])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "bad.pt"
    bad.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(UserError, match="bad.pt.*refusing to unpickle"):
        safe_load(bad)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(pickle.dumps(obj)[:20])
    with pytest.raises(UserError, match="trunc.pt"):
        safe_load(truncated)


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UserError):
        resolve_device("tpu")


@pytest.fixture
def four_gpus(monkeypatch):
    """A machine with four (pretend) GPUs; set_device calls are recorded, not made."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return chosen


def test_process_device_alone_is_what_the_user_asked(four_gpus):
    assert resolve_process_device("auto") == torch.device("cuda")
    assert resolve_process_device("cuda:2") == torch.device("cuda", 2)
    assert four_gpus == [torch.device("cuda", 2)]
    assert resolve_process_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="only 4 CUDA device"):
        resolve_process_device("cuda:4")


@pytest.mark.parametrize("launch", [
    {"WORLD_SIZE": "8", "RANK": "7", "LOCAL_RANK": "3"},                  # the 4th process of node 2
    {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
])
def test_process_device_under_torchrun_is_the_local_rank_gpu(four_gpus, monkeypatch, launch):
    for name, value in launch.items():
        monkeypatch.setenv(name, value)
    gpu = torch.device("cuda", int(launch["LOCAL_RANK"]))
    assert resolve_process_device("auto") == gpu and resolve_process_device("CUDA") == gpu
    assert four_gpus == [gpu, gpu]      # the current device too: no stray context on GPU 0
    assert resolve_process_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match=r"train.device 'cuda:1': under torchrun every process uses "
                                        r"cuda:LOCAL_RANK.*CUDA_VISIBLE_DEVICES"):
        resolve_process_device("cuda:1", what="train.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_process_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_process_device("cuda")


def test_process_device_refuses_more_processes_than_gpus(four_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(UserError, match="LOCAL_RANK 5 but only 4 CUDA device.*--nproc_per_node"):
        resolve_process_device("auto")
    assert four_gpus == []


def test_ensure_writable_dir_reports_unwritable_folder(tmp_path):
    # A path below a regular file can never be created, whoever runs the test (root included).
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="results folder is not writable: .*a_file"):
        ensure_writable_dir(blocker / "results", "results folder")
    assert ensure_writable_dir(tmp_path / "new" / "dir") == str(tmp_path / "new" / "dir")


def test_annotations_msvd_and_errors(tmp_path):
    (tmp_path / "train_qa.json").write_text(json.dumps([
        {"question": "what is a man doing?", "answer": "cook", "video_id": 3, "id": 0},
        {"question": "who plays?", "answer": "man", "video_id": 1, "id": 1},
    ]))
    (tmp_path / "youtube_mapping.txt").write_text("clipA_1_5 vid1\nclipB_2_9 vid3\n")
    videos = list_videos("msvd-qa", str(tmp_path), str(tmp_path / "videos"))
    assert [(v.video_id, v.name) for v in videos] == [(1, "clipA_1_5"), (3, "clipB_2_9")]
    assert videos[0].path.endswith(os.path.join("videos", "clipA_1_5.avi"))

    (tmp_path / "val_qa.json").write_text('[{"question": "q?", "video_id": 1}]')
    with pytest.raises(UserError, match=r"val_qa.json: record 0 .*has no answer"):
        load_qa(str(tmp_path), "val")
    (tmp_path / "test_qa.json").write_text("[{")
    with pytest.raises(UserError, match="test_qa.json: invalid JSON"):
        load_qa(str(tmp_path), "test")


def test_run_cli_prints_one_line_and_exits_2(tmp_path):
    code = ("from vqakd.core.errors import run_cli, UserError\n"
            "def main():\n    raise UserError('data/x.h5: record 3: bad shape')\n"
            "run_cli(main)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: data/x.h5: record 3: bad shape"


def test_msvd_video_in_another_container_is_found(tmp_path):
    # Re-downloaded MSVD clips come as .mp4/.webm; the release names them .avi.
    (tmp_path / "train_qa.json").write_text(json.dumps([
        {"question": "what is a man doing?", "answer": "cook", "video_id": 1, "id": 0},
        {"question": "who plays?", "answer": "man", "video_id": 2, "id": 1},
        {"question": "who sings?", "answer": "girl", "video_id": 3, "id": 2}]))
    (tmp_path / "youtube_mapping.txt").write_text("clipA_1_5 vid1\nclipB_2_9 vid2\nclipC_3_4 vid3\n")
    clips = tmp_path / "YouTubeClips"
    clips.mkdir()
    (clips / "clipA_1_5.mp4").write_bytes(b"x")
    (clips / "clipB_2_9.avi").write_bytes(b"x")
    (clips / "clipB_2_9.mp4").write_bytes(b"x")           # the release's .avi wins
    (clips / "clipC_3_4.video").write_bytes(b"x")         # not a container FFmpeg is asked to read
    paths = [os.path.basename(v.path) for v in list_videos("msvd-qa", str(tmp_path), str(tmp_path))]
    assert paths == ["clipA_1_5.mp4", "clipB_2_9.avi", "clipC_3_4.avi"]


def test_missing_video_names_the_file_beside_it(tmp_path):
    from vqakd.extraction.video import VideoError, read_clip_frames

    (tmp_path / "clipC_3_4.video").write_bytes(b"x")
    with pytest.raises(VideoError, match=r"file not found \(clipC_3_4.video beside it has the same name"):
        read_clip_frames(str(tmp_path / "clipC_3_4.avi"), 2, 4, (32, 32))
