"""Question preprocessing (docs/method.md#question-preprocessing, #question-files): exact tokens,
vocab order, labels, padding, GloVe rows,
the checked reader, and every bad-input path of the annotations and question pickles."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vqakd.core.files
from preprocess.preprocess_questions import main as preprocess_main
from vqakd.core.errors import UserError, run_cli
from vqakd.data.questions import load_question_file, pad_questions, record_tokens, tokenize_question
from vqakd.data.vocab import Vocabulary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 4

MSVD_TRAIN = [
    {"question": "what is a man doing?", "answer": "cook", "video_id": 3, "id": 0},
    {"question": "Who's the man's friend?", "answer": "man", "video_id": 1, "id": 1},
    {"question": "what is the man cutting?", "answer": "onion", "video_id": 3, "id": 2},
    {"question": "who plays a guitar?", "answer": "man", "video_id": 1, "id": 3},
    {"question": "what does the man do?", "answer": "cook", "video_id": 7, "id": 4},
    {"question": "what is a woman playing?", "answer": "guitar", "video_id": 7, "id": 5},
    {"question": "who is at home", "answer": "woman", "video_id": 3, "id": 6},       # no '?': loses its 'e'
]
MSVD_VAL = [
    {"question": "what is a woman slicing?", "answer": "tomato", "video_id": 1, "id": 7},
    {"question": "who cooks?", "answer": "man", "video_id": 7, "id": 8},
]
MSVD_TEST = [{"question": "what is the man doing?", "answer": "guitar", "video_id": 3, "id": 9}]
MAPPING = "clipA_1_5 vid1\nclipB_2_9 vid3\nclipC_0_4 vid7\n"
GLOVE_WORDS = {"what": 1.0, "is": 2.0, "a": 3.0, "man": 4.0, "the": 5.0, "who": 6.0, "guitar": 7.0,
               "hom": 8.0, "unused": 9.0}

# What the original preprocessing rules give for MSVD_TRAIN, by hand.
TRAIN_TOKENS = [["what", "is", "a", "man", "doing"],
                ["who", "'s", "the", "man", "'s", "friend"],
                ["what", "is", "the", "man", "cutting"],
                ["who", "plays", "a", "guitar"],
                ["what", "does", "the", "man", "do"],
                ["what", "is", "a", "woman", "playing"],
                ["who", "is", "at", "hom"]]
QUESTION_VOCAB = ["<NULL>", "<UNK>", "what", "is", "a", "man", "doing", "who", "'s", "the", "friend",
                  "cutting", "plays", "guitar", "does", "do", "woman", "playing", "at", "hom"]


def write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")


@pytest.fixture
def msvd(tmp_path):
    ann = tmp_path / "msvd_ann"
    ann.mkdir()
    write_json(ann / "train_qa.json", MSVD_TRAIN)
    write_json(ann / "val_qa.json", MSVD_VAL)
    write_json(ann / "test_qa.json", MSVD_TEST)
    (ann / "youtube_mapping.txt").write_text(MAPPING)
    glove = tmp_path / "glove.pkl"
    glove.write_bytes(pickle.dumps({w: np.full(DIM, v, np.float32) for w, v in GLOVE_WORDS.items()}))
    return ann, glove, tmp_path / "out"


def cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: preprocess_main(argv + ["--no-progress"]))
    captured = capsys.readouterr()
    return exc.value.code, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_tokens_are_those_of_the_original_preprocessing():
    assert tokenize_question("Who's the man's friend?") == ["who", "'s", "the", "man", "'s", "friend"]
    assert tokenize_question("What can't she do?") == ["what", "ca", "n't", "she", "do"]
    assert tokenize_question('what does the "cat" eat?') == ["what", "does", "the", "``", "cat", "''", "eat"]
    assert tokenize_question("what is 3.5 inches wide?") == ["what", "is", "3.5", "inches", "wide"]
    assert tokenize_question("who is at home") == ["who", "is", "at", "hom"]   # last character always dropped
    assert tokenize_question("?") == [] and tokenize_question("") == []


def test_vocab_order_and_answer_ties():
    vocab = Vocabulary.build(TRAIN_TOKENS, [r["answer"] for r in MSVD_TRAIN], answer_top=3)
    assert list(vocab.question_token_to_idx) == QUESTION_VOCAB
    assert list(vocab.question_token_to_idx.values()) == list(range(len(QUESTION_VOCAB)))
    # cook and man both occur twice (cook seen first), then onion/guitar/woman once: onion was first.
    assert vocab.answer_token_to_idx == {"<UNK0>": 0, "<UNK1>": 1, "cook": 2, "man": 3, "onion": 4}
    # The original's MSVD-QA/MSRVTT-QA preprocessing leaves the combined table at the two specials.
    assert vocab.question_answer_token_to_idx == {"<NULL>": 0, "<UNK>": 1}


def test_encoding_rules():
    vocab = Vocabulary({"<NULL>": 0, "<UNK>": 1, "what": 2}, {"<UNK0>": 0, "<UNK1>": 1, "cook": 2})
    assert vocab.encode_question(["what", "zebra"]) == [2, 1]
    assert [vocab.answer_label("cook", s) for s in ("train", "val", "test")] == [2, 2, 2]
    assert [vocab.answer_label("zebra", s) for s in ("train", "val", "test")] == [0, 1, 1]
    assert vocab.idx_to_question_token == ["<NULL>", "<UNK>", "what"] and vocab.idx_to_answer[2] == "cook"
    matrix, lengths = pad_questions([[2, 3], [4, 5, 6, 7], [8]])
    np.testing.assert_array_equal(matrix, [[2, 3, 0, 0], [4, 5, 6, 7], [8, 0, 0, 0]])
    assert matrix.dtype == np.int32 and lengths.dtype == np.int32 and lengths.tolist() == [2, 4, 1]


def test_written_vocabulary_loads_back_identical_with_its_file_hash(tmp_path):
    built = Vocabulary.build(TRAIN_TOKENS, [r["answer"] for r in MSVD_TRAIN], answer_top=3)
    path = tmp_path / "x_vocab.json"
    path.write_bytes(built.json_bytes())
    assert set(json.loads(path.read_text())) == {"question_token_to_idx", "answer_token_to_idx",
                                                 "question_answer_token_to_idx"}
    loaded = Vocabulary.load(str(path))
    assert loaded.json_bytes() == built.json_bytes() and loaded.idx_to_question_token == QUESTION_VOCAB
    assert loaded.info() == {"question_size": len(QUESTION_VOCAB), "answer_size": 5,
                             "sha256": vqakd.core.files.file_sha256(str(path)), "path": str(path)}
    path.write_text(json.dumps({**json.loads(built.json_bytes()), "answer_token_to_idx": {"<UNK0>": 0, "cook": 2}}))
    with pytest.raises(UserError, match="answer_token_to_idx: indices must be 0..1, each used once"):
        Vocabulary.load(str(path))


def test_msvd_end_to_end(msvd, capsys):
    ann, glove, out = msvd
    assert preprocess_main(["--dataset", "msvd-qa", "--annotation-dir", str(ann), "--out-dir", str(out),
                            "--glove", str(glove), "--mode", "all", "--answer-top", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[0].startswith("msvd-qa train: 7 questions (max length 6)")

    vocab = json.loads((out / "msvd-qa_vocab.json").read_text())
    assert set(vocab) == {"question_token_to_idx", "answer_token_to_idx", "question_answer_token_to_idx"}
    assert list(vocab["question_token_to_idx"]) == QUESTION_VOCAB
    q_index = vocab["question_token_to_idx"]

    with open(out / "msvd-qa_train_questions.pt", "rb") as handle:
        raw = pickle.load(handle)
    assert list(raw) == ["questions", "questions_len", "question_id", "video_ids", "video_names", "answers",
                         "glove", "record_id", "clip_names", "question_text", "answer_text", "vocab_sha256"]
    assert raw["questions"].dtype == np.int32 and raw["questions_len"].dtype == np.int32
    assert raw["questions"].shape == (7, 6)                                  # padded to the longest (6 tokens)
    for row, tokens in zip(raw["questions"], TRAIN_TOKENS):
        assert row.tolist() == [q_index[t] for t in tokens] + [0] * (6 - len(tokens))
    assert raw["questions_len"].tolist() == [len(t) for t in TRAIN_TOKENS]
    # cook=2, man=3, onion=4; guitar and woman are outside the top 3 -> 0 in train.
    assert raw["answers"] == [2, 3, 4, 3, 2, 0, 0]
    assert raw["question_id"] == [0, 1, 2, 3, 4, 5, 6]
    assert raw["video_ids"].tolist() == [3, 1, 3, 1, 7, 7, 3]
    np.testing.assert_array_equal(raw["video_names"], raw["video_ids"])
    assert raw["record_id"] == [0, 1, 2, 3, 4, 5, 6]
    assert raw["clip_names"] == ["clipB_2_9", "clipA_1_5", "clipB_2_9", "clipA_1_5", "clipC_0_4", "clipC_0_4",
                                 "clipB_2_9"]
    assert raw["question_text"] == [r["question"] for r in MSVD_TRAIN]
    assert raw["answer_text"] == [r["answer"] for r in MSVD_TRAIN]
    glove_rows = raw["glove"]
    assert glove_rows.dtype == np.float32 and glove_rows.shape == (len(QUESTION_VOCAB), DIM)
    for token, index in q_index.items():
        expected = GLOVE_WORDS.get(token, 0.0)                               # zero row for words GloVe lacks
        np.testing.assert_array_equal(glove_rows[index], np.full(DIM, expected, np.float32))

    sizes = len(q_index), len(vocab["answer_token_to_idx"])
    val = load_question_file(out / "msvd-qa_val_questions.pt", *sizes)
    # 'slicing' and 'cooks' are not train words -> <UNK>=1; padded to the longest val question (5 tokens).
    assert val["questions"].tolist() == [[2, 3, 4, 16, 1], [7, 1, 0, 0, 0]]
    assert val["questions_len"].tolist() == [5, 2]
    assert val["answers"].tolist() == [1, 3]                                 # unknown val answer -> 1
    assert val["glove"] is None and val["clip_names"] == ["clipA_1_5", "clipC_0_4"]
    assert val["question_id"] == [0, 1] and val["record_id"] == [7, 8]       # running index; the records' ids
    test = load_question_file(out / "msvd-qa_test_questions.pt", *sizes)
    assert test["answers"].tolist() == [1] and test["question_id"] == [0] and test["record_id"] == [9]

    train = load_question_file(out / "msvd-qa_train_questions.pt", *sizes)
    assert train["glove"].shape == (len(QUESTION_VOCAB), DIM)
    summary = json.loads((out / "msvd-qa_train_summary.json").read_text())
    assert summary["questions"] == 7 and summary["answer_coverage"] == pytest.approx(5 / 7)
    assert summary["glove_coverage"] == pytest.approx(8 / 18)                # 8 of the 18 real words
    val_summary = json.loads((out / "msvd-qa_val_summary.json").read_text())
    assert val_summary["answer_coverage"] == 0.5 and val_summary["unknown_token_rate"] == pytest.approx(2 / 7)


def test_msrvtt_script_as_a_user_runs_it(tmp_path):
    ann = tmp_path / "msrvtt"
    ann.mkdir()
    records = [{"question": "what is a man doing?", "answer": "cook", "video_id": 5, "id": 0, "category_id": 3},
               {"question": "who sings?", "answer": "woman", "video_id": 9, "id": 1, "category_id": 2}]
    write_json(ann / "train_qa.json", records)
    write_json(ann / "val_qa.json", records[:1])
    write_json(ann / "test_qa.json", [{"question": "who dances?", "answer": "girl", "video_id": 7012, "id": 2,
                                       "category_id": 1}])
    glove_txt = tmp_path / "glove.txt"                       # the GloVe text file, read for the vocab words only
    glove_txt.write_text("what 1 1 1 1\nman 2 2 2 2\nzebra 3 3 3 3\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "preprocess", "preprocess_questions.py"),
                           "--dataset", "msrvtt-qa", "--annotation_dir", str(ann), "--glove_pt", str(glove_txt),
                           "--mode", "all", "--answer_top", "4000"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "msrvtt-qa train: 2 questions" in proc.stdout and "GloVe coverage 28.57%" in proc.stdout
    out = tmp_path / "data" / "msrvtt-qa"                    # the default --out-dir, relative to the cwd
    vocab = Vocabulary.load(str(out / "msrvtt-qa_vocab.json"))
    sizes = vocab.question_size, vocab.answer_size
    train = load_question_file(out / "msrvtt-qa_train_questions.pt", *sizes)
    assert train["clip_names"] == ["video5", "video9"] and train["video_ids"].tolist() == [5, 9]
    assert train["glove"][2].tolist() == [1, 1, 1, 1] and train["glove"][5].tolist() == [2, 2, 2, 2]
    test = load_question_file(out / "msrvtt-qa_test_questions.pt", *sizes)
    assert test["clip_names"] == ["video7012"] and test["answers"].tolist() == [1]


def test_hcrn_style_paths(msvd):
    ann, glove, out = msvd
    template = str(out / "{}" / "{}_{}_q.pt")
    assert preprocess_main(["--dataset", "msvd-qa", "--annotation-dir", str(ann), "--glove", str(glove),
                            "--output_pt", template, "--vocab_json", str(out / "{}_vocab.json"),
                            "--mode", "train", "--no-progress"]) == 0
    assert (out / "msvd-qa" / "msvd-qa_train_q.pt").is_file() and (out / "msvd-qa_vocab.json").is_file()


# ---------------------------------------------------------------- bad input: one line, no output

@pytest.mark.parametrize("split_file, content, fragments", [
    ("train_qa.json", None, ["annotation file not found", "train_qa.json"]),
    ("train_qa.json", "[{\"question\": ", ["train_qa.json", "invalid JSON at line 1"]),
    ("train_qa.json", json.dumps(MSVD_TRAIN[:2] + [{"answer": "x", "video_id": 1, "id": 11}]),
     ["train_qa.json", "record 2 (id 11) has no question"]),
    ("train_qa.json", json.dumps([{"question": "who?", "video_id": 1, "id": 12}]),
     ["train_qa.json", "record 0 (id 12) has no answer"]),
    ("train_qa.json", json.dumps([{"question": "who?", "answer": "man", "id": 13}]),
     ["train_qa.json", "record 0 (id 13) has no video_id"]),
    ("train_qa.json", "[]", ["train_qa.json", "the train split has no QA records"]),
    ("train_qa.json", json.dumps(MSVD_TRAIN[:1] + [{"question": "?", "answer": "man", "video_id": 1, "id": 14}]),
     ["train_qa.json", "record 1 (id 14)", "question '?' has no tokens"]),
    ("train_qa.json", json.dumps([{"question": "who?", "answer": "man", "video_id": 99, "id": 15}]),
     ["train_qa.json", "record 0 (id 15)", "video_id 99", "youtube_mapping.txt"]),
])
def test_bad_annotations(msvd, capsys, split_file, content, fragments):
    ann, glove, out = msvd
    if content is None:
        os.remove(ann / split_file)
    else:
        (ann / split_file).write_text(content)
    code, err = cli(["--dataset", "msvd-qa", "--annotation-dir", str(ann), "--out-dir", str(out),
                     "--glove", str(glove), "--mode", "train"], capsys)
    assert_one_line_error(code, err, *fragments)
    assert os.listdir(out) == []


def test_bad_val_split_leaves_train_outputs_but_no_val_file(msvd, capsys):
    ann, glove, out = msvd
    (ann / "val_qa.json").write_text(json.dumps([{"question": "!", "answer": "man", "video_id": 1, "id": 20}]))
    code, err = cli(["--dataset", "msvd-qa", "--annotation-dir", str(ann), "--out-dir", str(out),
                     "--glove", str(glove), "--mode", "all"], capsys)
    assert_one_line_error(code, err, "val_qa.json", "record 0 (id 20)", "has no tokens")
    assert sorted(os.listdir(out)) == ["msvd-qa_train_questions.pt", "msvd-qa_train_summary.json",
                                       "msvd-qa_vocab.json"]


@pytest.mark.parametrize("mode", ["val", "test"])
def test_val_or_test_before_train(msvd, capsys, mode):
    ann, glove, out = msvd
    code, err = cli(["--dataset", "msvd-qa", "--annotation-dir", str(ann), "--out-dir", str(out),
                     "--mode", mode], capsys)
    assert_one_line_error(code, err, "vocabulary file not found", "msvd-qa_vocab.json", "--mode train")
    assert os.listdir(out) == []


def test_missing_glove_and_bad_vocab(msvd, capsys):
    ann, glove, out = msvd
    code, err = cli(["--dataset", "msvd-qa", "--annotation-dir", str(ann), "--out-dir", str(out),
                     "--glove", str(out / "nope.pkl"), "--mode", "train"], capsys)
    assert_one_line_error(code, err, "GloVe file not found", "nope.pkl", "txt2pickle.py")
    (out / "msvd-qa_vocab.json").write_text('{"question_token_to_idx": {"<NULL>": 0}}')
    code, err = cli(["--dataset", "msvd-qa", "--annotation-dir", str(ann), "--out-dir", str(out),
                     "--mode", "val"], capsys)
    assert_one_line_error(code, err, "msvd-qa_vocab.json", "no answer_token_to_idx")
    assert os.listdir(out) == ["msvd-qa_vocab.json"]


def test_failing_mid_write_leaves_no_file(msvd, monkeypatch):
    ann, glove, out = msvd

    def dump_half_then_die(obj, handle, protocol=None):
        handle.write(pickle.dumps(obj)[:40])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vqakd.core.files.pickle, "dump", dump_half_then_die)
    with pytest.raises(OSError):
        preprocess_main(["--dataset", "msvd-qa", "--annotation-dir", str(ann), "--out-dir", str(out),
                         "--glove", str(glove), "--mode", "train", "--no-progress"])
    assert os.listdir(out) == []


# ---------------------------------------------------------------- the checked reader

def good_question_file():
    return {"questions": np.array([[2, 3, 0], [4, 5, 6]], np.int32), "questions_len": np.array([2, 3], np.int32),
            "question_id": [0, 1], "video_ids": np.array([3, 1]), "video_names": ["a", "b"],
            "answers": [2, 0], "glove": np.zeros((7, 4), np.float32)}


def test_reader_accepts_hcrn_written_files(tmp_path):
    # HCRN wrote video_names as a numpy array (of the ids) and had no question_text.
    obj = dict(good_question_file(), video_names=np.array([3, 1]))
    path = tmp_path / "hcrn.pt"
    path.write_bytes(pickle.dumps(obj))
    data = load_question_file(path, question_vocab_size=7, answer_vocab_size=3)
    assert data["video_names"] == ["3", "1"] and data["question_text"] is None
    assert data["record_id"] is None and data["clip_names"] is None
    assert data["answers"].tolist() == [2, 0] and data["questions"].dtype == np.int64


def test_reader_returns_our_extra_keys(tmp_path):
    obj = dict(good_question_file(), record_id=[17, 4], clip_names=["clipX", "clipY"], question_text=["a?", "b?"])
    path = tmp_path / "ours.pt"
    path.write_bytes(pickle.dumps(obj))
    data = load_question_file(path, 7, 3)
    assert data["question_id"] == [0, 1] and data["record_id"] == [17, 4]
    assert data["clip_names"] == ["clipX", "clipY"] and data["question_text"] == ["a?", "b?"]


@pytest.mark.parametrize("change, message", [
    ({"questions": np.array([2, 3])}, "questions must be a 2-D integer array"),
    ({"questions": np.array([[2.0, 3.0], [1.0, 1.0]])}, "questions must be a 2-D integer array"),
    ({"questions_len": np.array([2, 4])}, "question 1: length 4 is outside 1..3"),
    ({"questions_len": np.array([0, 3])}, "question 0: length 0 is outside 1..3"),
    ({"answers": [2]}, "answers has 1 entries but questions has 2 rows"),
    ({"video_names": ["a"]}, "video_names has 1 entries but questions has 2 rows"),
    ({"record_id": [5]}, "record_id has 1 entries but questions has 2 rows"),
    ({"clip_names": "ab"}, "clip_names must be a list"),
    ({"video_ids": np.array(["x", "y"])}, "video_ids must be a 1-D integer array"),
    ({"answers": [2, 5]}, "question 1: answer label 5 is outside the answer vocabulary (0..2)"),
    ({"questions": np.array([[2, 9, 0], [4, 5, 6]])}, "question 0: token index outside the question vocabulary"),
    ({"glove": np.zeros((7,), np.float32)}, "glove must be a 2-D float array"),
    ({"glove": np.zeros((6, 4), np.float32)}, "glove has 6 rows but the question vocabulary has 7"),
    ({"glove": np.full((7, 4), np.nan, np.float32)}, "glove holds non-finite values"),
    ({"questions_len": None}, "questions_len must be a 1-D integer array"),
])
def test_reader_refuses_bad_files(tmp_path, change, message):
    path = tmp_path / "bad_questions.pt"
    path.write_bytes(pickle.dumps(dict(good_question_file(), **change)))
    with pytest.raises(UserError) as exc:
        load_question_file(path, question_vocab_size=7, answer_vocab_size=3)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value)


def test_reader_refuses_code_and_other_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(dict(good_question_file(), answers=Evil())))
    with pytest.raises(UserError, match=r"evil.pt: refusing to unpickle (posix|os|nt)\.system"):
        load_question_file(evil, 7, 3)
    listing = tmp_path / "list.pt"
    listing.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(UserError, match="list.pt: expected a dict"):
        load_question_file(listing, 7, 3)
    missing = tmp_path / "missing.pt"
    missing.write_bytes(pickle.dumps({"questions": np.zeros((1, 1), np.int32)}))
    with pytest.raises(UserError, match="missing.pt: missing questions_len, question_id"):
        load_question_file(missing, 7, 3)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(pickle.dumps(good_question_file())[:60])
    with pytest.raises(UserError, match="truncated.pt: not a readable pickle"):
        load_question_file(truncated, 7, 3)


# ---------------------------------------------------------------- fuzzing

VOCAB = Vocabulary.build(TRAIN_TOKENS, [r["answer"] for r in MSVD_TRAIN])

question_strings = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.characters(categories=["P", "S", "Z"]), max_size=40),    # punctuation/symbols/spaces
    st.builds(lambda words, tail: " ".join(words) + tail,
              st.lists(st.sampled_from(QUESTION_VOCAB[2:] + ["zebra", "çà", "日本", "n't"]), max_size=30),
              st.sampled_from(["?", "", ".", "!?", " "])),
    st.text(min_size=2000, max_size=3000),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(questions=st.lists(question_strings, min_size=1, max_size=4))
def test_fuzz_tokenize_and_encode(questions):
    encoded = []
    for index, question in enumerate(questions):
        try:
            tokens = record_tokens(question, "fuzz_qa.json", index, index)
        except UserError as exc:
            assert tokenize_question(question) == []
            assert str(exc).startswith(f"fuzz_qa.json: record {index} (id {index}): question ")
            assert "\n" not in str(exc).replace(repr(question), "")
            continue
        assert tokens and all(isinstance(t, str) and t for t in tokens)
        ids = VOCAB.encode_question(tokens)
        assert len(ids) == len(tokens) and all(0 < i < len(VOCAB.question_token_to_idx) for i in ids)
        encoded.append(ids)
    if encoded:
        matrix, lengths = pad_questions(encoded)
        assert matrix.shape == (len(encoded), max(map(len, encoded)))
        assert (matrix[np.arange(matrix.shape[1]) >= lengths[:, None]] == 0).all()
        assert (matrix[np.arange(matrix.shape[1]) < lengths[:, None]] > 0).all()
