"""The synthetic demo dataset, written in the layout of the MSVD-QA release (docs/method.md#annotations):
`YouTubeClips/<clip>.avi`, `youtube_mapping.txt`, `{train,val,test}_qa.json`, the GloVe-format
`glove.demo.300d.txt` and `dataset_info.json` (settings, counts and majority-answer rates).

Every question starts with one of the five words of the per-type accuracy tables and can only be
answered from the video: the words it names are dealt independently of what it asks, so a guesser
that reads only the question is at chance on every question text:

    what colour is the square / are the squares            -> red / green / blue / yellow
    who moves left                                         -> square / circle / triangle
    how many objects (or shapes) are there                 -> one / two / three
    when does the green triangle appear / do ... appear    -> start / end (half of the videos)
    where is the red circle / are the red circles          -> top / bottom / left / right

Attributes are dealt from balanced decks within each split, and everything is drawn from one
generator seeded by the user: the same seed gives the same files.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from vqakd.core.progress import progress_bar
from vqakd.demo.scenes import (COLOURS, COUNT_WORDS, DIRECTIONS, PLACES, SHAPES, TIMINGS, Scene, render_video,
                               sample_scene, scene_specs, write_video)
from vqakd.core.errors import UserError
from vqakd.core.files import atomic_open, ensure_writable_dir, write_json
from vqakd.data.questions import QUESTION_TYPES, question_type


DEFAULT_NUM_VIDEOS = 240
DEFAULT_FRAME_SIZE = 128
GLOVE_FILENAME = "glove.demo.300d.txt"
GLOVE_DIM = 300
VIDEO_FOLDER = "YouTubeClips"


@dataclass(frozen=True)
class DemoSettings:
    num_videos: int = DEFAULT_NUM_VIDEOS
    seed: int = 0
    frame_size: int = DEFAULT_FRAME_SIZE
    fps: int = 20
    seconds: float = 3.0
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    transient_rate: float = 0.5      # share of videos whose shapes are visible half the time ("when")

    @property
    def num_frames(self) -> int:
        return int(round(self.fps * self.seconds))

    def check(self) -> "DemoSettings":
        if self.num_videos < 5:
            raise UserError(f"--num-videos {self.num_videos}: need at least 5 videos (train, val and test "
                            "each need some)")
        if self.frame_size < 32 or self.frame_size % 2:
            raise UserError(f"--frame-size {self.frame_size}: must be an even number >= 32")
        if self.fps < 1 or self.num_frames < 8:
            raise UserError(f"--fps {self.fps} --seconds {self.seconds}: need at least 8 frames per video")
        if len(self.split_fractions) != 3 or min(self.split_fractions) <= 0:
            raise UserError(f"--split {self.split_fractions}: need three positive fractions (train val test)")
        if not 0.0 <= self.transient_rate <= 1.0:
            raise UserError(f"--transient-rate {self.transient_rate}: must be between 0 and 1")
        return self


def scene_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """One (question, answer) of each kind that `scene` allows, in QUESTION_TYPES order."""
    plural = scene.count > 1
    shape, colour, direction = scene.shape, scene.colour, scene.direction
    thing = f"{shape}s" if plural else shape
    be, do = ("are", "do") if plural else ("is", "does")
    counted = "objects" if rng.random() < 0.5 else "shapes"
    questions = [
        (f"what colour {be} the {thing}?", colour),
        (f"who moves {direction}?", shape),
        (f"how many {counted} are there?", COUNT_WORDS[scene.count]),
    ]
    if scene.timing != "whole":
        questions.append((f"when {do} the {colour} {thing} appear?", scene.timing))
    questions.append((f"where {be} the {colour} {thing}?", scene.place))
    return questions


def majority_rates(records: list[dict]) -> dict:
    """Share of the most frequent answer, overall and within each question type."""
    if not records:
        return {"overall": 0.0, "overall_answer": None, "per_type": {}}
    answers = Counter(r["answer"] for r in records)
    top_answer, top_count = answers.most_common(1)[0]
    per_type = {}
    for qtype in QUESTION_TYPES:
        typed = Counter(r["answer"] for r in records if question_type(r["question"]) == qtype)
        if typed:
            answer, count = typed.most_common(1)[0]
            per_type[qtype] = {"rate": count / sum(typed.values()), "answer": answer,
                               "questions": sum(typed.values())}
    return {"overall": top_count / len(records), "overall_answer": top_answer, "per_type": per_type}


def question_only_rates(train: list[dict], test: list[dict]) -> dict:
    """Accuracy on `test` of a blind guesser that knows the train answers but never sees a video:
    for each question, the most frequent train answer to the same question text, else the most
    frequent train answer of its question type. What a model scores above this, it took from
    the video."""
    by_text: dict[str, Counter] = {}
    by_type: dict[str, Counter] = {}
    for record in train:
        by_text.setdefault(record["question"], Counter())[record["answer"]] += 1
        by_type.setdefault(question_type(record["question"]), Counter())[record["answer"]] += 1
    overall = Counter(record["answer"] for record in train)
    correct: Counter = Counter()
    counts: Counter = Counter()
    for record in test:
        qtype = question_type(record["question"])
        table = by_text.get(record["question"]) or by_type.get(qtype) or overall
        guess = table.most_common(1)[0][0] if table else None
        counts[qtype] += 1
        correct[qtype] += guess == record["answer"]
    total = sum(counts.values())
    return {"overall": sum(correct.values()) / total if total else 0.0,
            "per_type": {qtype: correct[qtype] / counts[qtype] for qtype in QUESTION_TYPES if counts[qtype]}}


# Words that share a meaning group get vectors near a common group centre, like real GloVe
# vectors of related words; every other word gets its own random direction.
WORD_GROUPS = {
    "colour": list(COLOURS) + ["colour"],
    "shape": list(SHAPES) + [f"{shape}s" for shape in SHAPES] + ["shape", "shapes", "objects"],
    "direction": list(DIRECTIONS) + ["move", "moves"],
    "place": [place for place in PLACES if place not in DIRECTIONS],
    "number": list(COUNT_WORDS.values()) + ["many"],
    "time": list(TIMINGS) + ["when", "appear"],
}


def write_glove(path: str, records: list[dict], seed: int) -> int:
    """GloVe-format vectors of the words of the questions, answers and WORD_GROUPS; returns their count."""
    from vqakd.data.questions import tokenize_question  # the exact tokens the preprocessing will look up

    words = [word for group in WORD_GROUPS.values() for word in group]
    for record in records:
        words += [*tokenize_question(record["question"]), record["answer"]]
    rng = np.random.default_rng([seed, 300])
    group_of = {word: group for group, members in WORD_GROUPS.items() for word in members}
    centres = {group: rng.normal(0.0, 0.5, GLOVE_DIM) for group in WORD_GROUPS}
    words = sorted(set(words))          # sorted: vectors do not depend on question order
    with atomic_open(path, "w", encoding="utf-8") as handle:
        for word in words:
            noise = rng.normal(0.0, 0.25 if word in group_of else 0.5, GLOVE_DIM)
            base = centres[group_of[word]] if word in group_of else 0.0
            vector = (base + noise).astype(np.float32)
            handle.write(word + " " + " ".join(f"{v:.5f}" for v in vector) + "\n")
    return len(words)


def build_annotations(settings: DemoSettings) -> tuple[list[Scene], dict[str, list[dict]]]:
    """Scenes (sorted by video id) and the QA records of each split; no files written."""
    settings.check()
    rng = np.random.default_rng(settings.seed)
    # Video ids 1..num_videos shuffled into train/val/test by the split fractions (each non-empty).
    ids = [int(v) for v in rng.permutation(np.arange(1, settings.num_videos + 1))]
    fractions = settings.split_fractions
    n_val = max(1, int(round(settings.num_videos * fractions[1] / sum(fractions))))
    n_test = max(1, int(round(settings.num_videos * fractions[2] / sum(fractions))))
    n_train = settings.num_videos - n_val - n_test
    splits = {"train": sorted(ids[:n_train]), "val": sorted(ids[n_train:n_train + n_val]),
              "test": sorted(ids[n_train + n_val:])}
    scenes = []
    qa: dict[str, list[dict]] = {split: [] for split in splits}
    next_id = 0
    for split, video_ids in splits.items():
        # Attributes are dealt within each split so that every split is balanced on its own.
        for video_id, spec in zip(video_ids, scene_specs(rng, len(video_ids), settings.transient_rate)):
            scene = sample_scene(rng, video_id, spec)
            scenes.append(scene)
            for question, answer in scene_questions(scene, rng):
                qa[split].append({"question": question, "answer": answer, "video_id": video_id, "id": next_id})
                next_id += 1
    scenes.sort(key=lambda scene: scene.video_id)
    return scenes, qa


def write_dataset(out_dir: str, settings: DemoSettings, progress: bool = True) -> dict:
    """Write the whole demo dataset under `out_dir`; returns what goes into dataset_info.json."""
    scenes, qa = build_annotations(settings)
    ensure_writable_dir(out_dir, "demo dataset folder")
    video_dir = ensure_writable_dir(os.path.join(out_dir, VIDEO_FOLDER), "demo video folder")

    for scene in progress_bar(scenes, enabled=progress, desc="demo videos", unit="video"):
        write_video(os.path.join(video_dir, f"{scene.clip_name}.avi"),
                    render_video(scene, settings.num_frames, settings.frame_size), settings.fps)

    with atomic_open(os.path.join(out_dir, "youtube_mapping.txt"), "w", encoding="utf-8") as handle:
        for scene in scenes:
            handle.write(f"{scene.clip_name} vid{scene.video_id}\n")
    for split, records in qa.items():
        write_json(os.path.join(out_dir, f"{split}_qa.json"), records)

    all_records = [r for records in qa.values() for r in records]
    num_words = write_glove(os.path.join(out_dir, GLOVE_FILENAME), all_records, settings.seed)

    info = {
        "settings": {**asdict(settings), "num_frames": settings.num_frames},
        "videos": {split: len({r["video_id"] for r in records}) for split, records in qa.items()},
        "questions": {split: len(records) for split, records in qa.items()},
        "question_types": {split: dict(Counter(question_type(r["question"]) for r in records))
                           for split, records in qa.items()},
        "answers": sorted({r["answer"] for r in all_records}),
        "glove_words": num_words,
        "majority_rate": {split: majority_rates(records) for split, records in qa.items()},
    }
    write_json(os.path.join(out_dir, "dataset_info.json"), info)
    return info


def format_info(info: dict, out_dir: str) -> str:
    """The short summary the generator prints."""
    lines = [f"demo dataset in {out_dir}: "
             + ", ".join(f"{split} {info['videos'][split]} videos / {info['questions'][split]} questions"
                         for split in ("train", "val", "test")),
             f"{len(info['answers'])} answers, {info['glove_words']} words in {GLOVE_FILENAME}"]
    test = info["majority_rate"]["test"]
    per_type = ", ".join(f"{qtype} {entry['rate']:.1%}" for qtype, entry in test["per_type"].items())
    lines.append(f"test majority-answer rate: {test['overall']:.1%} (answer {test['overall_answer']!r}); "
                 f"within each type: {per_type}")
    return "\n".join(lines)
