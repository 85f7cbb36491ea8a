"""A tiny learnable VideoQA set written directly in the formats of docs/method.md#file-formats (shared by the training,
data and config tests; it holds no tests itself).

Each video has a colour (0..3) and a direction (0..2). The colour is a bump on feature channel
`colour` of every appearance frame, the direction a bump on channel 8 + direction of every motion
clip, both under Gaussian noise. Questions:
    what colour is it [filler...]      -> the colour name      (type "what")
    where does it go [filler...]       -> the direction name   (type "where")
    is it red [filler...]              -> yes / no             (type "other": first token "is")
so the answer needs both the question word and the video. The test split also has questions
whose answer is outside the vocabulary (label 1). Video ids are sparse and the two feature files
store the videos in different orders, so only an id-based lookup gives the right features.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter

import h5py
import numpy as np
import yaml

COLOURS = ("red", "green", "blue", "yellow")
DIRECTIONS = ("left", "right", "up")
FILLER = ("now", "in", "this", "clip", "please")
QUESTION_TOKENS = ["<NULL>", "<UNK>", "what", "colour", "is", "it", "where", "does", "go", "red", *FILLER]
ANSWERS = ["<UNK0>", "<UNK1>", *COLOURS, *DIRECTIONS, "yes", "no"]

TINY = dict(vision_dim=16, module_dim=32, word_dim=12, num_nodes=4, frames=3)


def _video_ids(count: int) -> list[int]:
    return [100 + 7 * i for i in range(count)]


def _question(kind: str, colour: int, direction: int, rng: np.random.Generator):
    filler = list(rng.choice(FILLER, size=int(rng.integers(0, 3)), replace=False))
    if kind == "what":
        tokens, answer = ["what", "colour", "is", "it"], COLOURS[colour]
    elif kind == "where":
        tokens, answer = ["where", "does", "it", "go"], DIRECTIONS[direction]
    else:
        tokens, answer = ["is", "it", "red"], "yes" if colour == 0 else "no"
    tokens = tokens + filler
    return tokens, answer, " ".join(tokens) + "?"


def _split_file(records, qvocab, avocab, glove, with_text: bool):
    lengths = np.array([len(r["tokens"]) for r in records], dtype=np.int32)
    questions = np.zeros((len(records), int(lengths.max())), dtype=np.int32)
    for row, record in enumerate(records):
        questions[row, :len(record["tokens"])] = [qvocab[t] for t in record["tokens"]]
    obj = {
        "questions": questions,
        "questions_len": lengths,
        "question_id": [r["id"] for r in records],
        "video_ids": np.array([r["video_id"] for r in records], dtype=np.int64),
        "video_names": [f"clip{r['video_id']}" for r in records],
        "answers": [avocab.get(r["answer"], 1) for r in records],
        "glove": glove,
    }
    if with_text:
        obj["question_text"] = [r["text"] for r in records]
        obj["answer_text"] = [r["answer"] for r in records]
    return obj


def make_dataset(root, *, seed: int = 0, videos: int = 48, questions_per_video: int = 6, num_nodes: int = 4,
                 vision_dim: int = 16, frames: int = 3, name: str = "tiny", with_text: bool = True,
                 unknown_test_answers: int = 3) -> dict:
    """Write vocab, question files and feature files under `root`; return their paths and stats."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = _video_ids(videos)
    colour = rng.integers(0, len(COLOURS), size=videos)
    direction = rng.integers(0, len(DIRECTIONS), size=videos)

    appearance = rng.normal(0.0, 0.5, size=(videos, num_nodes, frames, vision_dim)).astype(np.float32)
    motion = rng.normal(0.0, 0.5, size=(videos, num_nodes, vision_dim)).astype(np.float32)
    appearance[np.arange(videos), :, :, colour] += 2.0
    motion[np.arange(videos), :, 8 + direction] += 2.0

    qvocab = {token: index for index, token in enumerate(QUESTION_TOKENS)}
    avocab = {answer: index for index, answer in enumerate(ANSWERS)}
    splits = {"train": range(0, videos * 2 // 3), "val": range(videos * 2 // 3, videos * 5 // 6),
              "test": range(videos * 5 // 6, videos)}
    kinds = ("what", "where", "other")
    paths = {"root": root, "vocab": os.path.join(root, f"{name}_vocab.json")}
    stats = {}
    glove = rng.normal(0.0, 0.3, size=(len(qvocab), TINY["word_dim"])).astype(np.float32)
    next_id = 0
    for split, rows in splits.items():
        records = []
        for row in rows:
            for q in range(questions_per_video):
                tokens, answer, text = _question(kinds[q % len(kinds)], int(colour[row]), int(direction[row]), rng)
                records.append({"tokens": tokens, "answer": answer, "text": text, "video_id": ids[row], "id": next_id})
                next_id += 1
        if split == "test":
            for record in records[:unknown_test_answers]:
                record["answer"] = "purple"          # outside the answer vocabulary: label 1
        obj = _split_file(records, qvocab, avocab, glove if split == "train" else None, with_text)
        path = os.path.join(root, f"{name}_{split}_questions.pt")
        with open(path, "wb") as handle:
            pickle.dump(obj, handle)
        paths[f"{split}_questions"] = path
        counts = Counter(obj["answers"])
        stats[split] = {"count": len(records), "majority_rate": max(counts.values()) / len(records),
                        "answers": obj["answers"], "first_tokens": [r["tokens"][0] for r in records]}

    with open(paths["vocab"], "w") as handle:
        json.dump({"question_token_to_idx": qvocab, "answer_token_to_idx": avocab,
                   "question_answer_token_to_idx": {**qvocab, **{a: len(qvocab) + i for i, a in enumerate(ANSWERS[2:])}}},
                  handle)

    # Different row orders in the two files: lookups must go through `ids`.
    app_order = rng.permutation(videos)
    mot_order = rng.permutation(videos)
    paths["appearance_feat"] = os.path.join(root, f"{name}_appearance_feat.h5")
    paths["motion_feat"] = os.path.join(root, f"{name}_motion_feat.h5")
    with h5py.File(paths["appearance_feat"], "w") as handle:
        handle.create_dataset("resnet_features", data=appearance[app_order])
        handle.create_dataset("ids", data=np.array(ids)[app_order])
    with h5py.File(paths["motion_feat"], "w") as handle:
        handle.create_dataset("resnext_features", data=motion[mot_order])
        handle.create_dataset("ids", data=np.array(ids)[mot_order])
    return {"paths": paths, "stats": stats, "ids": ids, "appearance": appearance, "motion": motion,
            "colour": colour, "direction": direction}


def tiny_config_dict(paths: dict, output_dir: str, **sections) -> dict:
    """A config for the tiny set; `sections` update single sections, e.g. train={"epochs": 3}."""
    config = {
        "name": "tiny",
        "dataset": "msvd-qa",
        "output_dir": str(output_dir),
        "data": {key: paths[key] for key in ("vocab", "train_questions", "val_questions", "test_questions",
                                             "appearance_feat", "motion_feat")},
        "model": {"vision_dim": TINY["vision_dim"], "module_dim": TINY["module_dim"], "word_dim": TINY["word_dim"],
                  "num_nodes": TINY["num_nodes"], "fusion_dim": 16},
        "teacher": {"graph_layers": 2},
        "student": {"graph_layers": 1},
        "train": {"lr": 3e-3, "batch_size": 32, "epochs": 10, "progress": False, "device": "cpu",
                  "lr_halve_every": 6, "log_every": 5},
        "loss": {},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section].update(values)
        else:
            config[section] = values
    return config


def write_config(path, config: dict) -> str:
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    return str(path)
