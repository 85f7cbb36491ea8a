"""Reliability (issue 7): interrupted work is never lost, bad input never crashes obscurely.

The pieces not covered by the per-module test files:
- train.py killed with SIGKILL in the middle of an epoch, and killed in the middle of writing a
  checkpoint, then `--resume`: the final weights equal an uninterrupted run's, tensor for tensor,
  and best.pt / last.pt can be loaded at every moment of the run;
- question preprocessing killed with SIGKILL in the middle of writing its pickle;
- an unreadable video folder, unreadable video files, and read-only results folders for every
  entry script (these need a process that file permissions apply to, see `run_restricted`);
- checkpoints of another model size, checkpoints that carry a pickled object, and a scan that
  every `torch.load` in the toolkit uses `weights_only=True`.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import ctypes
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from cli_helpers import TIMING_COLUMNS as timing, run_main as quiet_run_main
from test_train_fixtures import make_dataset, tiny_config_dict, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import train  # noqa: E402
import validate  # noqa: E402
from vqakd.training.checkpoint import load_checkpoint  # noqa: E402
from vqakd.core.errors import UserError  # noqa: E402

SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
EPOCHS = 3
# 384 training questions: a fraction of a second per epoch, long against the few-ms polling below.
TRAIN_VIDEOS = 96
RUN_SECTIONS = dict(train={"epochs": EPOCHS, "lr_halve_every": 2}, teacher={"graph_layers": 1})
STAGE_FILES = {"last.pt", "best.pt", "metrics.csv", "config.yml", "train.log", "curves.png", "results.json"}
SUBPROCESS_TIMEOUT_S = 300


def run_main(main, argv) -> tuple[int, str]:
    return quiet_run_main(main, argv, quiet=True)


def assert_one_line_error(code, err, *fragments):
    assert code == 2, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ------------------------------------------------------------------ a process that permissions bind

CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
PR_CAPBSET_DROP = 24


def _drop_permission_override() -> None:
    """preexec_fn: remove the two capabilities that let root ignore file permission bits.

    Running as `nobody` is not an option here: the interpreter lives under /root (mode 0700).
    Dropped from the bounding set, the capabilities are gone after exec; the process keeps
    uid 0, so owner permission bits decide, exactly as for an ordinary user.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_restricted(args, timeout=SUBPROCESS_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a command as a process that file permissions apply to (root loses its override)."""
    preexec = _drop_permission_override if os.geteuid() == 0 else None
    return subprocess.run(args, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=timeout,
                          preexec_fn=preexec, cwd=ROOT)


@pytest.fixture(scope="module")
def permissions_apply(tmp_path_factory):
    """Skip, with the reason, where no process can be made to respect permission bits."""
    locked = tmp_path_factory.mktemp("probe") / "locked"
    locked.mkdir(mode=0)
    try:
        probe = run_restricted([sys.executable, "-c", f"import os; os.listdir({str(locked)!r})"], timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot start a process without CAP_DAC_OVERRIDE here ({exc})")
    finally:
        locked.chmod(0o700)
    if probe.returncode == 0:
        pytest.skip("a folder with mode 000 stays readable to every process here (running as root "
                    "without the right to drop CAP_DAC_OVERRIDE)")
    assert "PermissionError" in probe.stderr, probe.stderr


# ------------------------------------------------------------------ training data and the reference run

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    data = make_dataset(root / "data", videos=TRAIN_VIDEOS)
    return {"root": root, "data": data, "paths": data["paths"]}


def stage_config(tiny, name: str, **sections) -> str:
    merged = {key: dict(value) for key, value in RUN_SECTIONS.items()}
    for key, value in sections.items():
        merged.setdefault(key, {}).update(value)
    return write_config(tiny["root"] / f"{name}.yml",
                        tiny_config_dict(tiny["paths"], tiny["root"] / name, **merged))


@pytest.fixture(scope="module")
def reference(tiny):
    """The uninterrupted teacher run every interrupted one is compared with."""
    cfg = stage_config(tiny, "reference")
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "teacher"])
    assert code == 0, err
    return tiny["root"] / "reference" / "teacher"


def read_rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_same_run(resumed_folder, reference_folder):
    """Final weights, optimizer, scheduler, best checkpoint, metrics and results all equal."""
    ref, got = load_checkpoint(str(reference_folder / "last.pt")), load_checkpoint(str(resumed_folder / "last.pt"))
    assert got["epoch"] == ref["epoch"] == EPOCHS
    assert got["state_dict"].keys() == ref["state_dict"].keys()
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, got["state_dict"][key]), key
    for index, state in ref["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got["optimizer"]["state"][index][name])), \
                (index, name)
    assert got["scheduler"] == ref["scheduler"]
    ref_best, got_best = (load_checkpoint(str(folder / "best.pt")) for folder in (reference_folder, resumed_folder))
    assert got_best["epoch"] == ref_best["epoch"]
    for key, value in ref_best["state_dict"].items():
        assert torch.equal(value, got_best["state_dict"][key]), f"best.pt {key}"
    strip = [[{k: v for k, v in row.items() if k not in timing} for row in read_rows(folder / "metrics.csv")]
             for folder in (reference_folder, resumed_folder)]
    assert strip[0] == strip[1] and len(strip[1]) == EPOCHS
    ref_results = json.loads((reference_folder / "results.json").read_text())
    got_results = json.loads((resumed_folder / "results.json").read_text())
    for key in ("accuracy", "correct", "count", "per_type", "epoch", "val_accuracy"):
        assert got_results[key] == ref_results[key], key


class CheckpointWatcher:
    """Loads best.pt and last.pt over and over while a run goes on; every load must succeed."""

    def __init__(self, folder):
        self.folder = folder
        self.loaded: list[tuple[str, int]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for name in ("best.pt", "last.pt"):
                try:
                    data = (self.folder / name).read_bytes()
                except FileNotFoundError:
                    continue
                try:
                    checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                    self.loaded.append((name, int(checkpoint["epoch"])))
                except Exception as exc:     # a half-written file at the final path
                    self.failures.append(f"{name} ({len(data)} bytes): {type(exc).__name__}: {exc}")
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def visible_files(folder) -> set[str]:
    return {name for name in os.listdir(folder) if not name.startswith(".")}


def train_command(cfg, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--cfg", cfg, "--stage", "teacher", *extra]


# ------------------------------------------------------------------ training killed with SIGKILL

def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(tiny, reference):
    cfg = stage_config(tiny, "killed")
    folder = tiny["root"] / "killed" / "teacher"
    log = folder / "train.log"
    process = subprocess.Popen(train_command(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=SUBPROCESS_ENV)
    with CheckpointWatcher(folder) as watcher:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        # The epoch line is the last thing written after an epoch's checkpoints; the next thing
        # the process does is the next epoch.
        while process.poll() is None and time.monotonic() < deadline:
            if log.is_file() and "epoch 1/" in log.read_text():
                break
            time.sleep(0.002)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        epoch_seconds = float(read_rows(folder / "metrics.csv")[0]["time_s"])
        # Land well inside the next epoch rather than at its first step; where exactly the kill
        # lands does not matter to the checks below.
        time.sleep(0.4 * epoch_seconds)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    killed_at = load_checkpoint(str(folder / "last.pt"))["epoch"]
    assert 1 <= killed_at < EPOCHS
    assert not (folder / "results.json").exists()
    assert visible_files(folder) <= STAGE_FILES
    assert len(read_rows(folder / "metrics.csv")) == killed_at
    assert not watcher.failures, watcher.failures
    assert watcher.loaded, "the watcher never saw a checkpoint"

    with CheckpointWatcher(folder) as watcher:
        code, err = run_main(train.main, ["--cfg", cfg, "--stage", "teacher", "--resume"])
    assert code == 0, err
    assert not watcher.failures, watcher.failures
    assert_same_run(folder, reference)
    assert log.read_text().count(f"resuming teacher from {folder / 'last.pt'} after epoch {killed_at}") == 1


# Runs train.py with torch.save replaced: its KILL_AT-th call writes half of the checkpoint to
# the file it was given, then the process SIGKILLs itself: a kill in the middle of a write,
# at a known moment.
DIE_WHILE_SAVING = """
import io, os, runpy, signal, sys
import torch
KILL_AT = int(os.environ["KILL_AT_SAVE"])
real_save, calls = torch.save, []
def save_half_then_die(obj, target, *args, **kwargs):
    calls.append(target)
    if len(calls) == KILL_AT:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(target, "wb") as handle:
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        print("KILLED WRITING", target, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, target, *args, **kwargs)
torch.save = save_half_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_training_killed_while_writing_a_checkpoint_keeps_the_previous_one(tiny, reference):
    cfg = stage_config(tiny, "killed_writing")
    folder = tiny["root"] / "killed_writing" / "teacher"
    # Epoch 1 writes best.pt then last.pt; the third save is epoch 2's first checkpoint write.
    result = subprocess.run([sys.executable, "-c", DIE_WHILE_SAVING, *train_command(cfg)[1:]],
                            capture_output=True, text=True, env=dict(SUBPROCESS_ENV, KILL_AT_SAVE="3"),
                            timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    half_written = result.stdout.split("KILLED WRITING ", 1)[1].strip()
    # The half-written file is a temporary next to the checkpoints, never best.pt or last.pt.
    assert os.path.dirname(half_written) == str(folder)
    assert os.path.basename(half_written).startswith(".") and half_written.endswith(".tmp")
    with pytest.raises(Exception):
        torch.load(half_written, weights_only=True)
    for name in ("best.pt", "last.pt"):
        assert load_checkpoint(str(folder / name))["epoch"] == 1, name
    assert visible_files(folder) <= STAGE_FILES

    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "teacher", "--resume"])
    assert code == 0, err
    assert_same_run(folder, reference)
    # the resumed run cleared the interrupted write's temp file away (it is checkpoint-sized)
    assert not os.path.exists(half_written)
    assert f"removed 1 temporary file(s) left by an interrupted run: {half_written}" in (folder / "train.log").read_text()


# ------------------------------------------------------------------ question preprocessing killed

MSVD_RECORDS = {
    "train": [{"question": f"what is the man doing number {i}?", "answer": ["cook", "run"][i % 2],
               "video_id": 1 + i % 3, "id": i} for i in range(40)],
    "val": [{"question": "who is cooking?", "answer": "man", "video_id": 2, "id": 100}],
    "test": [{"question": "what is the man doing?", "answer": "cook", "video_id": 3, "id": 200}],
}

# preprocess_questions.py with pickle.dump replaced: writes half of the pickle, then SIGKILL.
DIE_WHILE_PICKLING = """
import os, pickle, runpy, signal, sys
def dump_half_then_die(obj, handle, protocol=None, **kwargs):
    data = pickle.dumps(obj, protocol=protocol)
    handle.write(data[: len(data) // 2])
    handle.flush()
    os.fsync(handle.fileno())
    print("KILLED WRITING", handle.name, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
pickle.dump = dump_half_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_question_preprocessing_killed_mid_write_leaves_no_truncated_file(tmp_path):
    annotations = write_msvd_annotations(tmp_path / "annotations")
    out = tmp_path / "out"
    command = [os.path.join(ROOT, "preprocess", "preprocess_questions.py"), "--dataset", "msvd-qa",
               "--annotation-dir", str(annotations), "--out-dir", str(out), "--no-glove", "--mode", "train",
               "--no-progress"]
    killed = subprocess.run([sys.executable, "-c", DIE_WHILE_PICKLING, *command], capture_output=True, text=True,
                            env=SUBPROCESS_ENV, timeout=SUBPROCESS_TIMEOUT_S)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    half_written = killed.stdout.split("KILLED WRITING ", 1)[1].strip()
    final = out / "msvd-qa_train_questions.pt"
    assert os.path.dirname(half_written) == str(out) and os.path.basename(half_written).startswith(".")
    assert os.path.getsize(half_written) > 0
    assert not final.exists()
    assert not any(name.endswith(".pt") for name in visible_files(out))

    # The same command again (here in-process) completes, and its output reads back.
    from preprocess.preprocess_questions import main as preprocess_questions
    from vqakd.data.questions import load_question_file
    from vqakd.data.vocab import Vocabulary

    with contextlib.redirect_stdout(io.StringIO()):
        assert preprocess_questions(command[1:]) == 0

    vocab = Vocabulary.load(str(out / "msvd-qa_vocab.json"))
    loaded = load_question_file(str(final), vocab.question_size, vocab.answer_size)
    assert len(loaded["answers"]) == len(MSVD_RECORDS["train"])


# ------------------------------------------------------------------ unreadable input, read-only output

# One restricted process runs every start-up case below (importing torch once instead of once per
# case): each job is an entry script run as `python <script> <args>` would run it (exit status and
# stderr recorded), or one video opened with vqakd.extraction.video.read_clip_frames (the failure reason).
RESTRICTED_DRIVER = r"""
import contextlib, io, json, runpy, sys
results = {}
for name, kind, args in json.loads(sys.argv[1]):
    stderr, stdout = io.StringIO(), io.StringIO()
    if kind == "cli":
        sys.argv = list(args)
        code = 0
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            try:
                runpy.run_path(args[0], run_name="__main__")
            except SystemExit as exc:
                code = exc.code
            except BaseException as exc:
                code, _ = "crash", print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        results[name] = {"code": code, "stderr": stderr.getvalue(), "stdout": stdout.getvalue()}
    else:
        from vqakd.extraction.video import VideoError, read_clip_frames
        try:
            read_clip_frames(args, 2, 2, size=(32, 32))
            results[name] = {"reason": None}
        except VideoError as exc:
            results[name] = {"reason": exc.reason}
print("RESULTS " + json.dumps(results))
"""


def write_msvd_annotations(folder):
    folder.mkdir()
    for split, records in MSVD_RECORDS.items():
        (folder / f"{split}_qa.json").write_text(json.dumps(records))
    (folder / "youtube_mapping.txt").write_text("clipA vid1\nclipB vid2\nclipC vid3\n")
    return folder


def write_msrvtt(root):
    """MSRVTT-QA layout with two good train videos and one test video."""
    from test_video import make_video

    annotations, videos = root / "annotations", root / "videos"
    annotations.mkdir()
    (videos / "TrainValVideo").mkdir(parents=True)
    (videos / "TestVideo").mkdir()
    make_video(videos / "TrainValVideo" / "video0.mp4", 12, 64, 48, 25, codec="libx264")
    make_video(videos / "TrainValVideo" / "video1.mp4", 12, 64, 48, 25, codec="libx264")
    make_video(videos / "TestVideo" / "video7000.mp4", 12, 64, 48, 25, codec="libx264")
    for split, ids in (("train", [0, 1]), ("val", [1]), ("test", [7000])):
        records = [{"question": f"what is in video {vid}?", "answer": "cat", "video_id": vid, "id": i,
                    "category_id": 0} for i, vid in enumerate(ids)]
        (annotations / f"{split}_qa.json").write_text(json.dumps(records))
    return annotations, videos


def features_args(annotations, videos, out, *extra):
    return [os.path.join(ROOT, "preprocess", "preprocess_features.py"), "--dataset", "msrvtt-qa",
            "--video-dir", str(videos), "--annotation-dir", str(annotations), "--model", "resnet101",
            "--random-weights", "--num-clips", "2", "--frames-per-clip", "2", "--image-height", "32",
            "--image-width", "32", "--num-workers", "0", "--no-progress", "--out", str(out), *extra]


def read_only_folder(path):
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


@pytest.fixture(scope="module")
def restricted(permissions_apply, tiny, reference, tmp_path_factory):
    """Every case run once in one restricted process; {case: result}, plus the folders used."""
    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("restricted")
    (root / "msrvtt").mkdir()
    annotations, videos = write_msrvtt(root / "msrvtt")
    msvd_annotations = write_msvd_annotations(root / "msvd_annotations")
    glove_text = root / "glove.txt"
    glove_text.write_text("the 0.1 0.2 0.3\nman 0.4 0.5 0.6\n")
    paths = {"videos": videos, "readonly": read_only_folder(root / "readonly"),
             "readonly_stage": read_only_folder(root / "readonly_stage" / "teacher"),
             "locked_videos": root / "locked_videos"}
    paths["locked_videos"].mkdir(mode=0)
    (videos / "TestVideo").chmod(0)                            # a whole sub-folder
    (videos / "TrainValVideo" / "video1.mp4").chmod(0)          # one file

    def train_config(name, output_dir):
        config = tiny_config_dict(tiny["paths"], output_dir, **RUN_SECTIONS)
        # The data check would fail too: the folder must be reported first, before data is read.
        config["data"]["motion_feat"] = str(root / "missing_motion.h5")
        return write_config(root / f"{name}.yml", config)

    readonly = paths["readonly"]
    jobs = [
        ("train_readonly", "cli", [os.path.join(ROOT, "train.py"), "--cfg", train_config("t1", readonly),
                                   "--stage", "teacher"]),
        ("train_readonly_stage", "cli", [os.path.join(ROOT, "train.py"), "--cfg",
                                         train_config("t2", paths["readonly_stage"].parent), "--stage", "teacher"]),
        ("validate_readonly", "cli", [os.path.join(ROOT, "validate.py"), "--cfg", train_config("v", root / "unused"),
                                      "--checkpoint", str(reference / "best.pt"), "--out",
                                      str(readonly / "eval.json")]),
        ("txt2pickle_readonly", "cli", [os.path.join(ROOT, "txt2pickle.py"), "--glove", str(glove_text), "--out",
                                        str(readonly / "glove.pkl"), "--no-progress"]),
        ("questions_readonly", "cli", [os.path.join(ROOT, "preprocess", "preprocess_questions.py"), "--dataset",
                                       "msvd-qa", "--annotation-dir", str(msvd_annotations), "--out-dir",
                                       str(readonly), "--no-glove", "--mode", "train", "--no-progress"]),
        ("features_readonly", "cli", features_args(annotations, videos, readonly / "feat.h5")),
        ("features_locked_folder", "cli", features_args(annotations, paths["locked_videos"],
                                                        root / "out_locked" / "feat.h5")),
        ("video_locked_file", "video", str(videos / "TrainValVideo" / "video1.mp4")),
        ("video_in_locked_folder", "video", str(videos / "TestVideo" / "video7000.mp4")),
        ("video_readable", "video", str(videos / "TrainValVideo" / "video0.mp4")),
    ]
    try:
        result = run_restricted([sys.executable, "-c", RESTRICTED_DRIVER, json.dumps(jobs)])
    finally:
        for folder, _, _ in os.walk(root):
            os.chmod(folder, 0o755)
        for path in (paths["locked_videos"], videos / "TestVideo"):
            path.chmod(0o755)
        (videos / "TrainValVideo" / "video1.mp4").chmod(0o644)
    assert result.returncode == 0 and "RESULTS " in result.stdout, result.stderr[-3000:]
    cases = json.loads(result.stdout.split("RESULTS ", 1)[1])
    return {"cases": cases, "paths": paths, "root": root, "annotations": annotations}


def test_unreadable_video_folder_is_a_one_line_error(restricted):
    case = restricted["cases"]["features_locked_folder"]
    assert_one_line_error(case["code"], case["stderr"],
                          f"video folder is not readable: {restricted['paths']['locked_videos']}")
    assert not (restricted["root"] / "out_locked" / "feat.h5").exists()


def test_unreadable_video_file_is_a_per_video_failure_with_the_reason(restricted):
    assert restricted["cases"]["video_readable"]["reason"] is None
    reason = restricted["cases"]["video_locked_file"]["reason"]
    assert "permission denied" in reason.lower(), reason


def test_video_in_an_unreadable_sub_folder_is_reported_as_a_permission_problem(restricted):
    reason = restricted["cases"]["video_in_locked_folder"]["reason"]
    assert "permission denied" in reason.lower(), reason


@pytest.mark.slow
def test_unreadable_videos_are_reported_and_the_extraction_continues(permissions_apply, tmp_path):
    pytest.importorskip("av")
    annotations, videos = write_msrvtt(tmp_path)
    (videos / "TrainValVideo" / "video1.mp4").chmod(0)
    out = tmp_path / "out" / "msrvtt-qa_appearance_feat.h5"
    try:
        result = run_restricted([sys.executable, *features_args(annotations, videos, out)])
    finally:
        (videos / "TrainValVideo" / "video1.mp4").chmod(0o644)
    assert result.returncode == 1, result.stderr[-2000:]
    report_path = f"{out}.failures.json"
    assert f"2 videos written, 1 failed (see {report_path})" in result.stdout
    report = json.loads(open(report_path).read())
    assert [(f["video_id"], f["reason"]) for f in report["failures"]] == [(1, "cannot open: Permission denied")]
    import h5py

    with h5py.File(out, "r") as handle:
        assert handle["ids"][()].tolist() == [0, 7000]


@pytest.mark.parametrize("case, fragment", [
    ("train_readonly", "teacher output folder is not writable: {readonly}/teacher (Permission denied)"),
    ("train_readonly_stage", "teacher output folder is not writable: {readonly_stage} (Permission denied)"),
    ("validate_readonly", "output folder for the evaluation results is not writable: {readonly} "),
    ("txt2pickle_readonly", "not writable: {readonly}"),
    ("questions_readonly", "not writable: {readonly}"),
    ("features_readonly", "not writable: {readonly}"),
])
def test_read_only_results_folder_is_reported_at_start_up(restricted, case, fragment):
    result = restricted["cases"][case]
    assert_one_line_error(result["code"], result["stderr"], fragment.format(**restricted["paths"]))
    # Nothing written; for train.py/validate.py the data (with its missing motion file) was never read.
    assert os.listdir(restricted["paths"]["readonly"]) in ([], ["teacher"])
    assert "missing_motion" not in result["stderr"]


# ------------------------------------------------------------------ checkpoints

def test_checkpoint_of_another_model_size_names_the_first_bad_key(tiny, reference, tmp_path):
    from model import DualVGR, ModelConfig

    ours = torch.load(reference / "best.pt", weights_only=True)
    bigger = ModelConfig(**{**ours["model_config"], "module_dim": 64})
    torch.manual_seed(0)
    mismatched = dict(ours, state_dict=DualVGR(bigger).state_dict())       # config says 32, weights are 64
    path = tmp_path / "mismatched.pt"
    torch.save(mismatched, path)
    cfg = stage_config(tiny, "validate_other_size")
    code, err = run_main(validate.main, ["--cfg", cfg, "--checkpoint", str(path), "--out", str(tmp_path / "e.json")])
    assert_one_line_error(code, err, str(path), "weights do not fit the model: key ", "the model needs (")
    assert not (tmp_path / "e.json").exists()

    fewer_layers = dict(ours, model_config={**ours["model_config"], "graph_layers": 2})   # weights have G=1
    path = tmp_path / "fewer_layers.pt"
    torch.save(fewer_layers, path)
    code, err = run_main(validate.main, ["--cfg", cfg, "--checkpoint", str(path), "--out", str(tmp_path / "e.json")])
    assert_one_line_error(code, err, str(path), "weights do not fit the model: missing key ")


def test_resume_with_another_model_size_is_refused_and_keeps_the_run(tiny, reference, tmp_path):
    cfg = write_config(tmp_path / "c.yml", tiny_config_dict(tiny["paths"], tmp_path / "run", **RUN_SECTIONS))
    stage = tmp_path / "run" / "teacher"
    stage.mkdir(parents=True)
    shutil.copy(reference / "last.pt", stage / "last.pt")
    before = (stage / "last.pt").read_bytes()
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "teacher", "--resume", "--set", "model.module_dim=64"])
    assert_one_line_error(code, err, str(stage / "last.pt"), "written for a different model (module_dim 32 vs 64 now)",
                          "--overwrite")
    assert (stage / "last.pt").read_bytes() == before


def test_student_refuses_a_teacher_of_another_module_size(tiny, reference, tmp_path):
    cfg = write_config(tmp_path / "c.yml", tiny_config_dict(tiny["paths"], tmp_path / "run", **RUN_SECTIONS))
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "student", "--teacher", str(reference / "best.pt"),
                                      "--set", "model.module_dim=64"])
    assert_one_line_error(code, err, "--set model.module_dim=64 conflicts with the teacher", str(reference / "best.pt"),
                          "module_dim = 32")
    assert not (tmp_path / "run").exists()


class Exploit:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_holding_a_pickled_object_is_refused_everywhere(tiny, reference, tmp_path):
    from vqakd.extraction.resnext3d import resnext101
    from vqakd.extraction.weights import load_weights

    marker = tmp_path / "code_ran"
    evil = dict(torch.load(reference / "best.pt", weights_only=True), payload=Exploit(marker))
    evil_path = tmp_path / "evil.pt"
    torch.save(evil, evil_path)
    cfg = write_config(tmp_path / "c.yml", tiny_config_dict(tiny["paths"], tmp_path / "run", **RUN_SECTIONS))
    expected = f"error: {evil_path}: cannot read it as a checkpoint"

    code, err = run_main(validate.main, ["--cfg", cfg, "--checkpoint", str(evil_path), "--out", str(tmp_path / "e.json")])
    assert_one_line_error(code, err, expected)
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "student", "--teacher", str(evil_path)])
    assert_one_line_error(code, err, expected)
    stage = tmp_path / "run" / "teacher"
    stage.mkdir(parents=True)
    shutil.copy(evil_path, stage / "last.pt")
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "teacher", "--resume"])
    assert_one_line_error(code, err, f"{stage / 'last.pt'}: cannot read it as a checkpoint")
    # an original-layout checkpoint and a ResNeXt weights file with the same payload
    torch.save({"epoch": 1, "state_dict": {}, "model_kwargs": {}, "payload": Exploit(marker)}, evil_path)
    with pytest.raises(UserError, match=str(evil_path)):
        load_checkpoint(str(evil_path))
    torch.save({"state_dict": {"conv1.weight": Exploit(marker)}}, evil_path)
    with pytest.raises(UserError, match=str(evil_path)):
        load_weights(resnext101(), str(evil_path), "3D ResNeXt-101 weights")
    assert not marker.exists()


def _calls(tree, module: str, function: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == function \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module:
            yield node


def toolkit_sources():
    skip = {".venv", ".git", "data", "results", "tests", "__pycache__", "shared"}
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if name not in skip and not name.startswith(".")]
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def test_every_torch_load_is_weights_only_and_no_plain_unpickling():
    unsafe, loads, sources = [], [], list(toolkit_sources())
    assert any(path.endswith(os.path.join("vqakd", "training", "checkpoint.py")) for path in sources)
    for path in sources:
        tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
        for call in _calls(tree, "torch", "load"):
            loads.append(os.path.relpath(path, ROOT))
            flags = {keyword.arg: keyword.value for keyword in call.keywords}
            value = flags.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                unsafe.append(f"{os.path.relpath(path, ROOT)}:{call.lineno}: torch.load without weights_only=True")
        # bench/ reads back only files it has just written itself (data_path.py re-creates the
        # original per-sample loader, pickle.load included); everything else reads user files.
        relative = os.path.relpath(path, ROOT)
        if relative != os.path.join("vqakd", "core", "safe_pickle.py") and not relative.startswith("bench" + os.sep):
            for function in ("load", "loads", "Unpickler"):
                for call in _calls(tree, "pickle", function):
                    unsafe.append(f"{os.path.relpath(path, ROOT)}:{call.lineno}: pickle.{function} "
                                  "(use vqakd.core.safe_pickle)")
    assert not unsafe, unsafe
    # the scan sees the real loaders: checkpoints (ours and original ones), ResNeXt weights
    assert {os.path.join("vqakd", "training", "checkpoint.py"), os.path.join("vqakd", "extraction", "weights.py")} <= set(loads), loads
