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
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
from typing import Any, ClassVar, NamedTuple, Sequence

import h5py
import numpy as np
import torch
from torch import nn

import vqakd
from vqakd.annotations import Video
from vqakd.errors import UserError
from vqakd.io import atomic_open, atomic_path, write_json
from vqakd.resnext3d import WEIGHTS_HOW_TO_GET as RESNEXT_HOW_TO_GET
from vqakd.resnext3d import load_strict, read_state_dict, resnext101
from vqakd.video import VideoError, read_clip_frames

FEATURE_DIM = 2048
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_NUM_CLIPS = 8
DEFAULT_FRAMES_PER_CLIP = 16
DEFAULT_CHUNK_VIDEOS = 16
DEFAULT_RANDOM_SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


class ExtractionResult(NamedTuple):
    output: str
    report: str
    videos: int
    written: int
    failures: list[dict]
    already_complete: bool


class DecodedVideo(NamedTuple):
    """What a decoding worker hands back for one video."""
    position: int                    # index in the list of videos still to do
    inputs: torch.Tensor | None      # uint8 network inputs (rows, ...), None on failure
    inverse: torch.Tensor | None     # (N, F) rows of `inputs` for each clip frame (frame models)
    error: str | None


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """How a worker turns a video file into network inputs (picklable, no network in it)."""
    num_clips: int
    frames_per_clip: int
    size: tuple[int, int]
    per_frame: bool        # True: distinct frames (U, H, W, 3); False: clips (N, F, H, W, 3)
    threads: int


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
                                           spec.frames_per_clip, spec.size, spec.threads)
        except VideoError as exc:
            return DecodedVideo(position, None, None, exc.reason)
        except Exception as exc:  # one odd file must not stop a day-long run; the reason is reported
            return DecodedVideo(position, None, None, f"unexpected {type(exc).__name__}: {exc}")
        if spec.per_frame:
            return DecodedVideo(position, torch.from_numpy(clip_frames.frames),
                                torch.from_numpy(clip_frames.inverse), None)
        return DecodedVideo(position, torch.from_numpy(np.ascontiguousarray(clip_frames.clips())), None, None)


def _keep_item(item: DecodedVideo) -> DecodedVideo:
    return item


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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

    def video_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

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

    def find_weights(self) -> str:
        """The weights file: --weights, else data/weights/<name>, else torchvision's cache."""
        if self.settings.weights:
            path = self.settings.weights
            if not os.path.isfile(path):
                raise UserError(f"{self.weights_what} file not found: {path}; {self.how_to_get_weights}")
            return path
        folders = [os.path.join(TOOLKIT_ROOT, "data", "weights"),
                   os.path.join(torch.hub.get_dir(), "checkpoints")]
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
        return path, sha256_file(path)

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

    def run(self, videos: Sequence[Video], out_path: str, overwrite: bool = False) -> ExtractionResult:
        """Extract features of `videos` into `out_path`, resuming a previous run of the same settings."""
        if not videos:
            raise UserError("no videos to extract features from")
        out_path = os.fspath(out_path)
        parts_dir = out_path + ".parts"
        report_path = out_path + ".failures.json"
        manifest = self.manifest(videos)
        _remove_stale_temporaries(out_path)

        if os.path.exists(out_path):
            existing = _read_output_manifest(out_path)
            if existing is not None and _identity(existing) == _identity(manifest) and not overwrite:
                # The output is renamed into place only once complete; parts left beside it
                # belong to a run killed while removing them.
                shutil.rmtree(parts_dir, ignore_errors=True)
                return self._already_complete(videos, out_path, report_path)
            if not overwrite:
                raise UserError(f"{out_path} already exists and was made "
                                f"{_difference(existing, manifest)}; pass --overwrite to replace it "
                                "or choose another --out")

        chunks = [list(range(start, min(start + self.settings.chunk_videos, len(videos))))
                  for start in range(0, len(videos), self.settings.chunk_videos)]
        done = self._open_parts(parts_dir, manifest, overwrite)
        todo = [k for k in range(len(chunks)) if k not in done]
        self._extract_chunks(videos, chunks, todo, parts_dir, done_videos=sum(len(chunks[k]) for k in done))
        return self._assemble(videos, chunks, parts_dir, out_path, report_path, manifest)

    def _open_parts(self, parts_dir: str, manifest: dict, overwrite: bool) -> set[int]:
        """Create or check the parts folder; return the chunks already finished."""
        settings_path = os.path.join(parts_dir, "settings.json")
        if os.path.isdir(parts_dir):
            saved = None
            if os.path.isfile(settings_path):
                try:
                    with open(settings_path, encoding="utf-8") as handle:
                        saved = json.load(handle)
                except (OSError, json.JSONDecodeError):
                    saved = None
            has_chunks = bool(glob.glob(os.path.join(glob.escape(parts_dir), "chunk-*.npz")))
            if saved is None and not has_chunks:
                shutil.rmtree(parts_dir)   # killed before the first chunk: nothing to keep
            elif saved is None or _identity(saved) != _identity(manifest):
                if not overwrite:
                    raise UserError(f"{parts_dir} holds an unfinished run made "
                                    f"{_difference(saved, manifest)}; re-run with the same settings "
                                    "to resume it, or pass --overwrite to discard it")
                shutil.rmtree(parts_dir)
        if not os.path.isdir(parts_dir):
            os.makedirs(parts_dir)
            write_json(settings_path, manifest)
        done = set()
        for path in glob.glob(os.path.join(parts_dir, "chunk-*.npz")):
            name = os.path.basename(path)[len("chunk-"):-len(".npz")]
            if name.isdigit():
                done.add(int(name))
        return done

    def _loader(self, videos: Sequence[Video]) -> torch.utils.data.DataLoader:
        s = self.settings
        spec = DecodeSpec(s.num_clips, s.frames_per_clip, (s.image_height, s.image_width),
                          self.per_frame, threads=1 if self.num_workers > 0 else 0)
        return torch.utils.data.DataLoader(
            VideoDecodeDataset(videos, spec), batch_size=None, shuffle=False,
            num_workers=self.num_workers, collate_fn=_keep_item,
            pin_memory=self.device.type == "cuda")

    def _extract_chunks(self, videos: Sequence[Video], chunks: list[list[int]], todo: list[int],
                        parts_dir: str, done_videos: int) -> None:
        if not todo:
            return
        queue = [videos[i] for k in todo for i in chunks[k]]
        self.network   # load the weights (and fail on a bad file) before starting the decoders
        progress = _progress_bar(len(videos), done_videos, self.model_name, self.progress)
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
                    self._write_chunk(parts_dir, k, [videos[i] for i in chunks[k]], chunk_items, rows)
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
                     items: list[DecodedVideo], rows: torch.Tensor) -> None:
        rows = rows.cpu()
        ids, features, failures = [], [], []
        offset = 0
        for video, item in zip(chunk_videos, items):
            if item.inputs is None:
                failures.append(_failure(video, item.error))
                continue
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
        with atomic_open(os.path.join(parts_dir, f"chunk-{chunk:06d}.npz"), "wb") as handle:
            np.savez(handle, ids=np.asarray(ids, np.int64), features=stacked,
                     failures=np.asarray(json.dumps(failures)))

    def _assemble(self, videos: Sequence[Video], chunks: list[list[int]], parts_dir: str,
                  out_path: str, report_path: str, manifest: dict) -> ExtractionResult:
        part_paths = [os.path.join(parts_dir, f"chunk-{k:06d}.npz") for k in range(len(chunks))]
        ids, failures = [], []
        for path in part_paths:
            with np.load(path, allow_pickle=False) as part:
                ids.append(part["ids"])
                failures.extend(json.loads(str(part["failures"])))
        all_ids = np.concatenate(ids)
        report = {"output": os.path.abspath(out_path), "model": self.model_name,
                  "videos": len(videos), "written": int(len(all_ids)), "failed": len(failures),
                  "failures": failures}
        write_json(report_path, report)
        if len(all_ids) == 0:
            first = failures[0]
            raise UserError(f"no video could be used (e.g. {first['path']}: {first['reason']}); "
                            f"{len(failures)} failures listed in {report_path}")
        with atomic_path(out_path) as tmp:
            with h5py.File(tmp, "w") as h5:
                data = h5.create_dataset(self.feature_dataset, shape=(len(all_ids),) + self.video_shape(),
                                         dtype="float32")
                row = 0
                for path in part_paths:
                    with np.load(path, allow_pickle=False) as part:
                        features = part["features"]
                        data[row:row + len(features)] = features
                        row += len(features)
                h5.create_dataset("ids", data=all_ids.astype(np.int64))
                for key, value in manifest.items():
                    h5.attrs[key] = value
                h5.attrs["failed_videos"] = len(failures)
                h5.attrs["manifest"] = json.dumps(manifest, sort_keys=True)
        shutil.rmtree(parts_dir, ignore_errors=True)
        return ExtractionResult(out_path, report_path, len(videos), int(len(all_ids)), failures, False)

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
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

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
        return "imagenet mean/std on 0-1 RGB"

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        # (B, H, W, 3) uint8 → (B, 3, H, W); the permuted view is already channels-last in memory.
        images = batch.permute(0, 3, 1, 2).float().div_(255.0)
        return images.sub_(self.mean).div_(self.std)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.network(inputs)

    def video_shape(self) -> tuple[int, ...]:
        return (self.settings.num_clips, self.settings.frames_per_clip, FEATURE_DIM)


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

    def video_shape(self) -> tuple[int, ...]:
        return (self.settings.num_clips, FEATURE_DIM)


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


def _remove_stale_temporaries(out_path: str) -> None:
    """Temporary files of a killed run: the output's and the parts' (atomic writes in progress)."""
    folder = os.path.dirname(os.path.abspath(out_path))
    base = os.path.basename(out_path)
    stale = glob.glob(os.path.join(folder, glob.escape(f".{base}.") + "*.tmp"))
    stale += glob.glob(os.path.join(glob.escape(out_path + ".parts"), ".*.tmp"))
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _progress_bar(total: int, initial: int, label: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="video", desc=label, disable=not enabled,
                dynamic_ncols=True, smoothing=0.05)
