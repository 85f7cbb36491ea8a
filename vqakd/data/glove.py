"""GloVe word vectors: stream-parse the published text file, load the pickles made from it.

A text line is `token v1 ... vD`, fields separated by single ASCII spaces; a token may itself hold
spaces (or other Unicode whitespace), so a line is split from the right. A pickle (`txt2pickle.py`,
or HCRN's pandas script) is `{word: 1-D float array}`, read with the restricted unpickler.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice, takewhile
from typing import Collection

import numpy as np

from vqakd.core.errors import UserError, require_file
from vqakd.core.progress import progress_bar
from vqakd.core.files import read_json, read_text
from vqakd.core.safe_pickle import safe_load

UTF8_BOM = b"\xef\xbb\xbf"
MAX_TOKEN_SHOWN = 60
# Without --dim, the vector size is the most common one among the first lines (not just the
# first line's, whose token might itself hold a space).
DIM_SAMPLE_LINES = 1000
# GloVe's own tools (vocab_count.c, MAX_STRING_LENGTH) never emit a token this long; a longer
# "token" is almost always two lines run together (a lost newline), so the line is skipped.
MAX_TOKEN_BYTES = 1000


@dataclass
class GloveReadStats:
    dim: int = 0
    lines: int = 0            # non-blank lines read
    duplicates: int = 0       # kept lines whose token had already been seen (the later line wins)
    missing: list[str] = field(default_factory=list)   # words of the keep set absent from the file
    long_tokens: int = 0      # lines skipped because their token is longer than MAX_TOKEN_BYTES
    first_long_line: int = 0  # the first such line (1-based), 0 if none

    def long_token_note(self) -> str:
        """One phrase for the summary line, when lines were skipped."""
        return (f"{self.long_tokens} line(s) skipped whose token is longer than {MAX_TOKEN_BYTES} bytes "
                f"(first at line {self.first_long_line}; probably lines run together)")


def _shown(token: bytes | str) -> str:
    text = token.decode("utf-8", "replace") if isinstance(token, bytes) else token
    return repr(text if len(text) <= MAX_TOKEN_SHOWN else text[:MAX_TOKEN_SHOWN] + "...")


def _is_float(text: bytes) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def infer_dim(path: str) -> int | None:
    """The most common count of trailing numeric fields among the first lines (the first field is
    always the token, so one holding spaces does not count; on a tie the first seen wins); None for
    an empty file."""
    with open(path, "rb") as handle:
        lines = islice(filter(None, (raw.rstrip() for raw in handle)), DIM_SAMPLE_LINES)     # the first non-blank
        counts = Counter(len(list(takewhile(_is_float, reversed(line.split(b" ")[1:])))) for line in lines)
    return max(counts, key=counts.__getitem__) if counts else None


def read_glove_text(path: str | os.PathLike, dim: int | None = None, keep: Collection[str] | None = None,
                    progress: bool = True) -> tuple[dict[str, np.ndarray], GloveReadStats]:
    """Parse a GloVe text file into `{word: float32 (dim,)}`, and the reading statistics. `dim`
    (None: `infer_dim`) is the vector size every line must have; with `keep`, only those words are
    parsed and returned. A token seen twice keeps its later vector."""
    path = require_file(path, "GloVe text file", "download glove.840B.300d.zip from "
                        "https://nlp.stanford.edu/projects/glove/ and unzip it")
    if dim is not None and dim < 1:
        raise UserError(f"the GloVe vector size must be positive, got {dim}")
    keep_bytes = None if keep is None else {word.encode("utf-8") for word in keep}
    dim_source = "--dim" if dim is not None else "the first lines of the file; pass --dim to set it"
    if dim is None:
        dim = infer_dim(path)
        if dim is None:
            raise UserError(f"{path}: the GloVe file is empty (no word vectors in it)")
        if dim < 1:
            raise UserError(f"{path}: the first lines hold tokens without vector values; is this a GloVe file?")
    stats = GloveReadStats(dim=dim)
    words: dict[str, np.ndarray] = {}
    bar = progress_bar(total=os.path.getsize(path), unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"reading {os.path.basename(path)}", enabled=progress, dynamic_ncols=True)
    with open(path, "rb") as handle, bar:
        for line_no, raw in enumerate(handle, 1):
            bar.update(len(raw))          # about 1 us, against 100 us to parse a line
            line = raw.rstrip()
            if line_no == 1 and line.startswith(UTF8_BOM):
                line = line[len(UTF8_BOM):]
            if not line:
                continue
            spaces = line.count(b" ")
            stats.lines += 1
            if spaces < dim:
                token = line.split(b" ", 1)[0]
                raise UserError(f"{path}: line {line_no}: token {_shown(token)}: vector has {spaces} values, "
                                f"expected {dim} (the size set by {dim_source})")
            # The token is everything before the last `dim` fields (it may hold spaces).
            cut = line.find(b" ") if spaces == dim else len(line.rsplit(b" ", dim)[0])
            token_bytes = line[:cut]
            if cut > MAX_TOKEN_BYTES:
                stats.long_tokens += 1
                stats.first_long_line = stats.first_long_line or line_no
                continue
            if keep_bytes is not None and token_bytes not in keep_bytes:
                continue
            try:
                token = token_bytes.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}: line {line_no}: the token is not UTF-8 text: {_shown(token_bytes)}") from None
            if not token:
                raise UserError(f"{path}: line {line_no}: empty token (the line starts with a space)")
            values = line[cut + 1:].split(b" ")
            try:
                # As fast per line as np.loadtxt over many lines, and bit-identical to it.
                vector = np.array(values, dtype=np.float32)
            except ValueError:
                bad = next(value for value in values if not _is_float(value))
                raise UserError(f"{path}: line {line_no}: token {_shown(token)}: non-numeric value "
                                f"{_shown(bad)} in the vector") from None
            if not np.isfinite(vector).all():
                raise UserError(f"{path}: line {line_no}: token {_shown(token)}: the vector holds a non-finite "
                                "value (nan or inf)")
            stats.duplicates += token in words
            words[token] = vector
    if not stats.lines:
        raise UserError(f"{path}: the GloVe file is empty (no word vectors in it)")
    if keep is not None:
        stats.missing = [word for word in keep if word not in words]
    return words, stats


def load_glove_pickle(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], int]:
    """`{word: vector}` from a GloVe pickle (restricted unpickler, checked), and how many keys
    that are not words were dropped, with a warning on stderr (HCRN's pandas script turns tokens
    such as `null` or `nan` into one NaN key): no word can match them, but one key must be a word."""
    path = require_file(path, "GloVe pickle", "make it with `python txt2pickle.py --glove glove.840B.300d.txt "
                        "--out <pkl>`")
    glove = safe_load(path)
    if not isinstance(glove, dict):
        raise UserError(f"{path}: expected a dict of word -> vector, found {type(glove).__name__}")
    if not glove:
        raise UserError(f"{path}: the GloVe dict is empty")
    dropped = [key for key in glove if not isinstance(key, str)]      # pandas' NaN for `null`/`nan`
    words = {key: vector for key, vector in glove.items() if isinstance(key, str)}
    if not words:
        raise UserError(f"{path}: no key is a word: {len(glove)} key(s) such as {dropped[0]!r} "
                        f"({type(dropped[0]).__name__}), expected str")
    first = next(iter(words))
    for word, vector in words.items():
        if not isinstance(vector, np.ndarray) or vector.ndim != 1 or vector.dtype.kind not in "fiu":
            what = (f"array of shape {vector.shape} and dtype {vector.dtype}" if isinstance(vector, np.ndarray)
                    else type(vector).__name__)
            raise UserError(f"{path}: word {_shown(word)}: expected a 1-D numeric vector, found {what}")
        if vector.shape[0] != words[first].shape[0]:
            raise UserError(f"{path}: word {_shown(word)} has a vector of size {vector.shape[0]}, "
                            f"expected {words[first].shape[0]} (the size of {_shown(first)})")
    if dropped:
        shown = ", ".join(repr(key) for key in dropped[:3]) + (", ..." if len(dropped) > 3 else "")
        print(f"warning: {path}: skipped {len(dropped)} key(s) that are not words ({shown}); pandas-based "
              "converters read tokens such as 'null' and 'nan' as missing values, so those words get a "
              "zero vector, as in the original preprocessing", file=sys.stderr, flush=True)
    return words, len(dropped)


def read_word_list(path: str | os.PathLike) -> list[str]:
    """The words a GloVe subset must keep: a `{name}_vocab.json` or a text file, one word a line."""
    path = require_file(path, "vocabulary file")
    if path.endswith(".json"):
        vocab = read_json(path)
        tables = [key for key in ("question_token_to_idx", "question_answer_token_to_idx")
                  if isinstance(vocab, dict) and isinstance(vocab.get(key), dict)]
        if not tables:
            raise UserError(f"{path}: expected a vocab JSON with question_token_to_idx or "
                            "question_answer_token_to_idx")
        return list(dict.fromkeys(word for key in tables for word in vocab[key]))
    return list(dict.fromkeys(line for line in read_text(path).split("\n") if line.strip()))
