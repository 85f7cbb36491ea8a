"""No silent loss, mix-up or stale state in the long-running scripts (train.py, validate.py,
predict.py, preprocess/preprocess_features.py, preprocess/merge_features.py): outputs that would
overwrite inputs, two runs into one output, leftover temporaries, a full disk, Ctrl-C, two
extractions into one --out, and checkpoint sizes that would allocate absurd memory."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

from vqakd.training.run import run_training
import pytest
import torch

from cli_helpers import run_main
from test_train_fixtures import make_dataset, tiny_config_dict, write_config
from test_video import make_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "preprocess"))

import merge_features  # noqa: E402
import preprocess_features  # noqa: E402
import train  # noqa: E402
import validate  # noqa: E402
from vqakd.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from vqakd.core.config import load_config  # noqa: E402
from vqakd.core.locks import output_lock  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
SMALL = ["--num-clips", "2", "--frames-per-clip", "4", "--image-height", "32", "--image-width", "32"]


def one_line(code, err, *fragments, status=2):
    assert code == status, (code, err)
    assert err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data = make_dataset(root / "data", videos=24, questions_per_video=3)
    cfg = write_config(root / "tiny.yml", tiny_config_dict(data["paths"], root / "out", train={"epochs": 1}))
    return {"root": root, "data": data, "cfg": cfg, "out": root / "out"}


@pytest.fixture(scope="module")
def teacher(tiny):
    """A one-epoch teacher run, in this process."""
    run_training(load_config(tiny["cfg"]), "teacher")
    return tiny["out"] / "teacher"


def validate_argv(tiny, checkpoint, *extra):
    return ["--cfg", tiny["cfg"], "--checkpoint", str(checkpoint), *extra]


# ---------------------------------------------------------------- 1. outputs vs inputs

def test_validate_refuses_out_that_is_the_checkpoint(tiny, teacher):
    best = teacher / "best.pt"
    before = best.read_bytes()
    code, err = run_main(validate.main, validate_argv(tiny, best, "--out", str(best)), quiet=True)
    one_line(code, err, f"--out {best} would overwrite --checkpoint")
    assert best.read_bytes() == before


def test_validate_refuses_preds_out_equal_to_out_or_a_data_file(tiny, teacher, tmp_path):
    out = tmp_path / "eval.json"
    code, err = run_main(validate.main, validate_argv(tiny, teacher / "best.pt", "--out", str(out), "--write-preds",
                                                     "--preds-out", str(out)), quiet=True)
    one_line(code, err, "--out and --preds-out are the same file")
    vocab = tiny["data"]["paths"]["vocab"]
    code, err = run_main(validate.main, validate_argv(tiny, teacher / "best.pt", "--out", vocab), quiet=True)
    one_line(code, err, "would overwrite data.vocab")


def test_train_refuses_stage_files_that_are_its_inputs(tiny, tmp_path):
    # The config saved by a run, used as --cfg of a new run into the same folder.
    out = tmp_path / "out"
    (out / "teacher").mkdir(parents=True)
    cfg = write_config(out / "teacher" / "config.yml", tiny_config_dict(tiny["data"]["paths"], out))
    before = open(cfg).read()
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "teacher"], quiet=True)
    one_line(code, err, "teacher config.yml", "would overwrite --cfg")
    assert open(cfg).read() == before
    assert sorted(os.listdir(out / "teacher")) == ["config.yml"]


def test_train_refuses_a_teacher_that_is_a_student_output(tiny, teacher, tmp_path):
    student_best = tiny["out"] / "student" / "best.pt"
    student_best.parent.mkdir(exist_ok=True)
    student_best.write_bytes((teacher / "best.pt").read_bytes())
    try:
        code, err = run_main(train.main, ["--cfg", tiny["cfg"], "--stage", "student", "--teacher", str(student_best)],
                             quiet=True)
        one_line(code, err, "student best.pt", "would overwrite --teacher")
    finally:
        student_best.unlink()
        student_best.parent.rmdir()


def test_feature_out_that_is_a_video_or_the_weights_is_refused(tmp_path, capsys):
    annotations, videos = msrvtt_layout(tmp_path)
    video = videos / "TrainValVideo" / "video0.mp4"
    before = video.read_bytes()
    code, err = run_main(preprocess_features.main, extraction_argv(annotations, videos, video), quiet=True)
    one_line(code, err, f"--out {video} would overwrite video 0")
    assert video.read_bytes() == before
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    argv = extraction_argv(annotations, videos, weights)
    argv.remove("--random-weights")
    code, err = run_main(preprocess_features.main, argv + ["--weights", str(weights)], quiet=True)
    one_line(code, err, "would overwrite --weights")
    assert weights.read_bytes() == b"weights"


# ---------------------------------------------------------------- 2. one run per output

def test_two_trainings_started_together_one_is_refused(tiny, tmp_path):
    cfg = write_config(tmp_path / "c.yml", tiny_config_dict(tiny["data"]["paths"], tmp_path / "out",
                                                            train={"epochs": 2}))
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--cfg", cfg, "--stage", "teacher"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
            for _ in range(2)]
    results = [(run.pid, run.wait(timeout=300), run.stderr.read()) for run in runs]
    for run in runs:
        run.stdout.close()
        run.stderr.close()
    codes = sorted(code for _, code, _ in results)
    assert codes == [0, 2], results
    (winner, _, _), = [r for r in results if r[1] == 0]
    (_, _, refused), = [r for r in results if r[1] == 2]
    folder = tmp_path / "out" / "teacher"
    assert refused.startswith(f"error: teacher output folder {folder} is in use by another run (pid {winner} ")
    assert refused.count("\n") == 1
    assert not (folder / ".vqakd.lock").exists()


def test_validate_refuses_while_another_writes_the_same_output(tiny, teacher, tmp_path):
    out = tmp_path / "eval.json"
    with output_lock(out, "evaluation output"):
        code, err = run_main(validate.main, validate_argv(tiny, teacher / "best.pt", "--out", str(out)), quiet=True)
    one_line(code, err, f"evaluation output {out} is in use by another run (pid {os.getpid()}")
    assert not out.exists()


def test_extraction_refuses_while_another_writes_the_same_output(tmp_path):
    annotations, videos = msrvtt_layout(tmp_path)
    out = tmp_path / "out" / "f.h5"
    with output_lock(out, "feature output"):
        code, err = run_main(preprocess_features.main, extraction_argv(annotations, videos, out), quiet=True)
    one_line(code, err, f"feature output {out} is in use by another run (pid {os.getpid()}")


# ---------------------------------------------------------------- 3. leftover temporaries

def test_validate_removes_the_temporaries_of_a_killed_run(tiny, teacher, tmp_path):
    out = tmp_path / "eval.json"
    leftover = tmp_path / ".eval.json.x1y2.tmp"
    leftover.write_bytes(b"half")
    code, _ = run_main(validate.main, validate_argv(tiny, teacher / "best.pt", "--out", str(out)), quiet=True)
    assert code == 0 and out.is_file() and not leftover.exists()


def test_merge_removes_the_temporaries_of_a_killed_run(tmp_path):
    annotations, videos = msrvtt_layout(tmp_path)
    out = tmp_path / "out" / "f.h5"
    assert preprocess_features.main(extraction_argv(annotations, videos, out)) == 0
    leftovers = [out.parent / ".f.h5.a1b2.tmp", out.parent / ".f.h5.failures.json.c3d4.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half")
    code, _ = run_main(merge_features.main, ["--out", str(out)], quiet=True)
    assert code == 0
    assert not any(leftover.exists() for leftover in leftovers)


# ---------------------------------------------------------------- 4. full disk

def raise_disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_saving_a_checkpoint_is_one_line(teacher, tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    checkpoint = load_checkpoint(str(teacher / "best.pt"))
    save_checkpoint(str(path), checkpoint)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", raise_disk_full)
    code, err = run_main(lambda argv: save_checkpoint(str(path), checkpoint), [])
    one_line(code, err, f"error: no space left on device while writing {path}")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["best.pt"]

    # torch's own words for a short write on a full disk: no errno, the same one line.
    import shutil

    def short_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1052160 vs 1052054")

    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    code, err = run_main(lambda argv: save_checkpoint(str(path), checkpoint), [])
    one_line(code, err, f"error: no space left on device while writing {path}")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["best.pt"]


def test_full_disk_during_training_is_one_line_and_keeps_earlier_files(tiny, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "c.yml", tiny_config_dict(tiny["data"]["paths"], tmp_path / "out",
                                                            train={"epochs": 2}))
    real_save, saves = torch.save, []

    def save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) > 2:          # epoch 1 writes best.pt and last.pt; epoch 2 finds the disk full
            raise_disk_full()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "teacher"], quiet=True)
    folder = tmp_path / "out" / "teacher"
    one_line(code, err, "error: no space left on device while writing", str(folder))
    assert load_checkpoint(str(folder / "last.pt"))["epoch"] == 1
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]


def test_full_disk_while_writing_a_feature_part_or_the_merged_file(tmp_path, monkeypatch):
    annotations, videos = msrvtt_layout(tmp_path)
    out = tmp_path / "out" / "f.h5"
    monkeypatch.setattr(np, "savez", raise_disk_full)
    code, err = run_main(preprocess_features.main, extraction_argv(annotations, videos, out), quiet=True)
    one_line(code, err, "error: no space left on device while writing", f"{out}.parts")
    monkeypatch.undo()
    real_file = h5py.File

    def full_h5(path, mode="r", *args, **kwargs):
        if mode == "w":    # h5py names the C library's errno only in its message
            raise OSError("Unable to synchronously create file (file write failed: errno = 28, error message = "
                          "'No space left on device')")
        return real_file(path, mode, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", full_h5)
    code, err = run_main(preprocess_features.main, extraction_argv(annotations, videos, out), quiet=True)
    one_line(code, err, f"error: no space left on device while writing {out}")
    assert not out.exists() and len(os.listdir(f"{out}.parts")) > 2   # the chunks made are kept


# ---------------------------------------------------------------- 5. Ctrl-C

@pytest.mark.parametrize("script", ["train.py", "validate.py", "predict.py",
                                    os.path.join("preprocess", "preprocess_features.py"),
                                    os.path.join("preprocess", "merge_features.py")])
def test_ctrl_c_while_importing_torch_is_one_line_and_exit_130(tmp_path, script):
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise KeyboardInterrupt\n")
    args = {"train.py": ["--cfg", "c.yml", "--stage", "teacher"], "validate.py": ["--cfg", "c", "--checkpoint", "x"],
            "predict.py": ["--checkpoint", "x", "--video", "v", "--question", "q?"]}.get(script, ["--out", "o.h5"])
    env = dict(ENV, PYTHONPATH=str(tmp_path / "fake"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (130, "interrupted\n")


@pytest.mark.parametrize("script", ["train.py", "validate.py"])
def test_help_answers_before_torch_is_imported(tmp_path, script):
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise SystemExit('torch imported')\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"],
                          env=dict(ENV, PYTHONPATH=str(tmp_path / "fake")), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_ctrl_c_in_lazy_mode_with_loader_workers_stops_training_with_130(tiny, tmp_path):
    cfg = write_config(tmp_path / "c.yml", tiny_config_dict(
        tiny["data"]["paths"], tmp_path / "out", data={"feature_mode": "lazy"},
        train={"epochs": 200, "num_workers": 1, "batch_size": 4}))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--cfg", cfg, "--stage", "teacher"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        log = tmp_path / "out" / "teacher" / "train.log"
        while time.monotonic() < deadline and not (log.exists() and "epoch 2/" in log.read_text()):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)          # what Ctrl-C in the terminal does
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err = f"still running 60 s after the SIGINT: {out[-300:]} {err[-2000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    # The last line is ours; PyTorch's worker shutdown may still print its own noise before it.
    assert err.endswith("interrupted\n"), err[-2000:]


# ---------------------------------------------------------------- 6. two extractions into one --out

def test_second_extraction_with_other_settings_into_one_out_names_them(tmp_path):
    annotations, videos = msrvtt_layout(tmp_path)
    out = tmp_path / "out" / "features.h5"
    assert preprocess_features.main(extraction_argv(annotations, videos, out)) == 0
    argv = extraction_argv(annotations, videos, out)
    argv[argv.index("resnet101")] = "resnext101"
    code, err = run_main(preprocess_features.main, argv, quiet=True)
    one_line(code, err, f"{out} already exists", "model: 'resnet101' there, 'resnext101' now", "--overwrite",
             "another --out")


def test_parts_of_another_extraction_in_one_out_name_the_settings(tmp_path):
    annotations, videos = msrvtt_layout(tmp_path)
    out = tmp_path / "out" / "features.h5"
    argv = extraction_argv(annotations, videos, out, "--num-shards", "2", "--shard-index", "0")
    assert preprocess_features.main(argv) == 0                 # appearance parts, not merged yet
    argv = extraction_argv(annotations, videos, out)
    argv[argv.index("resnet101")] = "resnext101"
    code, err = run_main(preprocess_features.main, argv, quiet=True)
    one_line(code, err, f"{out}.parts holds an unfinished run", "model: 'resnet101' there, 'resnext101' now",
             "--overwrite", "another --out")


# ---------------------------------------------------------------- 7. absurd sizes in a checkpoint

def test_checkpoint_with_absurd_size_is_refused_before_allocating(teacher, tmp_path):
    checkpoint = load_checkpoint(str(teacher / "best.pt"))
    checkpoint["model_config"] = dict(checkpoint["model_config"], module_dim=2 ** 22)
    path = tmp_path / "forged.pt"
    save_checkpoint(str(path), checkpoint)
    from vqakd.training.checkpoint import model_from_checkpoint
    from vqakd.core.errors import UserError
    with pytest.raises(UserError, match=rf"{path}: checkpoint weights do not fit the model: key .* \(from model_config module_dim 4194304 "):
        model_from_checkpoint(load_checkpoint(str(path)), str(path), torch.device("cpu"))


def test_checkpoint_sizes_check_accepts_real_checkpoints(teacher):
    from vqakd.training.checkpoint import check_sizes, model_config_from
    checkpoint = load_checkpoint(str(teacher / "best.pt"))
    config = model_config_from(checkpoint, "best.pt")
    check_sizes(config, checkpoint["state_dict"], "best.pt")
    assert dataclasses.asdict(config)["module_dim"] == 32


# ---------------------------------------------------------------- helpers

def msrvtt_layout(tmp_path):
    import json
    annotations, videos = tmp_path / "annotations", tmp_path / "videos"
    annotations.mkdir()
    (videos / "TrainValVideo").mkdir(parents=True)
    (videos / "TestVideo").mkdir()
    make_video(videos / "TrainValVideo" / "video0.mp4", 12, 64, 48, 24, codec="libx264")
    make_video(videos / "TrainValVideo" / "video3.mp4", 12, 64, 48, 24, codec="libx264")
    make_video(videos / "TestVideo" / "video7000.mp4", 12, 64, 48, 24, codec="libx264")
    for split, ids in (("train", [3, 0]), ("val", [3]), ("test", [7000])):
        records = [{"question": "what is it?", "answer": "cat", "video_id": vid, "id": i} for i, vid in enumerate(ids)]
        (annotations / f"{split}_qa.json").write_text(json.dumps(records))
    return annotations, videos


def extraction_argv(annotations, videos, out, *extra):
    return ["--dataset", "msrvtt-qa", "--video-dir", str(videos), "--annotation-dir", str(annotations),
            "--model", "resnet101", "--random-weights", *SMALL, "--num-workers", "0", "--chunk-videos", "1",
            "--no-progress", "--out", str(out), *extra]
