"""GloVe text parsing, GloVe pickles and txt2pickle.py: right vectors, clear errors, atomic output."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import txt2pickle
import vqakd.core.files
from vqakd.core.errors import UserError, run_cli
from vqakd.data.glove import load_glove_pickle, read_glove_text, read_word_list
from vqakd.data.questions import glove_matrix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 5
# Some GloVe 840B tokens hold spaces; only ASCII spaces separate fields (the no-break space
# in "new\u00a0york" belongs to the token).
WORDS = ["the", ",", "what", "is", "a", "man", "doing", "who", "'s", "friend", "guitar", "play",
         "at home", ". . .", "new\u00a0york", "café", "3.5", "woman", "cook", "onion"]


def vector_of(index):
    return np.round(np.linspace(-1, 1, DIM) * (index + 1) / 7, 5).astype(np.float32)


def glove_line(word, vector):
    return word + " " + " ".join(f"{value:.5f}" for value in vector) + "\n"


@pytest.fixture
def glove_txt(tmp_path):
    path = tmp_path / "glove.small.txt"
    path.write_text("".join(glove_line(word, vector_of(i)) for i, word in enumerate(WORDS)), encoding="utf-8")
    return path


def cli(main, argv, capsys):
    """Run an entry point as `run_cli` does; return (exit status, stderr)."""
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main(argv))
    return exc.value.code, capsys.readouterr().err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_parses_every_word_exactly_including_tokens_with_spaces(glove_txt):
    words, stats = read_glove_text(glove_txt, progress=False)
    assert list(words) == WORDS
    assert stats.dim == DIM and stats.lines == len(WORDS) and len(words) == len(WORDS)
    for i, word in enumerate(WORDS):
        assert words[word].dtype == np.float32 and words[word].shape == (DIM,)
        np.testing.assert_array_equal(words[word], vector_of(i))


def test_keep_set_dim_and_duplicates(glove_txt, tmp_path):
    words, stats = read_glove_text(glove_txt, keep={"man", "at home", "absent"}, progress=False)
    assert sorted(words) == ["at home", "man"]
    assert stats.missing == ["absent"]
    np.testing.assert_array_equal(words["at home"], vector_of(WORDS.index("at home")))
    # With the size given, the first token may itself hold a space.
    spaced_first = tmp_path / "spaced.txt"
    spaced_first.write_text(glove_line("at home", vector_of(0)) + glove_line("man", vector_of(1)))
    assert sorted(read_glove_text(spaced_first, dim=DIM, progress=False)[0]) == ["at home", "man"]
    # Without it the size is the common one of the first lines, so a spaced first token still works.
    assert sorted(read_glove_text(spaced_first, progress=False)[0]) == ["at home", "man"]
    # A repeated token keeps its later vector (as a dict built from the whole file would).
    repeated = tmp_path / "repeated.txt"
    repeated.write_text(glove_line("man", vector_of(0)) + glove_line("man", vector_of(3)))
    words, stats = read_glove_text(repeated, progress=False)
    np.testing.assert_array_equal(words["man"], vector_of(3))
    assert stats.duplicates == 1


def test_skipped_words_are_not_parsed(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text(glove_line("man", vector_of(0)) + "junk 1 2 x 4 5\n" + glove_line("who", vector_of(1)))
    assert sorted(read_glove_text(path, keep=["man", "who"], progress=False)[0]) == ["man", "who"]
    with pytest.raises(UserError, match=r"g.txt: line 2: token 'junk': non-numeric value 'x'"):
        read_glove_text(path, progress=False)


@pytest.mark.parametrize("content, message", [
    (glove_line("man", vector_of(0)) + "who 0.1 0.2 0.3 0.4\n" + glove_line("a", vector_of(1)),
     r"bad.txt: line 2: token 'who': vector has 4 values, expected 5"),
    (glove_line("man", vector_of(0)) + glove_line("a", vector_of(1)) + "who 0.1 0.2 abc 0.4 0.5\n",
     r"bad.txt: line 3: token 'who': non-numeric value 'abc'"),
    (glove_line("man", vector_of(0)) + "who 0.1 nan 0.3 0.4 0.5\n",
     r"bad.txt: line 2: token 'who': the vector holds a non-finite value"),
    ("", r"bad.txt: the GloVe file is empty"),
    ("\n\n", r"bad.txt: the GloVe file is empty"),
    ("man\nwho\n", r"bad.txt: the first lines hold tokens without vector values"),
])
def test_bad_glove_text_is_a_user_error(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_glove_text(path, progress=False)


def test_wrong_size_against_explicit_dim(glove_txt):
    with pytest.raises(UserError, match=r"line 1: token 'the': vector has 5 values, expected 6 \(the size set by --dim\)"):
        read_glove_text(glove_txt, dim=6, progress=False)


def test_word_lists(tmp_path):
    vocab = tmp_path / "x_vocab.json"
    vocab.write_text(json.dumps({"question_token_to_idx": {"<NULL>": 0, "<UNK>": 1, "man": 2},
                                 "answer_token_to_idx": {"<UNK0>": 0, "<UNK1>": 1, "cook": 2},
                                 "question_answer_token_to_idx": {"<NULL>": 0, "<UNK>": 1, "man": 2, "cook": 3}}))
    assert read_word_list(vocab) == ["<NULL>", "<UNK>", "man", "cook"]
    listing = tmp_path / "words.txt"
    listing.write_text("man\nat home\n\nman\n")
    assert read_word_list(listing) == ["man", "at home"]
    bad = tmp_path / "bad_vocab.json"
    bad.write_text('{"answer_token_to_idx": {}}')
    with pytest.raises(UserError, match="bad_vocab.json: expected a vocab JSON"):
        read_word_list(bad)


def test_glove_pickle_loader_checks_content(tmp_path):
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"man": np.ones(3, np.float32), "who": np.zeros(3, np.float64)}))
    assert sorted(load_glove_pickle(good)[0]) == ["man", "who"]
    mixed = tmp_path / "mixed.pkl"
    mixed.write_bytes(pickle.dumps({"man": np.ones(3), "who": np.ones(4)}))
    with pytest.raises(UserError, match=r"mixed.pkl: word 'who' has a vector of size 4, expected 3"):
        load_glove_pickle(mixed)[0]
    not_dict = tmp_path / "list.pkl"
    not_dict.write_bytes(pickle.dumps([np.ones(3)]))
    with pytest.raises(UserError, match="list.pkl: expected a dict"):
        load_glove_pickle(not_dict)[0]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"man": Evil()}))
    with pytest.raises(UserError, match=r"evil.pkl: refusing to unpickle (posix|os|nt)\.system"):
        load_glove_pickle(evil)[0]
    with pytest.raises(UserError, match="GloVe pickle not found: .*absent.pkl.*txt2pickle"):
        load_glove_pickle(tmp_path / "absent.pkl")[0]


def test_txt2pickle_as_a_user_runs_it(glove_txt, tmp_path):
    out = tmp_path / "out" / "glove.pkl"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "txt2pickle.py"), "--glove", str(glove_txt),
                           "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(WORDS)} lines, {len(WORDS)} words kept, dim {DIM}" in proc.stdout
    assert "reading glove.small.txt" in proc.stderr          # the progress bar
    words = load_glove_pickle(out)[0]
    assert list(words) == WORDS
    np.testing.assert_array_equal(words["new\u00a0york"], vector_of(WORDS.index("new\u00a0york")))


def test_txt2pickle_keeps_only_vocab_words(glove_txt, tmp_path, capsys):
    listing = tmp_path / "words.txt"
    listing.write_text("man\nat home\nzebra\n")
    out = tmp_path / "subset.pkl"
    assert txt2pickle.main(["--glove", str(glove_txt), "--out", str(out), "--vocab", str(listing),
                            "--no-progress"]) == 0
    assert "2 words kept of 3 requested (1 not in GloVe), dim 5" in capsys.readouterr().out
    assert sorted(load_glove_pickle(out)[0]) == ["at home", "man"]


@pytest.mark.parametrize("content, fragments", [
    (glove_line("man", vector_of(0)) + "who 0.1 0.2 0.3\n", ["bad.txt", "line 2", "'who'", "3 values, expected 5"]),
    (glove_line("man", vector_of(0)) + "who 0.1 0.2 0.3 0.4 zz\n", ["bad.txt", "line 2", "'who'", "non-numeric value 'zz'"]),
    ("", ["bad.txt", "empty"]),
])
def test_txt2pickle_bad_input_one_line_error_and_no_output(tmp_path, capsys, content, fragments):
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    out_dir = tmp_path / "out"
    code, err = cli(txt2pickle.main, ["--glove", str(bad), "--out", str(out_dir / "g.pkl"), "--no-progress"], capsys)
    assert_one_line_error(code, err, *fragments)
    assert os.listdir(out_dir) == []


def test_txt2pickle_missing_input(tmp_path, capsys):
    code, err = cli(txt2pickle.main, ["--glove", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "g.pkl")], capsys)
    assert_one_line_error(code, err, "GloVe text file not found", "nope.txt")
    assert not (tmp_path / "g.pkl").exists()


def test_txt2pickle_failing_mid_write_leaves_no_file(glove_txt, tmp_path, monkeypatch):
    out = tmp_path / "g.pkl"

    def dump_half_then_die(obj, handle, protocol=None):
        handle.write(pickle.dumps(obj)[:50])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vqakd.core.files.pickle, "dump", dump_half_then_die)
    with pytest.raises(OSError):
        txt2pickle.main(["--glove", str(glove_txt), "--out", str(out), "--no-progress"])
    assert os.listdir(tmp_path) == [glove_txt.name]


def test_txt2pickle_killed_mid_write_leaves_no_file(tmp_path):
    # Big enough that the pickle takes a while to write; SIGKILL as soon as the temporary file appears.
    rng = np.random.default_rng(0)
    rows = [" ".join(f"{v:.4f}" for v in rng.standard_normal(2000)) for _ in range(16)]
    glove = tmp_path / "big.txt"
    with open(glove, "w") as handle:
        for i in range(2000):
            handle.write(f"w{i} {rows[i % 16]}\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "big.pkl"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "txt2pickle.py"), "--glove", str(glove),
                             "--out", str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_while_writing = False
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if any(name.endswith(".tmp") for name in os.listdir(out_dir)):
            proc.send_signal(signal.SIGKILL)
            killed_while_writing = True
            break
        time.sleep(0.0005)
    proc.wait()
    assert killed_while_writing, "the pickle was written before the test could kill the process"
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()


def test_pandas_made_pickle_with_a_nan_key_loads_without_it(tmp_path, capsys):
    # The pandas-based txt2pickle.py of the original code reads `null`, `nan`, `NA`, ... as missing
    # values; they all become one float NaN key (the last vector read wins).
    made = {"the": np.full(3, 1.0), float("nan"): np.full(3, 9.0), "man": np.full(3, 2.0),
            "null-ish": np.full(3, 3.0)}
    path = tmp_path / "pandas_glove.pkl"
    path.write_bytes(pickle.dumps(made))
    words, skipped = load_glove_pickle(path)
    assert skipped == 1 and list(words) == ["the", "man", "null-ish"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pandas_glove.pkl: skipped 1 key(s) that are not words (nan)" in err
    # The GloVe matrix drops it too.
    matrix, _coverage, skipped = glove_matrix(str(path), {"<NULL>": 0, "<UNK>": 1, "man": 2})
    assert skipped == 1 and matrix[:, 0].tolist() == [0.0, 0.0, 2.0]
    # A NaN key's vector is not checked (nothing can use it) ...
    path.write_bytes(pickle.dumps({float("nan"): np.ones(5), 7: "junk", "man": np.ones(3)}))
    assert load_glove_pickle(path)[0].keys() == {"man"}
    assert "skipped 2 key(s) that are not words (nan, 7)" in capsys.readouterr().err
    # ... but a pickle without a single word key is not a GloVe pickle.
    path.write_bytes(pickle.dumps({b"man": np.ones(3), b"who": np.ones(3)}))
    with pytest.raises(UserError, match=r"pandas_glove.pkl: no key is a word: 2 key\(s\) such as b'man' \(bytes\)"):
        load_glove_pickle(path)[0]
    # A clean pickle: nothing skipped, nothing printed.
    path.write_bytes(pickle.dumps({"man": np.ones(3)}))
    assert load_glove_pickle(path)[1] == 0 and capsys.readouterr().err == ""
