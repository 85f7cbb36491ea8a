"""No silent loss, mix-up or stale state: outputs that would overwrite inputs, path templates,
leftover temporaries, a full disk, misleading inputs, forged pickle sizes, Ctrl-C, and question
files bound to their vocabulary."""

import errno
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

import txt2pickle
import vqakd.core.files
from preprocess.preprocess_questions import main as preprocess_main
from vqakd.data.annotations import load_msvd_mapping, load_qa
from vqakd.core.errors import UserError, run_cli
from vqakd.data.glove import MAX_TOKEN_BYTES, read_glove_text
from vqakd.core.files import atomic_open, file_sha256, remove_stale_temporaries, write_json, write_pickle
from vqakd.core.files import check_output_paths, expand_template
from vqakd.data.questions import check_vocab_binding, load_question_file
from vqakd.data.vocab import Vocabulary
from vqakd.core.safe_pickle import safe_load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN = [{"question": "what is a man doing?", "answer": "cook", "video_id": 3, "id": 0},
         {"question": "who plays a guitar?", "answer": "man", "video_id": 1, "id": 1}]
VAL = [{"question": "who cooks?", "answer": "man", "video_id": 1, "id": 2}]
TEST = [{"question": "what is the man doing?", "answer": "cook", "video_id": 3, "id": 3}]
MAPPING = "clipA_1_5 vid1\nclipB_2_9 vid3\n"


def run(main, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main(argv))
    captured = capsys.readouterr()
    return exc.value.code, captured.err


def one_line_error(code, err, *fragments):
    assert code == 2, (code, err)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture
def annotations(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    for split, records in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        (ann / f"{split}_qa.json").write_text(json.dumps(records))
    (ann / "youtube_mapping.txt").write_text(MAPPING)
    return ann


def preprocess_argv(ann, *extra):
    return ["--dataset", "msvd-qa", "--annotation-dir", str(ann), "--no-glove", "--no-progress", *extra]


def preprocess(ann, *extra):
    return preprocess_main(preprocess_argv(ann, *extra))


# ---------------------------------------------------------------- 1. outputs vs inputs, templates

def test_output_equal_to_an_input_or_another_output_is_refused(tmp_path):
    glove = tmp_path / "g.txt"
    glove.write_text("a 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.txt").symlink_to(glove)
    os.link(glove, tmp_path / "hard.txt")
    for same in (tmp_path / "sub" / ".." / "g.txt", tmp_path / "link.txt", tmp_path / "hard.txt"):
        with pytest.raises(UserError, match=r"--out .* would overwrite --glove"):
            check_output_paths({"--glove": glove}, {"--out": same})
    with pytest.raises(UserError, match="--out and --preds-out are the same file"):
        check_output_paths({}, [("--out", tmp_path / "a.json"), ("--preds-out", tmp_path / "sub/../a.json")])
    check_output_paths({"--glove": glove, "--vocab": None}, {"--out": tmp_path / "g.pkl"})


def test_txt2pickle_refuses_out_through_a_link_to_its_input(tmp_path, capsys):
    glove = tmp_path / "g.txt"
    glove.write_text("a 1 2\nb 3 4\n")
    (tmp_path / "sub").mkdir()
    code, err = run(txt2pickle.main, ["--glove", str(glove), "--out", str(tmp_path / "sub" / ".." / "g.txt"),
                                      "--no-progress"], capsys)
    one_line_error(code, err, "would overwrite --glove")
    assert glove.read_text() == "a 1 2\nb 3 4\n"


def test_template_without_split_field_is_refused_for_several_splits(annotations, tmp_path, capsys):
    # Before: all three splits were written to the same out/msvd-qa_questions.pt, exit 0.
    out = tmp_path / "out"
    argv = preprocess_argv(annotations, "--output-pt", str(out / "{}_questions.pt"), "--vocab-json",
                           str(out / "v.json"))
    code, err = run(preprocess_main, argv, capsys)
    one_line_error(code, err, "--output-pt (train split) and --output-pt (val split) are the same file",
                   "put {split} in the --output-pt template")
    assert not out.exists() or not any(out.iterdir())


def test_named_template_fields_work(annotations, tmp_path):
    # Before: KeyError: 'split' (a traceback).
    out = tmp_path / "out"
    assert preprocess(annotations, "--output-pt", str(out / "{dataset}" / "{split}.pt"),
                      "--vocab-json", str(out / "{dataset}_vocab.json")) == 0
    assert sorted(os.listdir(out / "msvd-qa")) == sorted(
        ["train.pt", "val.pt", "test.pt", "msvd-qa_train_summary.json", "msvd-qa_val_summary.json",
         "msvd-qa_test_summary.json"])
    assert (out / "msvd-qa_vocab.json").is_file()


@pytest.mark.parametrize("template, message", [
    ("out/{splt}.pt", "unknown field {splt}; the fields are {dataset}, {split}"),
    ("out/{}{}{}{}.pt", "more '{}' placeholders than the 3 values"),
    ("out/{split.pt", "not a usable path template"),
])
def test_bad_templates_are_one_line(annotations, tmp_path, capsys, template, message):
    argv = preprocess_argv(annotations, "--mode", "train", "--output-pt", str(tmp_path / template))
    code, err = run(preprocess_main, argv, capsys)
    one_line_error(code, err, "--output-pt", message)


def test_expand_template_positional_and_named():
    assert expand_template("{}/{}_{}.pt", "--x", ("d", "d", "train"), dataset="d", split="train") == "d/d_train.pt"
    assert expand_template("{dataset}-{split}", "--x", (), dataset="d", split="val") == "d-val"


def test_preprocess_refuses_writing_over_its_annotations(annotations, capsys):
    argv = preprocess_argv(annotations, "--mode", "val", "--output-pt", str(annotations / "val_qa.json"),
                           "--vocab-json", str(annotations / "v.json"))
    code, err = run(preprocess_main, argv, capsys)
    one_line_error(code, err, "would overwrite the val annotation file")
    assert json.loads((annotations / "val_qa.json").read_text()) == VAL


# ---------------------------------------------------------------- 4. leftover temporaries

def test_remove_stale_temporaries_only_touches_those_of_the_outputs(tmp_path):
    out = tmp_path / "g.pkl"
    stale = tmp_path / ".g.pkl.abc123_x.tmp"
    other = tmp_path / ".other.pkl.abc123.tmp"
    lookalike = tmp_path / ".g.pkl.abc.json"
    for path in (stale, other, lookalike):
        path.write_text("x")
    lines = []
    assert remove_stale_temporaries([out], lines.append) == [str(stale)]
    assert not stale.exists() and other.exists() and lookalike.exists()
    assert len(lines) == 1 and str(stale) in lines[0]


def test_txt2pickle_removes_the_temporary_of_a_killed_run(tmp_path, capsys):
    glove = tmp_path / "g.txt"
    glove.write_text("a 1 2\nb 3 4\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    leftover = out_dir / ".g.pkl.k1ll3d_0.tmp"        # what a kill -9 during write_pickle leaves
    leftover.write_bytes(b"\x80\x04half")
    assert txt2pickle.main(["--glove", str(glove), "--out", str(out_dir / "g.pkl"), "--no-progress"]) == 0
    assert sorted(os.listdir(out_dir)) == ["g.pkl"]
    assert "removed 1 temporary file" in capsys.readouterr().out


def test_preprocess_removes_the_temporaries_of_a_killed_run(annotations, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    leftovers = [out / ".msvd-qa_val_questions.pt.zz9a_b1.tmp", out / ".msvd-qa_vocab.json.q0q0q0.tmp"]
    for path in leftovers:
        path.write_text("half")
    assert preprocess(annotations, "--out-dir", str(out)) == 0
    assert not any(path.exists() for path in leftovers)
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


# ---------------------------------------------------------------- 5. a full disk

def test_full_disk_is_one_line_and_earlier_files_stay(tmp_path, monkeypatch):
    target = tmp_path / "features.pkl"
    write_pickle(target, {"old": 1})
    before = target.read_bytes()

    def full(obj, handle, protocol=None):
        handle.write(b"\x80\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vqakd.core.files.pickle, "dump", full)
    with pytest.raises(UserError) as exc:
        write_pickle(target, {"new": 2})
    message = str(exc.value)
    assert "\n" not in message and message.startswith("no space left on device") and str(target) in message
    assert isinstance(exc.value, OSError) and exc.value.errno == errno.ENOSPC
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["features.pkl"]


def test_full_disk_at_fsync_or_creating_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    write_json(target, {"a": 1})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vqakd.core.files.os, "fsync", no_space)
    with pytest.raises(UserError, match="no space left on device while writing"):
        with atomic_open(target, "w") as handle:
            handle.write("{}")
    monkeypatch.setattr(vqakd.core.files.tempfile, "mkstemp", no_space)
    with pytest.raises(UserError, match="no space left on device while writing"):
        write_json(target, {"b": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_txt2pickle_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    glove = tmp_path / "g.txt"
    glove.write_text("a 1 2\n")

    def full(obj, handle, protocol=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vqakd.core.files.pickle, "dump", full)
    code, err = run(txt2pickle.main, ["--glove", str(glove), "--out", str(tmp_path / "g.pkl"), "--no-progress"],
                    capsys)
    one_line_error(code, err, "no space left on device while writing", str(tmp_path / "g.pkl"))


# ---------------------------------------------------------------- 6. misleading inputs

def test_mapping_with_a_byte_order_mark(annotations):
    (annotations / "youtube_mapping.txt").write_bytes(b"\xef\xbb\xbf" + MAPPING.encode())
    assert load_msvd_mapping(str(annotations)) == {1: "clipA_1_5", 3: "clipB_2_9"}


def test_annotation_json_with_a_byte_order_mark(annotations):
    (annotations / "val_qa.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(VAL).encode())
    assert load_qa(str(annotations), "val") == VAL


@pytest.mark.parametrize("value", [2.9, True, False, -1, "2x", None, [2]])
def test_video_id_that_is_not_a_whole_number_is_refused(annotations, value):
    records = TRAIN + [{"question": "who?", "answer": "man", "video_id": value, "id": 77}]
    (annotations / "train_qa.json").write_text(json.dumps(records))
    with pytest.raises(UserError) as exc:
        load_qa(str(annotations), "train")
    message = str(exc.value)
    assert "train_qa.json" in message and "record 2 (id 77)" in message
    assert f"video_id {json.loads(json.dumps(value))!r}" in message


@pytest.mark.parametrize("value, expected", [(3, 3), (3.0, 3), ("3", 3)])
def test_video_id_whole_numbers_are_accepted(annotations, value, expected):
    (annotations / "train_qa.json").write_text(json.dumps([dict(TRAIN[0], video_id=value)]))
    assert int(load_qa(str(annotations), "train")[0]["video_id"]) == expected


def test_glove_line_with_an_absurdly_long_token_is_skipped_and_counted(tmp_path, capsys):
    glove = tmp_path / "g.txt"
    # A lost newline runs two lines together: the "token" is a whole line plus the next word.
    merged = "the " + " ".join(["0.5"] * 1200) + " of"
    glove.write_text(f"a 1 2\n{merged} 5 6\nb 3 4\n")
    words, stats = read_glove_text(glove, dim=2, progress=False)
    assert sorted(words) == ["a", "b"]
    assert stats.long_tokens == 1 and stats.first_long_line == 2
    assert len(merged) > MAX_TOKEN_BYTES
    assert txt2pickle.main(["--glove", str(glove), "--out", str(tmp_path / "g.pkl"), "--dim", "2",
                            "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"1 line(s) skipped whose token is longer than {MAX_TOKEN_BYTES} bytes (first at line 2" in out


def test_pickle_asking_for_absurd_memory_is_refused_before_allocating(tmp_path):
    size = (10 ** 13).to_bytes(6, "little")
    forged = {
        "bytearray": b"\x80\x04cbuiltins\nbytearray\n\x8a\x06" + size + b"\x85R.",
        "list of range": (b"\x80\x04cbuiltins\nlist\ncbuiltins\nrange\n\x8a\x06" + size + b"\x85R\x85R."),
        "ndarray": b"\x80\x04cnumpy\nndarray\n\x8a\x06" + size + b"\x85\x85R.",
        "_reconstruct": (b"\x80\x04cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n\x8a\x06" + size
                         + b"\x85C\x01b\x87R."),
    }
    for name, data in forged.items():
        path = tmp_path / "q.pt"
        path.write_bytes(data)
        with pytest.raises(UserError, match=r"corrupt or forged pickle: .* 10,000,000,000,000 items") as exc:
            load_question_file(path, 7, 3)
        assert str(path) in str(exc.value), name
    path.write_bytes(b"\x80\x04\x8e" + (10 ** 13).to_bytes(8, "little") + b"ab.")     # BINBYTES8
    with pytest.raises(UserError, match="more memory than there is"):
        safe_load(path)


def test_guarded_unpickler_still_reads_real_pickles(tmp_path):
    obj = {"q": np.arange(12, dtype=np.int32).reshape(3, 4), "g": np.zeros((50, 300), np.float32),
           "ids": [1, 2], "t": (1, "x"), "s": {3}, "b": b"xy", "ba": bytearray(b"z"), "n": None,
           "f": np.float32(2.5)}
    for protocol in (3, 4, 5):
        path = tmp_path / f"p{protocol}.pt"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        loaded = safe_load(path)
        assert type(loaded["q"]) is np.ndarray and np.array_equal(loaded["q"], obj["q"])
        assert loaded["g"].shape == (50, 300) and loaded["ba"] == bytearray(b"z") and loaded["s"] == {3}


# ---------------------------------------------------------------- 7. Ctrl-C

@pytest.mark.parametrize("script, args", [
    ("txt2pickle.py", ["--glove", "nowhere.txt"]),
    (os.path.join("preprocess", "preprocess_questions.py"), ["--dataset", "msvd-qa", "--annotation-dir", "nowhere"])])
def test_ctrl_c_while_importing_is_one_line_and_exit_130(tmp_path, script, args):
    # A stand-in numpy whose import is interrupted, as a Ctrl-C during the slow imports would be.
    fake = tmp_path / "fake"
    (fake / "numpy").mkdir(parents=True)
    (fake / "numpy" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    env = dict(os.environ, PYTHONPATH=str(fake))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "interrupted\n"


def test_ctrl_c_during_main_is_one_line_and_exit_130(capsys):
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exc:
        run_cli(main)
    assert exc.value.code == 130 and capsys.readouterr().err == "interrupted\n"


# ---------------------------------------------------------------- 3. question files bound to their vocabulary

def test_question_files_record_their_vocabulary(annotations, tmp_path):
    out = tmp_path / "out"
    assert preprocess(annotations, "--out-dir", str(out)) == 0
    vocab = out / "msvd-qa_vocab.json"
    digest = file_sha256(vocab)
    loaded = Vocabulary.load(str(vocab))
    sizes = loaded.question_size, loaded.answer_size
    for split in ("train", "val", "test"):
        path = out / f"msvd-qa_{split}_questions.pt"
        data = load_question_file(path, *sizes)
        assert data["vocab_sha256"] == digest
        check_vocab_binding(data, str(path), str(vocab), digest)
        with open(path, "rb") as handle:
            assert pickle.load(handle)["vocab_sha256"] == digest


def test_question_file_from_another_vocabulary_is_refused(annotations, tmp_path):
    out = tmp_path / "out"
    assert preprocess(annotations, "--out-dir", str(out)) == 0
    # The train split is encoded again with more questions: a new vocabulary; val is now stale.
    (annotations / "train_qa.json").write_text(json.dumps(
        TRAIN + [{"question": "what is a woman slicing?", "answer": "onion", "video_id": 1, "id": 9}]))
    assert preprocess(annotations, "--out-dir", str(out), "--mode", "train") == 0
    vocab = out / "msvd-qa_vocab.json"
    val = out / "msvd-qa_val_questions.pt"
    with pytest.raises(UserError) as exc:
        current = Vocabulary.load(str(vocab))
        check_vocab_binding(load_question_file(val, current.question_size, current.answer_size), str(val), str(vocab),
                            current.sha256)
    message = str(exc.value)
    assert str(val) in message and str(vocab) in message and "preprocess_questions.py" in message
    assert "--mode all" in message and "\n" not in message


def test_question_files_without_the_key_are_accepted(tmp_path):
    original = {"questions": np.array([[2, 3]]), "questions_len": np.array([2]), "question_id": [0],
                "video_ids": np.array([1]), "video_names": ["v"], "answers": [0], "glove": None}
    path = tmp_path / "hcrn_val_questions.pt"
    path.write_bytes(pickle.dumps(original))
    data = load_question_file(path, 4, 1)
    assert data["vocab_sha256"] is None
    check_vocab_binding(data, str(path), "v.json", "0" * 64)


# ---------------------------------------------------------------- 8. requirements

def test_torch_floor_is_the_first_release_with_a_safe_weights_only_load():
    text = open(os.path.join(ROOT, "requirements.txt")).read()
    floors = dict(re.findall(r"^(torch|torchvision)>=([0-9.]+)", text, re.M))
    assert tuple(map(int, floors["torch"].split("."))) >= (2, 6)
    assert tuple(map(int, floors["torchvision"].split("."))) >= (0, 21)
    assert re.search(r"^torch>=[0-9.]+,<=", text, re.M) and re.search(r"^torchvision>=[0-9.]+,<=", text, re.M)
