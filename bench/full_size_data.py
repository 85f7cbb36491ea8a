"""Synthetic inputs of the real datasets' sizes, in the toolkit's file formats, for memory and
speed measurements at full size (bench/full_size.py).

    python bench/full_size_data.py --dataset msrvtt-qa --out /data/full/msrvtt-qa [--fraction 0.125]

Writes into --out (names as preprocess/ writes them, docs/method.md#file-formats):
- `{dataset}_appearance_feat.h5` (V, N, F, 2048) and `{dataset}_motion_feat.h5` (V, N, 2048),
  float32, contiguous, with `ids`: the layout preprocess/merge_features.py writes;
- `{dataset}_vocab.json`: |Q| question words and |A| answers (`<UNK0>`, `<UNK1>` + the top answers);
- `{dataset}_{split}_questions.pt`: every key of ours (token matrix, lengths, ids, question and
  answer text, record ids, clip names, the vocabulary's sha256), and the train file's GloVe
  matrix (|Q| x 300), so a loaded split takes the memory a real one takes;
- `config.yml`: configs/{dataset}.yml with the data paths pointing here.

Sizes: MSVD-QA 1,970 videos, 30,933 / 6,415 / 13,157 questions, N=8; MSRVTT-QA 10,000 videos,
158,581 / 12,278 / 72,821 questions, N=16; F=16 frames per clip. Vocabularies: MSVD-QA about
4,000 question words and 1,000 answers, MSRVTT-QA about 8,000 and the 4,000-answer cap.
Question lengths are drawn like the real ones (first word what/who/how/when/where in the
datasets' proportions, about 7 words on average, a long tail to 30+ words).
`--fraction` keeps that share of the videos and of every split's questions (cost growth).

Features are values in [0, 1) (ResNet / ResNeXt pooled activations are non-negative), written a
chunk of videos at a time from a pool of random rows scaled per video, so memory stays under
half a GB and MSRVTT-QA's 21 GB are written in about the time the disk takes. An existing file
of the right shape is kept (run the command again after an interruption); files are written
under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vqakd.core.files import atomic_open, atomic_path, file_sha256, write_pickle  # noqa: E402
from vqakd.data.features import APPEARANCE_DATASET, IDS_DATASET, MOTION_DATASET  # noqa: E402

SIZES = {
    "msvd-qa": dict(videos=1970, train=30933, val=6415, test=13157, clips=8, words=4000, answers=1000, max_len=25),
    "msrvtt-qa": dict(videos=10000, train=158581, val=12278, test=72821, clips=16, words=8000, answers=4000,
                      max_len=35),
}
FRAMES, DIM, WORD_DIM = 16, 2048, 300
# First-word shares of the real MSRVTT-QA / MSVD-QA questions (what dominates, then who, how...).
TYPE_SHARES = {"what": 0.64, "who": 0.24, "how": 0.07, "when": 0.03, "where": 0.02}
POOL_VIDEOS = 32
CHUNK_BYTES = 256 << 20


def scaled_sizes(dataset: str, fraction: float) -> dict[str, int]:
    sizes = dict(SIZES[dataset])
    for key in ("videos", "train", "val", "test"):
        sizes[key] = max(1, round(sizes[key] * fraction))
    return sizes


def write_features(path: str, dataset_name: str, shape: tuple[int, ...], ids: np.ndarray, seed: int) -> bool:
    """One feature file, written chunk by chunk; False when a file of this shape is already there."""
    import h5py

    if os.path.exists(path):
        try:
            with h5py.File(path, "r") as handle:
                if handle[dataset_name].shape == shape and handle[IDS_DATASET].shape == ids.shape:
                    return False
        except (OSError, KeyError):
            pass
    rng = np.random.default_rng(seed)
    row_values = int(np.prod(shape[1:]))
    pool = rng.random((POOL_VIDEOS,) + shape[1:], dtype=np.float32)
    chunk = max(1, CHUNK_BYTES // (row_values * 4))
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        data = handle.create_dataset(dataset_name, shape=shape, dtype="float32")
        for start in range(0, shape[0], chunk):
            stop = min(start + chunk, shape[0])
            rows = np.arange(start, stop)
            scale = rng.uniform(0.5, 1.5, size=(len(rows),) + (1,) * (len(shape) - 1)).astype(np.float32)
            data[start:stop] = pool[rows % POOL_VIDEOS] * scale
        handle.create_dataset(IDS_DATASET, data=ids)
    return True


def question_lengths(rng: np.random.Generator, count: int, max_len: int) -> np.ndarray:
    """About 7 words on average with a long tail, as the real questions (question mark excluded)."""
    lengths = np.rint(rng.lognormal(mean=np.log(6.5), sigma=0.33, size=count)).astype(np.int64)
    return np.clip(lengths, 3, max_len)


def question_words(sizes: dict[str, int]) -> list[str]:
    """The question vocabulary by index: the two specials, the type words, then made-up words."""
    return ["<NULL>", "<UNK>"] + list(TYPE_SHARES) + [f"w{i}" for i in range(sizes["words"] - len(TYPE_SHARES))]


def write_questions(out: str, dataset: str, sizes: dict[str, int], ids: np.ndarray, vocab_sha: str,
                    seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    word_text = question_words(sizes)
    words = len(word_text)
    type_tokens = {name: 2 + i for i, name in enumerate(TYPE_SHARES)}     # word indices of the type words
    shares = np.array(list(TYPE_SHARES.values()))
    for split in ("train", "val", "test"):
        path = os.path.join(out, f"{dataset}_{split}_questions.pt")
        if os.path.exists(path):
            continue
        count = sizes[split]
        lengths = question_lengths(rng, count, sizes["max_len"])
        width = int(lengths.max())
        tokens = rng.integers(2 + len(TYPE_SHARES), words, size=(count, width))
        kind = rng.choice(len(TYPE_SHARES), size=count, p=shares / shares.sum())
        tokens[:, 0] = np.array(list(type_tokens.values()))[kind]
        tokens[np.arange(width)[None, :] >= lengths[:, None]] = 0
        video = ids[rng.integers(0, len(ids), size=count)]
        answers = rng.integers(0, sizes["answers"] + 2, size=count)
        text = [" ".join(word_text[t] for t in row[:n]) + "?" for row, n in zip(tokens.tolist(), lengths.tolist())]
        record = {
            "questions": tokens, "questions_len": lengths, "question_id": list(range(count)),
            "video_ids": video, "video_names": video.copy(), "answers": answers,
            "glove": (rng.standard_normal((words, WORD_DIM), dtype=np.float32) if split == "train" else None),
            "record_id": list(range(count)), "clip_names": [f"video{v}" for v in video.tolist()],
            "question_text": text, "answer_text": [f"answer{a}" for a in answers.tolist()],
            "vocab_sha256": vocab_sha,
        }
        write_pickle(path, record)


def write_vocab(out: str, dataset: str, sizes: dict[str, int]) -> str:
    path = os.path.join(out, f"{dataset}_vocab.json")
    words = question_words(sizes)
    answers = ["<UNK0>", "<UNK1>"] + [f"answer{i}" for i in range(sizes["answers"])]
    if not os.path.exists(path):
        with atomic_open(path) as handle:
            json.dump({"question_token_to_idx": {w: i for i, w in enumerate(words)},
                       "answer_token_to_idx": {a: i for i, a in enumerate(answers)},
                       "question_answer_token_to_idx": {"<NULL>": 0, "<UNK>": 1}}, handle, indent=4)
    return file_sha256(path)


def write_config(out: str, dataset: str) -> str:
    import yaml

    with open(os.path.join(ROOT, "configs", f"{dataset.replace('-', '_')}.yml")) as handle:
        config = yaml.safe_load(handle)
    for key in ("vocab", "train_questions", "val_questions", "test_questions", "appearance_feat", "motion_feat"):
        name = "vocab.json" if key == "vocab" else key.replace("_questions", "_questions.pt").replace(
            "_feat", "_feat.h5")
        config["data"][key] = os.path.join(os.path.abspath(out), f"{dataset}_{name}")
    config["output_dir"] = os.path.join(os.path.abspath(out), "runs")
    path = os.path.join(out, "config.yml")
    with atomic_open(path) as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    return path


def make_dataset(dataset: str, out: str, fraction: float = 1.0, seed: int = 0) -> dict[str, object]:
    sizes = scaled_sizes(dataset, fraction)
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    ids = np.arange(sizes["videos"], dtype=np.int64)
    vocab_sha = write_vocab(out, dataset, sizes)
    write_questions(out, dataset, sizes, ids, vocab_sha, seed)
    clips = sizes["clips"]
    written = [write_features(os.path.join(out, f"{dataset}_appearance_feat.h5"), APPEARANCE_DATASET,
                              (sizes["videos"], clips, FRAMES, DIM), ids, seed),
               write_features(os.path.join(out, f"{dataset}_motion_feat.h5"), MOTION_DATASET,
                              (sizes["videos"], clips, DIM), ids, seed + 2)]
    config = write_config(out, dataset)
    return {"dataset": dataset, "fraction": fraction, "sizes": sizes, "config": config,
            "features_written": any(written), "seconds": time.perf_counter() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(SIZES), required=True)
    parser.add_argument("--out", required=True, help="folder for the files (MSRVTT-QA needs 23 GB free)")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of videos and questions (0 < f <= 1)")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    if not 0 < a.fraction <= 1:
        parser.error("--fraction must be in (0, 1]")
    made = make_dataset(a.dataset, a.out, a.fraction, a.seed)
    sizes = made["sizes"]
    print(f"{a.dataset} x{a.fraction:g}: {sizes['videos']} videos, {sizes['train']}/{sizes['val']}/{sizes['test']} "
          f"questions in {a.out} ({made['seconds']:.0f} s); config: {made['config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
