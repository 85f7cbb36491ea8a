"""Which chunks a run makes. Chunks are keyed by their place in the video list, so the work splits
without changing a number:

* torchrun: rank 0 plans (`make_plan`) and rank r of K takes every K-th unfinished chunk; all ranks
  write into one parts folder, which must be on a filesystem every node sees.
* `Shard(count=S, index=i)` (--num-shards/--shard-index): separate runs each make the chunks
  k % S == i and leave a note (`finish_shard`); `merge_parts` then writes the output.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from typing import Callable, NamedTuple, Sequence

import h5py

from vqakd.data.annotations import Video
from vqakd.core.errors import UserError
from vqakd.extraction.merge import output_complete
from vqakd.data.features import IDS_DATASET
from vqakd.extraction.parts import (PARTS_LAUNCH, chunk_name, failures_report, open_parts, parts_folder,
                                    read_chunk, read_json_or_none, remove_parts_temporaries, worth_retrying,
                                    write_chunk)
from vqakd.extraction.settings import ExtractionResult, Shard, identity_digest
from vqakd.core.files import write_json

# Network filesystems may show a file another machine just wrote only after their attribute
# caches expire (NFS: up to a minute); ranks look this long before calling a file missing.
SHARED_FS_WAIT_S = 90.0


class Plan(NamedTuple):
    """What rank 0 found before the work starts (shared with every rank)."""
    complete: bool          # the output exists with these settings: nothing to do
    todo: list[int]         # this shard's unfinished chunks, in order
    token: str | None       # this launch's mark in the parts folder (several ranks)


def make_plan(videos: Sequence[Video], chunks: list[list[int]], out_path: str, manifest: dict,
              overwrite: bool, shard: Shard, world: int) -> Plan:
    """Rank 0: check the output and the parts folder; list this shard's unfinished chunks."""
    parts_dir = parts_folder(out_path)
    mine = [k for k in range(len(chunks)) if shard.owns(k)]
    # Another shard may be writing into a shared parts folder: only this shard's temporaries
    # (and the output's, when this run merges) can be left over from a killed run.
    remove_parts_temporaries(out_path, mine, output_too=shard.count == 1)
    if output_complete(out_path, manifest, overwrite):
        report = read_json_or_none(failures_report(out_path)) or {}
        if shard.count > 1 or not any(worth_retrying(failure) for failure in report.get("failures") or []):
            # Parts beside a complete output belong to a run killed while removing them.
            shutil.rmtree(parts_dir, ignore_errors=True)
            return Plan(True, [], None)
        # A failed video is worth retrying: rebuild the parts from the output, redo those chunks.
        if not os.path.isdir(parts_dir):
            parts_from_output(out_path, parts_dir, manifest, videos, chunks, report)
    done = open_parts(parts_dir, manifest, overwrite, videos)
    for k, path in list(done.items()):     # a chunk holding a failed video worth retrying is made again
        if any(worth_retrying(failure) for failure in read_chunk(path)[1]):
            os.remove(path)
            del done[k]
    token = secrets.token_hex(8) if world > 1 else None
    if token:
        write_json(os.path.join(parts_dir, PARTS_LAUNCH), {"token": token, "world_size": world})
    return Plan(False, [k for k in mine if k not in done], token)


def parts_from_output(out_path: str, parts_dir: str, manifest: dict, videos: Sequence[Video],
                      chunks: list[list[int]], report: dict) -> None:
    """The parts folder of a complete output, rebuilt from the output and its failure report."""
    open_parts(parts_dir, manifest, False, videos)
    failures = {int(failure["video_id"]): failure for failure in report.get("failures") or []}
    damaged = {int(record["video_id"]): record for record in report.get("damaged_videos") or []}
    digest = identity_digest(manifest)
    with h5py.File(out_path, "r") as h5:
        row_of = {int(video_id): row for row, video_id in enumerate(h5[IDS_DATASET][()])}
        data = h5[manifest["feature_dataset"]]
        for k, chunk in enumerate(chunks):
            ids = [videos[i].video_id for i in chunk]
            kept = [video_id for video_id in ids if video_id in row_of]
            # The output's rows follow the video list, so these rows increase as h5py requires.
            write_chunk(parts_dir, k, digest, kept, data[[row_of[video_id] for video_id in kept]],
                        [failures[v] for v in ids if v in failures], [damaged[v] for v in kept if v in damaged])


def launch_problem(parts_dir: str, token: str | None) -> str | None:
    """This rank's view of the parts folder rank 0 just marked: it must be the same folder."""
    saved = read_json_or_none(os.path.join(parts_dir, PARTS_LAUNCH))
    if isinstance(saved, dict) and saved.get("token") == token:
        return None
    return (f"cannot see the parts folder {os.path.abspath(parts_dir)} that rank 0 prepared; under torchrun "
            "on several machines --out must be on a filesystem every node shares (otherwise run "
            "each machine with --num-shards/--shard-index and merge with preprocess/merge_features.py)")


def require_shared_parts_folder(parts_dir: str, token: str | None) -> None:
    """Every rank: wait (briefly) to see rank 0's mark in the parts folder, else fail."""
    _wait_until(lambda: launch_problem(parts_dir, token) is None)
    if problem := launch_problem(parts_dir, token):
        raise UserError(problem)


def wait_for_chunks(parts_dir: str, chunks: Sequence[int]) -> None:
    """Rank 0, after the final barrier: other ranks' chunks may show up late on a network filesystem."""
    _wait_until(lambda: all(os.path.exists(os.path.join(parts_dir, chunk_name(k))) for k in chunks))


def _wait_until(ready: Callable[[], bool]) -> None:
    """Wait (briefly) until `ready()` holds; the caller then reports what is not."""
    deadline = time.monotonic() + SHARED_FS_WAIT_S
    delay = 0.05
    while not ready() and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def finish_shard(chunks: list[list[int]], parts_dir: str, shard: Shard) -> ExtractionResult:
    """Rank 0 of a shard: count what the shard made and leave a note for merge_parts."""
    mine = [k for k in range(len(chunks)) if shard.owns(k)]
    read = [read_chunk(os.path.join(parts_dir, chunk_name(k))) for k in mine]
    videos, written = sum(len(chunks[k]) for k in mine), sum(len(ids) for ids, *_ in read)
    failures = [failure for _, chunk_failures, _, _ in read for failure in chunk_failures]
    damaged = [record for _, _, chunk_damaged, _ in read for record in chunk_damaged]
    write_json(os.path.join(parts_dir, f"shard-{shard.index}-of-{shard.count}.json"),
               {"num_shards": shard.count, "shard_index": shard.index, "chunks": mine, "videos": videos,
                "written": written, "failed": len(failures), "damaged": len(damaged)})
    return ExtractionResult(parts_dir, "", videos, written, failures, False, merged=False, damaged=damaged)
