"""The parts folder `<out>.parts` of an extraction in progress, and its files.

Chunk k (a fixed run of `chunk_videos` videos) is written atomically to `chunk-<k>.npz` (ids,
features, failures, damaged videos, identity digest), so a killed process loses at most the chunk
in progress. Beside the chunks: `settings.json` (the manifest), `videos.json` (the video list),
`launch.json` (a torchrun launch's mark) and `shard-<i>-of-<S>.json` (what a --num-shards run made).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
from typing import Any, Iterable, Sequence

import numpy as np

from vqakd.data.annotations import Video
from vqakd.core.errors import UserError
from vqakd.extraction.settings import difference, identity
from vqakd.core.files import atomic_open, stale_temporaries, write_json

PARTS_SETTINGS = "settings.json"
PARTS_VIDEOS = "videos.json"
PARTS_LAUNCH = "launch.json"


def parts_folder(out_path: str) -> str:
    return out_path + ".parts"


def failures_report(out_path: str) -> str:
    return out_path + ".failures.json"


def chunk_partition(num_videos: int, chunk_videos: int) -> list[list[int]]:
    """The fixed partition of the video list into chunks (a chunk's number names its file)."""
    return [list(range(start, min(start + chunk_videos, num_videos)))
            for start in range(0, num_videos, chunk_videos)]


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}.npz"


def chunk_files(parts_dir: str) -> dict[int, str]:
    """The finished chunks in a parts folder: number → path."""
    return {int(match[1]): os.path.join(parts_dir, name) for name in os.listdir(parts_dir)
            if (match := re.fullmatch(r"chunk-(\d+)\.npz", name))}


def read_json_or_none(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def failure_record(video: Video, reason: str | None) -> dict:
    """One entry of a failure report, with the file's state then (a later run retries it if it changes)."""
    return {"video_id": video.video_id, "name": video.name, "path": video.path,
            "reason": reason or "unknown", "file": file_state(video.path)}


def file_state(path: str) -> dict | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def worth_retrying(failure: dict) -> bool:
    """Has the failed video's file appeared or changed since the failure was recorded?"""
    return "file" in failure and file_state(str(failure.get("path"))) != failure["file"]


def open_parts(parts_dir: str, manifest: dict, overwrite: bool, videos: Sequence[Video]) -> dict[int, str]:
    """Create or check the parts folder; return the chunks already finished (`chunk_files`)."""
    settings_path = os.path.join(parts_dir, PARTS_SETTINGS)
    if os.path.isdir(parts_dir):
        saved = read_json_or_none(settings_path)
        if overwrite:
            shutil.rmtree(parts_dir)        # every part, failures included: all made again
        elif (saved is not None or chunk_files(parts_dir)) and identity(saved) != identity(manifest):
            raise UserError(f"{parts_dir} holds an unfinished run made "
                            f"{difference(saved, manifest)}; re-run with its settings to resume "
                            "it, pass --overwrite to discard it, or choose another --out (one per "
                            "model: appearance and motion features are separate files)")
    # A folder without settings is completed: another shard sharing it may be creating it right now.
    os.makedirs(parts_dir, exist_ok=True)
    if not os.path.isfile(settings_path):
        write_json(settings_path, manifest)
    if not os.path.isfile(os.path.join(parts_dir, PARTS_VIDEOS)):
        write_json(os.path.join(parts_dir, PARTS_VIDEOS),
                   {"videos": [[video.video_id, video.name] for video in videos]})
    return chunk_files(parts_dir)


def write_chunk(parts_dir: str, chunk: int, identity_digest: str, ids: list[int], features: np.ndarray,
                failures: list[dict], damaged: Sequence[dict]) -> None:
    """Save one finished chunk atomically."""
    with atomic_open(os.path.join(parts_dir, chunk_name(chunk)), "wb") as handle:
        np.savez(handle, ids=np.asarray(ids, np.int64), features=features,
                 failures=np.asarray(json.dumps(failures)), identity=np.asarray(identity_digest),
                 damaged=np.asarray(json.dumps(damaged)))


def read_chunk(path: str) -> tuple[np.ndarray, list[dict], list[dict], str]:
    """A chunk's ids, failures, videos written from damaged files and identity digest (not its features)."""
    with np.load(path, allow_pickle=False) as part:
        return (np.asarray(part["ids"]), json.loads(str(part["failures"])), json.loads(str(part["damaged"])),
                str(part["identity"]))


def remove_parts_temporaries(out_path: str, chunks: Iterable[int], output_too: bool) -> None:
    """Temporary files of a killed run: those of `chunks`, and the parts folder's own when `output_too`
    (only the merging run may touch them; the output's are removed by the guard that locks it)."""
    parts_dir = parts_folder(out_path)
    stale = stale_temporaries([os.path.join(parts_dir, chunk_name(k)) for k in chunks])
    if output_too:
        stale += [path for path in glob.glob(os.path.join(glob.escape(parts_dir), ".*.tmp"))
                  if not os.path.basename(path).startswith(".chunk-")]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
