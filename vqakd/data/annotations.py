"""MSVD-QA / MSRVTT-QA annotation files (docs/method.md#annotations): QA records and the video
each refers to, for the question preprocessing and the feature extraction. Every problem is a
`UserError` naming the file and the record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vqakd.core.errors import UserError, require_file
from vqakd.core.files import read_json, read_text

DATASETS = ("msvd-qa", "msrvtt-qa")
SPLITS = ("train", "val", "test")
REQUIRED_FIELDS = ("question", "answer", "video_id")
# Containers FFmpeg reads, in the order a video is looked for when `<name>.<release extension>`
# is absent (MSVD clips re-downloaded from YouTube arrive as .mp4 or .webm).
VIDEO_EXTENSIONS = (".avi", ".mp4", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ogv")
RELEASE_EXTENSION = {"msvd-qa": ".avi", "msrvtt-qa": ".mp4"}


@dataclass(frozen=True)
class Video:
    video_id: int      # the integer id stored in the HDF5 `ids` dataset and in `video_ids`
    name: str          # MSVD-QA: the YouTube clip name; MSRVTT-QA: "video{id}"
    path: str          # the video file this id refers to (it may not exist; extraction reports it)


def qa_path(annotation_dir: str, split: str) -> str:
    return os.path.join(annotation_dir, f"{split}_qa.json")


def load_qa(annotation_dir: str, split: str, dataset: str = "msvd-qa") -> list[dict]:
    """Read `{split}_qa.json`, checking that every record has question, answer and video_id."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    path = require_file(qa_path(annotation_dir, split), "annotation file", f"download the {dataset.upper()} "
                        "annotations and pass their folder with --annotation-dir")
    records = read_json(path)
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of QA records, found {type(records).__name__}")
    if not records:
        raise UserError(f"{path}: the {split} split has no QA records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
        where = f"{path}: record {index} (id {record.get('id', index)})"
        missing = [field for field in REQUIRED_FIELDS if field not in record]
        if missing:
            raise UserError(f"{where} has no {', '.join(missing)}")
        if not isinstance(record["question"], str) or not isinstance(record["answer"], str):
            raise UserError(f"{where}: question and answer must be strings")
        if parse_video_id(record["video_id"]) is None:
            raise UserError(f"{where}: video_id {record['video_id']!r} is not a whole number >= 0")
    return records


def parse_video_id(value: object) -> int | None:
    """The video id a record's `video_id` holds (an int, a string of digits, or a float without a
    fraction), or None when it is not a whole number >= 0 (JSON booleans and 2.9 included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        value = int(value.strip())
    return value if isinstance(value, int) and value >= 0 else None


def load_msvd_mapping(annotation_dir: str) -> dict[int, str]:
    """`youtube_mapping.txt` lines `clipname vidN` → {N: clipname}."""
    path = require_file(os.path.join(annotation_dir, "youtube_mapping.txt"), "MSVD-QA mapping file",
                        "it ships with the MSVD-QA annotations next to the {split}_qa.json files")
    mapping: dict[int, str] = {}
    for line_no, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("vid") or not parts[1][3:].isdigit():
            raise UserError(f"{path}: line {line_no}: expected 'clipname vidN', got {line.strip()!r}")
        mapping[int(parts[1][3:])] = parts[0]
    return mapping


def clip_name(dataset: str, mapping: dict[int, str], record: dict, source: str, index: int) -> str:
    """The clip name of a QA record's video: MSVD-QA's from `mapping` (`load_msvd_mapping`),
    MSRVTT-QA's `video{id}`."""
    video_id = int(record["video_id"])
    if dataset != "msvd-qa":
        return f"video{video_id}"
    if video_id not in mapping:
        raise UserError(f"{source}: record {index} (id {record.get('id', index)}): video_id {video_id} "
                        f"(vid{video_id}) is not in youtube_mapping.txt")
    return mapping[video_id]


def _find_video(folder: str, name: str, release_ext: str, listings: dict[str, set[str]]) -> str:
    """`<name><release_ext>` in `folder` if present, else the same name in another container FFmpeg
    reads. Each folder is listed once into `listings` (10,000 stat calls on a network file system
    take minutes)."""
    if folder not in listings:
        try:
            listings[folder] = set(os.listdir(folder))
        except OSError:
            listings[folder] = set()
    for ext in (release_ext, *VIDEO_EXTENSIONS):
        for candidate in (f"{name}{ext}", f"{name}{ext.upper()}"):
            if candidate in listings[folder]:
                return os.path.join(folder, candidate)
    return os.path.join(folder, f"{name}{release_ext}")


def list_videos(dataset: str, annotation_dir: str, video_dir: str) -> list[Video]:
    """Every video referred to by the QA files (those present), sorted by id: MSVD-QA's
    in `video_dir/YouTubeClips`, MSRVTT-QA's in `video_dir/TrainValVideo` or `video_dir/TestVideo`
    (or `video_dir` itself where that folder is absent), found by `_find_video`."""
    present = [split for split in SPLITS if os.path.isfile(qa_path(annotation_dir, split))]
    if not present:
        raise UserError(f"no QA files ({', '.join(qa_path(annotation_dir, s) for s in SPLITS)}) "
                        f"found in {annotation_dir}")
    mapping = load_msvd_mapping(annotation_dir) if dataset == "msvd-qa" else {}
    videos: dict[int, Video] = {}
    listings: dict[str, set[str]] = {}
    for split in present:
        for index, record in enumerate(load_qa(annotation_dir, split, dataset)):
            vid = int(record["video_id"])
            if vid in videos:
                continue
            name = clip_name(dataset, mapping, record, qa_path(annotation_dir, split), index)
            folder = os.path.join(video_dir, "YouTubeClips" if dataset == "msvd-qa"
                                  else "TestVideo" if split == "test" else "TrainValVideo")
            folder = folder if os.path.isdir(folder) else video_dir
            videos[vid] = Video(vid, name, _find_video(folder, name, RELEASE_EXTENSION[dataset], listings))
    return [videos[vid] for vid in sorted(videos)]
