"""The graph-collapse tools reach a user's run: `loss.common` chooses the common loss,
metrics.csv holds validation losses and the node-spread diagnostic, train.log warns once per
collapsed layer, and `model.attention: gatv2` trains, reloads and refuses the original layout."""

from __future__ import annotations

import csv
import json
import pickle

import h5py
import pytest
import torch

from cli_helpers import run_main
from test_train_fixtures import make_dataset, tiny_config_dict, write_config

import train  # noqa: E402
import validate  # noqa: E402
from model import DualVGROutput, LayerOutput, ModelConfig  # noqa: E402
from model.original import ours_to_original  # noqa: E402
from vqakd.training.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from vqakd.core.config import LossConfig, load_config  # noqa: E402
from vqakd.data.batches import load_data, make_loader  # noqa: E402
from vqakd.training.engine import compute_loss, evaluate  # noqa: E402
from vqakd.training.metrics import LOSS_PARTS  # noqa: E402

WARNING = "clip features identical across clips; the common loss there is rounding noise"
STREAMS = ("specific_appearance", "common_appearance", "specific_motion", "common_motion")


def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def train_tiny(root, data, epochs=3, stage="teacher", extra=(), **sections):
    config = tiny_config_dict(data["paths"], root / "out", **{"train": {"epochs": epochs}, **sections})
    path = write_config(root / "tiny.yml", config)
    code, err = run_main(train.main, ["--cfg", path, "--stage", stage, *extra], quiet=True)
    assert code == 0, err
    return path, root / "out" / stage


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("wiring") / "data")


# ----------------------------------------------------------------------------------- loss.common

def _output(common: torch.Tensor, specific: torch.Tensor, logits: torch.Tensor) -> DualVGROutput:
    layer = LayerOutput(specific_appearance=specific, common_appearance=common, specific_motion=specific.flip(1),
                        common_motion=common.flip(1))
    return DualVGROutput(logits=logits, visual=specific, appearance=specific, motion=specific, layers=(layer,))


def test_loss_common_safe_reaches_the_loss():
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 9), torch.tensor([2, 3, 4, 5])
    specific = torch.randn(4, 6, 16)
    # a collapsed layer: every clip the same vector, off by a few ulps
    base = torch.randn(4, 1, 16)
    steps = torch.randint(-3, 4, (4, 6, 16)).float()
    collapsed = _output(base.expand(-1, 6, -1) * (1 + steps * torch.finfo(torch.float32).eps), specific, logits)
    diverse = _output(torch.randn(4, 6, 16), specific, logits)

    def common(output, mode):
        return compute_loss(output, labels, LossConfig(common=mode), "teacher")["common"]

    assert float(common(collapsed, "original")) > 0.1          # normalised rounding noise
    assert float(common(collapsed, "safe")) == 0.0
    torch.testing.assert_close(common(diverse, "safe"), common(diverse, "original"))


def test_invalid_loss_common_is_one_line_error(tiny_data, tmp_path):
    config = write_config(tmp_path / "c.yml", tiny_config_dict(tiny_data["paths"], tmp_path / "out"))
    code, err = run_main(train.main, ["--cfg", config, "--stage", "teacher", "--set", "loss.common=robust"])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "loss.common" in lines[0] and "'safe'" in lines[0], err


# ----------------------------------------------------------------------------------- metrics.csv

@pytest.fixture(scope="module")
def teacher(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    config, folder = train_tiny(root, tiny_data, epochs=3, teacher={"graph_layers": 1})
    return {"cfg": config, "folder": folder}


def test_metrics_have_validation_losses_and_node_spread(teacher):
    rows = read_csv(teacher["folder"] / "metrics.csv")
    header = list(rows[0])
    for part in LOSS_PARTS:
        # val_<part> right after train_<part>
        assert header.index(f"val_{part}") == header.index(f"train_{part}") + 1
    for row in rows:
        for part in ("loss", "hard", "ce", "common", "dependence"):
            assert float(row[f"val_{part}"]) >= 0, part
        assert row["val_app"] == row["val_kd"] == ""
        for stream in STREAMS:
            assert float(row[f"node_spread_g1_{stream}"]) > 1e-3
        assert float(row["node_collapsed_g1"]) == 0.0
        # the hard loss is put together as in training: CE + α·C + β·H
        hard = float(row["val_ce"]) + 100 * float(row["val_common"]) + 1e-6 * float(row["val_dependence"])
        assert float(row["val_hard"]) == pytest.approx(hard, rel=1e-5)
    log = (teacher["folder"] / "train.log").read_text()
    assert "val loss" in log and WARNING not in log


def test_validation_losses_do_not_depend_on_the_evaluation_batch(teacher):
    """The HSIC term is a sum over a batch: evaluate rescales it to the training batch, so every
    part is the same whatever the evaluation batch size (and the last epoch's row is reproduced)."""
    config = load_config(teacher["cfg"])
    bundle = load_data(config, progress=False)
    path = str(teacher["folder"] / "last.pt")
    model = model_from_checkpoint(load_checkpoint(path), path, torch.device("cpu"))
    results = []
    for batch_size in (7, 48):
        loader = make_loader(bundle.splits["val"], bundle.table, batch_size, False, 0, 0, False)
        summary, _ = evaluate(model, loader, torch.device("cpu"), loss_cfg=config.loss, stage="teacher",
                              reference_batch=config.train.batch_size, node_spread=True)
        results.append(summary)
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], rel=1e-4)
    assert results[0]["accuracy"] == results[1]["accuracy"]
    last = read_csv(teacher["folder"] / "metrics.csv")[-1]
    for part, value in results[1]["losses"].items():
        assert float(last[f"val_{part}"]) == pytest.approx(value, rel=1e-4), part
    for column, value in results[1]["node_spread"]["columns"].items():
        assert float(last[column]) == pytest.approx(value, rel=1e-4), column


def test_student_validation_has_distillation_parts(tiny_data, teacher, tmp_path):
    _, folder = train_tiny(tmp_path, tiny_data, epochs=1, stage="student",
                           extra=("--teacher", str(teacher["folder"] / "best.pt")))
    row = read_csv(folder / "metrics.csv")[0]
    assert float(row["val_app"]) >= 0 and float(row["val_mo"]) >= 0 and row["val_kd"] == ""
    total = float(row["val_hard"]) + float(row["val_app"]) + float(row["val_mo"])
    assert float(row["val_loss"]) == pytest.approx(total, rel=1e-5)


# ----------------------------------------------------------------------------------- collapse warning

def _same_clips(data: dict) -> None:
    """Every video's clips replaced by copies of its first clip: the graph layers cannot tell them apart."""
    for key, name in (("appearance_feat", "resnet_features"), ("motion_feat", "resnext_features")):
        with h5py.File(data["paths"][key], "r+") as handle:
            features = handle[name][...]
            features[:, 1:] = features[:, :1]
            handle[name][...] = features


def test_collapse_warning_once_per_layer_per_run(tmp_path):
    data = make_dataset(tmp_path / "data", videos=24)
    _same_clips(data)
    # teacher: 2 graph layers; stopped after epoch 1 and resumed: still one warning per layer
    train_tiny(tmp_path, data, epochs=3, train={"epochs": 3, "stop_after_epoch": 1})
    _, folder = train_tiny(tmp_path, data, epochs=3, extra=("--resume",))
    log = (folder / "train.log").read_text()
    assert log.count(f"graph layer 1: {WARNING}") == 1 and log.count(f"graph layer 2: {WARNING}") == 1
    rows = read_csv(folder / "metrics.csv")
    assert all(float(r["node_collapsed_g1"]) == 1.0 and float(r["node_spread_g2_common_motion"]) < 1e-6
               for r in rows)


# ----------------------------------------------------------------------------------- GATv2

def test_gatv2_trains_reloads_and_refuses_the_original_layout(tiny_data, tmp_path):
    config, folder = train_tiny(tmp_path, tiny_data, epochs=2, model={
        **tiny_config_dict(tiny_data["paths"], tmp_path)["model"], "attention": "gatv2"})
    checkpoint = load_checkpoint(str(folder / "best.pt"))
    assert checkpoint["model_config"]["attention"] == "gatv2"
    out = tmp_path / "eval.json"
    code, err = run_main(validate.main, ["--cfg", config, "--checkpoint", str(folder / "best.pt"), "--out", str(out)])
    assert code == 0, err
    written = json.loads((folder / "results.json").read_text())
    assert json.loads(out.read_text())["accuracy"] == written["accuracy"]

    # Exporting to the original code's layout: one clear line (the original has GAT only).
    with pytest.raises(ValueError) as error:
        ours_to_original(checkpoint["state_dict"], ModelConfig(**checkpoint["model_config"]))
    assert "\n" not in str(error.value) and "gatv2" in str(error.value)
    # An original-layout checkpoint claiming another graph module: one error line from validate.py.
    gat = dict(checkpoint["model_config"], attention="gat")
    from model import DualVGR
    state = ours_to_original(DualVGR(ModelConfig(**gat)).state_dict(), ModelConfig(**gat))
    original = tmp_path / "original.pt"
    with open(original, "wb") as handle:
        torch.save({"epoch": 1, "state_dict": state, "optimizer": {},
                    "model_kwargs": {"vision_dim": gat["vision_dim"], "module_dim": gat["module_dim"],
                                     "word_dim": gat["word_dim"], "num_of_nodes": gat["num_nodes"],
                                     "graph_module": "GATv2", "graph_layers": gat["graph_layers"],
                                     "unit_layers": gat["unit_layers"]}}, handle, pickle_protocol=2)
    code, err = run_main(validate.main, ["--cfg", config, "--checkpoint", str(original), "--out", str(out)])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "GATv2" in err, err
