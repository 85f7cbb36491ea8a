"""The vocabulary and question files equal, key by key, what the original VQAKD / DualVGR / HCRN
question preprocessing writes for MSVD-QA and MSRVTT-QA from the same annotations and GloVe pickle.

`original_files` below re-states the original's rules on its own (no toolkit code): the files
are compared in types, dtypes, shapes, values and key order, and the vocabulary byte by byte.
The GloVe pickle is made as the original's pandas-based converter makes them: the word `null`
is not in it, a float NaN key is.
"""

import json
import pickle
from collections import Counter

import numpy as np
import pytest
from nltk.tokenize import NLTKWordTokenizer

from preprocess.preprocess_questions import main as preprocess_main

DIM = 5
ORIGINAL_KEYS = ["questions", "questions_len", "question_id", "video_ids", "video_names", "answers", "glove"]

MSVD = {
    "train": [
        {"question": "what is a man doing?", "answer": "cook", "video_id": 12, "id": 100},
        {"question": "Who's slicing the null tomato?", "answer": "woman", "video_id": 3, "id": 41},
        {"question": "what does the café owner pour?", "answer": "coffee", "video_id": 12, "id": 7},
        {"question": "who is cooking?", "answer": "man", "video_id": 5, "id": 8},
        {"question": "what is a woman cutting?", "answer": "onion", "video_id": 3, "id": 9},
        {"question": "what is the man doing?", "answer": "cook", "video_id": 5, "id": 10},
        {"question": "who plays", "answer": "man", "video_id": 12, "id": 11},   # no '?': the 's' goes
    ],
    "val": [
        {"question": "what is a zebra eating?", "answer": "grass", "video_id": 5, "id": 300},
        {"question": "who cooks?", "answer": "cook", "video_id": 3, "id": 301},
    ],
    "test": [{"question": "what is the woman slicing?", "answer": "tomato", "video_id": 12, "id": 512}],
}
MSVD_MAPPING = "-4wsuPCjDBc_5_15 vid3\nzzit5b_-ukg_5_20 vid5\n0lh_UWF9ZP4_62_69 vid12\n"

MSRVTT = {
    "train": [
        {"question": "what is a man singing?", "answer": "song", "video_id": 0, "id": 0, "category_id": 2},
        {"question": "who is talking about a car?", "answer": "man", "video_id": 4, "id": 1, "category_id": 3},
        {"question": "what are people doing?", "answer": "dance", "video_id": 4, "id": 2, "category_id": 1},
        {"question": "what is shown?", "answer": "car", "video_id": 6512, "id": 3, "category_id": 0},
    ],
    "val": [{"question": "who sings a song?", "answer": "woman", "video_id": 6600, "id": 4, "category_id": 2}],
    "test": [
        {"question": "what is a man doing in a kitchen?", "answer": "cook", "video_id": 7010, "id": 5,
         "category_id": 5},
        {"question": "who dances?", "answer": "man", "video_id": 9999, "id": 6, "category_id": 1},
    ],
}

GLOVE_WORDS = ["the", "what", "is", "a", "man", "doing", "who", "'s", "tomato", "café", "woman", "car", "song"]


def pandas_style_glove():
    """As the original's pandas converter leaves it: float64 vectors, `null` (and `nan`, ...) as one NaN key."""
    glove = {word: np.arange(DIM, dtype=np.float64) + 10 * index for index, word in enumerate(GLOVE_WORDS)}
    glove[float("nan")] = np.full(DIM, -7.0)
    return glove


# ---------------------------------------------------------------- the original's rules, re-stated

def original_tokens(question):
    # The original calls nltk.word_tokenize, which needs the downloadable punkt data; for one
    # sentence the Treebank-style word tokenizer alone gives the same tokens.
    return NLTKWordTokenizer().tokenize(question.lower()[:-1])


def original_files(splits, glove, answer_top):
    """(vocabulary file text, {split: question-file object}) as the original writes them."""
    train = splits["train"]
    answer_counts = {}
    for record in train:
        answer_counts[record["answer"]] = answer_counts.get(record["answer"], 0) + 1
    answer_token_to_idx = {"<UNK0>": 0, "<UNK1>": 1}
    for answer, _ in Counter(answer_counts).most_common(answer_top):
        answer_token_to_idx[answer] = len(answer_token_to_idx)
    question_token_to_idx = {"<NULL>": 0, "<UNK>": 1}
    for record in train:
        for token in original_tokens(record["question"]):
            question_token_to_idx.setdefault(token, len(question_token_to_idx))
    vocab = {"question_token_to_idx": question_token_to_idx, "answer_token_to_idx": answer_token_to_idx,
             "question_answer_token_to_idx": {"<NULL>": 0, "<UNK>": 1}}
    vocab_text = json.dumps(vocab, indent=4)

    files = {}
    for split, records in splits.items():
        encoded, lengths, running, video_ids, answers = [], [], [], [], []
        for index, record in enumerate(records):
            tokens = [question_token_to_idx.get(t, 1) for t in original_tokens(record["question"])]
            encoded.append(tokens)
            lengths.append(len(tokens))
            running.append(index)
            video_ids.append(record["video_id"])
            if record["answer"] in answer_token_to_idx:
                answers.append(answer_token_to_idx[record["answer"]])
            else:
                answers.append(0 if split == "train" else 1)
        longest = max(lengths)
        encoded = [tokens + [0] * (longest - len(tokens)) for tokens in encoded]
        matrix = None
        if split == "train":
            by_index = {index: token for token, index in question_token_to_idx.items()}
            size = glove["the"].shape[0]
            matrix = np.asarray([glove.get(by_index[i], np.zeros((size,))) for i in range(len(by_index))],
                                dtype=np.float32)
        files[split] = {"questions": np.asarray(encoded, dtype=np.int32),
                        "questions_len": np.asarray(lengths, dtype=np.int32),
                        "question_id": running, "video_ids": np.asarray(video_ids),
                        "video_names": np.array(video_ids), "answers": answers, "glove": matrix}
    return vocab_text, files


# ---------------------------------------------------------------- comparison

def assert_same_value(ours, original, where):
    assert type(ours) is type(original), (where, type(ours), type(original))
    if isinstance(original, np.ndarray):
        assert ours.dtype == original.dtype and ours.shape == original.shape, (where, ours.dtype, original.dtype)
        np.testing.assert_array_equal(ours, original, err_msg=where)
    elif isinstance(original, list):
        assert len(ours) == len(original), where
        for index, (mine, theirs) in enumerate(zip(ours, original)):
            assert_same_value(mine, theirs, f"{where}[{index}]")
    else:
        assert ours == original, (where, ours, original)


def run_ours(tmp_path, dataset, splits, mapping=None, answer_top=3):
    ann = tmp_path / "annotations"
    ann.mkdir(parents=True)
    for split, records in splits.items():
        (ann / f"{split}_qa.json").write_text(json.dumps(records), encoding="utf-8")
    if mapping is not None:
        (ann / "youtube_mapping.txt").write_text(mapping)
    glove_path = tmp_path / "glove.pkl"
    glove_path.write_bytes(pickle.dumps(pandas_style_glove()))
    out = tmp_path / "out"
    assert preprocess_main(["--dataset", dataset, "--annotation-dir", str(ann), "--out-dir", str(out),
                            "--glove", str(glove_path), "--answer-top", str(answer_top), "--mode", "all",
                            "--no-progress"]) == 0
    files = {}
    for split in splits:
        with open(out / f"{dataset}_{split}_questions.pt", "rb") as handle:
            files[split] = pickle.load(handle)
    return (out / f"{dataset}_vocab.json").read_bytes(), files, json.loads(
        (out / f"{dataset}_train_summary.json").read_text())


@pytest.mark.parametrize("dataset, splits, mapping", [("msvd-qa", MSVD, MSVD_MAPPING),
                                                      ("msrvtt-qa", MSRVTT, None)])
def test_files_equal_the_originals_key_by_key(tmp_path, capsys, dataset, splits, mapping):
    vocab_bytes, ours, summary = run_ours(tmp_path, dataset, splits, mapping)
    vocab_text, original = original_files(splits, pandas_style_glove(), answer_top=3)

    assert vocab_bytes == vocab_text.encode("ascii")                          # byte for byte
    assert list(json.loads(vocab_bytes)["question_answer_token_to_idx"].items()) == [("<NULL>", 0), ("<UNK>", 1)]
    for split in splits:
        mine, theirs = ours[split], original[split]
        assert list(mine)[:len(ORIGINAL_KEYS)] == list(theirs) == ORIGINAL_KEYS
        for key in ORIGINAL_KEYS:
            assert_same_value(mine[key], theirs[key], f"{dataset} {split} {key}")
        # What we add comes after, under keys of its own.
        records = splits[split]
        assert mine["record_id"] == [r["id"] for r in records]
        assert mine["question_text"] == [r["question"] for r in records]
    # The pandas NaN key was dropped and counted; `null` has a zero row, as in the original.
    assert summary["glove_skipped_keys"] == 1
    assert "skipped 1 key(s) that are not words (nan)" in capsys.readouterr().err


def test_clip_names_are_kept_under_their_own_key(tmp_path):
    _, msvd, _ = run_ours(tmp_path / "msvd", "msvd-qa", MSVD, MSVD_MAPPING)
    assert msvd["train"]["clip_names"][:2] == ["0lh_UWF9ZP4_62_69", "-4wsuPCjDBc_5_15"]
    assert msvd["test"]["clip_names"] == ["0lh_UWF9ZP4_62_69"]
    _, msrvtt, _ = run_ours(tmp_path / "msrvtt", "msrvtt-qa", MSRVTT)
    assert msrvtt["test"]["clip_names"] == ["video7010", "video9999"]


def test_the_restated_rules_see_what_they_claim():
    # Guards the reference itself: the cases the annotations were written to exercise do occur.
    vocab_text, files = original_files(MSVD, pandas_style_glove(), answer_top=3)
    train_vocab = json.loads(vocab_text)["question_token_to_idx"]
    assert "null" in train_vocab and "café" in train_vocab and "play" in train_vocab   # "who plays" loses its s
    assert not files["train"]["glove"][train_vocab["null"]].any()             # the NaN key matches nothing
    assert files["train"]["glove"][train_vocab["café"]].any()
    assert 0 in files["train"]["answers"] and files["val"]["answers"][0] == 1  # outside the top 3
    assert 1 in files["val"]["questions"][0]                                  # "zebra": <UNK>
    assert files["val"]["question_id"] == [0, 1] and files["val"]["video_ids"].dtype.kind == "i"
