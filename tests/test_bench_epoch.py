"""bench/epoch.py at its smallest: both paths run for both stages and the JSON holds the figures
the GPU run is read for."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from vqakd.core.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_epoch", os.path.join(ROOT, "bench", "epoch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_epoch_writes_both_paths(tmp_path):
    out = tmp_path / "epoch.json"
    data = tmp_path / "data"
    load_bench().main(["--small", "--device", "cpu", "--videos", "8", "--train-questions", "96",
                       "--val-questions", "40", "--batch-size", "32", "--baseline-batches", "1", "--workers", "0", "--warmup-epochs", "0",
                       "--dir", str(data), "--json-out", str(out)])
    report = json.loads(out.read_text())
    assert report["device_name"] == "cpu" and report["batch_size"] == 32 and not report["full_msvd_qa_size"]
    assert report["precision"] == {"amp": "none", "tf32": False, "compile": False, "feature_dtype": "float32"}
    for stage in ("teacher", "student"):
        row = report["stages"][stage]
        ours, original = row["ours"], row["original"]
        # 96 train questions in batches of 32: 3 steps, every question once; all 40 validated
        assert ours["epochs"][-1]["train_questions"] == 96 and ours["epochs"][-1]["val_questions"] == 40
        assert ours["epoch_s"] == pytest.approx(ours["train_s"] + ours["val_s"])
        assert original["train_timed_questions"] == 32 and original["extrapolated"]
        assert row["ratio"] == pytest.approx(original["epoch_s"] / ours["epoch_s"])
    plan = report["msrvtt_qa_memory_plan"]
    # 10,000 videos x 16 clips x (16 frames + 1 motion row) x 2048 floats
    assert plan["table_gib"]["float32"] == pytest.approx(10000 * 16 * 17 * 2048 * 4 / 2**30)
    assert plan["table_gib"]["float16"] == pytest.approx(plan["table_gib"]["float32"] / 2)
    assert report["gpu_utilization_percent"] is None
    assert sorted(os.listdir(data)) == sorted(f"bench_{name}" for name in (
        "appearance_feat.h5", "motion_feat.h5", "vocab.json", "train_questions.pt", "val_questions.pt"))


def test_bad_stage_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--stages"):
        load_bench().main(["--small", "--device", "cpu", "--stages", "teacher,pupil",
                           "--json-out", str(tmp_path / "x.json")])
