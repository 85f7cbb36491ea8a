"""The extraction loop: decode (`decoding.py`), batch the rows, run the network, save each chunk.

Work is saved chunk by chunk into `<out>.parts`; chunks are a fixed partition of the video list and
a chunk's batches depend only on its videos, so a resumed run computes every number exactly as an
uninterrupted one. A video that cannot be used is listed with its reason in `<out>.failures.json`
and the run goes on. Under torchrun every rank runs `FeatureExtractor.run` with the same arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

import vqakd
from vqakd.core import distributed
from vqakd.core.errors import UserError
from vqakd.core.files import file_sha256
from vqakd.core.progress import progress_bar
from vqakd.data.annotations import Video
from vqakd.extraction.decoding import DecodedVideo, VideoDecodeDataset
from vqakd.extraction.merge import completed_result, merge_parts
from vqakd.extraction.networks import NETWORKS, FeatureNetwork, check_settings
from vqakd.extraction.parts import chunk_partition, failure_record, parts_folder, write_chunk
from vqakd.extraction.plan import finish_shard, make_plan, require_shared_parts_folder, wait_for_chunks
from vqakd.extraction.settings import (FEATURE_DIM, MANIFEST_FORMAT, ExtractionResult, ExtractionSettings, Shard,
                                       identity_digest, videos_digest)
from vqakd.extraction.weights import WeightsIdentity, find_weights
from vqakd.extraction.video import require_decoder

# How long ranks wait for each other (the final barrier waits for the slowest rank's last chunk).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=24)


class FeatureExtractor:
    """One extraction: a feature network (`model`), its weights, and the loop that runs it."""

    def __init__(self, settings: ExtractionSettings, device: torch.device | str = "cpu",
                 batch_size: int | None = None, num_workers: int = 0, progress: bool = True):
        if settings.model not in NETWORKS:
            raise UserError(f"unknown model {settings.model!r}; choose one of {', '.join(NETWORKS)}")
        network_type = NETWORKS[settings.model]
        self.device = torch.device(device)
        self.batch_size = batch_size or network_type.default_batch_size
        self.num_workers = num_workers
        self.progress = progress
        height = settings.image_height or network_type.default_image_size[0]
        width = settings.image_width or network_type.default_image_size[1]
        self.settings = dataclasses.replace(settings, image_height=height, image_width=width)
        check_settings(self.settings, self.device, self.batch_size, self.num_workers)
        self.model: FeatureNetwork = network_type(self.settings, self.device)
        if self.settings.random_weights:
            self.weights = WeightsIdentity("random", f"random (seed {self.settings.random_seed})")
        else:
            path = os.path.abspath(find_weights(self.settings.weights, network_type.weight_files,
                                                network_type.weights_what, network_type.how_to_get_weights))
            self.weights = WeightsIdentity(path, file_sha256(path))

    @functools.cached_property
    def network(self) -> nn.Module:
        """The network on the device, built on first use (a finished run never loads it)."""
        return self.model.instantiate(self.weights)

    def video_shape(self) -> tuple[int, ...]:
        return self.model.shape_for(self.settings.num_clips, self.settings.frames_per_clip)

    def manifest(self, videos: Sequence[Video]) -> dict[str, Any]:
        """The settings that determine the numbers (and the weights file), stored with the parts and
        in the output."""
        s = self.settings
        return {
            "format": MANIFEST_FORMAT, "toolkit_version": vqakd.__version__, "dataset": s.dataset,
            "model": self.model.model_name, "feature_dataset": self.model.feature_dataset,
            "num_clips": s.num_clips, "frames_per_clip": s.frames_per_clip,
            "image_height": s.image_height, "image_width": s.image_width, "kinetics_mean": bool(s.kinetics_mean),
            "normalisation": self.model.normalisation(), "normalization": s.normalization,
            "decode_past_damage": bool(s.decode_past_damage), "precision": s.precision,
            "weights": self.weights.path, "weights_sha256": self.weights.sha256,
            "random_weights": bool(s.random_weights), "chunk_videos": s.chunk_videos, "videos": len(videos),
            "videos_sha256": videos_digest(videos),
        }

    def run(self, videos: Sequence[Video], out_path: str, overwrite: bool = False,
            shard: Shard = Shard()) -> ExtractionResult | None:
        """Extract features of `videos` into `out_path`, resuming a previous run of the same settings;
        a `shard` of several makes only its chunks and leaves the output to `merge_parts`. Under
        torchrun only rank 0 returns a result (the others None)."""
        if not videos:
            raise UserError("no videos to extract features from")
        rank, world = distributed.get_rank(), distributed.get_world_size()
        out_path = os.fspath(out_path)
        parts_dir = parts_folder(out_path)
        manifest = self.manifest(videos)
        chunks = chunk_partition(len(videos), self.settings.chunk_videos)
        plan = distributed.from_main(
            lambda: make_plan(videos, chunks, out_path, manifest, overwrite, shard, world),
            what="the check of the output and its parts folder")
        if plan.complete:
            return completed_result(out_path, videos) if rank == 0 else None
        mine = plan.todo[rank::world]
        if world > 1:
            distributed.agree(lambda: require_shared_parts_folder(parts_dir, plan.token),
                              what="the check of the shared parts folder")
            label = f"{self.model.model_name} [rank {rank}/{world}]"
            total, initial = sum(len(chunks[k]) for k in mine), 0
        else:       # the progress of the whole shard, finished chunks included
            total = sum(len(chunk) for k, chunk in enumerate(chunks) if shard.owns(k))
            label, initial = self.model.model_name, total - sum(len(chunks[k]) for k in mine)
        digest = identity_digest(manifest)
        self._extract_chunks(videos, chunks, mine, total, initial, label,
                             lambda k, rows: write_chunk(parts_dir, k, digest, *rows))
        distributed.barrier()
        if rank != 0:
            return None
        if world > 1:
            wait_for_chunks(parts_dir, plan.todo)
        if shard.count == 1:
            return merge_parts([parts_dir], out_path)
        return finish_shard(chunks, parts_dir, shard)

    def extract(self, videos: Sequence[Video]) -> tuple[list[int], np.ndarray, list[dict], list[dict]]:
        """The features of a few videos in memory, computed as one chunk of `run` (predict.py's
        extraction): the usable videos' ids and features, the failures and the damaged videos."""
        found = []
        self._extract_chunks(videos, [list(range(len(videos)))], [0], len(videos), 0, self.model.model_name,
                             lambda k, rows: found.append(rows))
        return found[0]

    def _extract_chunks(self, videos: Sequence[Video], chunks: list[list[int]], todo: list[int],
                        progress_total: int, progress_initial: int, label: str,
                        save: Callable[[int, tuple], None]) -> None:
        """Each chunk k of `todo` through the network, in batches of exactly `batch_size` rows (frames or
        clips) across its videos; `save(k, _split_rows(...))` as it finishes."""
        if not todo:
            return
        require_decoder()
        queue = [videos[i] for k in todo for i in chunks[k]]
        self.network   # load the weights (and fail on a bad file) before starting the decoders
        progress = progress_bar(total=progress_total, initial=progress_initial, unit="video", desc=label,
                                enabled=self.progress, dynamic_ncols=True, smoothing=0.05)
        s = self.settings
        dataset = VideoDecodeDataset(queue, s.num_clips, s.frames_per_clip, (s.image_height, s.image_width),
                                     self.model.per_frame, threads=1 if self.num_workers > 0 else 0,
                                     past_damage=s.decode_past_damage)
        # Unbatched, the loader only converts (items are tensors, strings and dicts).
        items = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                                 pin_memory=self.device.type == "cuda"))
        try:
            with self.numerics():
                for k in todo:
                    chunk_videos = [videos[i] for i in chunks[k]]
                    chunk_items, outputs, pending = [], [], None
                    for _ in chunk_videos:
                        item = next(items)
                        if item.inputs is not None:
                            rows = item.inputs.to(self.device, non_blocking=True)
                            # The last batch, full or not, waits for the next video's rows.
                            *full, pending = torch.split(rows if pending is None else torch.cat([pending, rows]),
                                                         self.batch_size)
                            outputs += [self.forward(batch) for batch in full]
                        chunk_items.append(item)
                        progress.update(1)
                    if pending is not None:
                        outputs.append(self.forward(pending))
                    save(k, self._split_rows(chunk_videos, chunk_items, outputs))
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"out of GPU memory with --batch-size {self.batch_size}; lower it and "
                            "re-run (finished chunks are kept and resumed)") from None
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            names = ", ".join(video.path for video in chunk_videos)
            raise UserError(f"a video decoding worker died ({str(exc).splitlines()[0]}) while reading one "
                            f"of: {names}; finished chunks are kept — re-run with --num-workers 0 to see "
                            "which file crashes the decoder") from None
        finally:
            del items   # shuts the decoding workers down
            progress.close()

    @contextlib.contextmanager
    def numerics(self):
        """fp32 is true fp32 (no TF32 on CUDA); fp16/bf16 run under CUDA autocast."""
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.settings.precision)  # CUDA only
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 inputs on the device → float32 features (B, 2048)."""
        return self.network(self.model.prepare(batch)).float()

    def _split_rows(self, chunk_videos: list[Video], items: list[DecodedVideo],
                    outputs: list[torch.Tensor]) -> tuple[list[int], np.ndarray, list[dict], list[dict]]:
        """A chunk's output rows → each usable video's features, the failures and the damaged videos."""
        rows = torch.cat(outputs).cpu() if outputs else torch.zeros((0, FEATURE_DIM))
        ids, features, failures, damaged = [], [], [], []
        per_video = iter(rows.split([len(item.inputs) for item in items if item.inputs is not None]))
        for video, item in zip(chunk_videos, items):
            if item.inputs is None:
                failures.append(failure_record(video, item.error))
                continue
            video_rows = next(per_video)
            if item.inverse is not None:
                video_rows = video_rows[item.inverse]
            if not torch.isfinite(video_rows).all():
                failures.append(failure_record(video, "the network produced non-finite features "
                                                      f"(precision {self.settings.precision})"))
                continue
            ids.append(video.video_id)
            features.append(video_rows.numpy())
            if item.damage is not None:
                damaged.append({**failure_record(video, item.damage["reason"]), **item.damage})
        return ids, np.asarray(features, np.float32).reshape((-1,) + self.video_shape()), failures, damaged


# The name callers build an extraction by.
make_extractor = FeatureExtractor
