"""predict.py: answers about video files agree with validate.py, features are cached, bad input
is one clear line.

One module-scoped pipeline on a tiny demo dataset (random-weight networks, 2 clips, 32x32
images, 1 training epoch), as `make demo` runs it, then predict.py against validate.py's CSV.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.cli_helpers import run_main
from vqakd.demo import data as demo_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLIPS = 2
OVERRIDES = ["model.num_nodes=2", "model.module_dim=16", "train.epochs=1", "train.batch_size=8",
             "train.progress=false", "data.use_glove=false"]


def _script(*parts):
    return os.path.join(ROOT, *parts)


def _run_script(path, argv):
    """Run a repository script's main() in this process (exactly its command line)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code, err = run_main(module.main, argv, quiet=True)
    assert code == 0, err
    return module


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data, out = root / "data", root / "results"
    demo_data.write_dataset(str(data), demo_data.DemoSettings(num_videos=8, seed=5, frame_size=32, fps=10,
                                                              seconds=1.0), progress=False)
    _run_script(_script("preprocess", "preprocess_questions.py"),
                ["--dataset", "msvd-qa", "--annotation-dir", str(data), "--out-dir", str(data), "--no-glove",
                 "--no-progress"])
    for kind, model, frames in (("appearance", "resnet101", 2), ("motion", "resnext101", 4)):
        _run_script(_script("preprocess", "preprocess_features.py"),
                    ["--dataset", "msvd-qa", "--video-dir", str(data), "--annotation-dir", str(data),
                     "--model", model, "--random-weights", "--num-clips", str(NUM_CLIPS), "--frames-per-clip",
                     str(frames), "--image-height", "32", "--image-width", "32", "--device", "cpu",
                     "--num-workers", "0", "--no-progress", "--out", str(data / f"msvd-qa_{kind}_feat.h5")])
    sets = []
    for override in OVERRIDES + [f"output_dir={out}"] + [
            f"data.{key}={data / name}" for key, name in (
                ("vocab", "msvd-qa_vocab.json"), ("train_questions", "msvd-qa_train_questions.pt"),
                ("val_questions", "msvd-qa_val_questions.pt"), ("test_questions", "msvd-qa_test_questions.pt"),
                ("appearance_feat", "msvd-qa_appearance_feat.h5"), ("motion_feat", "msvd-qa_motion_feat.h5"))]:
        sets += ["--set", override]
    cfg = _script("configs", "demo.yml")
    _run_script(_script("train.py"), ["--cfg", cfg, "--stage", "teacher", "--device", "cpu", *sets])
    checkpoint = out / "teacher" / "best.pt"
    _run_script(_script("validate.py"), ["--cfg", cfg, "--checkpoint", str(checkpoint), "--split", "test",
                                         "--write-preds", "--device", "cpu", *sets])
    return {"root": root, "data": data, "checkpoint": checkpoint, "cfg": cfg, "sets": sets,
            "preds": out / "teacher" / "eval_test_preds.csv"}


def predict_main(argv):
    import predict
    return run_main(predict.main, argv)


def reference_probabilities(pipeline):
    """validate.py's model on the stored features: each test question's top probability."""
    from vqakd.training.checkpoint import load_checkpoint, model_from_checkpoint
    from vqakd.core.config import load_config
    from vqakd.data.batches import load_data, make_loader

    config = load_config(pipeline["cfg"], [s for s in pipeline["sets"] if s != "--set"])
    bundle = load_data(config, splits=("test",), progress=False)
    model = model_from_checkpoint(load_checkpoint(str(pipeline["checkpoint"])), str(pipeline["checkpoint"]), torch.device("cpu"))
    model.eval()
    found = {}
    loader = make_loader(bundle.splits["test"], bundle.table, 256, False, 0, 0, False)
    with torch.no_grad():
        for batch in loader:
            probs = torch.softmax(model(batch["appearance"], batch["motion"], batch["question"],
                                        batch["question_len"]).logits.float(), dim=1)
            top, index = probs.max(dim=1)
            for i, p, a in zip(batch["index"].tolist(), top.tolist(), index.tolist()):
                found[bundle.splits["test"].display_ids[i]] = (bundle.vocab.idx_to_answer[a], p)
    return found


def test_checkpoint_records_extraction_settings_and_vocabulary(pipeline):
    checkpoint = torch.load(pipeline["checkpoint"], weights_only=True)
    record = checkpoint["inference"]
    assert record["features"]["appearance"]["model"] == "resnet101"
    assert record["features"]["appearance"]["frames_per_clip"] == 2
    assert record["features"]["motion"]["frames_per_clip"] == 4
    assert record["features"]["motion"]["image_height"] == 32
    assert record["features"]["motion"]["random_weights"] is True
    assert record["features"]["appearance"]["random_seed"] == 0
    vocab = json.loads((pipeline["data"] / "msvd-qa_vocab.json").read_text())
    assert record["vocabulary"]["question_token_to_idx"] == vocab["question_token_to_idx"]


def test_same_answers_and_probabilities_as_validate(pipeline, tmp_path):
    """Every test question of every test video: predict.py's top answer is validate.py's, with
    the probability the model gives on the stored features (to 1e-5)."""
    with open(pipeline["preds"], encoding="utf-8") as handle:
        preds = list(csv.DictReader(handle))
    test_qa = json.loads((pipeline["data"] / "test_qa.json").read_text())
    mapping = dict(line.split()[::-1] for line in (pipeline["data"] / "youtube_mapping.txt").read_text().splitlines())
    questions = tmp_path / "questions.csv"
    with open(questions, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "video", "question"])
        for record in test_qa:
            clip = mapping[f"vid{record['video_id']}"]
            writer.writerow([record["id"], str(pipeline["data"] / "YouTubeClips" / f"{clip}.avi"), record["question"]])
    assert len({r["video_id"] for r in test_qa}) >= 2
    out = tmp_path / "answers.jsonl"
    code, err = predict_main(["--checkpoint", str(pipeline["checkpoint"]), "--questions", str(questions),
                              "--out", str(out), "--device", "cpu", "--cache-dir", str(tmp_path / "cache")])
    assert code == 0, err
    answers = {str(r["id"]): r for r in map(json.loads, out.read_text().splitlines())}
    reference = reference_probabilities(pipeline)
    assert len(answers) == len(preds) == len(test_qa)
    for row in preds:
        got = answers[str(row["question_id"])]
        assert got["answers"][0]["answer"] == row["predicted_answer"], row
        want_answer, want_probability = reference[int(row["question_id"])]
        assert want_answer == row["predicted_answer"]
        assert abs(got["answers"][0]["probability"] - want_probability) < 1e-5
        assert len(got["answers"]) == 5
        assert not got["features_cached"]


def _one_video(pipeline):
    return str(sorted((pipeline["data"] / "YouTubeClips").iterdir())[0])


def test_single_question_cache_and_unknown_words(pipeline, tmp_path, capsys):
    video = _one_video(pipeline)
    base = ["--checkpoint", str(pipeline["checkpoint"]), "--video", video, "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--json", "--top-k", "3"]
    code, err = predict_main(base + ["--question", "what colour is the zebra?"])
    assert code == 0, err
    first = json.loads(capsys.readouterr().out)
    assert not first["features_cached"] and len(first["answers"]) == 3
    assert first["unknown_words"] == ["zebra"] and first["warnings"] == []
    cached = list((tmp_path / "cache").rglob("*.npy"))
    assert len(cached) == 2
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".")]  # no temporaries left
    started = time.perf_counter()
    code, err = predict_main(base + ["--question", "xyzzy plugh?"])
    assert code == 0, err
    second = json.loads(capsys.readouterr().out)
    assert second["features_cached"]
    assert second["unknown_words"] == ["xyzzy", "plugh"]
    assert any("ignores the question text" in w for w in second["warnings"])
    assert time.perf_counter() - started < 30
    # --no-cache: extracted again, same numbers
    code, err = predict_main(base[:4] + ["--device", "cpu", "--json", "--top-k", "3", "--no-cache",
                                         "--question", "what colour is the zebra?"])
    assert code == 0, err
    again = json.loads(capsys.readouterr().out)
    assert not again["features_cached"]
    assert again["answers"][0]["answer"] == first["answers"][0]["answer"]
    assert abs(again["answers"][0]["probability"] - first["answers"][0]["probability"]) < 1e-6


def test_bad_inputs_are_one_line(pipeline, tmp_path):
    ckpt = str(pipeline["checkpoint"])
    video = _one_video(pipeline)
    cache = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    code, err = predict_main(["--checkpoint", ckpt, "--video", str(tmp_path / "nope.mp4"), "--question", "what?"] + cache)
    assert code == 2 and "video not found" in err and "Traceback" not in err and err.count("\n") == 1
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"not a video at all" * 100)
    code, err = predict_main(["--checkpoint", ckpt, "--video", str(broken), "--question", "what?"] + cache)
    assert code == 2 and str(broken) in err and err.count("\n") == 1, err
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    code, err = predict_main(["--checkpoint", str(other), "--video", video, "--question", "what?"] + cache)
    assert code == 2 and "not a vqakd checkpoint" in err and err.count("\n") == 1
    # batch: the failing rows are reported, the rest answered, exit 1
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "video": video, "question": "what colour is the square?"},
        {"id": "b", "video": str(broken), "question": "what?"},
        {"id": "c", "video": "missing.avi", "question": "what?"},
        {"id": "d", "video": video}]) + "\n")
    out = tmp_path / "answers.csv"
    code, err = predict_main(["--checkpoint", ckpt, "--questions", str(questions), "--out", str(out)] + cache)
    assert code == 1
    assert "(id b)" in err and "(id c)" in err and "(id d)" in err and "(id a)" not in err
    rows = {row["id"]: row for row in csv.DictReader(open(out, encoding="utf-8"))}
    assert rows["a"]["answer_1"] and not rows["a"]["error"]
    assert rows["b"]["error"] and rows["c"]["error"] and rows["d"]["error"] == "no question"


def test_weights_sha256_mismatch_is_refused(pipeline, tmp_path):
    """A checkpoint recording real weights refuses a weights file with another sha256, naming both."""
    from vqakd.predict import Answerer
    from vqakd.core.errors import UserError

    checkpoint = torch.load(pipeline["checkpoint"], weights_only=True)
    motion = checkpoint["inference"]["features"]["motion"]
    motion.update(random_weights=False, random_seed=None, weights="/elsewhere/resnext-101-kinetics.pth",
                  weights_sha256="ab" * 32)
    path = tmp_path / "real.pt"
    torch.save(checkpoint, path)
    fake = tmp_path / "resnext-101-kinetics.pth"
    torch.save({"x": torch.zeros(1)}, fake)
    from vqakd.predict import ExtractionFlags
    answerer = Answerer(str(path), torch.device("cpu"), ExtractionFlags(motion_weights=str(fake)), use_cache=False)
    with pytest.raises(UserError) as info:
        answerer.answer(_one_video(pipeline), "what colour is the square?")
    message = str(info.value)
    assert str(fake) in message and "ab" * 32 in message and "/elsewhere/resnext-101-kinetics.pth" in message


def test_checkpoint_without_record_needs_the_settings_as_flags(pipeline, tmp_path, capsys):
    checkpoint = torch.load(pipeline["checkpoint"], weights_only=True)
    del checkpoint["inference"]
    path = tmp_path / "old.pt"
    torch.save(checkpoint, path)
    video = _one_video(pipeline)
    base = ["--checkpoint", str(path), "--video", video, "--question", "what colour is the square?",
            "--device", "cpu", "--no-cache", "--json"]
    code, err = predict_main(base)
    assert code == 2
    for flag in ("--appearance-frames-per-clip", "--motion-frames-per-clip", "--appearance-image-size",
                 "--motion-image-size", "--motion-normalisation"):
        assert flag in err
    code, err = predict_main(base + ["--appearance-frames-per-clip", "2", "--motion-frames-per-clip", "4",
                                     "--appearance-image-size", "32", "--motion-image-size", "32x32",
                                     "--motion-normalisation", "raw", "--random-weights"])
    assert code == 0, err
    old = json.loads(capsys.readouterr().out)
    code, err = predict_main(["--checkpoint", str(pipeline["checkpoint"])] + base[2:])
    new = json.loads(capsys.readouterr().out)
    assert old["answers"] == new["answers"]
    # A flag the record decides may only repeat it: --seed 7 is refused, not ignored.
    code, err = predict_main(["--checkpoint", str(pipeline["checkpoint"])] + base[2:] + ["--seed", "7"])
    assert code == 2 and "not seed 7" in err and "leave --seed out" in err and err.count("\n") == 1, err
    code, err = predict_main(["--checkpoint", str(pipeline["checkpoint"])] + base[2:] + ["--seed", "0"])
    assert code == 0, err


def test_help_is_fast_and_imports_no_torch():
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-X", "importtime", _script("predict.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--checkpoint" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "torch" not in imported and time.perf_counter() - started < 20


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_outputs_never_replace_inputs(pipeline, tmp_path):
    ckpt = str(pipeline["checkpoint"])
    questions = tmp_path / "q.csv"
    questions.write_text(f"video,question\n{_one_video(pipeline)},what colour is the square?\n")
    cache = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    before = {path: _sha256(path) for path in (questions, ckpt)}
    for out in (questions, ckpt):
        code, err = predict_main(["--checkpoint", ckpt, "--questions", str(questions), "--out", str(out)] + cache)
        assert code == 2 and "would overwrite" in err and err.count("\n") == 1, err
    assert {path: _sha256(path) for path in before} == before
    code, err = predict_main(["--checkpoint", ckpt, "--questions", str(questions), "--out", str(tmp_path)] + cache)
    assert code == 2 and "is a folder" in err and err.count("\n") == 1, err
    code, err = predict_main(["--checkpoint", ckpt, "--questions", str(questions), "--cache-dir", str(questions)])
    assert code == 2 and "--cache-dir" in err and "is a file" in err and err.count("\n") == 1, err
    code, err = predict_main(["--checkpoint", ckpt, "--questions", str(questions), "--batch-size", "0"])
    assert code == 2 and "--batch-size 0" in err


def test_questions_file_without_id_to_stdout(pipeline, tmp_path, capsys):
    # The documented video,question format, answers on stdout: each row named by its line.
    questions = tmp_path / "noid.csv"
    questions.write_text(f"video,question\n{_one_video(pipeline)},what colour is the square?\n")
    code, err = predict_main(["--checkpoint", str(pipeline["checkpoint"]), "--questions", str(questions),
                              "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert code == 0, err
    assert capsys.readouterr().out.startswith("line 2\t")


def test_question_rows_bom_quotes_and_physical_lines(tmp_path):
    from vqakd.core.errors import UserError
    from vqakd.predict_batch import read_question_rows

    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffvideo,question,id\r\na.avi,\"what is it,\r\nthe small one?\",7\r\n\r\nb.avi,who?,8\r\n"
                     .encode("utf-8"))
    rows = read_question_rows(str(path))
    assert [(r["id"], r["where"], r["question"]) for r in rows] == [
        ("7", "line 2", "what is it,\r\nthe small one?"), ("8", "line 5", "who?")]
    path.write_text("video,question\na.avi,what?\n\nb.avi,what colour are the triangles, the small ones?\n")
    with pytest.raises(UserError, match=r"excel.csv: line 4: 3 fields where the header names 2 .*double quotes"):
        read_question_rows(str(path))


def test_many_questions_about_one_video_go_in_bounded_passes(pipeline, tmp_path, monkeypatch):
    import vqakd.predict as predict_module

    seen = []
    original = predict_module.Answerer.answer_encoded

    def spy(self, features, questions):
        seen.append(len(questions))
        return original(self, features, questions)

    monkeypatch.setattr(predict_module, "QUESTIONS_PER_PASS", 4)
    monkeypatch.setattr(predict_module.Answerer, "answer_encoded", spy)
    questions = tmp_path / "many.csv"
    video = _one_video(pipeline)
    questions.write_text("video,question,id\n" + "".join(f"{video},what colour is the square?,{i}\n" for i in range(10)))
    out = tmp_path / "answers.jsonl"
    code, err = predict_main(["--checkpoint", str(pipeline["checkpoint"]), "--questions", str(questions), "--out",
                              str(out), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert code == 0, err
    assert seen == [4, 4, 2]
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    # The same question, the same answers (to rounding: a pass of 2 and one of 4 round differently).
    first = answers[0]["answers"]
    for answer in answers:
        assert [a["answer"] for a in answer["answers"]] == [a["answer"] for a in first]
        assert [a["probability"] for a in answer["answers"]] == pytest.approx([a["probability"] for a in first], abs=1e-5)


def test_a_killed_batch_keeps_the_videos_it_finished(pipeline, tmp_path, monkeypatch):
    import vqakd.predict as predict_module

    videos = [str(path) for path in sorted((pipeline["data"] / "YouTubeClips").iterdir())[:6]]
    questions = tmp_path / "q.csv"
    questions.write_text("video,question\n" + "".join(f"{v},what colour is the square?\n" for v in videos))
    cache = tmp_path / "cache"
    monkeypatch.setattr(predict_module, "VIDEOS_PER_EXTRACTION", 2)
    original, calls = predict_module.Answerer._extract, []

    def killed_at_the_third_group(self, kind, paths):
        calls.append(list(paths))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, kind, paths)

    monkeypatch.setattr(predict_module.Answerer, "_extract", killed_at_the_third_group)
    argv = ["--checkpoint", str(pipeline["checkpoint"]), "--questions", str(questions), "--out",
            str(tmp_path / "a.csv"), "--cache-dir", str(cache), "--device", "cpu"]
    code, err = predict_main(argv)
    assert code == 130
    assert len(list(cache.glob("*/*.appearance.*.npy"))) == 4  # two finished groups are cached
    calls.clear()
    monkeypatch.setattr(predict_module.Answerer, "_extract", lambda self, kind, paths: calls.append(list(paths))
                        or original(self, kind, paths))
    code, err = predict_main(argv)
    assert code == 0, err
    assert calls[0] == videos[4:]                              # the rerun extracts only the rest


def test_validate_checks_the_features_against_the_checkpoints_record(pipeline, tmp_path):
    # Same videos, appearance features from another random network (seed 5): validate.py refuses
    # them unless told, and then records how they differ (predict.py enforces the same record).
    data = pipeline["data"]
    other = tmp_path / "appearance_seed5.h5"
    _run_script(_script("preprocess", "preprocess_features.py"),
                ["--dataset", "msvd-qa", "--video-dir", str(data), "--annotation-dir", str(data), "--model",
                 "resnet101", "--random-weights", "--seed", "5", "--num-clips", str(NUM_CLIPS), "--frames-per-clip",
                 "2", "--image-height", "32", "--image-width", "32", "--device", "cpu", "--num-workers", "0",
                 "--no-progress", "--out", str(other)])
    import validate

    argv = ["--cfg", pipeline["cfg"], "--checkpoint", str(pipeline["checkpoint"]), "--device", "cpu",
            "--out", str(tmp_path / "eval.json"), *pipeline["sets"], "--set", f"data.appearance_feat={other}"]
    code, err = run_main(validate.main, argv, quiet=True)
    assert code == 2 and "trained on features made otherwise" in err and "random_seed" in err, err
    assert str(other) in err and "--other-features" in err and err.count("\n") == 1
    code, err = run_main(validate.main, argv + ["--other-features"], quiet=True)
    assert code == 0, err
    recorded = json.loads((tmp_path / "eval.json").read_text())["other_features"]
    assert recorded and all("appearance" in entry for entry in recorded)
    code, err = run_main(validate.main, argv[:-2] + ["--set", f"data.appearance_feat={data / 'msvd-qa_appearance_feat.h5'}"],
                         quiet=True)
    assert code == 0, err
    assert json.loads((tmp_path / "eval.json").read_text())["other_features"] == []


def test_a_video_cut_short_is_reported_by_extraction_and_predict(pipeline, tmp_path, capsys):
    # Cut mid-file, the video decodes cleanly up to its end: only the header's frame count shows
    # what is missing. The frames kept are the original's; every step says the file is damaged.
    whole = open(_one_video(pipeline), "rb").read()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole[:len(whole) * 4 // 5])
    from vqakd.extraction.video import read_clip_frames

    frames = read_clip_frames(str(cut), 2, 2, (32, 32))
    assert frames.damage() is not None and "frames its header announces" in frames.damage()["reason"]
    assert read_clip_frames(_one_video(pipeline), 2, 2, (32, 32)).damage() is None
    argv = ["--checkpoint", str(pipeline["checkpoint"]), "--video", str(cut), "--question", "what colour is it?",
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--json"]
    for cached in (False, True):
        code, err = predict_main(argv)
        assert code == 0, err
        answer = json.loads(capsys.readouterr().out)
        assert answer["features_cached"] is cached
        assert any("damaged video" in w and "header announces" in w for w in answer["warnings"]), answer
