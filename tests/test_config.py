"""The typed config: shipped files, unknown keys with suggestions, types, overrides, original flags."""

from __future__ import annotations

import os

import pytest
import yaml

from vqakd.core.config import (Config, config_from_dict, config_to_dict, dump_config, eval_batch_size, load_config,
                          parse_override)
from vqakd.core.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSVD = os.path.join(ROOT, "configs", "msvd_qa.yml")
MSRVTT = os.path.join(ROOT, "configs", "msrvtt_qa.yml")


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yml"
    path.write_text(text)
    return str(path)


def test_shipped_configs_hold_the_spec_protocol():
    for path, dataset, nodes in ((MSVD, "msvd-qa", 8), (MSRVTT, "msrvtt-qa", 16)):
        config = load_config(path)
        assert config.dataset == dataset and config.model.num_nodes == nodes
        assert config.output_dir == os.path.join("results", dataset, "default")
        assert config.data.vocab == f"data/{dataset}/{dataset}_vocab.json"
        assert config.data.appearance_feat == f"data/{dataset}/{dataset}_appearance_feat.h5"
        assert config.data.test_questions == f"data/{dataset}/{dataset}_test_questions.pt"
        train = config.train
        assert (train.lr, train.batch_size, train.epochs, train.lr_halve_every, train.lr_decay, train.grad_clip,
                train.seed) == (1e-4, 256, 25, 10, 0.5, 12.0, 666)
        assert isinstance(train.lr, float)
        loss = config.loss
        assert (loss.alpha, loss.beta, loss.tau_app, loss.tau_mo, loss.kappa_app, loss.kappa_mo, loss.distill) == \
            (100.0, 1e-6, 1.0, 1.0, 1.0, 1.0, "feature")
        assert (config.teacher.graph_layers, config.student.graph_layers, config.model.unit_layers) == (4, 1, 1)
        assert (config.model.module_dim, config.model.vision_dim, config.model.word_dim) == (768, 2048, 300)
        # The files list every key of the schema (nothing is left to a hidden default).
        with open(path) as handle:
            raw = yaml.safe_load(handle)
        expected = config_to_dict(Config())
        for section, values in expected.items():
            assert section in raw, section
            if isinstance(values, dict):
                assert set(raw[section]) == set(values), section


def test_defaults_equal_the_shipped_msvd_config():
    assert config_to_dict(load_config(None)) == config_to_dict(load_config(MSVD))


@pytest.mark.parametrize("text, message", [
    ("trian:\n  lr: 0.1\n", "unknown key 'trian' (did you mean 'train'?)"),
    ("train:\n  lrr: 0.1\n", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("loss:\n  kapa_app: 2\n", "unknown key 'loss.kapa_app' (did you mean 'loss.kappa_app'?)"),
    ("data:\n  feature_mod: lazy\n", "unknown key 'data.feature_mod' (did you mean 'data.feature_mode'?)"),
    ("train:\n  zzz: 1\n", "unknown key 'train.zzz' (known keys in train: lr, batch_size"),
    ("train:\n  epochs: ten\n", "key 'train.epochs' must be an integer, got 'ten'"),
    ("train:\n  epochs: 2.5\n", "key 'train.epochs' must be an integer, got 2.5"),
    ("train:\n  batch_size: true\n", "key 'train.batch_size' must be an integer, got True"),
    ("train:\n  lr: fast\n", "key 'train.lr' must be a number, got 'fast'"),
    ("train:\n  progress: 1\n", "key 'train.progress' must be true or false, got 1"),
    ("train:\n  amp: fp16\n", "key 'train.amp' must be one of 'none', 'bf16', got 'fp16'"),
    ("loss:\n  distill: features\n", "key 'loss.distill' must be one of 'feature', 'logit', 'none'"),
    ("dataset: tgif-qa\n", "key 'dataset' must be one of 'msvd-qa', 'msrvtt-qa', 'demo', got 'tgif-qa'"),
    ("data:\n  glove: 3\n", "key 'data.glove' must be a string or null, got 3"),
    ("train: 5\n", "train must be a mapping of keys, got 5"),
    ("train:\n  batch_size: 0\n", "train.batch_size must be > 0, got 0"),
    ("train:\n  epochs: 3\n  stop_after_epoch: 4\n", "train.stop_after_epoch (4) is after the last epoch (3)"),
    ("model:\n  module_dim: 30\n", "model.module_dim (30) must be divisible by model.num_heads (4)"),
    ("loss:\n  logit_mix: 1.5\n", "loss.logit_mix must be in [0, 1], got 1.5"),
    ("train:\n  lr: [1\n", "invalid YAML at line"),
    ("- a\n- b\n", "expected a mapping of sections"),
])
def test_bad_files_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert str(caught.value).startswith(path + ": ")
    assert message in str(caught.value)


def test_missing_config_file():
    with pytest.raises(UserError, match="config file not found: /nowhere/c.yml"):
        load_config("/nowhere/c.yml")


def test_numbers_written_without_a_dot_are_numbers(tmp_path):
    # PyYAML reads `1e-4` as a string; a number field still takes it.
    config = load_config(write(tmp_path, "train:\n  lr: 1e-4\n  grad_clip: 5\nloss:\n  beta: 2e-6\n"))
    assert config.train.lr == 1e-4 and config.loss.beta == 2e-6
    assert isinstance(config.train.grad_clip, float) and config.train.grad_clip == 5.0


def test_set_overrides_are_yaml_and_checked(tmp_path):
    config = load_config(MSVD, ["train.lr=2e-4", "train.amp=bf16", "data.glove=null", "teacher.graph_layers=2",
                                "train.eval_batch_size=512", "name=run2", "data.feature_dtype=float16"])
    assert config.train.lr == 2e-4 and config.train.amp == "bf16" and config.data.glove is None
    assert config.teacher.graph_layers == 2 and eval_batch_size(config) == 512
    assert config.output_dir == os.path.join("results", "msvd-qa", "run2")
    assert eval_batch_size(load_config(MSVD)) == 256
    with pytest.raises(UserError, match=r"--set train.lrr=1: unknown key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        load_config(MSVD, ["train.lrr=1"])
    with pytest.raises(UserError, match=r"--set train.epochs=many: key 'train.epochs' must be an integer"):
        load_config(MSVD, ["train.epochs=many"])
    with pytest.raises(UserError, match="expected key=value"):
        load_config(MSVD, ["train.lr"])
    with pytest.raises(UserError, match="'train.lr' is a setting, not a section"):
        load_config(MSVD, ["train.lr.x=1"])
    assert parse_override("loss.distill=none") == (["loss", "distill"], "none")


def test_original_flags_map_onto_keys_and_set_wins():
    flags = {"alpha": 50.0, "beta": 2e-6, "unit_layers": 2, "t_app": 3.0, "t_mo": 4.0, "kd_alpha": 0.5,
             "kd_beta": 0.25}
    config = load_config(MSVD, [], flags)
    loss = config.loss
    assert (loss.alpha, loss.beta, loss.tau_app, loss.tau_mo, loss.kappa_app, loss.kappa_mo) == \
        (50.0, 2e-6, 3.0, 4.0, 0.5, 0.25)
    assert config.model.unit_layers == 2
    assert load_config(MSVD, ["loss.alpha=7"], {"alpha": 50.0}).loss.alpha == 7.0
    assert load_config(MSVD, [], {"alpha": None}).loss.alpha == 100.0
    with pytest.raises(UserError, match="--unit_layers: key 'model.unit_layers' must be an integer"):
        load_config(MSVD, [], {"unit_layers": 1.5})


def test_train_cli_flags_reach_the_config(monkeypatch):
    import train
    import vqakd.training.run

    seen = {}

    def fake_run(config, stage, **kwargs):
        seen.update(config=config, stage=stage, **kwargs)

    monkeypatch.setattr(vqakd.training.run, "run_training", fake_run)
    assert train.main(["--cfg", MSVD, "--stage", "student", "--kd_alpha", "2", "--t_mo", "3", "--unit_layers", "2",
                       "--distill", "logit", "--device", "cpu", "--set", "train.epochs=3", "--resume"]) == 0
    config = seen["config"]
    assert (config.loss.kappa_app, config.loss.tau_mo, config.model.unit_layers) == (2.0, 3.0, 2)
    assert config.loss.distill == "logit" and config.train.device == "cpu" and config.train.epochs == 3
    assert seen["stage"] == "student" and seen["resume"] is True and seen["teacher_path"] is None


def test_dump_and_reload_round_trip(tmp_path):
    config = load_config(MSRVTT, ["train.lr=3e-4", "data.feature_mode=lazy"])
    path = str(tmp_path / "saved.yml")
    dump_config(config, path)
    assert config_to_dict(load_config(path)) == config_to_dict(config)
    assert config_to_dict(config_from_dict(config_to_dict(config))) == config_to_dict(config)


def test_path_templates(tmp_path):
    config = load_config(write(tmp_path, "name: x\ndataset: demo\ndata:\n  vocab: /d/{dataset}/{name}.json\n"
                                         "output_dir: /r/{name}\n"))
    assert config.data.vocab == "/d/demo/x.json" and config.output_dir == "/r/x"
    assert config.stage_dir("student") == os.path.join("/r/x", "student")
    with pytest.raises(UserError, match="unknown placeholder"):
        load_config(write(tmp_path, "data:\n  vocab: /d/{split}.json\n"))
    with pytest.raises(UserError, match="unknown stage 'pupil'"):
        load_config(None).stage("pupil")


def test_model_section_is_the_network_settings_less_what_data_and_stage_set():
    """One list of network settings: every ModelConfig field but the vocabulary sizes (from the
    data) and the graph layers (per stage) is a `model.` key with ModelConfig's default, and
    reaches the network unchanged."""
    import dataclasses

    from model import ModelConfig

    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)
              if f.name not in ("question_vocab_size", "answer_vocab_size", "graph_layers")}
    assert config_to_dict(load_config(None))["model"] == fields
    config = load_config(None, ["model.fusion_factor=3", "model.graph_dropout=0.25"])
    network = ModelConfig(question_vocab_size=9, answer_vocab_size=5, graph_layers=config.student.graph_layers,
                          **dataclasses.asdict(config.model))
    assert (network.fusion_factor, network.graph_dropout, network.graph_layers) == (3, 0.25, 1)
    with pytest.raises(UserError, match=r"model.graph_dropout must be in \[0, 1\), got 1.0"):
        load_config(None, ["model.graph_dropout=1.0"])
    with pytest.raises(ValueError, match=r"ModelConfig.graph_dropout must be in \[0, 1\), got 1.0"):
        ModelConfig(question_vocab_size=9, answer_vocab_size=5, graph_dropout=1.0)


def test_set_on_a_yaml_alias_changes_that_section_only(tmp_path):
    path = write(tmp_path, "teacher: &g\n  graph_layers: 3\nstudent: *g\n")
    config = load_config(path, ["student.graph_layers=2"])
    assert (config.teacher.graph_layers, config.student.graph_layers) == (3, 2)
