"""Data loading: id-based feature lookup, whole-batch gathers, modes, and every start-up check."""

from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest
import torch

from test_train_fixtures import make_dataset, tiny_config_dict
from vqakd.core.config import config_from_dict
from vqakd.data.batches import EpochBatchSampler, QuestionBatches, load_data, make_loader
from vqakd.core.errors import UserError
from vqakd.data.questions import OTHER_TYPE, QUESTION_TYPES


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root / "data", videos=24, questions_per_video=3)


def config_for(tiny, tmp_path, **sections):
    return config_from_dict(tiny_config_dict(tiny["paths"], tmp_path / "out", **sections))


def expected_features(tiny, video_ids):
    index = {vid: i for i, vid in enumerate(tiny["ids"])}
    rows = [index[int(v)] for v in video_ids]
    return torch.from_numpy(tiny["appearance"][rows]), torch.from_numpy(tiny["motion"][rows])


def test_batches_carry_each_questions_own_video_features(tiny, tmp_path):
    bundle = load_data(config_for(tiny, tmp_path), progress=False)
    split = bundle.splits["train"]
    batch = QuestionBatches(split, bundle.table)[torch.tensor([5, 0, 5, 17])]
    app, mot = expected_features(tiny, split.video_ids[[5, 0, 5, 17]])
    # The files store videos in two different orders; the lookup goes through `ids`.
    assert torch.equal(batch["appearance"], app) and torch.equal(batch["motion"], mot)
    assert batch["appearance"].shape == (4, 4, 3, 16) and batch["motion"].shape == (4, 4, 16)
    assert torch.equal(batch["question"], split.questions[[5, 0, 5, 17]])
    assert batch["question"].dtype == torch.long and batch["answer"].dtype == torch.long
    assert torch.equal(batch["index"], torch.tensor([5, 0, 5, 17]))
    assert bundle.vocab.question_size == 15 and bundle.vocab.answer_size == 11
    assert split.glove.shape == (15, 12) and bundle.splits["val"].glove is None


def test_question_types_come_from_the_first_token(tiny, tmp_path):
    bundle = load_data(config_for(tiny, tmp_path), splits=("test",), progress=False)
    split = bundle.splits["test"]
    first = tiny["stats"]["test"]["first_tokens"]
    expected = [QUESTION_TYPES.index(t) if t in QUESTION_TYPES else OTHER_TYPE for t in first]
    assert split.qtypes.tolist() == expected
    assert OTHER_TYPE in expected and QUESTION_TYPES.index("where") in expected
    # Label 1 for the test answers outside the vocabulary, as the original preprocessing stores them.
    assert split.answers[:3].tolist() == [1, 1, 1]
    assert split.text(0, bundle.vocab).endswith("?")


def test_loader_reads_whole_batches_and_shuffles_reproducibly(tiny, tmp_path, monkeypatch):
    bundle = load_data(config_for(tiny, tmp_path), splits=("train",), progress=False)
    split = bundle.splits["train"]
    loader = make_loader(split, bundle.table, batch_size=10, shuffle=True, seed=3, num_workers=0, pin_memory=False)
    calls = []
    original = QuestionBatches.__getitem__

    def counting(self, indices):
        calls.append(len(indices))
        return original(self, indices)

    monkeypatch.setattr(QuestionBatches, "__getitem__", counting)

    def epoch_order(epoch):
        loader.sampler.epoch = epoch
        return torch.cat([batch["index"] for batch in loader]).tolist()

    first = epoch_order(1)
    assert sorted(first) == list(range(len(split)))        # every question once
    assert calls == [10] * (len(split) // 10) + ([len(split) % 10] if len(split) % 10 else [])
    assert epoch_order(1) == first                          # same epoch, same order (resume)
    assert epoch_order(2) != first
    assert len(loader) == len(calls) // 3


def test_epoch_batch_sampler_edge_cases():
    sampler = EpochBatchSampler(21, 10, shuffle=True, seed=0)
    batches = list(sampler)
    assert [len(b) for b in batches] == [10, 10] and len(sampler) == 2     # BatchNorm cannot train on 1
    plain = EpochBatchSampler(21, 10, shuffle=False)
    assert [b.tolist() for b in plain][-1] == [20] and len(plain) == 3
    # Sharded evaluation: every index exactly once over the ranks, no padding.
    shards = [torch.cat(list(EpochBatchSampler(23, 4, False, rank=r, world_size=3))).tolist() for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(23))
    # Sharded training: equal step counts, same permutation for a given epoch.
    train = [EpochBatchSampler(23, 4, True, seed=1, rank=r, world_size=3) for r in range(3)]
    assert len({len(list(s)) for s in train}) == 1
    assert set(sum((torch.cat(list(s)).tolist() for s in train), [])) == set(range(23))


def test_float16_table_and_lazy_mode_agree_with_memory(tiny, tmp_path):
    memory = load_data(config_for(tiny, tmp_path), splits=("val",), progress=False)
    half = load_data(config_for(tiny, tmp_path, data={**tiny_data(tiny), "feature_dtype": "float16"}),
                     splits=("val",), progress=False)
    lazy = load_data(config_for(tiny, tmp_path, data={**tiny_data(tiny), "feature_mode": "lazy"}),
                     splits=("val",), progress=False)
    assert half.table.appearance.dtype == torch.float16 and half.table.nbytes() * 2 == memory.table.nbytes()
    assert lazy.table.appearance is None                    # nothing read up front
    index = torch.tensor([3, 1, 3, 0])
    reference = QuestionBatches(memory.splits["val"], memory.table)[index]
    from_half = QuestionBatches(half.splits["val"], half.table)[index]
    from_lazy = QuestionBatches(lazy.splits["val"], lazy.table)[index]
    assert torch.equal(from_lazy["appearance"], reference["appearance"])
    assert torch.equal(from_lazy["motion"], reference["motion"])
    torch.testing.assert_close(from_half["appearance"].float(), reference["appearance"], rtol=1e-3, atol=1e-3)
    # Loader workers get their own handles (a pickled table carries none).
    assert pickle.loads(pickle.dumps(lazy.table))._handles is None
    loader = make_loader(lazy.splits["val"], lazy.table, 5, False, 0, num_workers=2, pin_memory=False)
    workers = torch.cat([b["appearance"] for b in loader])
    serial = torch.cat([b["appearance"] for b in make_loader(memory.splits["val"], memory.table, 5, False, 0, 0, False)])
    assert torch.equal(workers, serial)


def tiny_data(tiny):
    return {key: tiny["paths"][key] for key in ("vocab", "train_questions", "val_questions", "test_questions",
                                                 "appearance_feat", "motion_feat")}


# ----------------------------------------------------------------------------------- bad files

def copy_h5(source, target, edit):
    with h5py.File(source, "r") as handle:
        datasets = {name: handle[name][()] for name in handle}
    edit(datasets)
    with h5py.File(target, "w") as handle:
        for name, value in datasets.items():
            handle.create_dataset(name, data=value)
    return str(target)


def load_with(tiny, tmp_path, splits=("train", "val", "test"), **data_overrides):
    return load_data(config_for(tiny, tmp_path, data={**tiny_data(tiny), **data_overrides}), splits=splits,
                     progress=False)


def test_missing_video_ids_listed_once(tiny, tmp_path):
    ids = tiny["ids"]
    dropped = sorted(ids[:9])

    def drop(d):
        keep = ~np.isin(d["ids"], dropped)
        d["resnext_features"], d["ids"] = d["resnext_features"][keep], d["ids"][keep]

    motion = copy_h5(tiny["paths"]["motion_feat"], tmp_path / "m.h5", drop)
    with pytest.raises(UserError) as caught:
        load_with(tiny, tmp_path, motion_feat=motion)
    message = str(caught.value)
    assert message.startswith(tiny["paths"]["train_questions"])
    assert f"9 video id(s) used by its questions are missing from {motion}: " in message
    assert ", ".join(str(v) for v in dropped[:5]) + ", ..." in message


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_features_name_the_video(tiny, tmp_path, bad):
    victim = {}

    def poison(d):
        d["resnet_features"][2, 1, 0, 5] = bad
        victim["id"] = int(d["ids"][2])

    appearance = copy_h5(tiny["paths"]["appearance_feat"], tmp_path / "a.h5", poison)
    with pytest.raises(UserError, match=f"'resnet_features' of video id {victim['id']} holds NaN or infinite"):
        load_with(tiny, tmp_path, appearance_feat=appearance)
    lazy = load_with(tiny, tmp_path, splits=("train",), appearance_feat=appearance, feature_mode="lazy")
    rows = np.flatnonzero(lazy.splits["train"].video_ids == victim["id"])
    with pytest.raises(UserError, match=f"video id {victim['id']} holds NaN"):
        QuestionBatches(lazy.splits["train"], lazy.table)[torch.tensor(rows[:1])]


def test_float16_overflow_is_reported(tiny, tmp_path):
    def huge(d):
        d["resnext_features"][0, 0, 0] = 1e6

    motion = copy_h5(tiny["paths"]["motion_feat"], tmp_path / "m.h5", huge)
    with pytest.raises(UserError, match="too large for float16; use data.feature_dtype: float32"):
        load_with(tiny, tmp_path, motion_feat=motion, feature_dtype="float16")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(features=d.pop("resnet_features")),
     "no dataset 'resnet_features' (found: features, ids)"),
    (lambda d: d.update(resnet_features=d["resnet_features"][:, :, 0]), "has shape (24, 4, 16); expected (V, N, F, D)"),
    (lambda d: d.update(ids=d["ids"][:-1]), "'ids' has 23 entries but 'resnet_features' has 24 videos"),
    (lambda d: d.update(ids=np.zeros_like(d["ids"])), "video id 0 appears 24 times"),
    (lambda d: d.update(ids=d["ids"].astype(np.float64)), "dataset 'ids' has shape (24,) and dtype float64"),
])
def test_wrong_feature_layout_names_file_and_dataset(tiny, tmp_path, edit, message):
    appearance = copy_h5(tiny["paths"]["appearance_feat"], tmp_path / "a.h5", edit)
    with pytest.raises(UserError) as caught:
        load_with(tiny, tmp_path, appearance_feat=appearance)
    assert str(caught.value).startswith(appearance) and message in str(caught.value)


def test_clip_count_and_feature_size_must_match_the_model(tiny, tmp_path):
    with pytest.raises(UserError, match="has 4 clips per video but model.num_nodes is 6"):
        load_data(config_for(tiny, tmp_path, model={"num_nodes": 6}), progress=False)
    with pytest.raises(UserError, match="'resnext_features' has feature size 16 but model.vision_dim is 20|"
                                        "'resnet_features' has feature size 16 but model.vision_dim is 20"):
        load_data(config_for(tiny, tmp_path, model={"vision_dim": 20}), progress=False)


def test_truncated_and_missing_files(tiny, tmp_path):
    truncated = tmp_path / "t.h5"
    truncated.write_bytes(open(tiny["paths"]["appearance_feat"], "rb").read()[:1500])
    with pytest.raises(UserError, match=f"{truncated}: cannot open as HDF5"):
        load_with(tiny, tmp_path, appearance_feat=str(truncated))
    with pytest.raises(UserError, match=f"vocabulary file not found: {tmp_path / 'v.json'}"):
        load_with(tiny, tmp_path, vocab=str(tmp_path / "v.json"))
    with pytest.raises(UserError, match=f"val question file not found: {tmp_path / 'q.pt'}"):
        load_with(tiny, tmp_path, val_questions=str(tmp_path / "q.pt"))


def test_question_files_are_checked_against_the_vocabulary(tiny, tmp_path):
    with open(tiny["paths"]["val_questions"], "rb") as handle:
        obj = pickle.load(handle)
    obj["questions"] = obj["questions"].copy()
    obj["questions"][4, 0] = 99
    bad = tmp_path / "val.pt"
    with open(bad, "wb") as handle:
        pickle.dump(obj, handle)
    with pytest.raises(UserError, match=r"val.pt: question 4: token index outside the question vocabulary \(0..14\)"):
        load_with(tiny, tmp_path, splits=("val",), val_questions=str(bad))


def test_question_pickles_cannot_run_code(tiny, tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as handle:
        pickle.dump({"questions": Exploit()}, handle)
    with pytest.raises(UserError, match="refusing to unpickle"):
        load_with(tiny, tmp_path, splits=("val",), val_questions=str(bad))
    assert not (tmp_path / "owned").exists()


def test_files_without_question_text_decode_tokens(tmp_path):
    data = make_dataset(tmp_path / "d", videos=6, questions_per_video=3, with_text=False)
    bundle = load_data(config_from_dict(tiny_config_dict(data["paths"], tmp_path / "o")), splits=("val",),
                       progress=False)
    split = bundle.splits["val"]
    assert split.question_text is None
    assert split.text(0, bundle.vocab).startswith("what colour is it")


def test_reused_batch_buffers_give_the_same_batches(tiny, tmp_path):
    bundle = load_data(config_for(tiny, tmp_path), splits=("train",), progress=False)
    split = bundle.splits["train"]
    fresh = make_loader(split, bundle.table, 10, True, 3, 0, False)
    reused = make_loader(split, bundle.table, 10, True, 3, 0, False, reuse_buffers=True)
    pointers = []
    for epoch in (1, 2):
        fresh.sampler.epoch = epoch
        reused.sampler.epoch = epoch
        for a, b in zip(fresh, reused, strict=True):
            # Compared before the next batch is drawn: a reused batch is valid until then.
            assert torch.equal(a["index"], b["index"])
            assert torch.equal(a["appearance"], b["appearance"]) and torch.equal(a["motion"], b["motion"])
            pointers.append(b["appearance"].data_ptr())
    assert len(split) % 10 != 0                     # the short last batch is a view of a buffer too
    assert len(set(pointers)) == QuestionBatches.BUFFER_RING
    # Worker processes never reuse buffers (their tensors travel through shared memory).
    assert not make_loader(split, bundle.table, 10, True, 3, 2, False, reuse_buffers=True).dataset.reuse_buffers


def test_feature_device_choices_on_a_cpu_machine(tiny, tmp_path):
    from vqakd.data.batches import choose_table_device

    bundle = load_data(config_for(tiny, tmp_path), splits=("val",), device=torch.device("cpu"), progress=False)
    assert bundle.table.device == torch.device("cpu")
    auto = config_for(tiny, tmp_path)
    assert choose_table_device(auto, bundle.table, torch.device("cpu")) == torch.device("cpu")
    forced = config_for(tiny, tmp_path, data={**tiny_data(tiny), "feature_device": "cuda"})
    with pytest.raises(UserError, match="feature_device: cuda needs a CUDA training device"):
        choose_table_device(forced, bundle.table, torch.device("cpu"))
    batch = QuestionBatches(bundle.splits["val"], bundle.table)[torch.tensor([0, 2])]
    assert batch["question_len"].device.type == "cpu" and batch["appearance"].device.type == "cpu"


def test_data_path_benchmark_runs_and_reports_both_loaders(tmp_path, capsys):
    import importlib.util
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_data_path", os.path.join(root, "bench", "data_path.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    previous = torch.get_num_threads()
    try:
        assert bench.main(["--videos", "6", "--clips", "2", "--frames", "3", "--dim", "16", "--questions", "40",
                           "--batch-size", "8", "--batches", "2", "--rounds", "2", "--dir", str(tmp_path / "files"),
                           "--json-out", str(tmp_path / "r.json")]) == 0
    finally:
        torch.set_num_threads(previous)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["ours"]["questions_per_s"] > 0 and result["per_sample_hdf5"]["questions_per_s"] > 0
    assert len(result["ours"]["rounds"]) == 2 and all(r["questions"] == 16 for r in result["ours"]["rounds"])
    assert result["speedup"] == pytest.approx(result["ours"]["questions_per_s"] /
                                              result["per_sample_hdf5"]["questions_per_s"])
    assert "questions/s" in capsys.readouterr().out
    with pytest.raises(UserError, match="--questions must be at least"):
        bench.main(["--questions", "10", "--dir", str(tmp_path / "x")])
