"""Questions: tokenization, question types, encoding, and the `{name}_{split}_questions.pt` files.

The rules (docs/method.md#question-preprocessing), as HCRN / DualVGR applied them: tokens are
`question.lower()` without its final character through NLTK's Treebank tokenizer; questions are
padded with `<NULL>`=0 to the longest of the split; the train file carries the GloVe matrix (zero
rows for words GloVe lacks). The file holds the original's seven keys with the original's values
and types, then ours: EXTRA_KEYS and `vocab_sha256` (docs/method.md#question-files).
`load_question_file` is the checked reader the training data loader uses.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping, Sequence

import numpy as np

from vqakd.core.progress import progress_bar
from vqakd.data.annotations import clip_name, load_msvd_mapping, load_qa, parse_video_id, qa_path
from vqakd.core.errors import UserError
from vqakd.data.glove import load_glove_pickle, read_glove_text
from vqakd.core.files import atomic_open, write_json, write_pickle
from vqakd.core.safe_pickle import safe_load
from vqakd.data.vocab import NULL_INDEX, NULL_TOKEN, UNK_INDEX, UNK_TOKEN, Vocabulary

# The sha256 of the vocabulary file a question file was encoded with (absent in HCRN/DualVGR files).
VOCAB_SHA256_KEY = "vocab_sha256"
# The original's keys, in its order; ours follow them (EXTRA_KEYS, then VOCAB_SHA256_KEY).
QUESTION_FILE_KEYS = ("questions", "questions_len", "question_id", "video_ids", "video_names", "answers", "glove")
EXTRA_KEYS = ("record_id", "clip_names", "question_text", "answer_text")


# ---------------------------------------------------------------- tokens

# The question types of MSVD-QA and MSRVTT-QA: a question's type is its first token (as
# `tokenize_question` makes it, so "what's" is "what"), every other first token is "other".
QUESTION_TYPES = ("what", "who", "how", "when", "where")
OTHER_TYPE = len(QUESTION_TYPES)            # code of every other first token
TYPE_NAMES = (*QUESTION_TYPES, "other")     # by code


def question_type_code(first_token: str) -> int:
    return QUESTION_TYPES.index(first_token) if first_token in QUESTION_TYPES else OTHER_TYPE


def question_type(question: str) -> str:
    """The type of a question's text, by the same rule the metrics apply to its first token."""
    tokens = tokenize_question(question)
    return TYPE_NAMES[question_type_code(tokens[0] if tokens else "")]


def tokenize_question(question: str) -> list[str]:
    """The tokens of one question (possibly none), as the original preprocessing made them."""
    # Imported here: `import nltk` takes seconds, and readers of question files never tokenize.
    import nltk

    return nltk.word_tokenize(question.lower()[:-1], preserve_line=True)


def record_tokens(question: str, source: str, index: int, record_id: Any) -> list[str]:
    """Tokens of one annotation record's question; a question without any is a UserError."""
    tokens = tokenize_question(question)
    if not tokens:
        raise UserError(f"{source}: record {index} (id {record_id}): question {question!r} has no tokens "
                        "(after lower-casing, dropping its last character and tokenizing)")
    return tokens


# ---------------------------------------------------------------- encoding

def pad_questions(encoded: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(Q, L) int32 padded with <NULL> to the longest question, and the (Q,) int32 lengths."""
    lengths = np.array([len(tokens) for tokens in encoded], dtype=np.int32)
    matrix = np.full((len(encoded), int(lengths.max(initial=0))), NULL_INDEX, dtype=np.int32)
    for row, tokens in enumerate(encoded):
        matrix[row, :len(tokens)] = tokens
    return matrix, lengths


def glove_matrix(glove_source: str, question_token_to_idx: Mapping[str, int],
                 progress: bool = True) -> tuple[np.ndarray, float, int]:
    """The question vocabulary's rows of a GloVe pickle or `.txt` file: (|Q|, D) float32 in vocab
    order, zero for words GloVe lacks (the specials are looked up too, as the original did); the
    share of the vocabulary's words besides <NULL>/<UNK> found; the non-word pickle keys skipped."""
    words = [token for token in question_token_to_idx if token not in (NULL_TOKEN, UNK_TOKEN)]
    if glove_source.endswith(".txt"):       # parsed for the vocabulary's words only
        glove = read_glove_text(glove_source, keep=set(question_token_to_idx), progress=progress)[0]
        skipped_keys = 0
    else:
        glove, skipped_keys = load_glove_pickle(glove_source)
    if not glove:
        raise UserError(f"{glove_source}: none of the {len(words)} question words is in this GloVe file")
    dim = next(iter(glove.values())).shape[0]
    matrix = np.zeros((len(question_token_to_idx), dim), dtype=np.float32)
    for token, index in question_token_to_idx.items():
        if token in glove:
            matrix[index] = glove[token]
    found = sum(word in glove for word in words)
    return matrix, (found / len(words)) if words else 0.0, skipped_keys


# ---------------------------------------------------------------- one split, end to end

def preprocess_split(dataset: str, annotation_dir: str, split: str, questions_out: str, vocab_file: str,
                     summary_out: str, glove_source: str | None, answer_top: int, progress: bool) -> dict[str, Any]:
    """Encode one split; the train split also builds and writes the vocabulary. `glove_source`
    (train only): a GloVe pickle or `.txt` file; None stores `glove: None`. Returns the summary
    that is also written to `summary_out`."""
    if split != "train":
        vocab = Vocabulary.load(vocab_file)   # before the slow work, so a missing vocab fails fast
    source = qa_path(annotation_dir, split)
    records = load_qa(annotation_dir, split, dataset)
    mapping = load_msvd_mapping(annotation_dir) if dataset == "msvd-qa" else {}
    names = [clip_name(dataset, mapping, record, source, index) for index, record in enumerate(records)]
    tokens = [record_tokens(record["question"], source, index, record.get("id", index))
              for index, record in enumerate(progress_bar(records, desc=f"tokenizing {split}", unit="q",
                                                          enabled=progress, dynamic_ncols=True))]
    if split == "train":
        vocab = Vocabulary.build(tokens, [r["answer"] for r in records], answer_top)
        vocab_bytes = vocab.json_bytes()
        vocab.sha256 = hashlib.sha256(vocab_bytes).hexdigest()
    # The question file (docs/method.md#question-files), bound to the exact vocabulary it is encoded
    # with by its sha256 (see check_vocab_binding); `glove` is filled in below.
    questions, lengths = pad_questions([vocab.encode_question(question) for question in tokens])
    # Plain ints (annotations may write "12" or 12.0; load_qa checked they are whole numbers).
    video_ids = [parse_video_id(record["video_id"]) for record in records]
    obj = {
        "questions": questions,
        "questions_len": lengths,
        "question_id": list(range(len(records))),
        # Two arrays made from the same list, with numpy's default integer type, as the original's
        # np.asarray / np.array calls make them.
        "video_ids": np.asarray(video_ids),
        "video_names": np.array(video_ids),
        "answers": [vocab.answer_label(record["answer"], split) for record in records],
        "glove": None,
        "record_id": [record.get("id", index) for index, record in enumerate(records)],
        "clip_names": names,
        "question_text": [record["question"] for record in records],
        # The annotation's answer as written: a label of 0/1 (outside the answer vocabulary)
        # would otherwise lose the truth on the way to the predictions file and the report.
        "answer_text": [record["answer"] for record in records],
        VOCAB_SHA256_KEY: vocab.sha256,
    }
    summary: dict[str, Any] = {
        "dataset": dataset,
        "split": split,
        "annotation_file": source,
        "questions": len(records),
        "max_question_length": int(questions.shape[1]),
        "question_vocab_size": len(vocab.question_token_to_idx),
        "answer_vocab_size": len(vocab.answer_token_to_idx),
        "answer_coverage": float(np.mean([r["answer"] in vocab.answer_token_to_idx for r in records])),
        # Padding is <NULL>, so every <UNK> is a real token.
        "unknown_token_rate": float((questions == UNK_INDEX).sum() / lengths.sum()),
        "questions_file": questions_out,
        "vocab_file": vocab_file,
        VOCAB_SHA256_KEY: vocab.sha256,
    }
    if split == "train" and glove_source is not None:
        obj["glove"], coverage, skipped_keys = glove_matrix(glove_source, vocab.question_token_to_idx, progress)
        summary.update(glove_file=glove_source, glove_dim=int(obj["glove"].shape[1]),
                       glove_coverage=coverage, glove_skipped_keys=skipped_keys)
    elif split == "train":
        summary.update(glove_file=None, glove_dim=None, glove_coverage=None, glove_skipped_keys=None)

    write_pickle(questions_out, obj)
    if split == "train":
        with atomic_open(vocab_file, "wb") as handle:      # exactly the bytes hashed above
            handle.write(vocab_bytes)
    write_json(summary_out, summary)
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    parts = [f"{summary['dataset']} {summary['split']}: {summary['questions']} questions "
             f"(max length {summary['max_question_length']})",
             f"question vocab {summary['question_vocab_size']}",
             f"answer vocab {summary['answer_vocab_size']}",
             f"answer coverage {100 * summary['answer_coverage']:.2f}%"]
    if summary["split"] != "train":
        parts.append(f"unknown tokens {100 * summary['unknown_token_rate']:.2f}%")
    if summary.get("glove_coverage") is not None:
        parts.append(f"GloVe coverage {100 * summary['glove_coverage']:.2f}% of the vocab "
                     f"(dim {summary['glove_dim']})")
        if summary.get("glove_skipped_keys"):
            parts.append(f"{summary['glove_skipped_keys']} non-word GloVe key(s) skipped")
    elif summary["split"] == "train":
        parts.append("no GloVe matrix")
    return ", ".join(parts) + f" -> {summary['questions_file']}"


# ---------------------------------------------------------------- the checked reader

def _int_array(value: Any, path: str, key: str, ndim: int) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        array = None
    if array is None or array.dtype == object or array.ndim != ndim or (
            array.size and array.dtype.kind not in "iu"):
        what = f"array of shape {array.shape} and dtype {array.dtype}" if array is not None else type(value).__name__
        raise UserError(f"{path}: {key} must be a {ndim}-D integer array, found {what}")
    return array.astype(np.int64, copy=False)


def load_question_file(path: str | os.PathLike, question_vocab_size: int,
                       answer_vocab_size: int) -> dict[str, Any]:
    """Read and check a `{name}_{split}_questions.pt` (ours, or one written by HCRN/DualVGR): int64
    arrays, `glove` float32 or None, lists for the rest (EXTRA_KEYS None in files without them).
    The vocabulary sizes bound the token and answer indices."""
    path = os.fspath(path)
    data = safe_load(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a dict of question arrays, found {type(data).__name__}")
    missing = [key for key in QUESTION_FILE_KEYS if key not in data and key != "glove"]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}; not a question file of this format")
    questions = _int_array(data["questions"], path, "questions", 2)
    count, max_len = questions.shape
    if count == 0 or max_len == 0:
        raise UserError(f"{path}: questions has shape {questions.shape}; expected at least one token and question")
    sized = {key: _int_array(data[key], path, key, 1) for key in ("questions_len", "video_ids", "answers")}
    lengths, video_ids, answers = sized["questions_len"], sized["video_ids"], sized["answers"]
    for key in ("question_id", "video_names") + EXTRA_KEYS:
        if data.get(key) is not None:
            if not isinstance(data[key], (list, tuple, np.ndarray)) or np.ndim(data[key]) != 1:
                raise UserError(f"{path}: {key} must be a list, found {type(data[key]).__name__}")
            sized[key] = data[key]
    for key, value in sized.items():
        if len(value) != count:
            raise UserError(f"{path}: {key} has {len(value)} entries but questions has {count} rows")
    bad = np.flatnonzero((lengths < 1) | (lengths > max_len))
    if bad.size:
        raise UserError(f"{path}: question {int(bad[0])}: length {int(lengths[bad[0]])} is outside 1..{max_len}")
    bad = np.flatnonzero(((questions < 0) | (questions >= question_vocab_size)).any(axis=1))
    if bad.size:
        raise UserError(f"{path}: question {int(bad[0])}: token index outside the question vocabulary "
                        f"(0..{question_vocab_size - 1})")
    bad = np.flatnonzero((answers < 0) | (answers >= answer_vocab_size))
    if bad.size:
        raise UserError(f"{path}: question {int(bad[0])}: answer label {int(answers[bad[0]])} is outside "
                        f"the answer vocabulary (0..{answer_vocab_size - 1})")

    glove = data.get("glove")
    if glove is not None:
        if not isinstance(glove, np.ndarray) or glove.ndim != 2 or glove.dtype.kind != "f":
            what = (f"array of shape {glove.shape} and dtype {glove.dtype}" if isinstance(glove, np.ndarray)
                    else type(glove).__name__)
            raise UserError(f"{path}: glove must be a 2-D float array (|Q|, D) or None, found {what}")
        if glove.shape[0] != question_vocab_size:
            raise UserError(f"{path}: glove has {glove.shape[0]} rows but the question vocabulary has "
                            f"{question_vocab_size} words")
        if not np.isfinite(glove).all():
            raise UserError(f"{path}: glove holds non-finite values (row "
                            f"{int(np.flatnonzero(~np.isfinite(glove).all(axis=1))[0])})")
        glove = glove.astype(np.float32, copy=False)

    def listed(key: str, convert: Any = lambda value: value) -> list | None:
        return None if data.get(key) is None else [convert(value) for value in data[key]]

    return {
        "questions": questions,
        "questions_len": lengths,
        "question_id": listed("question_id"),
        "video_ids": video_ids,
        "video_names": listed("video_names", str),
        "answers": answers,
        "glove": glove,
        "record_id": listed("record_id"),
        **{key: listed(key, str) for key in ("clip_names", "question_text", "answer_text")},
        VOCAB_SHA256_KEY: data.get(VOCAB_SHA256_KEY),
    }


# ---------------------------------------------------------------- question file <-> vocabulary

def check_vocab_binding(question_file_obj: Mapping[str, Any], question_path: str, vocab_path: str,
                        vocab_sha256: str) -> None:
    """Refuse a question file (its object, raw or as `load_question_file` returns it) encoded with
    another vocabulary than the one at `vocab_path` (sha256 `vocab_sha256`). Files without the key
    (written by HCRN/DualVGR) are accepted as they are."""
    recorded = question_file_obj.get(VOCAB_SHA256_KEY)
    if recorded is None:
        return
    if not isinstance(recorded, str) or len(recorded) != 64:
        raise UserError(f"{question_path}: {VOCAB_SHA256_KEY} must be a sha256 hex string, found {recorded!r}")
    if recorded.lower() != vocab_sha256.lower():
        raise UserError(f"{question_path} was encoded with another vocabulary than {vocab_path} (vocabulary "
                        f"sha256 {recorded[:12]}... recorded, {vocab_sha256[:12]}... now): its token and answer "
                        f"indices would mean other words; re-encode every split with one vocabulary: "
                        "python preprocess/preprocess_questions.py --dataset <dataset> --annotation-dir <folder> "
                        "--mode all")
