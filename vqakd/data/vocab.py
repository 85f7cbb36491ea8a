"""The question and answer vocabularies (`Vocabulary`), built from the train split by the
preprocessing, written as `{name}_vocab.json`, and loaded with checks for training.

The rules (docs/method.md#question-preprocessing), as HCRN / DualVGR applied them: question vocab
`<NULL>`=0, `<UNK>`=1, then tokens in first-seen order; answer vocab `<UNK0>`=0, `<UNK1>`=1, then
the `answer_top` most frequent train answers (ties in first-seen order); a train answer outside it
is labelled 0, a val/test one 1 (never predicted, so wrong). The file is written with the
original's `json.dump(..., indent=4)`, so it is byte-identical (docs/method.md#vocabulary-file).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Optional, Sequence

from vqakd.core.errors import UserError, require_file
from vqakd.core.files import file_sha256, read_json

NULL_TOKEN, UNK_TOKEN = "<NULL>", "<UNK>"
NULL_INDEX, UNK_INDEX = 0, 1
TRAIN_UNKNOWN_ANSWER = 0      # label of a train answer outside the answer vocab (`<UNK0>`)
EVAL_UNKNOWN_ANSWER = 1       # label of a val/test answer outside it (`<UNK1>`): never predicted
ANSWER_SPECIALS = ("<UNK0>", "<UNK1>")
DEFAULT_ANSWER_TOP = 4000
VOCAB_KEYS = ("question_token_to_idx", "answer_token_to_idx", "question_answer_token_to_idx")
# The question vocabulary starts with these; for MSVD-QA and MSRVTT-QA they are all the original
# writes to question_answer_token_to_idx (HCRN's TGIF-QA preprocessing fills it with words and answers).
QUESTION_SPECIALS = {NULL_TOKEN: NULL_INDEX, UNK_TOKEN: UNK_INDEX}


@dataclass
class Vocabulary:
    """Token -> index tables of the questions and answers, their inverses, and (when read from a
    file) that file's path and sha256."""
    question_token_to_idx: dict[str, int]
    answer_token_to_idx: dict[str, int]
    question_answer_token_to_idx: dict[str, int] = field(default_factory=dict)
    path: Optional[str] = None
    sha256: Optional[str] = None
    idx_to_question_token: list[str] = field(init=False, repr=False, compare=False)
    idx_to_answer: list[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The indices are 0..n-1, each used once (built so, or checked by `load`).
        self.idx_to_question_token = sorted(self.question_token_to_idx, key=self.question_token_to_idx.__getitem__)
        self.idx_to_answer = sorted(self.answer_token_to_idx, key=self.answer_token_to_idx.__getitem__)

    @property
    def question_size(self) -> int:
        return len(self.question_token_to_idx)

    @property
    def answer_size(self) -> int:
        return len(self.answer_token_to_idx)

    def encode_question(self, tokens: Sequence[str]) -> list[int]:
        """Token indices of one question; a word outside the vocab is `<UNK>`."""
        return [self.question_token_to_idx.get(token, UNK_INDEX) for token in tokens]

    def answer_label(self, answer: str, split: str) -> int:
        """The class label of `answer`; outside the vocab: 0 for train, 1 (never predicted) otherwise."""
        unknown = TRAIN_UNKNOWN_ANSWER if split == "train" else EVAL_UNKNOWN_ANSWER
        return self.answer_token_to_idx.get(answer, unknown)

    def json_bytes(self) -> bytes:
        """The file's exact bytes: what the original's `json.dump(vocab, f, indent=4)` writes."""
        return json.dumps({key: getattr(self, key) for key in VOCAB_KEYS}, indent=4).encode("ascii")

    def info(self) -> dict[str, Any]:
        """What a checkpoint records about the vocabulary it was trained with."""
        return {"question_size": self.question_size, "answer_size": self.answer_size, "sha256": self.sha256,
                "path": self.path}

    @classmethod
    def build(cls, questions_tokens: Sequence[Sequence[str]], answers: Sequence[str],
              answer_top: int = DEFAULT_ANSWER_TOP) -> "Vocabulary":
        """Train-split vocabularies from the tokenized questions and the raw answers."""
        question_token_to_idx = dict(QUESTION_SPECIALS)
        for token in chain.from_iterable(questions_tokens):          # new words in first-seen order
            question_token_to_idx.setdefault(token, len(question_token_to_idx))
        answer_token_to_idx = {special: index for index, special in enumerate(ANSWER_SPECIALS)}
        for answer, _count in Counter(answers).most_common(answer_top):
            answer_token_to_idx.setdefault(answer, len(answer_token_to_idx))
        return cls(question_token_to_idx, answer_token_to_idx, dict(QUESTION_SPECIALS))

    @classmethod
    def load(cls, path: str) -> "Vocabulary":
        """Read and check a `{name}_vocab.json` (ours or one written by HCRN/DualVGR)."""
        require_file(path, "vocabulary file", "make it with preprocess/preprocess_questions.py --mode train (the "
                     "train split builds the vocabulary that val and test are encoded with)")
        data = read_json(path)
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object with {', '.join(VOCAB_KEYS)}")
        question, answer = (_check_index_table(data.get(key), path, key) for key in VOCAB_KEYS[:2])
        if any(question.get(token) != index for token, index in QUESTION_SPECIALS.items()):
            raise UserError(f"{path}: question_token_to_idx must map {NULL_TOKEN} to 0 and {UNK_TOKEN} to 1")
        combined = data.get("question_answer_token_to_idx") or {}
        if not isinstance(combined, dict):
            raise UserError(f"{path}: question_answer_token_to_idx must be an object")
        return cls(question, answer, combined, path=path, sha256=file_sha256(path))


def _check_index_table(table: object, path: str, key: str) -> dict[str, int]:
    if table is None:
        raise UserError(f"{path}: no {key}; not a vocabulary file of this format")
    if not isinstance(table, dict) or not table:
        raise UserError(f"{path}: {key} must be a non-empty object mapping tokens to indices")
    for token, index in table.items():
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise UserError(f"{path}: {key}: token {token!r} has index {index!r}, expected an integer >= 0")
    if sorted(table.values()) != list(range(len(table))):
        raise UserError(f"{path}: {key}: indices must be 0..{len(table) - 1}, each used once")
    return table
