"""Checking the parts folders of one extraction and writing its output HDF5 file and failure report."""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from typing import NamedTuple, Sequence

import h5py
import numpy as np

from vqakd.data.annotations import Video
from vqakd.core.errors import UserError
from vqakd.data.features import IDS_DATASET
from vqakd.extraction.networks import NETWORKS
from vqakd.extraction.parts import (PARTS_SETTINGS, PARTS_VIDEOS, chunk_files, chunk_name, chunk_partition,
                                    failure_record, failures_report, read_chunk, read_json_or_none,
                                    remove_parts_temporaries)
from vqakd.extraction.settings import ExtractionResult, difference, identity, identity_digest, videos_digest
from vqakd.core.files import atomic_path, write_json


class PartsFolder(NamedTuple):
    path: str
    manifest: dict
    videos: list[tuple[int, str]]
    chunks: dict[int, str]


def read_parts_folder(parts_dir: str) -> PartsFolder:
    if not os.path.isdir(parts_dir):
        raise UserError(f"{parts_dir}: parts folder not found (made by preprocess/preprocess_features.py "
                        "next to its --out, as <out>.parts)")
    settings_path = os.path.join(parts_dir, PARTS_SETTINGS)
    manifest = read_json_or_none(settings_path)
    if not isinstance(manifest, dict) or "feature_dataset" not in manifest or "videos_sha256" not in manifest:
        raise UserError(f"{settings_path}: missing or unreadable extraction settings, so {parts_dir} is not "
                        "(or no longer) the parts folder of one extraction: another run into the same --out "
                        "may have replaced or removed it; give each extraction its own --out and run it again")
    videos_path = os.path.join(parts_dir, PARTS_VIDEOS)
    listing = read_json_or_none(videos_path)
    try:
        videos = [(int(vid), str(name)) for vid, name in listing["videos"]]
    except (TypeError, KeyError, ValueError):
        raise UserError(f"{videos_path}: missing or unreadable video list") from None
    if videos_digest([Video(vid, name, "") for vid, name in videos]) != manifest["videos_sha256"]:
        raise UserError(f"{videos_path}: the video list does not match {settings_path} (videos_sha256)")
    return PartsFolder(parts_dir, manifest, videos, chunk_files(parts_dir))


def _short(ids: list[int], limit: int = 6) -> str:
    text = ", ".join(str(i) for i in ids[:limit])
    return text + (f", … ({len(ids)} in all)" if len(ids) > limit else "")


def check_chunk(path: str, expected: list[int], video_shape: tuple[int, ...],
                identity: str) -> tuple[np.ndarray, list[dict], list[dict]]:
    """A chunk's ids, failures and damaged videos, after checking them against its place in the video list."""
    try:
        # The features' shape and dtype from their .npy header, without reading the data.
        with zipfile.ZipFile(path) as archive, archive.open("features.npy") as handle:
            version = np.lib.format.read_magic(handle)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _, dtype = reader(handle)
        ids, failures, damaged, saved_identity = read_chunk(path)
        failure_ids = [int(failure["video_id"]) for failure in failures]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: unreadable part file ({type(exc).__name__}: {exc}); delete it and "
                        "re-run the extraction (shard) that made it") from None
    if saved_identity != identity:
        raise UserError(f"{path}: made with other extraction settings than its folder's {PARTS_SETTINGS}")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"{path}: ids must be a list of integers, got {ids.dtype} {ids.shape}")
    if dtype != np.float32 or shape != (len(ids),) + video_shape:
        raise UserError(f"{path}: features are {dtype} {shape}, expected float32 {(len(ids),) + video_shape}")
    held = ids.tolist() + failure_ids
    if sorted(held) != sorted(expected):
        problems = {"videos twice": sorted({i for i in held if held.count(i) > 1}),
                    "videos not in this chunk of the video list": [i for i in held if i not in expected],
                    "videos missing": [i for i in expected if i not in held]}
        detail = "; ".join(f"{what}: {_short(found)}" for what, found in problems.items() if found)
        raise UserError(f"{path}: does not hold exactly its chunk of the video list ({detail})")
    if ids.tolist() != [i for i in expected if i not in failure_ids]:
        raise UserError(f"{path}: videos are not in the order of the video list")
    return ids.astype(np.int64), failures, damaged


def merge_parts(parts_dirs: Sequence[str], out_path: str, keep_parts: bool = False) -> ExtractionResult:
    """Check the parts folders of one extraction (every chunk exactly once, all made with the same
    settings for the same video list) and write its output and failure report."""
    folders = [read_parts_folder(os.fspath(path)) for path in parts_dirs]
    first = folders[0]
    manifest = first.manifest
    for folder in folders[1:]:
        if identity(folder.manifest) != identity(manifest):
            raise UserError(f"{os.path.join(folder.path, PARTS_SETTINGS)}: made "
                            f"{difference(folder.manifest, manifest)} than {first.path}")
    model = manifest.get("model")
    if model not in NETWORKS or manifest["feature_dataset"] != NETWORKS[model].feature_dataset:
        raise UserError(f"{os.path.join(first.path, PARTS_SETTINGS)}: unknown model {model!r}")
    video_shape = NETWORKS[model].shape_for(int(manifest["num_clips"]), int(manifest["frames_per_clip"]))
    chunks = chunk_partition(len(first.videos), int(manifest["chunk_videos"]))
    digest = identity_digest(manifest)

    owner: dict[int, str] = {}
    for folder in folders:
        for k, path in sorted(folder.chunks.items()):
            if k >= len(chunks):
                raise UserError(f"{path}: chunk {k} is beyond the {len(chunks)} chunks of the video list")
            if k in owner:
                raise UserError(f"{path}: chunk {k} is also in {owner[k]}; give each chunk once")
            owner[k] = path
    missing = [k for k in range(len(chunks)) if k not in owner]
    if missing:
        raise UserError(f"{first.path}: {len(missing)} of {len(chunks)} chunks missing "
                        f"({_missing_hint(missing, chunks, first.videos, folders)}); run the extraction "
                        "(shards) that make them, or give every parts folder")

    checked = [check_chunk(owner[k], [first.videos[i][0] for i in chunk], video_shape, digest)
               for k, chunk in enumerate(chunks)]
    all_ids = np.concatenate([ids for ids, _, _ in checked])
    failures = [failure for _, chunk_failures, _ in checked for failure in chunk_failures]
    damaged = [record for _, _, chunk_damaged in checked for record in chunk_damaged]
    report_path = failures_report(out_path)
    report = {"output": os.path.abspath(out_path), "model": model, "videos": len(first.videos),
              "written": len(all_ids), "failed": len(failures), "failures": failures,
              "damaged": len(damaged), "damaged_videos": damaged}
    write_json(report_path, report)
    if len(all_ids) == 0:
        example = failures[0]
        raise UserError(f"no video could be used (e.g. {example['path']}: {example['reason']}); "
                        f"{len(failures)} failures listed in {report_path}")
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as h5:
            data = h5.create_dataset(manifest["feature_dataset"], shape=(len(all_ids),) + video_shape,
                                     dtype="float32")
            row = 0
            for k, (ids, _, _) in enumerate(checked):     # check_chunk saw a row of features per id
                with np.load(owner[k], allow_pickle=False) as part:
                    data[row:row + len(ids)] = part["features"]
                row += len(ids)
            h5.create_dataset(IDS_DATASET, data=all_ids)
            h5.attrs.update(manifest)
            h5.attrs["failed_videos"] = len(failures)
            h5.attrs["manifest"] = json.dumps(manifest, sort_keys=True)
    if not keep_parts:
        for folder in folders:
            shutil.rmtree(folder.path, ignore_errors=True)
    return ExtractionResult(out_path, report_path, len(first.videos), len(all_ids), failures, False,
                            damaged=damaged)


def output_complete(out_path: str, manifest: dict | None, overwrite: bool) -> bool:
    """Does `out_path` already hold these features (made with `manifest`'s settings, or any when None)?
    False when there is none yet or `overwrite`; an output made otherwise is refused."""
    if overwrite or not os.path.exists(out_path):
        return False
    try:
        with h5py.File(out_path, "r") as h5:
            existing = json.loads(h5.attrs["manifest"])
    except (OSError, ValueError, KeyError, TypeError):
        existing = None     # not one of ours, or unreadable
    if existing is not None and (manifest is None or identity(existing) == identity(manifest)):
        return True
    raise UserError(f"{out_path} already exists and was made {difference(existing, manifest)}; pass --overwrite "
                    "to replace it or choose another --out (one per model: appearance and motion features are "
                    "separate files)")


def completed_result(out_path: str, videos: Sequence[Video] = ()) -> ExtractionResult:
    """The result of a finished extraction, from its failure report, else from its ids (then those
    of `videos` not among them are the failures)."""
    report_path = failures_report(out_path)
    report = read_json_or_none(report_path)
    try:
        count, written, failures = int(report["videos"]), int(report["written"]), list(report["failures"])
        damaged = list(report.get("damaged_videos", []))
    except (TypeError, KeyError, ValueError):
        with h5py.File(out_path, "r") as h5:
            present = set(int(i) for i in h5[IDS_DATASET][()])
            count = int(h5.attrs["videos"])
        written, damaged = len(present), []
        failures = [failure_record(v, "not in the existing output (no failure report found)")
                    for v in videos if v.video_id not in present]
    return ExtractionResult(out_path, report_path, count, written, failures, True, damaged=damaged)


def merge_into_output(parts_dirs: Sequence[str], out_path: str, overwrite: bool = False,
                      keep_parts: bool = False) -> ExtractionResult:
    """`merge_parts`, unless `out_path` already holds these features (a finished merge)."""
    out_path = os.fspath(out_path)
    present = [path for path in parts_dirs if os.path.isdir(path)]
    settings = (read_json_or_none(os.path.join(present[0], PARTS_SETTINGS)) or {}) if present else None
    if output_complete(out_path, settings, overwrite):
        if not keep_parts:   # a merge killed while removing its parts
            for path in present:
                shutil.rmtree(path, ignore_errors=True)
        return completed_result(out_path)
    remove_parts_temporaries(out_path, [], output_too=True)
    return merge_parts(parts_dirs, out_path, keep_parts)


def _missing_hint(missing: list[int], chunks: list[list[int]], videos: list[tuple[int, str]],
                  folders: list[PartsFolder]) -> str:
    names = ", ".join(chunk_name(k) for k in missing[:4]) + (", …" if len(missing) > 4 else "")
    first_video = videos[chunks[missing[0]][0]][0]
    hint = f"{names}; the first holds video {first_video}"
    # The --num-shards named by the shard notes (`finish_shard`).
    counts = {int(match[1]) for folder in folders for name in os.listdir(folder.path)
              if (match := re.fullmatch(r"shard-\d+-of-(\d+)\.json", name))}
    if len(counts) == 1:
        count = counts.pop()
        indices = sorted({k % count for k in missing})
        hint += f"; made by --num-shards {count} --shard-index {', '.join(str(i) for i in indices)}"
    return hint
