"""What a researcher publishes from: provenance in every result file, timestamped logs, quiet
progress bars in files, the predictions CSV's probabilities and per-answer figures, readable
curves and tables, and one-line answers to the usual mistakes."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time

import h5py
import pytest

from cli_helpers import run_main
from test_train_fixtures import make_dataset, tiny_config_dict, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import train  # noqa: E402
import validate  # noqa: E402
from vqakd.training import provenance as provenance_run  # noqa: E402
from vqakd.core.errors import UserError  # noqa: E402
from vqakd.data.questions import QUESTION_TYPES  # noqa: E402
from vqakd.training.metrics import format_table, summarize  # noqa: E402

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")
EPOCHS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-epoch teacher trained in-process, then validate.py --write-preds on it."""
    root = tmp_path_factory.mktemp("outputs")
    data = make_dataset(root / "data")
    cfg = write_config(root / "tiny.yml", tiny_config_dict(data["paths"], root / "out", train={"epochs": EPOCHS}))
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "teacher"], quiet=True)
    assert code == 0, err
    folder = root / "out" / "teacher"
    stdout = io.StringIO()
    import contextlib
    with contextlib.redirect_stdout(stdout):
        code, err = run_main(validate.main, ["--cfg", cfg, "--checkpoint", str(folder / "best.pt"), "--write-preds",
                                             "--out", str(root / "eval.json")])
    assert code == 0, err
    return {"root": root, "cfg": cfg, "folder": folder, "data": data, "validate_stdout": stdout.getvalue()}


# ----------------------------------------------------------------------------------- provenance

def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_results_and_evaluation_record_their_provenance(run):
    results = json.loads((run["folder"] / "results.json").read_text())
    evaluation = json.loads((run["root"] / "eval.json").read_text())
    for record in (results["provenance"], evaluation["provenance"]):
        assert record["code"]["version"]
        # This repository is a git checkout: the commit and whether the tree had edits.
        assert re.fullmatch(r"[0-9a-f]{40}", record["code"]["git_commit"])
        assert isinstance(record["code"]["git_modified"], bool)
        assert STAMP.match(record["started_utc"] + " ") and STAMP.match(record["ended_utc"] + " ")
        assert record["started_utc"] <= record["ended_utc"]
        assert record["versions"]["python"] and record["versions"]["torch"]
        assert record["device"].startswith("cpu") and record["world_size"] == 1 and record["host"]
        assert record["vocab_sha256"] == _sha256(run["data"]["paths"]["vocab"])
        # The tiny feature files record no extraction settings.
        assert record["features"] == {"appearance": None, "motion": None}
    # The config hash is that of the config as run (results.json holds it).
    assert results["provenance"]["config_sha256"] == provenance_run.config_sha256(results["config"])


def test_provenance_outside_a_git_checkout_and_with_extraction_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance_run, "REPO_ROOT", str(tmp_path))
    features = tmp_path / "app.h5"
    with h5py.File(features, "w") as handle:
        handle.attrs["model"] = "resnet101"
        handle.attrs["weights_sha256"] = "ab" * 32
        handle.attrs["num_clips"] = 8
    from vqakd.core.config import Config, config_to_dict

    config = Config()
    config.data.appearance_feat, config.data.motion_feat = str(features), None
    config.data.vocab = str(tmp_path / "absent_vocab.json")
    monkeypatch.setattr(sys, "argv", ["train.py", "--cfg", "x.yml"])
    record = provenance_run.provenance_for_config(config, started="2026-01-01T00:00:00Z")
    assert record["code"] == {"version": __import__("vqakd").__version__}
    assert record["command"][1:] == ["train.py", "--cfg", "x.yml"]
    assert record["features"]["appearance"]["model"] == "resnet101"
    assert record["features"]["appearance"]["num_clips"] == 8 and record["features"]["motion"] is None
    assert record["vocab_sha256"] is None and record["device"] is None
    assert record["config_sha256"] == provenance_run.config_sha256(config_to_dict(config))
    assert provenance_run.config_sha256({"b": 1, "a": [2]}) == provenance_run.config_sha256({"a": [2], "b": 1})
    assert provenance_run.config_sha256({"a": [2], "b": 1}) != provenance_run.config_sha256({"a": [2], "b": 2})


# ----------------------------------------------------------------------------------- logs and bars

def test_train_log_lines_start_with_their_utc_time(run):
    lines = (run["folder"] / "train.log").read_text().splitlines()
    assert any(f"epoch {EPOCHS}/{EPOCHS}" in line for line in lines)
    assert lines and all(STAMP.match(line) for line in lines), [l for l in lines if not STAMP.match(l)][:3]


def test_progress_bar_written_to_a_file_is_throttled(monkeypatch):
    from vqakd.core.progress import NOT_A_TERMINAL_INTERVAL_S, progress_bar

    monkeypatch.delenv("VQAKD_PROGRESS", raising=False)
    stream = io.StringIO()
    for _ in progress_bar(range(30), file=stream, desc="steps"):
        time.sleep(0.02)
    # Unthrottled, tqdm redraws every 0.1 s (6 redraws here, and a log line per redraw in a file);
    # throttled it draws the start and the end.
    assert 0 < len(stream.getvalue()) < 300 and stream.getvalue().count("\r") <= 3

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def bar(**options):
        made = progress_bar(**options)
        made.close()
        return made

    assert bar(file=Terminal()).mininterval < NOT_A_TERMINAL_INTERVAL_S
    assert bar(file=io.StringIO()).mininterval == NOT_A_TERMINAL_INTERVAL_S
    assert bar(enabled=False, file=Terminal()).disable is True
    monkeypatch.setenv("VQAKD_PROGRESS", "0")
    assert bar(file=Terminal()).disable is True


# ----------------------------------------------------------------------------------- predictions

def test_predictions_csv_has_type_probability_and_top5(run):
    with open(run["root"] / "eval_preds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["question_id", "video_id", "question", "predicted_answer", "answer", "true_answer",
                             "answer_in_vocab", "correct", "question_type", "probability", "top5"]
    evaluation = json.loads((run["root"] / "eval.json").read_text())
    assert len(rows) == evaluation["count"] and sum(int(r["correct"]) for r in rows) == evaluation["correct"]
    for row in rows:
        # The truth as annotated, also where the vocabulary has no entry for it (<UNK1>).
        assert row["true_answer"] and row["answer_in_vocab"] == str(int(not row["answer"].startswith("<UNK")))
        if row["answer_in_vocab"] == "1":
            assert row["true_answer"] == row["answer"]
        top = [entry.rsplit(":", 1) for entry in row["top5"].split("|")]
        probs = [float(p) for _, p in top]
        assert len(top) == 5 and top[0][0] == row["predicted_answer"]
        assert float(row["probability"]) == probs[0] and probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1.0005
        assert row["question_type"] == (row["question"].split()[0].lower() if row["question"].split()[0].lower()
                                        in QUESTION_TYPES else "other")
    assert {row["question_type"] for row in rows} >= {"what", "where", "other"}
    outside = [row for row in rows if row["answer_in_vocab"] == "0"]
    assert outside and {row["true_answer"] for row in outside} == {"purple"}   # not <UNK1>


def test_per_answer_figures_with_scikit_learn(run):
    from sklearn.metrics import precision_recall_fscore_support

    report = json.loads((run["root"] / "eval_answers.json").read_text())
    with open(run["root"] / "eval_preds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    named = [r for r in rows if not r["answer"].startswith("<UNK")]
    assert report["questions"] == len(rows)
    supports = [entry["support"] for entry in report["answers"]]
    assert supports == sorted(supports, reverse=True) and sum(supports) <= len(named)
    first = report["answers"][0]
    p, r, f, n = precision_recall_fscore_support([x["answer"] for x in rows], [x["predicted_answer"] for x in rows],
                                                 labels=[first["answer"]], zero_division=0)
    assert (first["precision"], first["recall"], first["f1"], first["support"]) == pytest.approx(
        (p[0], r[0], f[0], n[0]))
    confusion = report["confusion"]
    assert len(confusion["matrix"]) == len(confusion["answers"]) == len(confusion["matrix"][0])
    # Each row of the confusion counts that true answer's questions predicted as one of the listed ones.
    assert confusion["matrix"][0][0] == sum(1 for x in named if x["answer"] == confusion["answers"][0]
                                            and x["predicted_answer"] == confusion["answers"][0])
    assert "precision / recall / F1" in run["validate_stdout"]


# ----------------------------------------------------------------------------------- curves and tables

def _rows(with_val_loss: bool):
    rows = []
    for epoch, (loss, acc) in enumerate([(137.0, 0.2), (3.0, 0.5), (2.5, 0.7), (2.2, 0.6)], start=1):
        row = {"epoch": epoch, "train_loss": loss, "train_hard": loss, "train_ce": loss * 0.9, "train_common": 0.1,
               "train_dependence": 2e-3, "train_acc": acc, "val_acc": acc - 0.05}
        if with_val_loss:
            row.update(val_hard=loss * 1.1, val_ce=loss)
        rows.append(row)
    return rows


def test_curves_show_every_epoch_mark_the_best_and_dash_validation_losses(tmp_path):
    import matplotlib.pyplot as plt

    from vqakd.training.plots import curves_figure, plot_curves

    rows = _rows(with_val_loss=True)
    figure = curves_figure(rows, "teacher", 3)
    loss_axis = figure.axes[0]
    assert loss_axis.get_yscale() == "log"      # 137 then ~3: a linear axis would flatten epochs 2-4
    dashed = [line for line in loss_axis.get_lines() if line.get_linestyle() == "--"]
    assert sorted(line.get_label() for line in dashed) == ["CE (val)", "hard (val)"]
    for axis in figure.axes:
        verticals = [line for line in axis.get_lines() if list(line.get_xdata()) == [3, 3]]
        assert len(verticals) == 1
    plt.close(figure)
    figure = curves_figure(_rows(with_val_loss=False), "teacher", 3)
    assert not [line for line in figure.axes[0].get_lines() if line.get_linestyle() == "--"]
    plt.close(figure)
    plot_curves(rows, str(tmp_path / "curves.png"), "teacher", 3)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_shows_a_dash_for_a_type_without_questions():
    table = format_table(summarize([3, 0, 0, 0, 1, 2], [4, 0, 0, 0, 2, 4]))
    lines = {line.split()[0]: line.split() for line in table.splitlines()}
    assert lines["who"] == ["who", "\u2013", "\u2013", "0"]
    assert lines["what"] == ["what", "75.00%", "3", "4"]
    assert " 0.00%" not in table


# ----------------------------------------------------------------------------------- friction

def test_missing_requirement_is_one_line_naming_make_venv(tmp_path):
    from vqakd.core.script import check_requirements

    with pytest.raises(SystemExit) as exited:
        check_requirements("no_such_module_for_vqakd")
    assert exited.value.code == 2
    # A Python without the virtual environment's packages (-S: no site-packages): torch is missing.
    done = subprocess.run([sys.executable, "-S", os.path.join(ROOT, "train.py"), "--cfg", "x.yml", "--stage",
                           "teacher"], capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "make venv" in done.stderr and "torch" in done.stderr


def test_relative_missing_path_names_the_folder_it_was_looked_up_in(tmp_path, monkeypatch):
    from vqakd.training.checkpoint import load_checkpoint
    from vqakd.core.config import load_config

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=re.escape(f"configs/nothing.yml (relative to {tmp_path}")):
        load_config("configs/nothing.yml")
    with pytest.raises(UserError, match=re.escape(f"checkpoint not found: run/best.pt (relative to {tmp_path}")):
        load_checkpoint("run/best.pt")


def test_validate_refuses_model_overrides(run):
    code, err = run_main(validate.main, ["--cfg", run["cfg"], "--checkpoint", str(run["folder"] / "best.pt"),
                                         "--set", "model.module_dim=64"])
    assert code == 2 and err.count("\n") == 1 and "the checkpoint defines the model" in err
    # repeating the checkpoint's own value changes nothing and is accepted (the demo passes its
    # model settings to every step)
    from vqakd.training.checkpoint import load_checkpoint

    module_dim = load_checkpoint(str(run["folder"] / "best.pt"))["model_config"]["module_dim"]
    code, err = run_main(validate.main, ["--cfg", run["cfg"], "--checkpoint", str(run["folder"] / "best.pt"),
                                         "--out", str(run["root"] / "same.json"),
                                         "--set", f"model.module_dim={module_dim}"], quiet=True)
    assert code == 0, err


def test_checkpoint_folder_and_non_checkpoint_files_get_clear_messages(run):
    for target, expected in ((run["folder"], "is a folder; give best.pt or last.pt inside it"),
                             (run["folder"] / "metrics.csv", "not a PyTorch checkpoint")):
        code, err = run_main(validate.main, ["--cfg", run["cfg"], "--checkpoint", str(target),
                                             "--out", str(run["root"] / "x.json")])
        assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_resume_of_a_finished_run_says_so_and_changes_nothing(run):
    folder = run["folder"]
    before = {name: (folder / name).read_bytes() for name in ("last.pt", "best.pt", "results.json", "metrics.csv")}
    stdout = io.StringIO()
    import contextlib
    with contextlib.redirect_stdout(stdout):
        code, err = run_main(train.main, ["--cfg", run["cfg"], "--stage", "teacher", "--resume"])
    assert code == 0, err
    assert f"is finished: all {EPOCHS} epochs done" in stdout.getvalue()
    assert f"--set train.epochs=N with N > {EPOCHS}" in stdout.getvalue()
    assert {name: (folder / name).read_bytes() for name in before} == before


def test_stage_flag_is_explained_in_help():
    stage_help = next(action.help for action in train.build_parser()._actions if "--stage" in action.option_strings)
    assert "teacher" in stage_help and "student" in stage_help and "distil" in stage_help


def test_ceiling_names_a_type_the_vocabulary_cannot_answer():
    from types import SimpleNamespace

    import torch

    from vqakd.training.validation import answer_ceiling, format_ceiling

    # what: both answers outside the vocabulary (label 1); who: one of two inside.
    split = SimpleNamespace(answers=torch.tensor([1, 1, 5, 1]), qtypes=torch.tensor([0, 0, 1, 1]), dropped=0,
                            dropped_qtypes=None)
    ceiling = answer_ceiling(split)
    assert ceiling == {"all": 0.25, "per_type": {"what": 0.0, "who": 0.5}}
    text = format_ceiling(ceiling)
    assert "all 25.0%" in text and "who 50.0%" in text
    assert "no what question has its answer in the answer vocabulary" in text


def test_an_output_that_is_a_folder_is_refused_before_any_work(run, tmp_path):
    # Before: IsADirectoryError after the whole evaluation.
    checkpoint = str(run["folder"] / "best.pt")
    for flag in ("--out", "--preds-out"):
        argv = ["--cfg", run["cfg"], "--checkpoint", checkpoint, "--write-preds", flag, str(tmp_path)]
        code, err = run_main(validate.main, argv, quiet=True)
        assert code == 2 and f"{flag} {tmp_path} is a folder" in err and err.count("\n") == 1, err
