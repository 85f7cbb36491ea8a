"""Appearance (ResNet-101) and motion (3D ResNeXt-101) feature extraction (SPEC §1.3, §2).

`FeatureExtractor` owns everything the two models share:

* Decoding runs in DataLoader worker processes (`num_workers`), overlapped with the network on
  the device. Each worker decodes only the frames a video's clips need (`vqakd.video`).
* All frames (or clips) of a video, and of consecutive videos, go through the network together
  in batches of `batch_size` images (or clips).
* Work is saved in chunks of `chunk_videos` videos: each finished chunk is written atomically to
  `<out>.parts/chunk-NNNNNN.npz`. A process killed at any instant (SIGKILL included) loses at
  most the chunk in progress; an HDF5 file being written when the process dies can be left
  unreadable, a renamed-into-place chunk file cannot. Re-running the same command skips the
  finished chunks, then assembles `<out>` (written to a temporary name, renamed when complete)
  and removes the parts. Chunks are a fixed partition of the video list and a chunk's batches
  depend only on its videos, so a resumed run computes every number exactly as an uninterrupted
  run does (bit-identical on CPU).
* A video that cannot be used (missing, corrupt, no frames, unsupported codec, non-finite
  features) is recorded with its reason, left out of the output and listed in
  `<out>.failures.json`; the run goes on.
* The settings that determine the numbers (model, weights hash, clip sampling, image size,
  normalisation, precision, video list, toolkit version) are stored with the parts and in the
  output's attributes; resuming with different settings is refused.

Many GPUs and machines. Chunks are keyed by their place in the video list, not by who made
them, so the work splits without changing a number:

* `torchrun --nproc_per_node=K` (any number of nodes): rank 0 checks the output and the parts
  folder and shares the list of unfinished chunks over the default (gloo) process group; rank r
  takes every K-th of them, on `cuda:LOCAL_RANK`. All ranks write into the same parts folder,
  which therefore must be on a filesystem every node sees (checked at the start). After a
  barrier, rank 0 merges. A killed launch resumes with any number of ranks.
* `Shard(count=S, index=i)` (`--num-shards/--shard-index`): separate runs, e.g. on machines
  without a shared disk, each make the chunks k with k % S == i; `merge_parts`
  (preprocess/merge_features.py) checks the collected parts folders and writes the output.
  A shard may itself run under torchrun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import secrets
import shutil
import time
import zipfile
from typing import Any, Callable, ClassVar, Iterable, NamedTuple, Sequence

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import vqakd
from vqakd.annotations import Video
from vqakd.distributed import env_world_size, get_rank, get_world_size, is_initialized
from vqakd.errors import UserError
from vqakd.io import atomic_open, atomic_path, file_sha256, write_json
from vqakd.resnext3d import WEIGHTS_HOW_TO_GET as RESNEXT_HOW_TO_GET
from vqakd.resnext3d import load_strict, read_state_dict, resnext101
from vqakd.video import VideoError, check_frames_per_clip, read_clip_frames, require_decoder

FEATURE_DIM = 2048
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_NUM_CLIPS = 8
DEFAULT_FRAMES_PER_CLIP = 16
DEFAULT_CHUNK_VIDEOS = 16
DEFAULT_RANDOM_SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
# Appearance normalisation (x / 255 - mean) / std: "original" is the original work's constants
# (its third std is 0.224), "torchvision" the ones the ImageNet weights were trained with.
NORMALIZATIONS = {"original": (IMAGENET_MEAN, (0.229, 0.224, 0.224)),
                  "torchvision": (IMAGENET_MEAN, (0.229, 0.224, 0.225))}
# Mean RGB (0–255) that Hara et al. subtracted when training the Kinetics models (their
# `get_mean(1, "activitynet")`, the default of their training script).
KINETICS_MEAN = (114.7748, 107.7354, 99.4750)
# torchvision's file names for ResNet-101 IMAGENET1K_V1 (current, and the same weights' older name).
RESNET101_FILES = ("resnet101-63fe2227.pth", "resnet101-5d3b4d8f.pth")
RESNET_HOW_TO_GET = ("download https://download.pytorch.org/models/resnet101-63fe2227.pth "
                     "(torchvision ResNet-101 IMAGENET1K_V1) and pass it with --weights, or use "
                     "--random-weights for a test run")
TOOLKIT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST_FORMAT = 1
# Manifest entries that may differ between runs whose numbers are the same.
NOT_IDENTITY = ("weights",)
# How long ranks wait for each other (the final barrier waits for the slowest rank's last chunk).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=24)
# Network filesystems may show a file another machine just wrote only after their attribute
# caches expire (NFS: up to a minute); ranks look this long before calling a file missing.
SHARED_FS_WAIT_S = 90.0
PARTS_SETTINGS = "settings.json"
PARTS_VIDEOS = "videos.json"
PARTS_LAUNCH = "launch.json"
CHUNK_PATTERN = "chunk-*.npz"


@dataclasses.dataclass(frozen=True)
class ExtractionSettings:
    """Everything that determines the extracted numbers."""
    dataset: str
    model: str
    num_clips: int = DEFAULT_NUM_CLIPS
    frames_per_clip: int = DEFAULT_FRAMES_PER_CLIP
    image_height: int | None = None     # None: the model's default size
    image_width: int | None = None
    weights: str | None = None          # None: look in the default places (see find_weights)
    random_weights: bool = False
    random_seed: int = DEFAULT_RANDOM_SEED
    kinetics_mean: bool = False
    precision: str = "fp32"
    chunk_videos: int = DEFAULT_CHUNK_VIDEOS
    normalization: str = "original"     # resnet101: a key of NORMALIZATIONS
    decode_past_damage: bool = False    # skip packets the decoder rejects instead of stopping


class ExtractionResult(NamedTuple):
    output: str
    report: str
    videos: int
    written: int
    failures: list[dict]
    already_complete: bool
    merged: bool = True          # False: one shard's parts, to be merged with merge_parts
    main: bool = True            # False on torchrun ranks other than 0 (rank 0 reports)
    damaged: list[dict] = []     # videos written from damaged files (truncated or packets skipped)


@dataclasses.dataclass(frozen=True)
class Shard:
    """One of `count` separate runs that split the chunks of one extraction: it makes the chunks
    k with k % count == index (a fixed rule, so every machine agrees without talking)."""
    count: int = 1
    index: int = 0

    def __post_init__(self):
        if self.count < 1:
            raise UserError(f"--num-shards must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise UserError(f"--shard-index must be in 0..{self.count - 1} for --num-shards {self.count}, "
                            f"got {self.index}")

    def owns(self, chunk: int) -> bool:
        return chunk % self.count == self.index


class PeerError(UserError):
    """Another rank stopped the run and prints the reason; this rank exits quietly."""


def start_process_group() -> bool:
    """Join the default process group when launched by torchrun with several processes.

    gloo whatever the device: the ranks only agree on the plan and wait for each other, no
    tensors travel. The long timeout covers the final barrier, which waits for the slowest rank.
    """
    if env_world_size() <= 1 or is_initialized():
        return is_initialized()
    dist.init_process_group(backend="gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return True


class ProcessGroup:
    """The processes of one launch sharing an extraction (a group of one without torchrun)."""

    def __init__(self):
        self.rank = get_rank()
        self.world = get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def from_main(self, work: Callable[[], Any]) -> Any:
        """Rank 0 runs `work`; every rank gets its value, or fails with rank 0's error."""
        if self.world == 1:
            return work()
        payload: list[Any] = [None]
        failure: BaseException | None = None
        if self.main:
            try:
                payload = [("ok", work())]
            except UserError as exc:
                payload, failure = [("error", str(exc))], exc
            except BaseException as exc:
                payload, failure = [("error", f"{type(exc).__name__} on rank 0")], exc
        dist.broadcast_object_list(payload, src=0)
        if failure is not None:
            raise failure
        status, value = payload[0]
        if status != "ok":
            raise PeerError(f"rank 0 stopped the run: {value}")
        return value

    def agree(self, problem: str | None) -> None:
        """Every rank states its problem (None: none); any problem stops every rank."""
        if self.world == 1:
            if problem:
                raise UserError(problem)
            return
        problems: list[Any] = [None] * self.world
        dist.all_gather_object(problems, problem)
        found = [f"rank {rank}: {text}" for rank, text in enumerate(problems) if text]
        if found:
            if self.main:
                raise UserError("; ".join(found))
            raise PeerError("; ".join(found))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class DecodedVideo(NamedTuple):
    """What a decoding worker hands back for one video."""
    position: int                    # index in the list of videos still to do
    inputs: torch.Tensor | None      # uint8 network inputs (rows, ...), None on failure
    inverse: torch.Tensor | None     # (N, F) rows of `inputs` for each clip frame (frame models)
    error: str | None
    damage: dict | None = None       # truncation / skipped packets, for the failures report


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """How a worker turns a video file into network inputs (picklable, no network in it)."""
    num_clips: int
    frames_per_clip: int
    size: tuple[int, int]
    per_frame: bool        # True: distinct frames (U, H, W, 3); False: clips (N, F, H, W, 3)
    threads: int
    past_damage: bool = False


class VideoDecodeDataset(torch.utils.data.Dataset):
    def __init__(self, videos: Sequence[Video], spec: DecodeSpec):
        self.videos = list(videos)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, position: int) -> DecodedVideo:
        spec = self.spec
        try:
            clip_frames = read_clip_frames(self.videos[position].path, spec.num_clips,
                                           spec.frames_per_clip, spec.size, spec.threads,
                                           spec.past_damage)
        except VideoError as exc:
            return DecodedVideo(position, None, None, exc.reason)
        except Exception as exc:  # one odd file must not stop a day-long run; the reason is reported
            return DecodedVideo(position, None, None, f"unexpected {type(exc).__name__}: {exc}")
        if spec.per_frame:
            return DecodedVideo(position, torch.from_numpy(clip_frames.frames),
                                torch.from_numpy(clip_frames.inverse), None, clip_frames.damage())
        return DecodedVideo(position, torch.from_numpy(np.ascontiguousarray(clip_frames.clips())), None, None,
                            clip_frames.damage())


def _keep_item(item: DecodedVideo) -> DecodedVideo:
    return item


def torchvision_weights_cache() -> str:
    """Where torchvision keeps downloaded weights ($TORCH_HOME/hub/checkpoints, TORCH_HOME
    defaulting to $XDG_CACHE_HOME/torch or ~/.cache/torch). Only looked into, never filled:
    the path is worked out here rather than through torch.hub, whose job is downloading."""
    cache_home = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    torch_home = os.path.expanduser(os.environ.get("TORCH_HOME", os.path.join(cache_home, "torch")))
    return os.path.join(torch_home, "hub", "checkpoints")


def videos_digest(videos: Sequence[Video]) -> str:
    digest = hashlib.sha256()
    for video in videos:
        digest.update(f"{video.video_id}\t{video.name}\n".encode("utf-8"))
    return digest.hexdigest()


class FeatureExtractor:
    """Shared extraction loop; subclasses define the network, its inputs and its output shape."""

    model_name: ClassVar[str]
    feature_dataset: ClassVar[str]       # HDF5 dataset name (SPEC §2)
    default_image_size: ClassVar[tuple[int, int]]
    default_batch_size: ClassVar[int]
    per_frame: ClassVar[bool]            # inputs are single frames (True) or whole clips (False)
    weight_files: ClassVar[tuple[str, ...]]
    how_to_get_weights: ClassVar[str]
    weights_what: ClassVar[str]

    def __init__(self, settings: ExtractionSettings, device: torch.device | str = "cpu",
                 batch_size: int | None = None, num_workers: int = 0, progress: bool = True):
        self.device = torch.device(device)
        self.batch_size = batch_size or self.default_batch_size
        self.num_workers = num_workers
        self.progress = progress
        height = settings.image_height or self.default_image_size[0]
        width = settings.image_width or self.default_image_size[1]
        self.settings = dataclasses.replace(settings, image_height=height, image_width=width)
        self._check_settings()
        self.weights_path, self.weights_sha256 = self._weights_identity()
        self._network: nn.Module | None = None

    @property
    def network(self) -> nn.Module:
        """The network on the device, built on first use (a finished run never loads it)."""
        if self._network is None:
            network = self._build_loaded_network().to(self.device).eval()
            if self.device.type == "cuda":
                network = network.to(memory_format=self.memory_format)
            self._network = network
        return self._network

    # ----- what subclasses provide -------------------------------------------------------------

    memory_format: ClassVar[torch.memory_format] = torch.contiguous_format

    def build_network(self) -> nn.Module:
        """The architecture with its own initialisation (weights are loaded over it)."""
        raise NotImplementedError

    def load_network(self, path: str) -> nn.Module:
        """The architecture with the weights of `path`, loaded strictly."""
        raise NotImplementedError

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 inputs on the device → the network's float input."""
        raise NotImplementedError

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, ...) network input → (B, 2048) features."""
        raise NotImplementedError

    @staticmethod
    def shape_for(num_clips: int, frames_per_clip: int) -> tuple[int, ...]:
        """The feature array of one video."""
        raise NotImplementedError

    def video_shape(self) -> tuple[int, ...]:
        return self.shape_for(self.settings.num_clips, self.settings.frames_per_clip)

    # ----- settings, weights, identity ---------------------------------------------------------

    def _check_settings(self) -> None:
        s = self.settings
        for name in ("num_clips", "frames_per_clip", "image_height", "image_width", "chunk_videos"):
            if getattr(s, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be 0 or more, got {self.num_workers}")
        if s.precision not in PRECISIONS:
            raise UserError(f"unknown precision {s.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if s.precision != "fp32" and self.device.type != "cuda":
            raise UserError(f"--{s.precision} needs a CUDA device (device is {self.device}); "
                            "on CPU features are computed in fp32")
        if s.random_weights and s.weights:
            raise UserError("--weights and --random-weights exclude each other")
        if check_frames_per_clip(s.frames_per_clip):
            raise UserError(f"--{check_frames_per_clip(s.frames_per_clip)}")
        if s.normalization not in NORMALIZATIONS:
            raise UserError(f"unknown normalization {s.normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
        if s.normalization != "original" and not self.per_frame:
            raise UserError("--normalization applies to the resnet101 appearance model only")

    def find_weights(self) -> str:
        """The weights file: --weights, else data/weights/<name>, else torchvision's cache."""
        if self.settings.weights:
            path = self.settings.weights
            if not os.path.isfile(path):
                raise UserError(f"{self.weights_what} file not found: {path}; {self.how_to_get_weights}")
            return path
        folders = [os.path.join(TOOLKIT_ROOT, "data", "weights"), torchvision_weights_cache()]
        for folder in folders:
            for name in self.weight_files:
                candidate = os.path.join(folder, name)
                if os.path.isfile(candidate):
                    return candidate
        looked = ", ".join(os.path.join(folder, self.weight_files[0]) for folder in folders)
        raise UserError(f"no {self.weights_what} file given (--weights) or found (looked for {looked}); "
                        f"{self.how_to_get_weights}")

    def _weights_identity(self) -> tuple[str, str]:
        if self.settings.random_weights:
            return "random", f"random (seed {self.settings.random_seed})"
        path = os.path.abspath(self.find_weights())
        return path, file_sha256(path)

    def _build_loaded_network(self) -> nn.Module:
        if self.settings.random_weights:
            # Seeded so that a resumed run rebuilds exactly the same random network.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.settings.random_seed)
                return self.build_network()
        return self.load_network(self.weights_path)

    def manifest(self, videos: Sequence[Video]) -> dict[str, Any]:
        s = self.settings
        return {
            "format": MANIFEST_FORMAT,
            "toolkit_version": vqakd.__version__,
            "dataset": s.dataset,
            "model": self.model_name,
            "feature_dataset": self.feature_dataset,
            "num_clips": s.num_clips,
            "frames_per_clip": s.frames_per_clip,
            "image_height": s.image_height,
            "image_width": s.image_width,
            "kinetics_mean": bool(s.kinetics_mean),
            "normalisation": self.normalisation(),
            "normalization": s.normalization,
            "decode_past_damage": bool(s.decode_past_damage),
            "precision": s.precision,
            "weights": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "random_weights": bool(s.random_weights),
            "chunk_videos": s.chunk_videos,
            "videos": len(videos),
            "videos_sha256": videos_digest(videos),
        }

    def normalisation(self) -> str:
        raise NotImplementedError

    # ----- the run -----------------------------------------------------------------------------

    def run(self, videos: Sequence[Video], out_path: str, overwrite: bool = False,
            shard: Shard = Shard(), group: ProcessGroup | None = None) -> ExtractionResult:
        """Extract features of `videos` into `out_path`, resuming a previous run of the same settings.

        Under torchrun every rank calls this with the same arguments; with a `shard` of several,
        only that shard's chunks are made and the output is left to `merge_parts`.
        """
        if not videos:
            raise UserError("no videos to extract features from")
        group = group or ProcessGroup()
        out_path = os.fspath(out_path)
        parts_dir = out_path + ".parts"
        report_path = out_path + ".failures.json"
        manifest = self.manifest(videos)
        chunks = chunk_partition(len(videos), self.settings.chunk_videos)
        plan = group.from_main(lambda: self._plan(videos, chunks, out_path, parts_dir, manifest,
                                                  overwrite, shard, group.world))
        if plan.complete:
            if not group.main:
                return ExtractionResult(out_path, report_path, len(videos), 0, [], True, main=False)
            return self._already_complete(videos, out_path, report_path)
        if group.world > 1:
            launch_path = os.path.join(parts_dir, PARTS_LAUNCH)
            _wait_until_visible([launch_path], lambda: _launch_problem(parts_dir, plan.token) is None)
            group.agree(_launch_problem(parts_dir, plan.token))
        mine = plan.todo[group.rank::group.world]
        if group.world > 1:
            label = f"{self.model_name} [rank {group.rank}/{group.world}]"
            total, initial = sum(len(chunks[k]) for k in mine), 0
        else:
            label, total, initial = self.model_name, plan.shard_videos, plan.done_videos
        self._extract_chunks(videos, chunks, mine, parts_dir, total, initial, label,
                             identity_digest(manifest))
        group.barrier()
        if not group.main:
            return ExtractionResult(out_path, report_path, len(videos), 0, [], False, main=False)
        if group.world > 1:
            _wait_until_visible([os.path.join(parts_dir, chunk_name(k)) for k in plan.todo])
        if shard.count == 1:
            return merge_parts([parts_dir], out_path)
        return self._finish_shard(videos, chunks, parts_dir, out_path, shard)

    def _plan(self, videos: Sequence[Video], chunks: list[list[int]], out_path: str, parts_dir: str,
              manifest: dict, overwrite: bool, shard: Shard, world: int) -> "_Plan":
        """Rank 0: check the output and the parts folder; list this shard's unfinished chunks."""
        mine = [k for k in range(len(chunks)) if shard.owns(k)]
        # Another shard may be writing into a shared parts folder: only this shard's temporaries
        # (and the output's, when this run merges) can be left over from a killed run.
        _remove_stale_temporaries(out_path, mine, output_too=shard.count == 1)
        if os.path.exists(out_path):
            existing = _read_output_manifest(out_path)
            if existing is not None and _identity(existing) == _identity(manifest) and not overwrite:
                # The output is renamed into place only once complete; parts left beside it
                # belong to a run killed while removing them.
                shutil.rmtree(parts_dir, ignore_errors=True)
                return _Plan(True, [], 0, 0, None)
            if not overwrite:
                raise UserError(f"{out_path} already exists and was made "
                                f"{_difference(existing, manifest)}; pass --overwrite to replace it "
                                "or choose another --out")
        done = self._open_parts(parts_dir, manifest, overwrite, videos)
        token = None
        if world > 1:
            token = secrets.token_hex(8)
            write_json(os.path.join(parts_dir, PARTS_LAUNCH), {"token": token, "world_size": world})
        return _Plan(False, [k for k in mine if k not in done], sum(len(chunks[k]) for k in mine),
                     sum(len(chunks[k]) for k in mine if k in done), token)

    def _open_parts(self, parts_dir: str, manifest: dict, overwrite: bool,
                    videos: Sequence[Video]) -> set[int]:
        """Create or check the parts folder; return the chunks already finished."""
        settings_path = os.path.join(parts_dir, PARTS_SETTINGS)
        if os.path.isdir(parts_dir):
            saved = _read_json_or_none(settings_path)
            has_chunks = bool(glob.glob(os.path.join(glob.escape(parts_dir), CHUNK_PATTERN)))
            if (saved is not None or has_chunks) and _identity(saved) != _identity(manifest):
                if not overwrite:
                    raise UserError(f"{parts_dir} holds an unfinished run made "
                                    f"{_difference(saved, manifest)}; re-run with the same settings "
                                    "to resume it, or pass --overwrite to discard it")
                shutil.rmtree(parts_dir)
        # A folder without settings (killed before writing them) is simply completed: another
        # shard sharing the folder may be creating it at this very moment.
        os.makedirs(parts_dir, exist_ok=True)
        if not os.path.isfile(settings_path):
            write_json(settings_path, manifest)
        if not os.path.isfile(os.path.join(parts_dir, PARTS_VIDEOS)):
            write_json(os.path.join(parts_dir, PARTS_VIDEOS),
                       {"videos": [[video.video_id, video.name] for video in videos]})
        return set(_chunk_files(parts_dir))

    def _finish_shard(self, videos: Sequence[Video], chunks: list[list[int]], parts_dir: str,
                      out_path: str, shard: Shard) -> ExtractionResult:
        """Rank 0 of a shard: count what the shard made and leave a note for merge_parts."""
        mine = [k for k in range(len(chunks)) if shard.owns(k)]
        written, failures = 0, []
        for k in mine:
            with np.load(os.path.join(parts_dir, chunk_name(k)), allow_pickle=False) as part:
                written += len(part["ids"])
                failures.extend(json.loads(str(part["failures"])))
        write_json(os.path.join(parts_dir, f"shard-{shard.index}-of-{shard.count}.json"),
                   {"num_shards": shard.count, "shard_index": shard.index, "chunks": mine,
                    "videos": sum(len(chunks[k]) for k in mine), "written": written,
                    "failed": len(failures)})
        return ExtractionResult(parts_dir, "", sum(len(chunks[k]) for k in mine), written, failures,
                                False, merged=False)

    def _loader(self, videos: Sequence[Video]) -> torch.utils.data.DataLoader:
        s = self.settings
        spec = DecodeSpec(s.num_clips, s.frames_per_clip, (s.image_height, s.image_width),
                          self.per_frame, threads=1 if self.num_workers > 0 else 0,
                          past_damage=self.settings.decode_past_damage)
        return torch.utils.data.DataLoader(
            VideoDecodeDataset(videos, spec), batch_size=None, shuffle=False,
            num_workers=self.num_workers, collate_fn=_keep_item,
            pin_memory=self.device.type == "cuda")

    def _extract_chunks(self, videos: Sequence[Video], chunks: list[list[int]], todo: list[int],
                        parts_dir: str, progress_total: int, progress_initial: int, label: str,
                        identity: str) -> None:
        if not todo:
            return
        require_decoder()
        queue = [videos[i] for k in todo for i in chunks[k]]
        self.network   # load the weights (and fail on a bad file) before starting the decoders
        progress = _progress_bar(progress_total, progress_initial, label, self.progress)
        batcher = _RowBatcher(self._forward, self.batch_size)
        items = iter(self._loader(queue))
        try:
            with self._numerics():
                for k in todo:
                    chunk_items = []
                    for _ in chunks[k]:
                        item = _next_item(items, chunks[k], videos)
                        if item.inputs is not None:
                            batcher.add(item.inputs.to(self.device, non_blocking=True))
                        chunk_items.append(item)
                        progress.update(1)
                    rows = batcher.finish()
                    self._write_chunk(parts_dir, k, [videos[i] for i in chunks[k]], chunk_items, rows,
                                      identity)
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"out of GPU memory with --batch-size {self.batch_size}; lower it and "
                            "re-run (finished chunks are kept and resumed)") from None
        finally:
            del items   # shuts the decoding workers down
            progress.close()

    @contextlib.contextmanager
    def _numerics(self):
        """fp32 is true fp32 (no TF32 on CUDA); fp16/bf16 run under CUDA autocast."""
        if self.device.type != "cuda":
            with torch.inference_mode():
                yield
            return
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.settings.precision)
            autocast = (torch.autocast("cuda", dtype=dtype) if dtype is not None
                        else contextlib.nullcontext())
            with torch.inference_mode(), autocast:
                yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.embed(self.prepare(batch)).float()

    def _write_chunk(self, parts_dir: str, chunk: int, chunk_videos: list[Video],
                     items: list[DecodedVideo], rows: torch.Tensor, identity: str) -> None:
        rows = rows.cpu()
        ids, features, failures, damaged = [], [], [], []
        offset = 0
        for video, item in zip(chunk_videos, items):
            if item.inputs is None:
                failures.append(_failure(video, item.error))
                continue
            if item.damage is not None:
                damaged.append({**_failure(video, item.damage["reason"]), **item.damage})
            count = item.inputs.shape[0]
            video_rows = rows[offset:offset + count]
            offset += count
            if item.inverse is not None:
                video_rows = video_rows[item.inverse]
            if not torch.isfinite(video_rows).all():
                failures.append(_failure(video, "the network produced non-finite features "
                                               f"(precision {self.settings.precision})"))
                continue
            ids.append(video.video_id)
            features.append(video_rows.numpy().reshape(self.video_shape()))
        stacked = (np.stack(features).astype(np.float32, copy=False) if features
                   else np.zeros((0,) + self.video_shape(), np.float32))
        with atomic_open(os.path.join(parts_dir, chunk_name(chunk)), "wb") as handle:
            np.savez(handle, ids=np.asarray(ids, np.int64), features=stacked,
                     failures=np.asarray(json.dumps(failures)), identity=np.asarray(identity),
                     damaged=np.asarray(json.dumps(damaged)))

    def _already_complete(self, videos: Sequence[Video], out_path: str, report_path: str) -> ExtractionResult:
        failures: list[dict] = []
        written = None
        try:
            with open(report_path, encoding="utf-8") as handle:
                report = json.load(handle)
            failures, written = list(report["failures"]), int(report["written"])
        except (OSError, ValueError, KeyError, TypeError):
            with h5py.File(out_path, "r") as h5:
                present = set(int(i) for i in h5["ids"][()])
            written = len(present)
            failures = [_failure(v, "not in the existing output (no failure report found)")
                        for v in videos if v.video_id not in present]
        return ExtractionResult(out_path, report_path, len(videos), written, failures, True)


class _RowBatcher:
    """Runs rows (frames or clips) through the network in batches of exactly `batch_size`.

    Rows arrive video by video; a batch may span videos. `finish()` runs what is left and returns
    every output row in arrival order, so the batch layout depends only on the rows of a chunk.
    """

    def __init__(self, forward, batch_size: int):
        self.forward = forward
        self.batch_size = batch_size
        self.pending: list[torch.Tensor] = []
        self.pending_rows = 0
        self.outputs: list[torch.Tensor] = []

    def add(self, rows: torch.Tensor) -> None:
        self.pending.append(rows)
        self.pending_rows += rows.shape[0]
        while self.pending_rows >= self.batch_size:
            self._run(self.batch_size)

    def _run(self, count: int) -> None:
        buffer = self.pending[0] if len(self.pending) == 1 else torch.cat(self.pending)
        self.outputs.append(self.forward(buffer[:count]))
        rest = buffer[count:]
        self.pending = [rest] if rest.shape[0] else []
        self.pending_rows = rest.shape[0]

    def finish(self) -> torch.Tensor:
        if self.pending_rows:
            self._run(self.pending_rows)
        outputs = self.outputs
        self.outputs = []
        if not outputs:
            return torch.zeros((0, FEATURE_DIM))
        return torch.cat(outputs)


class ResNet101Extractor(FeatureExtractor):
    """torchvision ResNet-101 without its fc: one 2048-d vector per frame → (N, F, 2048) per video."""

    model_name = "resnet101"
    feature_dataset = "resnet_features"
    default_image_size = (224, 224)
    default_batch_size = 128
    per_frame = True
    weight_files = RESNET101_FILES
    how_to_get_weights = RESNET_HOW_TO_GET
    weights_what = "ResNet-101 weights"
    memory_format = torch.channels_last

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        mean, std = NORMALIZATIONS[self.settings.normalization]
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    def _check_settings(self) -> None:
        super()._check_settings()
        if self.settings.kinetics_mean:
            raise UserError("--kinetics-mean applies to the resnext101 motion model only")

    def build_network(self) -> nn.Module:
        import torchvision
        network = torchvision.models.resnet101(weights=None)
        network.fc = nn.Identity()
        return network

    def load_network(self, path: str) -> nn.Module:
        import torchvision
        network = torchvision.models.resnet101(weights=None)
        load_strict(network, read_state_dict(path, self.weights_what), path, self.weights_what)
        network.fc = nn.Identity()
        return network

    def normalisation(self) -> str:
        mean, std = NORMALIZATIONS[self.settings.normalization]
        return f"{self.settings.normalization}: (RGB / 255 - mean {mean}) / std {std}"

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        # (B, H, W, 3) uint8 → (B, 3, H, W); the permuted view is already channels-last in memory.
        images = batch.permute(0, 3, 1, 2).float().div_(255.0)
        return images.sub_(self.mean).div_(self.std)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.network(inputs)

    @staticmethod
    def shape_for(num_clips: int, frames_per_clip: int) -> tuple[int, ...]:
        return (num_clips, frames_per_clip, FEATURE_DIM)


class ResNeXt101Extractor(FeatureExtractor):
    """3D ResNeXt-101 (Kinetics): one 2048-d vector per clip → (N, 2048) per video."""

    model_name = "resnext101"
    feature_dataset = "resnext_features"
    default_image_size = (112, 112)
    default_batch_size = 16
    per_frame = False
    weight_files = ("resnext-101-kinetics.pth",)
    how_to_get_weights = RESNEXT_HOW_TO_GET
    weights_what = "3D ResNeXt-101 weights"
    memory_format = torch.channels_last_3d

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mean = torch.tensor(KINETICS_MEAN, device=self.device).view(1, 3, 1, 1, 1)

    def build_network(self) -> nn.Module:
        return resnext101()

    def load_network(self, path: str) -> nn.Module:
        network = resnext101()
        load_strict(network, read_state_dict(path, self.weights_what), path, self.weights_what)
        return network

    def normalisation(self) -> str:
        return "0-255 RGB minus Kinetics mean" if self.settings.kinetics_mean else "raw 0-255 RGB"

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        # (B, F, H, W, 3) uint8 → (B, 3, F, H, W), raw 0–255 values as the original work fed them.
        clips = batch.permute(0, 4, 1, 2, 3).float()
        if self.settings.kinetics_mean:
            clips = clips.sub_(self.mean)
        return clips

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.network.features(inputs)

    @staticmethod
    def shape_for(num_clips: int, frames_per_clip: int) -> tuple[int, ...]:
        return (num_clips, FEATURE_DIM)


EXTRACTORS: dict[str, type[FeatureExtractor]] = {
    ResNet101Extractor.model_name: ResNet101Extractor,
    ResNeXt101Extractor.model_name: ResNeXt101Extractor,
}


def make_extractor(settings: ExtractionSettings, device: torch.device | str = "cpu",
                   batch_size: int | None = None, num_workers: int = 0,
                   progress: bool = True) -> FeatureExtractor:
    if settings.model not in EXTRACTORS:
        raise UserError(f"unknown model {settings.model!r}; choose one of {', '.join(EXTRACTORS)}")
    return EXTRACTORS[settings.model](settings, device, batch_size, num_workers, progress)


class _Plan(NamedTuple):
    """What rank 0 found before the work starts (shared with every rank)."""
    complete: bool          # the output exists with these settings: nothing to do
    todo: list[int]         # this shard's unfinished chunks, in order
    shard_videos: int       # videos in this shard's chunks
    done_videos: int        # of which already in finished chunks
    token: str | None       # this launch's mark in the parts folder (several ranks)


def chunk_partition(num_videos: int, chunk_videos: int) -> list[list[int]]:
    """The fixed partition of the video list into chunks (a chunk's number names its file)."""
    return [list(range(start, min(start + chunk_videos, num_videos)))
            for start in range(0, num_videos, chunk_videos)]


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}.npz"


def identity_digest(manifest: dict) -> str:
    """Hash of the settings that determine the numbers, stored in every chunk."""
    return hashlib.sha256(json.dumps(_identity(manifest), sort_keys=True).encode("utf-8")).hexdigest()


def _chunk_files(parts_dir: str) -> dict[int, str]:
    found = {}
    for path in glob.glob(os.path.join(glob.escape(parts_dir), CHUNK_PATTERN)):
        number = os.path.basename(path)[len("chunk-"):-len(".npz")]
        if number.isdigit():
            found[int(number)] = path
    return found


def _read_json_or_none(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _wait_until_visible(paths: Sequence[str], ready: Callable[[], bool] | None = None,
                        timeout: float = SHARED_FS_WAIT_S) -> None:
    """Wait (briefly) until `paths` exist and `ready()` holds; the caller then reports what is not."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if all(os.path.exists(path) for path in paths) and (ready is None or ready()):
            return
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


def _launch_problem(parts_dir: str, token: str | None) -> str | None:
    """This rank's view of the parts folder rank 0 just marked: it must be the same folder."""
    saved = _read_json_or_none(os.path.join(parts_dir, PARTS_LAUNCH))
    if isinstance(saved, dict) and saved.get("token") == token:
        return None
    return (f"cannot see the parts folder {os.path.abspath(parts_dir)} that rank 0 prepared; under torchrun "
            "on several machines --out must be on a filesystem every node shares (otherwise run "
            "each machine with --num-shards/--shard-index and merge with preprocess/merge_features.py)")


class _PartsFolder(NamedTuple):
    path: str
    manifest: dict
    videos: list[tuple[int, str]]
    chunks: dict[int, str]


def _read_parts_folder(parts_dir: str) -> _PartsFolder:
    if not os.path.isdir(parts_dir):
        raise UserError(f"{parts_dir}: parts folder not found (made by preprocess/preprocess_features.py "
                        "next to its --out, as <out>.parts)")
    settings_path = os.path.join(parts_dir, PARTS_SETTINGS)
    manifest = _read_json_or_none(settings_path)
    if not isinstance(manifest, dict) or "feature_dataset" not in manifest or "videos_sha256" not in manifest:
        raise UserError(f"{settings_path}: missing or unreadable extraction settings; not a parts folder "
                        "of preprocess/preprocess_features.py")
    videos_path = os.path.join(parts_dir, PARTS_VIDEOS)
    listing = _read_json_or_none(videos_path)
    try:
        videos = [(int(vid), str(name)) for vid, name in listing["videos"]]
    except (TypeError, KeyError, ValueError):
        raise UserError(f"{videos_path}: missing or unreadable video list") from None
    if videos_digest([Video(vid, name, "") for vid, name in videos]) != manifest["videos_sha256"]:
        raise UserError(f"{videos_path}: the video list does not match {settings_path} (videos_sha256)")
    return _PartsFolder(parts_dir, manifest, videos, _chunk_files(parts_dir))


def _npy_header(archive: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an .npz file, without reading its data."""
    with archive.open(f"{name}.npy") as handle:
        version = np.lib.format.read_magic(handle)
        reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _, dtype = reader(handle)
    return tuple(shape), np.dtype(dtype)


def _short(ids: Sequence[int], limit: int = 6) -> str:
    ids = list(ids)
    text = ", ".join(str(i) for i in ids[:limit])
    return text + (f", … ({len(ids)} in all)" if len(ids) > limit else "")


def _check_chunk(path: str, expected: list[int], video_shape: tuple[int, ...], identity: str) -> tuple[np.ndarray, list[dict]]:
    """A chunk's ids and failures, after checking them against its place in the video list."""
    try:
        with zipfile.ZipFile(path) as archive:
            shape, dtype = _npy_header(archive, "features")
        with np.load(path, allow_pickle=False) as part:
            ids = np.asarray(part["ids"])
            failures = json.loads(str(part["failures"]))
            saved_identity = str(part["identity"]) if "identity" in part.files else None
        failure_ids = [int(failure["video_id"]) for failure in failures]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: unreadable part file ({type(exc).__name__}: {exc}); delete it and "
                        "re-run the extraction (shard) that made it") from None
    if saved_identity is not None and saved_identity != identity:
        raise UserError(f"{path}: made with other extraction settings than its folder's {PARTS_SETTINGS}")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"{path}: ids must be a list of integers, got {ids.dtype} {ids.shape}")
    if dtype != np.float32 or shape != (len(ids),) + video_shape:
        raise UserError(f"{path}: features are {dtype} {shape}, expected float32 {(len(ids),) + video_shape}")
    held = [int(i) for i in ids] + failure_ids
    if sorted(held) != sorted(expected):
        duplicated = sorted({i for i in held if held.count(i) > 1})
        extra = [i for i in held if i not in expected]
        missing = [i for i in expected if i not in held]
        detail = "; ".join(text for text in (
            f"videos twice: {_short(duplicated)}" if duplicated else "",
            f"videos not in this chunk of the video list: {_short(extra)}" if extra else "",
            f"videos missing: {_short(missing)}" if missing else "") if text)
        raise UserError(f"{path}: does not hold exactly its chunk of the video list ({detail})")
    if [int(i) for i in ids] != [i for i in expected if i in set(held) - set(failure_ids)]:
        raise UserError(f"{path}: videos are not in the order of the video list")
    return ids.astype(np.int64), failures


def merge_parts(parts_dirs: Sequence[str], out_path: str, keep_parts: bool = False) -> ExtractionResult:
    """Check the parts folders of one extraction and write its output and failure report.

    The folders (one, or one per shard or machine) must hold every chunk exactly once, all made
    with the same settings for the same video list. The output is written to a temporary name
    and renamed when complete; then the parts folders are removed (unless `keep_parts`).
    """
    if not parts_dirs:
        raise UserError("no parts folder given")
    folders = [_read_parts_folder(os.fspath(path)) for path in parts_dirs]
    first = folders[0]
    manifest = first.manifest
    for folder in folders[1:]:
        if _identity(folder.manifest) != _identity(manifest):
            raise UserError(f"{os.path.join(folder.path, PARTS_SETTINGS)}: made "
                            f"{_difference(folder.manifest, manifest)} than {first.path}")
    model = manifest.get("model")
    if model not in EXTRACTORS or manifest["feature_dataset"] != EXTRACTORS[model].feature_dataset:
        raise UserError(f"{os.path.join(first.path, PARTS_SETTINGS)}: unknown model {model!r}")
    video_shape = EXTRACTORS[model].shape_for(int(manifest["num_clips"]), int(manifest["frames_per_clip"]))
    chunks = chunk_partition(len(first.videos), int(manifest["chunk_videos"]))
    identity = identity_digest(manifest)

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

    ids, failures, damaged = [], [], []
    for k, chunk in enumerate(chunks):
        chunk_ids, chunk_failures = _check_chunk(owner[k], [first.videos[i][0] for i in chunk],
                                                 video_shape, identity)
        ids.append(chunk_ids)
        failures.extend(chunk_failures)
        damaged.extend(_chunk_damage(owner[k]))
    all_ids = np.concatenate(ids)
    report_path = out_path + ".failures.json"
    report = {"output": os.path.abspath(out_path), "model": model, "videos": len(first.videos),
              "written": int(len(all_ids)), "failed": len(failures), "failures": failures,
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
            for k in range(len(chunks)):
                with np.load(owner[k], allow_pickle=False) as part:
                    features = part["features"]
                    data[row:row + len(features)] = features
                    row += len(features)
            h5.create_dataset("ids", data=all_ids)
            for key, value in manifest.items():
                h5.attrs[key] = value
            h5.attrs["failed_videos"] = len(failures)
            h5.attrs["manifest"] = json.dumps(manifest, sort_keys=True)
    if not keep_parts:
        for folder in folders:
            shutil.rmtree(folder.path, ignore_errors=True)
    return ExtractionResult(out_path, report_path, len(first.videos), int(len(all_ids)), failures, False,
                            damaged=damaged)


def _chunk_damage(path: str) -> list[dict]:
    """The damaged-but-written videos a chunk records (written from damaged files)."""
    with np.load(path, allow_pickle=False) as part:
        return json.loads(str(part["damaged"])) if "damaged" in part.files else []


def merge_into_output(parts_dirs: Sequence[str], out_path: str, overwrite: bool = False,
                      keep_parts: bool = False) -> ExtractionResult:
    """`merge_parts`, unless `out_path` already holds these features (a finished merge).

    An existing output made with other settings is kept unless `overwrite`.
    """
    out_path = os.fspath(out_path)
    if os.path.exists(out_path) and not overwrite:
        existing = _read_output_manifest(out_path)
        present = [path for path in parts_dirs if os.path.isdir(path)]
        settings = _read_json_or_none(os.path.join(present[0], PARTS_SETTINGS)) if present else None
        if existing is not None and (not present or _identity(settings) == _identity(existing)):
            if not keep_parts:   # a merge killed while removing its parts
                for path in present:
                    shutil.rmtree(path, ignore_errors=True)
            return _completed_result(out_path, existing)
        difference = _difference(existing, settings) if isinstance(settings, dict) else "by something else"
        raise UserError(f"{out_path} already exists and was made {difference}; pass --overwrite to "
                        "replace it or choose another --out")
    _remove_stale_temporaries(out_path, [], output_too=True)
    return merge_parts(parts_dirs, out_path, keep_parts)


def _completed_result(out_path: str, manifest: dict) -> ExtractionResult:
    report_path = out_path + ".failures.json"
    report = _read_json_or_none(report_path)
    try:
        failures, written = list(report["failures"]), int(report["written"])
    except (TypeError, KeyError, ValueError):
        with h5py.File(out_path, "r") as h5:
            written = len(h5["ids"])
        failures = []
    return ExtractionResult(out_path, report_path, int(manifest.get("videos", written)), written,
                            failures, True)


def _missing_hint(missing: list[int], chunks: list[list[int]], videos: list[tuple[int, str]],
                  folders: list[_PartsFolder]) -> str:
    names = ", ".join(chunk_name(k) for k in missing[:4]) + (", …" if len(missing) > 4 else "")
    first_video = videos[chunks[missing[0]][0]][0]
    hint = f"{names}; the first holds video {first_video}"
    shard_counts = set()
    for folder in folders:
        for path in glob.glob(os.path.join(glob.escape(folder.path), "shard-*-of-*.json")):
            note = _read_json_or_none(path)
            if isinstance(note, dict) and isinstance(note.get("num_shards"), int):
                shard_counts.add(note["num_shards"])
    if len(shard_counts) == 1:
        count = shard_counts.pop()
        indices = sorted({k % count for k in missing})
        hint += f"; made by --num-shards {count} --shard-index {', '.join(str(i) for i in indices)}"
    return hint


def _next_item(items, chunk: list[int], videos: Sequence[Video]) -> DecodedVideo:
    try:
        return next(items)
    except RuntimeError as exc:
        if "DataLoader worker" not in str(exc):
            raise
        names = ", ".join(videos[i].path for i in chunk)
        raise UserError(f"a video decoding worker died ({str(exc).splitlines()[0]}) while reading one "
                        f"of: {names}; finished chunks are kept — re-run with --num-workers 0 to see "
                        "which file crashes the decoder") from None


def _failure(video: Video, reason: str | None) -> dict:
    return {"video_id": video.video_id, "name": video.name, "path": video.path,
            "reason": reason or "unknown"}


def _identity(manifest: dict | None) -> dict | None:
    if manifest is None:
        return None
    return {key: value for key, value in manifest.items() if key not in NOT_IDENTITY}


def _difference(saved: dict | None, manifest: dict) -> str:
    if saved is None:
        return "by something else (no readable extraction settings in it)"
    for key, value in manifest.items():
        if key in NOT_IDENTITY:
            continue
        if saved.get(key) != value:
            return f"with other settings ({key}: {saved.get(key)!r} there, {value!r} now)"
    return "with other settings"


def _read_output_manifest(path: str) -> dict | None:
    try:
        with h5py.File(path, "r") as h5:
            text = h5.attrs.get("manifest")
    except (OSError, ValueError):
        return None
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def _remove_stale_temporaries(out_path: str, chunks: Iterable[int], output_too: bool) -> None:
    """Temporary files of a killed run (atomic writes in progress): those of `chunks`, and the
    output's and the parts folder's own when `output_too` (only the merging run may touch them)."""
    folder = os.path.dirname(os.path.abspath(out_path))
    parts_dir = out_path + ".parts"
    stale = [path for k in chunks
             for path in glob.glob(os.path.join(glob.escape(parts_dir), glob.escape(f".{chunk_name(k)}.") + "*.tmp"))]
    if output_too:
        stale += glob.glob(os.path.join(folder, glob.escape(f".{os.path.basename(out_path)}.") + "*.tmp"))
        stale += [path for path in glob.glob(os.path.join(glob.escape(parts_dir), ".*.tmp"))
                  if not os.path.basename(path).startswith(".chunk-")]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _progress_bar(total: int, initial: int, label: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="video", desc=label, disable=not enabled,
                dynamic_ncols=True, smoothing=0.05)
