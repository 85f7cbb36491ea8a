"""No silent loss, mix-up or stale state in a run's settings: --resume with other settings is
refused or applied and recorded, YAML aliases do not tie sections together, questions of
missing videos are dropped only on request (and still count as wrong), and out-of-range
settings or features stop with one line naming their origin."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import h5py
import numpy as np
import pytest
import yaml

from cli_helpers import run_main
from test_train_fixtures import make_dataset, tiny_config_dict, write_config

import train  # noqa: E402
import validate  # noqa: E402
from vqakd.training.checkpoint import load_checkpoint  # noqa: E402
from vqakd.core.config import load_config  # noqa: E402

SECTIONS = dict(teacher={"graph_layers": 1}, train={"epochs": 2, "lr_halve_every": 6, "lr": 3e-3})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    return make_dataset(root / "data", videos=24)


def config_file(tiny, tmp_path, name="c.yml", **sections) -> str:
    merged = {key: dict(value) for key, value in SECTIONS.items()}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return write_config(tmp_path / name, tiny_config_dict(tiny["paths"], tmp_path / "out", **merged))


def teacher(cfg: str, *args: str) -> tuple[int, str]:
    return run_main(train.main, ["--cfg", cfg, "--stage", "teacher", *args], quiet=True)


def one_line_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err


def lrs(folder) -> list[float]:
    with open(folder / "metrics.csv", newline="") as handle:
        return [float(row["lr"]) for row in csv.DictReader(handle)]


# ----------------------------------------------------------------------------------- resume

def test_resume_applies_and_records_a_changed_lr_schedule_and_more_epochs(tiny, tmp_path):
    cfg = config_file(tiny, tmp_path)
    folder = tmp_path / "out" / "teacher"
    assert teacher(cfg, "--set", "train.stop_after_epoch=1")[0] == 0
    code, err = teacher(cfg, "--resume", "--set", "train.lr=1e-3", "--set", "train.lr_halve_every=1",
                        "--set", "train.epochs=3", "--set", "loss.alpha=0")
    assert code == 0, err
    # The new schedule from the resumed epoch on, as if used from the start: 1e-3 * 0.5 ** (epochs done // 1).
    assert lrs(folder) == pytest.approx([3e-3, 5e-4, 2.5e-4])
    results = json.loads((folder / "results.json").read_text())
    assert results["resumed"] == [{"epoch": 2, "after_epoch": 1, "changed": {
        "train.lr": [3e-3, 1e-3], "train.epochs": [2, 3], "train.lr_halve_every": [6, 1],
        "train.stop_after_epoch": [1, None], "loss.alpha": [100.0, 0.0]}}]
    assert results["config"]["train"]["lr"] == 1e-3 and results["config"]["loss"]["alpha"] == 0.0
    saved = yaml.safe_load((folder / "config.yml").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["train"]["lr_halve_every"] == 1 and saved["train"]["epochs"] == 3
    assert "settings changed from epoch 2 on: train.lr 0.003 -> 0.001" in (folder / "train.log").read_text()
    assert load_checkpoint(str(folder / "last.pt"))["config"]["train"]["lr"] == 1e-3

    # A second extension: compared with the settings of the last resume, recorded after the first.
    code, err = teacher(cfg, "--resume", "--set", "train.lr=1e-3", "--set", "train.lr_halve_every=1",
                        "--set", "train.epochs=4", "--set", "loss.alpha=0")
    assert code == 0, err
    results = json.loads((folder / "results.json").read_text())
    assert [entry["epoch"] for entry in results["resumed"]] == [2, 4]
    assert results["resumed"][1]["changed"] == {"train.epochs": [3, 4]}
    assert lrs(folder) == pytest.approx([3e-3, 5e-4, 2.5e-4, 1.25e-4])

    # Fewer epochs than done: refused (nothing would run, yet config and results would say 2);
    # likewise for a run stopped early (below).
    before = (folder / "last.pt").read_bytes(), (folder / "results.json").read_bytes()
    code, err = teacher(cfg, "--resume", "--set", "train.lr=1e-3", "--set", "train.lr_halve_every=1",
                        "--set", "train.epochs=2", "--set", "loss.alpha=0")
    one_line_error(code, err, "train.epochs=2", "already trained 4 epochs")
    assert ((folder / "last.pt").read_bytes(), (folder / "results.json").read_bytes()) == before
    code, err = teacher(cfg, "--overwrite", "--set", "train.epochs=4", "--set", "train.stop_after_epoch=3")
    assert code == 0, err
    code, err = teacher(cfg, "--resume", "--set", "train.epochs=2")
    one_line_error(code, err, "train.epochs=2", "already trained 3 epochs")


@pytest.mark.parametrize("override, key, old, new", [
    ("train.seed=1", "train.seed", "666", "1"),
    ("train.batch_size=16", "train.batch_size", "32", "16"),
])
def test_resume_refuses_a_setting_that_defines_the_run(tiny, tmp_path, override, key, old, new):
    cfg = config_file(tiny, tmp_path)
    folder = tmp_path / "out" / "teacher"
    assert teacher(cfg, "--set", "train.stop_after_epoch=1")[0] == 0
    before = (folder / "last.pt").read_bytes()
    code, err = teacher(cfg, "--resume", "--set", override)
    one_line_error(code, err, str(folder / "last.pt"), f"cannot resume with {key} = {new}",
                   f"trained with {old}", "--overwrite")
    assert (folder / "last.pt").read_bytes() == before


def test_resume_refuses_other_data_files(tiny, tmp_path):
    cfg = config_file(tiny, tmp_path)
    assert teacher(cfg, "--set", "train.stop_after_epoch=1")[0] == 0
    other = tmp_path / "other_test.pt"          # other questions (a copy of the same ones would be allowed)
    other.write_bytes(open(tiny["paths"]["val_questions"], "rb").read())
    code, err = teacher(cfg, "--resume", "--set", f"data.test_questions={other}")
    one_line_error(code, err, "cannot resume", f"data.test_questions ({other}) changed")


@pytest.mark.parametrize("content", ['{"epoch": 2}', '[{"after_epoch": 1}]'])
def test_resume_with_a_damaged_resume_record_says_so_in_one_line(tiny, tmp_path, content):
    cfg = config_file(tiny, tmp_path)
    folder = tmp_path / "out" / "teacher"
    assert teacher(cfg, "--set", "train.stop_after_epoch=1")[0] == 0
    (folder / "resumes.json").write_text(content)
    code, err = teacher(cfg, "--resume")
    one_line_error(code, err, str(folder / "resumes.json"), "not a list of resumes", "delete it")


# ----------------------------------------------------------------------------------- YAML aliases

def test_yaml_alias_sections_are_independent(tmp_path):
    path = tmp_path / "alias.yml"
    path.write_text("teacher: &g {graph_layers: 2}\nstudent: *g\n")
    config = load_config(str(path), ["student.graph_layers=1"])
    assert (config.teacher.graph_layers, config.student.graph_layers) == (2, 1)
    config = load_config(str(path), ["teacher.graph_layers=3"])
    assert (config.teacher.graph_layers, config.student.graph_layers) == (3, 2)


# ----------------------------------------------------------------------------------- missing videos

def without_video(source: str, target, video_id: int, dataset: str) -> str:
    with h5py.File(source, "r") as handle:
        ids = handle["ids"][()]
        features = handle[dataset][()]
    keep = ids != video_id
    with h5py.File(target, "w") as handle:
        handle.create_dataset(dataset, data=features[keep])
        handle.create_dataset("ids", data=ids[keep])
    return str(target)


def test_missing_videos_stop_training_unless_dropped_and_dropped_questions_count_as_wrong(tiny, tmp_path):
    train_video, test_video = tiny["ids"][0], tiny["ids"][-1]
    motion = without_video(tiny["paths"]["motion_feat"], tmp_path / "m.h5", train_video, "resnext_features")
    appearance = without_video(tiny["paths"]["appearance_feat"], tmp_path / "a.h5", test_video, "resnet_features")
    files = {"motion_feat": motion, "appearance_feat": appearance}
    cfg = config_file(tiny, tmp_path, data=files, train={"epochs": 1})
    code, err = teacher(cfg)
    one_line_error(code, err, "1 video id(s) used by its questions are missing", "data.missing_videos: drop")

    code, err = teacher(cfg, "--set", "data.missing_videos=drop")
    assert code == 0, err
    folder = tmp_path / "out" / "teacher"
    results = json.loads((folder / "results.json").read_text())
    stats = tiny["stats"]["test"]
    assert results["dropped_questions"] == {"train": 6, "val": 0, "test": 6}
    assert results["count"] == stats["count"] and results["count_answered"] == stats["count"] - 6
    assert results["accuracy"] == pytest.approx(results["correct"] / stats["count"])
    assert results["accuracy_answered"] == pytest.approx(results["correct"] / (stats["count"] - 6))
    dropped_types = stats["first_tokens"][-6:]
    for qtype, values in results["per_type"].items():
        assert values["count"] == stats["first_tokens"].count(qtype), qtype
        assert values["dropped"] == dropped_types.count(qtype)
        assert values["accuracy"] == pytest.approx(values["correct"] / values["count"] if values["count"] else 0.0)
    assert "drop left out 6 train, 6 test question(s)" in (folder / "train.log").read_text()

    out = tmp_path / "eval.json"
    code, err = run_main(validate.main, ["--cfg", cfg, "--checkpoint", str(folder / "best.pt"), "--out", str(out)],
                         quiet=True)
    one_line_error(code, err, "data.missing_videos: drop")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code, err = run_main(validate.main, ["--cfg", cfg, "--checkpoint", str(folder / "best.pt"), "--out", str(out),
                                             "--set", "data.missing_videos=drop"])
    assert code == 0, err
    # The terminal says so, not only the JSON.
    assert f"6 of {stats['count']} questions were left out" in printed.getvalue()
    assert "count as wrong" in printed.getvalue()
    evaluated = json.loads(out.read_text())
    # Ceiling: the answers the vocabulary can name, the dropped questions counted as unreachable.
    labels = np.asarray(stats["answers"])
    assert evaluated["ceiling"]["all"] == pytest.approx(float((labels[:-6] >= 2).sum()) / stats["count"])
    for key in ("accuracy", "count", "accuracy_answered", "count_answered", "per_type"):
        assert evaluated[key] == results[key], key
    assert evaluated["dropped_questions"] == {"test": 6}


# ----------------------------------------------------------------------------------- one clear line

@pytest.mark.parametrize("override, expected", [
    ("train.seed=4294967296", "--set train.seed=4294967296: train.seed must be in [0, 4294967295]"),
    ("train.lr=.nan", "--set train.lr=.nan: key 'train.lr' must be a finite number, got nan"),
    ("train.lr=.inf", "--set train.lr=.inf: key 'train.lr' must be a finite number, got inf"),
    ("train.epochs=0", "--set train.epochs=0: train.epochs must be > 0, got 0"),
    ("train.batch_size=1", "train.batch_size is 1: BatchNorm needs at least 2 questions per training batch"),
])
def test_out_of_range_settings_are_one_line_naming_the_option(tiny, tmp_path, override, expected):
    cfg = config_file(tiny, tmp_path)
    one_line_error(*teacher(cfg, "--set", override), expected)
    assert not (tmp_path / "out").exists()


def test_a_last_training_batch_of_one_question_is_left_out(tiny, tmp_path):
    train_count = tiny["stats"]["train"]["count"]
    cfg = config_file(tiny, tmp_path, train={"epochs": 1, "batch_size": train_count - 1})
    code, err = teacher(cfg)
    assert code == 0, err


def test_features_overflowing_float32_are_named_as_such(tiny, tmp_path):
    with h5py.File(tiny["paths"]["appearance_feat"], "r") as handle:
        ids, features = handle["ids"][()], handle["resnet_features"][()].astype(np.float64)
    features[3, 1, 0, 2] = 1e300
    path = tmp_path / "a64.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("resnet_features", data=features)
        handle.create_dataset("ids", data=ids)
    cfg = config_file(tiny, tmp_path, data={"appearance_feat": str(path)})
    code, err = teacher(cfg)
    one_line_error(code, err, f"{path}: 'resnet_features' of video id {int(ids[3])} holds values up to 1e+300 "
                   "(float64 in the file), too large for float32")
    assert "float16" not in err


def test_a_network_larger_than_memory_is_refused_before_it_is_built(tiny, tmp_path):
    cfg = config_file(tiny, tmp_path)
    code, err = teacher(cfg, "--set", "model.module_dim=4194304")
    one_line_error(code, err, "parameters", "GiB", "model.module_dim=4194304")
    assert not (tmp_path / "out" / "teacher" / "last.pt").exists()


def test_resume_refuses_inputs_whose_content_changed(tiny, tmp_path):
    # Features re-extracted into the same path between a stopped run and --resume: the epochs
    # done were trained on the old ones, so the resume is refused, naming the file.
    import shutil

    motion = tmp_path / "motion.h5"
    shutil.copy(tiny["paths"]["motion_feat"], motion)
    cfg = config_file(tiny, tmp_path, data={"motion_feat": str(motion)})
    folder = tmp_path / "out" / "teacher"
    assert teacher(cfg, "--set", "train.stop_after_epoch=1")[0] == 0
    recorded = load_checkpoint(str(folder / "last.pt"))["inputs"]
    assert recorded["data.motion_feat"] and recorded["data.vocab"]
    with h5py.File(motion, "r+") as handle:
        handle["resnext_features"][0] = handle["resnext_features"][0] + 1.0
    before = (folder / "last.pt").read_bytes()
    code, err = teacher(cfg, "--resume")
    one_line_error(code, err, "cannot resume", f"data.motion_feat ({motion}) changed since epoch 1", "--overwrite")
    assert (folder / "last.pt").read_bytes() == before
    # The same content under another path (a moved dataset) is the same input: the run resumes
    # from it, and the path change is recorded.
    shutil.copy(tiny["paths"]["motion_feat"], tmp_path / "moved.h5")
    code, err = teacher(cfg, "--resume", "--set", f"data.motion_feat={tmp_path / 'moved.h5'}")
    assert code == 0, err
    resumed = json.loads((folder / "results.json").read_text())["resumed"]
    assert resumed[-1]["changed"]["data.motion_feat"] == [str(motion), str(tmp_path / "moved.h5")]


def test_a_runs_config_yml_is_a_reusable_config(tiny, tmp_path):
    cfg = config_file(tiny, tmp_path)
    assert teacher(cfg, "--set", "train.lr=0.002", "--set", "train.epochs=1")[0] == 0
    saved = tmp_path / "out" / "teacher" / "config.yml"
    again = load_config(str(saved), [f"output_dir={tmp_path / 'again'}"])
    assert again.train.lr == 0.002 and again.train.epochs == 1
    code, err = teacher(str(saved), "--set", f"output_dir={tmp_path / 'again'}")
    assert code == 0, err


def test_a_weighted_term_that_drowns_the_cross_entropy_is_named_once(tiny, tmp_path):
    cfg = config_file(tiny, tmp_path)
    code, err = teacher(cfg, "--set", "loss.alpha=1e9", "--set", "train.epochs=2")
    assert code == 0, err
    log = (tmp_path / "out" / "teacher" / "train.log").read_text()
    assert log.count("warning: loss.alpha x common") == 1 and "the cross-entropy" in log
    assert "loss.beta x dependence" not in log
    code, err = teacher(cfg, "--overwrite", "--set", "train.epochs=1")
    assert code == 0, err
    assert "x the cross-entropy" not in (tmp_path / "out" / "teacher" / "train.log").read_text()
