"""The memory plan: what a run will need, said (--plan) and checked before the features are read,
and train.max_steps, the bounded run the full-size measurements use."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from test_train_fixtures import make_dataset, tiny_config_dict, write_config
from vqakd.core.config import config_from_dict
from vqakd.core.errors import UserError
from vqakd.data.batches import load_data
from vqakd.training import memory
from vqakd.training.checkpoint import model_config_for_stage
from vqakd.training.memory import _LiveBytes, measure_step, plan_run
from vqakd.training.run import train_stage
from vqakd.training.validation import validate_checkpoint

GIB = 2**30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "data", videos=24, questions_per_video=3)


def config_for(tiny, tmp_path, **sections):
    return config_from_dict(tiny_config_dict(tiny["paths"], tmp_path / "out", **sections))


def test_live_bytes_counts_what_is_alive_and_its_peak():
    kept = torch.zeros(1000)
    with _LiveBytes({kept.untyped_storage().data_ptr()}) as live:
        a = torch.ones(1024)              # 4 KiB
        b = torch.ones(2048)              # 8 KiB
        del a
        c = b.view(2, 1024)               # a view: no new memory
        kept.add_(1)                      # in place on a storage made outside: not counted
        assert live.live == 8192
    assert live.peak == 12288
    del b, c


def _step_inputs(model_config, batch, frames=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, model_config.num_nodes, frames, model_config.vision_dim, generator=generator),
            torch.rand(batch, model_config.num_nodes, model_config.vision_dim, generator=generator),
            torch.randint(2, model_config.question_vocab_size, (batch, 20), generator=generator),
            torch.full((batch,), 8))


def probe_against_a_larger_batch() -> tuple[int, int]:
    """(the plan's step for four times the probe's batch, that batch's measured rise in resident
    memory), for a model big enough that its step, not the interpreter, is what is seen."""
    from model import DualVGR, ModelConfig
    from vqakd.core.config import LossConfig
    from vqakd.training.engine import compute_loss

    model_config = ModelConfig(question_vocab_size=60, answer_vocab_size=20, graph_layers=2, num_nodes=8,
                               vision_dim=512, module_dim=256, word_dim=32)
    cost = measure_step(model_config, 16, loss_cfg=LossConfig(), question_width=20)
    model = DualVGR(model_config)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    batch = 4 * memory.PROBE_QUESTIONS
    inputs = _step_inputs(model_config, batch)
    with memory._ResidentGrowth() as grown:
        output = model(*inputs)
        compute_loss(output, torch.zeros(batch, dtype=torch.long), LossConfig(), "teacher", None, 1)["loss"].backward()
        del output
    return cost.train(batch), grown.peak


@pytest.mark.skipif(not memory._reset_peak_rss(), reason="the kernel cannot reset this process's peak memory")
def test_step_cost_predicts_the_resident_memory_of_a_larger_batch():
    """The probe's per-question cost, times a batch four times its own, is that batch's real rise
    in resident memory. In a fresh interpreter, as a run's plan is made: a long test session's
    heap is not a run's."""
    code = "import json, test_memory_plan as t; print(json.dumps(t.probe_against_a_larger_batch()))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    planned, measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured > 50 * 2**20
    assert planned == pytest.approx(measured, rel=0.2)


def test_without_the_kernels_peak_the_plan_counts_tensor_bytes(tiny, tmp_path, monkeypatch):
    """Where the peak resident memory cannot be reset (not Linux), the CPU plan falls back to the
    bytes of live tensors, the upper bound, rather than failing or guessing."""
    config = config_for(tiny, tmp_path)
    model_config = model_config_for_stage(config, "teacher", load_data(config, progress=False))
    tensors = measure_step(model_config, 3, loss_cfg=config.loss, count="tensors")
    monkeypatch.setattr(memory, "_reset_peak_rss", lambda: False)
    assert measure_step(model_config, 3, loss_cfg=config.loss) == tensors


def test_gpu_step_cost_counts_live_tensors(tiny, tmp_path):
    """For the GPU the probe counts live tensor bytes: a larger batch's tracked peak, measured directly."""
    config = config_for(tiny, tmp_path)
    bundle = load_data(config, progress=False)
    model_config = model_config_for_stage(config, "teacher", bundle)
    cost = measure_step(model_config, 3, loss_cfg=config.loss, count="tensors")
    assert cost.train_per_question > cost.eval_per_question > 0
    from model import DualVGR
    from vqakd.training.engine import compute_loss

    torch.manual_seed(0)
    model = DualVGR(model_config)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    batch = 48
    inputs = (torch.rand(batch, 4, 3, 16), torch.rand(batch, 4, 16), torch.randint(2, 15, (batch, 30)),
              torch.full((batch,), 8))
    known = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *inputs]}
    known |= {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
    with _LiveBytes(known) as live:
        output = model(*inputs)
        compute_loss(output, torch.zeros(batch, dtype=torch.long), config.loss, "teacher", None, 1)["loss"].backward()
        del output
    assert cost.train(batch) == pytest.approx(live.peak, rel=0.15)


def test_plan_parts_follow_the_table_mode_and_dtype(tiny, tmp_path):
    table_values = 24 * (4 * 3 * 16 + 4 * 16)
    for mode, dtype, table_bytes in (("memory", "float32", 4 * table_values), ("memory", "float16", 2 * table_values),
                                     ("lazy", "float32", 0)):
        config = config_for(tiny, tmp_path, data={"feature_mode": mode, "feature_dtype": dtype})
        bundle = load_data(config, progress=False, before_table=lambda bundle: False)
        assert bundle.table.appearance is None                  # the table was not read
        plan = plan_run(config, bundle, model_config_for_stage(config, "teacher", bundle), torch.device("cpu"),
                        training=True, batch=32, eval_batch=32)
        assert plan.host["feature table"] == table_bytes
        assert plan.host_peak == sum(plan.host.values()) and plan.gpu == {}
        assert plan.disk_at_start == (0 if mode == "lazy" else pytest.approx(4 * table_values, rel=0.5))
        assert (plan.disk_per_epoch > 0) == (mode == "lazy")
        assert set(plan.others) == {"memory float32", "memory float16", "lazy"} - {plan.setting()}
        two = plan_run(config, bundle, model_config_for_stage(config, "teacher", bundle), torch.device("cpu"),
                       training=True, batch=32, eval_batch=32, processes=2)
        assert two.host_peak == 2 * sum(two.host.values())


def test_plan_prints_and_stops_before_the_features(tiny, tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "c.yml", tiny_config_dict(tiny["paths"], tmp_path / "out"))
    read = []
    monkeypatch.setattr("vqakd.data.features.FeatureTable.load", lambda *a, **k: read.append(1))
    assert train_stage(config, "teacher", plan=True) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan (teacher training, feature table: memory float32 on cpu, batch 32):")
    assert "one step (batch 32)" in out and "verdict: fits" in out and read == []
    assert not (tmp_path / "out").exists()                      # nothing written
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1000)
    assert train_stage(config, "teacher", plan=True) == 1
    assert "verdict: does NOT fit" in capsys.readouterr().out


def test_a_run_that_will_not_fit_is_refused_naming_a_setting_that_would(tiny, tmp_path, monkeypatch):
    config = tiny_config_dict(tiny["paths"], tmp_path / "out")
    path = write_config(tmp_path / "c.yml", config)
    plan = plan_run(config_from_dict(config), *_bundle_and_model(config), torch.device("cpu"), training=True,
                    batch=32, eval_batch=32)
    between = (plan.others["lazy"]["host"] + plan.host_peak) // 2      # lazy fits, the float32 table does not
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: between)
    with pytest.raises(UserError, match=r"this run needs .* GiB of memory .* data.feature_mode: lazy would fit"):
        train_stage(path, "teacher")
    assert not (tmp_path / "out" / "teacher" / "last.pt").exists()
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1000)
    with pytest.raises(UserError, match="no feature-table setting fits: lower the batch size"):
        train_stage(path, "teacher")


def _bundle_and_model(config_dict):
    config = config_from_dict(config_dict)
    bundle = load_data(config, progress=False, before_table=lambda bundle: False)
    return bundle, model_config_for_stage(config, "teacher", bundle)


def test_max_steps_bounds_training_and_every_evaluation(tiny, tmp_path):
    config = write_config(tmp_path / "c.yml", tiny_config_dict(
        tiny["paths"], tmp_path / "out", train={"epochs": 1, "batch_size": 8, "max_steps": 1}))
    train_stage(config, "teacher")
    folder = tmp_path / "out" / "teacher"
    results = json.loads((folder / "results.json").read_text())
    assert results["count"] == 8                               # one test batch of the 12 questions
    assert results["memory_plan"]["host_peak_bytes"] > 0
    with open(folder / "metrics.csv") as handle:
        row = next(csv.DictReader(handle))
    assert int(row["val_count"]) == 8                           # one val batch of the 12 questions
    assert float(row["train_steps_per_s"]) > 0 and float(row["val_questions_per_s"]) > 0
    evaluated = validate_checkpoint(config, str(folder / "best.pt"), split="test", out=str(tmp_path / "e.json"))
    assert evaluated["count"] == 8 and evaluated["memory_plan"]["what"] == "evaluation"
    plan = validate_checkpoint(config, str(folder / "best.pt"), split="test", plan=True)
    assert plan.fits() and plan.what == "evaluation"


def test_gpu_plan_puts_the_table_where_feature_device_auto_would(tiny, tmp_path, monkeypatch):
    """No GPU needed: the GPU's free memory is what the plan asks torch for."""
    config = config_for(tiny, tmp_path)
    bundle, model_config = _bundle_and_model(tiny_config_dict(tiny["paths"], tmp_path / "out"))
    for free, table_on in ((64 * GIB, "cuda"), (1000, "cpu")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 80 * GIB))
        plan = plan_run(config, bundle, model_config, torch.device("cuda"), training=True, batch=32, eval_batch=32)
        assert plan.table_on == table_on and plan.gpu_free == free
        assert (plan.gpu["feature table"] > 0) == (table_on == "cuda") and (plan.host["feature table"] > 0) == (
            table_on == "cpu")
        assert plan.gpu["CUDA context"] > 0 and "one step (batch 32)" in plan.gpu
        assert plan.fits() == (free > 1000) and ("GPU memory" in (plan.refusal() or "GPU memory"))
