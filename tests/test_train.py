"""train.py / validate.py end to end on a tiny learnable set (CPU): the teacher learns, the
student distils from the saved teacher, validate.py reproduces the written test figures,
--resume continues exactly, and bad input stops with one `error:` line and exit status 2."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml

from cli_helpers import TIMING_COLUMNS, run_main
from test_train_fixtures import make_dataset, tiny_config_dict, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import train  # noqa: E402
import validate  # noqa: E402
from vqakd.training.checkpoint import load_checkpoint  # noqa: E402
from vqakd.core.errors import UserError  # noqa: E402

TEACHER_EPOCHS = 8
STUDENT_EPOCHS = 7


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data = make_dataset(root / "data")
    config_path = write_config(root / "tiny.yml", tiny_config_dict(data["paths"], root / "out",
                                                                   train={"epochs": TEACHER_EPOCHS}))
    return {"root": root, "data": data, "cfg": config_path, "out": root / "out"}


@pytest.fixture(scope="module")
def teacher_run(tiny):
    """The teacher, trained the way a user does it: train.py as a subprocess."""
    result = run_script("train.py", "--cfg", tiny["cfg"], "--stage", "teacher")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"stdout": result.stdout, "folder": tiny["out"] / "teacher"}


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ----------------------------------------------------------------------------------- teacher

def test_teacher_learns_and_writes_every_output(tiny, teacher_run):
    folder = teacher_run["folder"]
    for name in ("last.pt", "best.pt", "metrics.csv", "results.json", "curves.png", "config.yml", "train.log"):
        assert (folder / name).is_file(), name
    results = json.loads((folder / "results.json").read_text())
    stats = tiny["data"]["stats"]["test"]
    assert results["stage"] == "teacher" and results["split"] == "test"
    assert results["count"] == stats["count"]
    # Well above always answering the most frequent test answer.
    assert results["accuracy"] >= stats["majority_rate"] + 0.35, results["accuracy"]
    assert set(results["per_type"]) == {"what", "who", "how", "when", "where"}
    assert results["per_type"]["what"]["count"] == stats["first_tokens"].count("what")
    assert results["per_type"]["who"]["count"] == 0
    from model import DualVGR, ModelConfig
    rebuilt = DualVGR(ModelConfig(**load_checkpoint(str(folder / "best.pt"))["model_config"]))
    assert results["params"] == sum(p.numel() for p in rebuilt.parameters())
    assert results["config"]["train"]["seed"] == 666

    rows = read_csv(folder / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, TEACHER_EPOCHS + 1))
    for column in ("train_loss", "train_ce", "train_common", "train_dependence", "train_acc", "val_acc",
                   "val_acc_what", "val_acc_where", "time_s", "lr"):
        assert all(r[column] != "" for r in rows), column
    assert all(r["train_app"] == "" for r in rows)
    # The learning rate halves after every lr_halve_every (6) epochs; best = first epoch of max val accuracy.
    assert float(rows[0]["lr"]) == pytest.approx(3e-3) and float(rows[6]["lr"]) == pytest.approx(1.5e-3)
    val = [float(r["val_acc"]) for r in rows]
    assert results["epoch"] == val.index(max(val)) + 1
    assert load_checkpoint(str(folder / "last.pt"))["epoch"] == TEACHER_EPOCHS
    # The per-epoch line is printed and logged.
    assert f"epoch {TEACHER_EPOCHS}/{TEACHER_EPOCHS}" in teacher_run["stdout"]
    assert f"epoch 1/{TEACHER_EPOCHS}" in (folder / "train.log").read_text()
    saved = yaml.safe_load((folder / "config.yml").read_text())
    assert saved["teacher"]["graph_layers"] == 2 and saved["output_dir"] == str(tiny["out"])
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_contents_load_with_weights_only(teacher_run):
    checkpoint = torch.load(teacher_run["folder"] / "last.pt", weights_only=True)
    assert checkpoint["stage"] == "teacher"
    assert checkpoint["model_config"]["graph_layers"] == 2 and checkpoint["model_config"]["num_nodes"] == 4
    assert len(checkpoint["vocab"]["sha256"]) == 64 and checkpoint["vocab"]["answer_size"] == 11
    assert {"python", "numpy", "torch", "cuda"} <= set(checkpoint["rng"])
    assert checkpoint["optimizer"]["state"] and checkpoint["scheduler"]["last_epoch"] == TEACHER_EPOCHS
    assert len(checkpoint["history"]) == TEACHER_EPOCHS


# ----------------------------------------------------------------------------------- student

def test_student_distils_from_saved_teacher(tiny, teacher_run):
    teacher_best = teacher_run["folder"] / "best.pt"
    teacher_bytes = teacher_best.read_bytes()
    # --teacher defaults to <output_dir>/teacher/best.pt
    code, err = run_main(train.main, ["--cfg", tiny["cfg"], "--stage", "student",
                                      "--set", f"train.epochs={STUDENT_EPOCHS}"])
    assert code == 0, err
    folder = tiny["out"] / "student"
    results = json.loads((folder / "results.json").read_text())
    teacher_results = json.loads((teacher_run["folder"] / "results.json").read_text())
    assert results["stage"] == "student" and results["distill"] == "feature"
    assert results["teacher"] == str(teacher_best)
    assert results["params"] < teacher_results["params"]
    assert results["model_config"]["graph_layers"] == 1
    assert results["accuracy"] >= tiny["data"]["stats"]["test"]["majority_rate"] + 0.25, results["accuracy"]
    rows = read_csv(folder / "metrics.csv")
    for column in ("train_app", "train_mo", "train_hard"):
        values = [float(r[column]) for r in rows]
        assert all(v >= 0 and v == v for v in values), column
    # The student's total loss is hard + κ_a·APP + κ_m·MO (κ = 1).
    row = rows[-1]
    assert float(row["train_loss"]) == pytest.approx(
        float(row["train_hard"]) + float(row["train_app"]) + float(row["train_mo"]), rel=1e-5)
    assert teacher_best.read_bytes() == teacher_bytes


def test_student_rejects_teacher_with_other_vocabulary(tiny, teacher_run, tmp_path):
    data = tiny["data"]["paths"]
    vocab = json.loads(open(data["vocab"]).read())
    vocab["question_token_to_idx"]["extra"] = len(vocab["question_token_to_idx"])
    other_vocab = tmp_path / "vocab.json"
    other_vocab.write_text(json.dumps(vocab))
    # Its GloVe matrix no longer fits the vocabulary; drop it so the teacher check is reached.
    with open(data["train_questions"], "rb") as handle:
        train_questions = pickle.load(handle)
    train_questions["glove"] = None
    with open(tmp_path / "train.pt", "wb") as handle:
        pickle.dump(train_questions, handle)
    config = tiny_config_dict(data, tmp_path / "out", data={**{k: data[k] for k in (
        "val_questions", "test_questions", "appearance_feat", "motion_feat")},
        "train_questions": str(tmp_path / "train.pt"), "vocab": str(other_vocab)})
    cfg = write_config(tmp_path / "c.yml", config)
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "student",
                                      "--teacher", str(teacher_run["folder"] / "best.pt")])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "question vocabulary of 15 entries" in err and "has 16" in err


def test_student_rejects_teacher_with_other_node_count(tiny, teacher_run, tmp_path):
    data = make_dataset(tmp_path / "data", num_nodes=3)
    config = tiny_config_dict(data["paths"], tmp_path / "out", model={"num_nodes": 3})
    cfg = write_config(tmp_path / "c.yml", config)
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "student",
                                      "--teacher", str(teacher_run["folder"] / "best.pt")])
    # The student takes num_nodes from its teacher (4); features of 3 clips do not fit it.
    assert code == 2 and "3 clips per video" in err and f"the teacher {teacher_run['folder'] / 'best.pt'}" in err
    assert err.count("\n") == 1
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "student", "--set", "model.num_nodes=3",
                                      "--teacher", str(teacher_run["folder"] / "best.pt")])
    assert code == 2 and "--set model.num_nodes=3 conflicts with the teacher" in err and "num_nodes = 4" in err


# ----------------------------------------------------------------------------------- validate

def test_validate_reproduces_training_test_figures(tiny, teacher_run):
    folder = teacher_run["folder"]
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code, err = run_main(validate.main, ["--cfg", tiny["cfg"], "--checkpoint", str(folder / "best.pt"),
                                             "--write-preds"])
    assert code == 0, err
    written = json.loads((folder / "results.json").read_text())
    evaluated = json.loads((folder / "eval_test.json").read_text())
    assert evaluated["accuracy"] == written["accuracy"]
    assert evaluated["per_type"] == written["per_type"]
    assert evaluated["epoch"] == written["epoch"] and evaluated["split"] == "test"
    assert "where" in stdout.getvalue() and f"{100 * written['accuracy']:.2f}%" in stdout.getvalue()

    rows = read_csv(folder / "eval_test_preds.csv")
    assert len(rows) == written["count"]
    assert sum(int(r["correct"]) for r in rows) == written["correct"]
    assert list(rows[0])[:8] == ["question_id", "video_id", "question", "predicted_answer", "answer", "true_answer",
                                 "answer_in_vocab", "correct"]
    # The fixture's first test questions have answers outside the vocabulary: never correct.
    assert rows[0]["answer"] == "<UNK1>" and rows[0]["correct"] == "0"
    assert rows[0]["true_answer"] == "purple" and rows[0]["answer_in_vocab"] == "0"     # the truth, kept
    assert rows[3]["question"].endswith("?")          # the stored question text, not decoded tokens
    assert {int(r["video_id"]) for r in rows} <= set(tiny["data"]["ids"])


def test_validate_accepts_original_checkpoint(tiny, teacher_run, tmp_path):
    from model import ModelConfig
    from model.original import ours_to_original

    ours = load_checkpoint(str(teacher_run["folder"] / "best.pt"))
    config = ModelConfig(**ours["model_config"])
    original = {
        "epoch": 7,
        "state_dict": ours_to_original(ours["state_dict"], config),
        "optimizer": {},
        "model_kwargs": {"vision_dim": config.vision_dim, "module_dim": config.module_dim, "word_dim": config.word_dim,
                         "num_of_nodes": config.num_nodes, "graph_module": "GAT",
                         # as VQAKD's train_kd_2.py writes students: a graph_layers its weights contradict
                         "graph_layers": config.graph_layers + 2, "unit_layers": config.unit_layers},
    }
    path = tmp_path / "original.pt"
    torch.save(original, path)
    out = tmp_path / "eval.json"
    code, err = run_main(validate.main, ["--cfg", tiny["cfg"], "--checkpoint", str(path), "--out", str(out)])
    assert code == 0, err
    evaluated = json.loads(out.read_text())
    written = json.loads((teacher_run["folder"] / "results.json").read_text())
    assert evaluated["original_checkpoint"] is True and evaluated["epoch"] == 7
    assert evaluated["claimed_model_kwargs"] == {"graph_layers": config.graph_layers + 2}
    assert evaluated["accuracy"] == written["accuracy"] and evaluated["per_type"] == written["per_type"]


def test_truncated_checkpoint_is_one_line_error(tiny, teacher_run, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes((teacher_run["folder"] / "best.pt").read_bytes()[:5000])
    code, err = run_main(validate.main, ["--cfg", tiny["cfg"], "--checkpoint", str(broken)])
    assert code == 2 and err.startswith(f"error: {broken}: cannot read it as a checkpoint") and err.count("\n") == 1
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


# ----------------------------------------------------------------------------------- resume

def test_resume_after_interruption_equals_uninterrupted_run(tiny, tmp_path):
    paths = tiny["data"]["paths"]
    sections = dict(train={"epochs": 3, "lr_halve_every": 2}, teacher={"graph_layers": 1})
    full_cfg = write_config(tmp_path / "full.yml", tiny_config_dict(paths, tmp_path / "full", **sections))
    split_cfg = write_config(tmp_path / "split.yml", tiny_config_dict(paths, tmp_path / "split", **sections))

    assert run_main(train.main, ["--cfg", full_cfg, "--stage", "teacher"])[0] == 0
    code, err = run_main(train.main, ["--cfg", split_cfg, "--stage", "teacher", "--set", "train.stop_after_epoch=2"])
    assert code == 0, err
    stopped = tmp_path / "split" / "teacher"
    assert load_checkpoint(str(stopped / "last.pt"))["epoch"] == 2 and not (stopped / "results.json").exists()
    # Without --resume an existing run is not silently overwritten.
    code, err = run_main(train.main, ["--cfg", split_cfg, "--stage", "teacher"])
    assert code == 2 and "--resume" in err
    code, err = run_main(train.main, ["--cfg", split_cfg, "--stage", "teacher", "--resume"])
    assert code == 0, err

    full = load_checkpoint(str(tmp_path / "full" / "teacher" / "last.pt"))
    resumed = load_checkpoint(str(stopped / "last.pt"))
    assert full["epoch"] == resumed["epoch"] == 3
    assert full["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in full["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for key, state in full["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed["optimizer"]["state"][key][name]))
    assert full["scheduler"] == resumed["scheduler"]
    strip = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in full["history"]]
    assert strip == [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in resumed["history"]]
    full_results = json.loads((tmp_path / "full" / "teacher" / "results.json").read_text())
    resumed_results = json.loads((stopped / "results.json").read_text())
    assert full_results["accuracy"] == resumed_results["accuracy"] and full_results["epoch"] == resumed_results["epoch"]
    assert len(read_csv(stopped / "metrics.csv")) == 3
    assert (stopped / "train.log").read_text().count("resuming teacher") == 1


# ----------------------------------------------------------------------------------- engine

def test_teacher_is_frozen_and_never_updated(tiny):
    from vqakd.core.config import load_config
    from vqakd.data.batches import load_data, make_loader
    from vqakd.training.engine import train_one_epoch
    from vqakd.training.checkpoint import build_model_for_stage

    config = load_config(tiny["cfg"], ["data.use_glove=false"])
    device = torch.device("cpu")
    bundle = load_data(config, splits=("train",), device=device, progress=False)
    torch.manual_seed(0)
    teacher = build_model_for_stage(config, "teacher", bundle, device, False)
    teacher.eval()
    teacher.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model_for_stage(config, "student", bundle, device, False)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    loader = make_loader(bundle.splits["train"], bundle.table, 64, True, 0, 0, False)
    stats = train_one_epoch(student, loader, optimizer, device, 1, stage="student", loss_cfg=config.loss,
                            teacher=teacher, progress=False)
    assert stats["app"] > 0 and stats["mo"] > 0
    assert not teacher.training and student.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key        # BatchNorm running stats included
    assert all(p.grad is None for p in teacher.parameters())


def test_nan_loss_names_epoch_step_and_part(tiny, monkeypatch):
    import vqakd.training.engine as engine
    from vqakd.core.config import load_config
    from vqakd.data.batches import load_data, make_loader
    from vqakd.training.checkpoint import build_model_for_stage

    config = load_config(tiny["cfg"], ["data.use_glove=false"])
    device = torch.device("cpu")
    bundle = load_data(config, splits=("train",), device=device, progress=False)
    torch.manual_seed(0)
    model = build_model_for_stage(config, "teacher", bundle, device, False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = make_loader(bundle.splits["train"], bundle.table, 32, True, 0, 0, False)
    real = engine.compute_loss
    calls = []

    def poisoned(*args, **kwargs):
        values = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            values["common"] = values["common"] * float("nan")
            values["loss"] = values["loss"] + values["common"]
        return values

    monkeypatch.setattr(engine, "compute_loss", poisoned)
    with pytest.raises(UserError, match=r"non-finite loss at epoch 5, step 3 of 6: common = nan"):
        engine.train_one_epoch(model, loader, optimizer, device, 5, stage="teacher", loss_cfg=config.loss,
                               progress=False)
    assert len(calls) == 3                      # stopped at once on the CPU


def test_overflowing_weighted_term_is_named_by_the_cli(tiny, tmp_path):
    cfg = write_config(tmp_path / "c.yml", tiny_config_dict(tiny["data"]["paths"], tmp_path / "out"))
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "teacher", "--beta", "1e38"])
    assert code == 2 and err.count("\n") == 1
    assert "non-finite loss at epoch 1, step 1 of 6: loss.beta × dependence = inf" in err


# ----------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case", ["typo", "wrong_type", "missing_file", "clip_count", "unknown_dataset",
                                  "vision_dim", "unwritable_output", "missing_teacher"])
def test_bad_input_fails_with_one_clear_line(tiny, tmp_path, case):
    paths = tiny["data"]["paths"]
    config = tiny_config_dict(paths, tmp_path / "out")
    stage, expected = "teacher", ""
    if case == "typo":
        config["train"]["epocs"] = 3
        expected = "unknown key 'train.epocs' (did you mean 'train.epochs'?)"
    elif case == "wrong_type":
        config["train"]["batch_size"] = "big"
        expected = "key 'train.batch_size' must be an integer, got 'big'"
    elif case == "missing_file":
        config["data"]["motion_feat"] = str(tmp_path / "nowhere_motion.h5")
        expected = f"feature file not found: {tmp_path / 'nowhere_motion.h5'}"
    elif case == "clip_count":
        config["model"]["num_nodes"] = 8
        expected = "has 4 clips per video but model.num_nodes is 8"
    elif case == "unknown_dataset":
        config["dataset"] = "msvd"
        expected = "key 'dataset' must be one of 'msvd-qa', 'msrvtt-qa', 'demo', got 'msvd'"
    elif case == "vision_dim":
        config["model"]["vision_dim"] = 32
        expected = "has feature size 16 but model.vision_dim is 32"
    elif case == "unwritable_output":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        config["output_dir"] = str(blocker / "out")
        expected = "output folder is not writable"
    elif case == "missing_teacher":
        stage, expected = "student", "teacher checkpoint not found"
    cfg = write_config(tmp_path / "bad.yml", config)
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", stage])
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()          # a failed start leaves no output folder behind


def test_loss_modes_combine_the_parts_as_documented():
    from model import DualVGR, ModelConfig
    from model.losses import logit_distill_loss
    from vqakd.core.config import LossConfig
    from vqakd.training.engine import compute_loss

    torch.manual_seed(0)
    config = ModelConfig(question_vocab_size=15, answer_vocab_size=11, vision_dim=16, module_dim=32, word_dim=12,
                         num_nodes=4, graph_layers=1, fusion_dim=16)
    student, teacher = DualVGR(config).eval(), DualVGR(config).eval()
    inputs = (torch.randn(5, 4, 3, 16), torch.randn(5, 4, 16), torch.randint(2, 15, (5, 6)),
              torch.tensor([6, 3, 2, 6, 1]))
    labels = torch.tensor([2, 3, 4, 0, 10])
    out, t_out = student(*inputs), teacher(*inputs)
    loss = LossConfig(alpha=10.0, beta=1e-3, kappa_app=2.0, kappa_mo=0.5, logit_tau=2.0, logit_mix=0.25)
    hard = compute_loss(out, labels, loss, "teacher")
    assert set(hard) == {"loss", "hard", "ce", "common", "dependence"}
    torch.testing.assert_close(hard["loss"], hard["ce"] + 10.0 * hard["common"] + 1e-3 * hard["dependence"])
    feature = compute_loss(out, labels, loss, "student", t_out)
    torch.testing.assert_close(feature["loss"], feature["hard"] + 2.0 * feature["app"] + 0.5 * feature["mo"])
    logit = compute_loss(out, labels, LossConfig(**{**loss.__dict__, "distill": "logit"}), "student", t_out)
    torch.testing.assert_close(logit["kd"], logit_distill_loss(out.logits, t_out.logits, labels, 2.0, 0.25))
    torch.testing.assert_close(logit["loss"], logit["kd"] + 10.0 * logit["common"] + 1e-3 * logit["dependence"])
    alone = compute_loss(out, labels, LossConfig(**{**loss.__dict__, "distill": "none"}), "student")
    torch.testing.assert_close(alone["loss"], hard["loss"])


def test_world_size_without_torchrun_is_one_clear_line(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    cfg = write_config(tmp_path / "c.yml", tiny_config_dict(tiny["data"]["paths"], tmp_path / "out"))
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "teacher"])
    assert code == 2 and err.count("\n") == 1
    assert "WORLD_SIZE is 2 but RANK is not set; launch with torchrun" in err
    assert not (tmp_path / "out").exists()


def test_validate_checks_the_data_against_the_checkpoint(teacher_run, tmp_path):
    data = make_dataset(tmp_path / "data", videos=6, questions_per_video=3, num_nodes=3)
    cfg = write_config(tmp_path / "c.yml", tiny_config_dict(data["paths"], tmp_path / "out", model={"num_nodes": 3}))
    code, err = run_main(validate.main, ["--cfg", cfg, "--checkpoint", str(teacher_run["folder"] / "best.pt"),
                                         "--out", str(tmp_path / "e.json")])
    assert code == 2 and "has 3 clips per video but the checkpoint's model_config.num_nodes is 4" in err
    assert not (tmp_path / "e.json").exists()


def _small_training_setup(tiny):
    from vqakd.core.config import load_config
    from vqakd.data.batches import load_data, make_loader
    from vqakd.training.checkpoint import build_model_for_stage

    config = load_config(tiny["cfg"], ["data.use_glove=false"])
    device = torch.device("cpu")
    bundle = load_data(config, splits=("train",), device=device, progress=False)
    torch.manual_seed(0)
    model = build_model_for_stage(config, "teacher", bundle, device, False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = make_loader(bundle.splits["train"], bundle.table, 32, True, 0, 0, False, reuse_buffers=True)
    return config, device, model, optimizer, loader


def test_training_step_reads_nothing_back_except_every_log_every_steps(tiny, monkeypatch):
    """The GPU rule, checked on the CPU: the toolkit's code (engine, metrics, data) converts no
    tensor to a Python value or host copy inside a step, except on logging steps."""
    import vqakd.data.batches
    import vqakd.training.engine as engine
    import vqakd.training.metrics

    config, device, model, optimizer, loader = _small_training_setup(tiny)
    ours = {os.path.abspath(m.__file__) for m in (engine, vqakd.training.metrics, vqakd.data.batches)}
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if os.path.abspath(sys._getframe(1).f_code.co_filename) in ours:
                reads.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    per_step = []
    real_step = optimizer.step

    def step(*args, **kwargs):
        per_step.append(len(reads))
        return real_step(*args, **kwargs)

    optimizer.step = step
    engine.train_one_epoch(model, loader, optimizer, device, 1, stage="teacher", loss_cfg=config.loss,
                           log_every=3, check_every=3, progress=True)
    assert len(per_step) == 6
    # reads[k] counted before step k+1's update: a step's reads show up in the next difference.
    deltas = [b - a for a, b in zip([0] + per_step[:-1], per_step)]
    assert deltas[:4] == [0, 0, 0, deltas[3]] and deltas[3] > 0       # step 3 logged and checked
    assert deltas[1] == deltas[2] == deltas[4] == deltas[5] == 0


def test_bf16_autocast_trains_on_the_cpu(tiny):
    import vqakd.training.engine as engine

    config, device, model, optimizer, loader = _small_training_setup(tiny)
    stats = engine.train_one_epoch(model, loader, optimizer, device, 1, stage="teacher", loss_cfg=config.loss,
                                   amp="bf16", progress=False)
    assert 0 < stats["loss"] < float("inf") and stats["questions"] == len(loader.dataset)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_settings_come_from_the_files_that_hold_them(tiny, teacher_run, tmp_path):
    # A config that forgot the teacher run's sizes (word_dim, module_dim) and says 300 for the
    # GloVe width: the student takes them from the teacher checkpoint and the GloVe matrix.
    config = tiny_config_dict(tiny["data"]["paths"], tmp_path / "out", model={"word_dim": 300, "module_dim": 64})
    cfg = write_config(tmp_path / "forgot.yml", config)
    teacher = str(teacher_run["folder"] / "best.pt")
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "student", "--teacher", teacher,
                                      "--set", "train.epochs=1"], quiet=True)
    assert code == 0, err
    log = (tmp_path / "out" / "student" / "train.log").read_text()
    assert f"model.word_dim = 12 from the teacher {teacher} (the config says 300)" in log
    assert "model.module_dim = 32 from the teacher" in log
    saved = yaml.safe_load((tmp_path / "out" / "student" / "config.yml").read_text())
    assert saved["model"]["word_dim"] == 12 and saved["model"]["module_dim"] == 32
    # A teacher run whose config says 300: model.word_dim is the GloVe matrix's width.
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "teacher", "--set", "train.epochs=1"], quiet=True)
    assert code == 0, err
    assert ("model.word_dim = 12 from the GloVe matrix of data.train_questions (the config says 300)"
            in (tmp_path / "out" / "teacher" / "train.log").read_text())
    # An explicit setting that contradicts the file is one line naming both values.
    code, err = run_main(train.main, ["--cfg", cfg, "--stage", "teacher", "--overwrite", "--set",
                                      "model.word_dim=300"], quiet=True)
    assert code == 2 and "--set model.word_dim=300 conflicts with the GloVe matrix" in err and "= 12" in err


def test_resume_with_another_teacher_is_refused(tiny, teacher_run, tmp_path):
    import torch

    teacher_a = str(teacher_run["folder"] / "best.pt")
    checkpoint = torch.load(teacher_a, weights_only=True)
    first = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][first] = checkpoint["state_dict"][first] + 1.0
    teacher_b = tmp_path / "teacher_b.pt"
    torch.save(checkpoint, teacher_b)
    config = tiny_config_dict(tiny["data"]["paths"], tmp_path / "out")
    cfg = write_config(tmp_path / "c.yml", config)
    base = ["--cfg", cfg, "--stage", "student"]
    code, err = run_main(train.main, base + ["--teacher", teacher_a, "--set", "train.stop_after_epoch=1"], quiet=True)
    assert code == 0, err
    code, err = run_main(train.main, base + ["--teacher", str(teacher_b), "--resume"], quiet=True)
    assert code == 2 and f"teacher ({teacher_b}) changed since epoch 1" in err and err.count("\n") == 1, err
