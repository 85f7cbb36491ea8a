"""train.py / validate.py under torchrun on the CPU (gloo, 2 processes) against one process.

Why the comparison can be exact: `train.batch_size` is the global batch, each rank takes every
2nd index of the same permutation (so the two shares of a step are exactly the one-process
batch), gradients are averaged, BatchNorm uses global statistics and the HSIC sum is scaled per
share. Dropout is the one thing that cannot match (each process draws its own masks), so these
runs set every dropout rate to 0; what is left differs only by float summation order, which
moves the loss in the 6th digit and leaves every prediction, hence every accuracy, identical.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from cli_helpers import run_main as quiet_run_main
from test_train_fixtures import make_dataset, tiny_config_dict, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import train  # noqa: E402
import validate  # noqa: E402
from vqakd.core import distributed as dist  # noqa: E402
from vqakd.core.errors import UserError  # noqa: E402

EPOCHS = 2
NO_DROPOUT = {name: 0.0 for name in ("word_dropout", "frame_dropout", "encoder_dropout", "graph_dropout",
                                     "head_dropout")}
STAGE_FILES = {"last.pt", "best.pt", "metrics.csv", "results.json", "curves.png", "config.yml", "train.log"}


def torchrun(script: str, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
               os.path.join(ROOT, script), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def run_main(main, argv) -> tuple[int, str]:
    return quiet_run_main(main, argv, quiet=True)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process vs 2 processes (the latter stopped after epoch 1 and resumed under torchrun)."""
    root = tmp_path_factory.mktemp("ddp")
    # 25 val and 25 test questions: odd, so the two ranks hold different shares.
    data = make_dataset(root / "data", videos=30, questions_per_video=5)
    sections = dict(train={"epochs": EPOCHS, "batch_size": 20, "eval_batch_size": 6},
                    teacher={"graph_layers": 1}, model={**tiny_config_dict(data["paths"], root)["model"], **NO_DROPOUT})
    one = write_config(root / "one.yml", tiny_config_dict(data["paths"], root / "one", **sections))
    two = write_config(root / "two.yml", tiny_config_dict(data["paths"], root / "two", **sections))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, err = run_main(train.main, ["--cfg", one, "--stage", "teacher"])
    finally:
        torch.set_num_threads(previous)
    assert code == 0, err
    stopped = torchrun("train.py", "--cfg", two, "--stage", "teacher", "--set", "train.stop_after_epoch=1")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = torchrun("train.py", "--cfg", two, "--stage", "teacher", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"root": root, "data": data, "one": root / "one" / "teacher", "two": root / "two" / "teacher",
            "cfg_one": one, "cfg_two": two, "stopped": stopped, "resumed": resumed}


def test_two_processes_match_one_process_epoch_by_epoch(runs):
    one, two = read_csv(runs["one"] / "metrics.csv"), read_csv(runs["two"] / "metrics.csv")
    assert [r["epoch"] for r in one] == [r["epoch"] for r in two] == ["1", "2"]
    for a, b in zip(one, two):
        # Validation: the whole split (25 questions, counted once), identical accuracies.
        assert a["val_count"] == b["val_count"] == "25"
        for key in a:
            if key.startswith(("val_acc", "train_acc")):
                assert a[key] == b[key], (a["epoch"], key)
        for key in ("train_loss", "train_ce", "train_common"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4), (a["epoch"], key)
        # HSIC is a sum of many small differences (β = 1e-6 in the loss): rounding shows earlier.
        assert float(b["train_dependence"]) == pytest.approx(float(a["train_dependence"]), rel=1e-2)
        assert a["lr"] == b["lr"]
    r1 = json.loads((runs["one"] / "results.json").read_text())
    r2 = json.loads((runs["two"] / "results.json").read_text())
    assert (r2["count"], r2["world_size"], r1["world_size"]) == (25, 2, 1)
    assert (r2["accuracy"], r2["per_type"], r2["epoch"]) == (r1["accuracy"], r1["per_type"], r1["epoch"])
    w1 = torch.load(runs["one"] / "last.pt", weights_only=True)["state_dict"]
    w2 = torch.load(runs["two"] / "last.pt", weights_only=True)["state_dict"]
    assert w1.keys() == w2.keys()              # plain BatchNorm keys: checkpoints are interchangeable
    # Adam divides by sqrt(v): where a gradient is ~0, rounding noise still moves a weight by up to
    # lr per step (3e-3 x 10 steps here), so weights agree to that bound, not to float precision.
    for key in w1:
        torch.testing.assert_close(w2[key].float(), w1[key].float(), rtol=0, atol=1e-2, msg=key)


def test_rank_zero_alone_writes_one_set_of_files_and_resume_works(runs):
    # no temp files, no per-rank copies; resumes.json records the (settings of the) resume
    assert {p.name for p in runs["two"].iterdir()} == STAGE_FILES | {"resumes.json"}
    log = (runs["two"] / "train.log").read_text()
    assert log.count("resuming teacher") == 1 and log.count("epoch 1/2") == 1 and log.count("epoch 2/2") == 1
    assert "DistributedDataParallel: 2 processes x 10 questions (global batch 20)" in log
    # Each line once on stdout: rank 1 prints nothing.
    assert runs["resumed"].stdout.count("epoch 2/2") == 1
    assert "stopped after epoch 1" in runs["stopped"].stdout
    checkpoint = torch.load(runs["two"] / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2


def test_validate_under_torchrun_counts_every_question_once(runs, tmp_path):
    best = str(runs["two"] / "best.pt")
    single_out, multi_out = tmp_path / "one.json", tmp_path / "two.json"
    code, err = run_main(validate.main, ["--cfg", runs["cfg_one"], "--checkpoint", best, "--split", "val",
                                         "--write-preds", "--out", str(single_out)])
    assert code == 0, err
    result = torchrun("validate.py", "--cfg", runs["cfg_two"], "--checkpoint", best, "--split", "val",
                      "--write-preds", "--out", str(multi_out), "--set", "train.eval_batch_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = json.loads(single_out.read_text()), json.loads(multi_out.read_text())
    # provenance tells how each was made (command line, times, world size): the figures are equal
    assert two.pop("provenance")["world_size"] == 2 and one.pop("provenance")["world_size"] == 1
    # so does the memory plan (this machine's memory, 2 processes each with its share)
    assert two.pop("memory_plan")["processes"] == 2 and one.pop("memory_plan")["processes"] == 1
    assert two["count"] == 25 and two == one
    assert (tmp_path / "two_preds.csv").read_text() == (tmp_path / "one_preds.csv").read_text()
    assert result.stdout.count("wrote") == 3 and sorted(os.listdir(tmp_path)) == sorted(
        ["one.json", "one_answers.json", "one_preds.csv", "two.json", "two_answers.json", "two_preds.csv"])


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 1])
def test_student_distils_under_torchrun(runs, nproc):
    """The frozen teacher runs on every rank; with one process torchrun still takes the DDP path."""
    teacher_bytes = (runs["two"] / "best.pt").read_bytes()
    result = torchrun("train.py", "--cfg", runs["cfg_two"], "--stage", "student", "--overwrite",
                      "--set", "train.epochs=1", nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = runs["root"] / "two" / "student"
    rows = read_csv(folder / "metrics.csv")
    assert float(rows[0]["train_app"]) > 0 and float(rows[0]["train_mo"]) > 0
    assert f"DistributedDataParallel: {nproc} processes" in (folder / "train.log").read_text()
    assert (runs["two"] / "best.pt").read_bytes() == teacher_bytes


@pytest.mark.slow
def test_errors_under_torchrun_are_printed_once(runs):
    result = torchrun("train.py", "--cfg", runs["cfg_two"], "--stage", "teacher", "--overwrite",
                      "--set", "train.batch_size=21")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: train.batch_size (21) is the global batch and must be divisible by the number of "
                     "processes (2); e.g. --set train.batch_size=20"]
    assert (runs["two"] / "last.pt").is_file()      # the failed start discarded nothing


# ----------------------------------------------------------------------------- in two spawned processes

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    """Runs in each spawned process; writes what it saw to <folder>/<rank>.json."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    report = {}
    with dist.session():
        # 1. BatchNorm over the two halves == BatchNorm over the whole batch, values and gradients.
        torch.manual_seed(0)
        whole = torch.randn(10, 6, dtype=torch.float64)
        reference = torch.nn.BatchNorm1d(6).double()
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.uniform_(-0.5, 0.5)
        model = dist.convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(6).double()))
        model[0].load_state_dict(reference.state_dict())
        mine = whole[rank::world].clone().requires_grad_(True)
        out = model(mine)
        weights = torch.arange(60, dtype=torch.float64).view(10, 6)
        (out * weights[rank::world]).sum().backward()
        grad_weight = dist.all_reduce_sum(model[0].weight.grad.clone())
        full = whole.clone().requires_grad_(True)
        expected = reference(full)
        (expected * weights).sum().backward()
        report["bn_out"] = torch.allclose(out, expected[rank::world], atol=1e-10)
        report["bn_grad_input"] = torch.allclose(mine.grad, full.grad[rank::world], atol=1e-10)
        report["bn_grad_weight"] = torch.allclose(grad_weight, reference.weight.grad, atol=1e-9)
        report["bn_running"] = torch.allclose(model[0].running_var, reference.running_var, atol=1e-12) and \
            torch.allclose(model[0].running_mean, reference.running_mean, atol=1e-12)

        # 2. A start-up error on rank 1 only stops both ranks; rank 0 names it.
        def start():
            if rank == 1:
                raise UserError("features.h5: unreadable on this node")
            return "ok"
        try:
            dist.agree(start)
            report["agree"] = "no error"
        except UserError as exc:
            report["agree"] = str(exc)
            # shown_by_main: rank 0 prints this error, so the other ranks need not.
            report["agree_quiet"] = bool(getattr(exc, "shown_by_main", False))

        # 3. A non-finite loss on rank 1 only: every rank raises the same error at the same check.
        from vqakd.training.engine import _NonFiniteWatch
        watch = _NonFiniteWatch(("loss", "ce"), (), torch.device("cpu"))
        watch.update(1, torch.tensor([1.0, 1.0]))
        watch.update(2, torch.tensor([float("nan") if rank == 1 else 2.0, 1.0]))
        try:
            watch.check(epoch=3, steps=4)
            report["nan"] = "no error"
        except UserError as exc:
            report["nan"] = str(exc)
        # 4. A session inside another (a study's train and validate calls) keeps the outer group.
        with dist.session():
            pass
        report["nested_session_keeps_group"] = dist.is_initialized()
    with open(os.path.join(folder, f"{rank}.json"), "w") as handle:
        json.dump(report, handle)


def test_global_batchnorm_agreement_and_nan_watch_in_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for report in reports:
        assert report["bn_out"] and report["bn_grad_input"] and report["bn_grad_weight"] and report["bn_running"]
        assert report["nested_session_keeps_group"]
        assert report["nan"].startswith("non-finite loss at epoch 3, step 2 of 4: loss = nan")
    # Rank 0 prints the error of rank 1; rank 1 raises its own (marked, so quiet_unless_main keeps it quiet).
    assert reports[0]["agree"] == "rank 1 failed during start-up: features.h5: unreadable on this node"
    assert reports[1]["agree"] == "features.h5: unreadable on this node"
    assert reports[0]["agree_quiet"] is True and reports[1]["agree_quiet"] is True


# ----------------------------------------------------------------------------- single-process pieces

def test_global_batch_is_split_and_must_divide():
    from vqakd.data.batches import EpochBatchSampler
    from vqakd.training.run import per_process_batch

    assert per_process_batch(256, 4) == 64 and per_process_batch(32, 1) == 32
    with pytest.raises(UserError, match=r"train.batch_size \(30\) is the global batch .* \(4\); e.g. --set "
                                        r"train.batch_size=28"):
        per_process_batch(30, 4)
    # The K shares of step j are exactly the one-process batch j.
    single = list(EpochBatchSampler(40, 8, True, seed=5))
    shards = [list(EpochBatchSampler(40, 4, True, seed=5, rank=r, world_size=2)) for r in range(2)]
    for j, batch in enumerate(single):
        assert sorted(torch.cat([shards[0][j], shards[1][j]]).tolist()) == sorted(batch.tolist())


def test_hsic_term_is_scaled_per_share():
    from model import DualVGR, ModelConfig
    from vqakd.core.config import LossConfig
    from vqakd.training.engine import compute_loss

    torch.manual_seed(0)
    config = ModelConfig(question_vocab_size=15, answer_vocab_size=11, vision_dim=16, module_dim=32, word_dim=12,
                         num_nodes=4, graph_layers=1, fusion_dim=16)
    model = DualVGR(config).eval()
    out = model(torch.randn(4, 4, 3, 16), torch.randn(4, 4, 16), torch.randint(2, 15, (4, 5)),
                torch.tensor([5, 3, 2, 4]))
    labels = torch.tensor([2, 3, 4, 5])
    loss = LossConfig(beta=0.5)
    one, two = compute_loss(out, labels, loss, "teacher"), compute_loss(out, labels, loss, "teacher", batch_shards=2)
    torch.testing.assert_close(two["dependence"], 2 * one["dependence"])
    torch.testing.assert_close(two["loss"], one["loss"] + 0.5 * one["dependence"])
    torch.testing.assert_close(two["ce"], one["ce"])


def test_single_process_pieces_need_no_process_group(monkeypatch):
    from vqakd.core.distributed import resolve_process_device

    layer = torch.nn.BatchNorm1d(3)
    converted = dist.convert_batchnorm(torch.nn.Sequential(layer))
    assert type(converted[0]) is dist.GlobalBatchNorm1d and converted[0].weight is layer.weight
    assert list(converted.state_dict()) == ["0.weight", "0.bias", "0.running_mean", "0.running_var",
                                            "0.num_batches_tracked"]
    x = torch.randn(5, 3)
    torch.testing.assert_close(converted(x), torch.nn.functional.batch_norm(
        x, None, None, layer.weight, layer.bias, training=True))
    assert dist.agree(lambda: 7) == 7 and dist.all_gather_objects("x") == ["x"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UserError, match="launch with torchrun"), dist.session():
        pass
    with pytest.raises(UserError, match="under torchrun every process uses cuda:LOCAL_RANK"):
        resolve_process_device("cuda:1", what="train.device")
    assert resolve_process_device("cpu", what="train.device") == torch.device("cpu")
