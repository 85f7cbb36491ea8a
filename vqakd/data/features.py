"""The video feature table: the two HDF5 feature files (docs/method.md#feature-files), checked
(`read_feature_header`, `load_feature_table`) and read into memory once as two tensors, optionally
float16, optionally on the GPU (`choose_table_device`), or read batch by batch in lazy mode (one
open handle per file and process). NaN/inf features are reported naming the video.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from vqakd.core.progress import progress_bar
from vqakd.core.config import Config
from vqakd.core.errors import UserError, require_file

APPEARANCE_DATASET = "resnet_features"
MOTION_DATASET = "resnext_features"
IDS_DATASET = "ids"
# Rows read from an HDF5 file per chunk while building the in-memory table.
LOAD_CHUNK_BYTES = 256 << 20
# The GPU table may use at most this share of the free GPU memory (the model needs the rest).
GPU_TABLE_SHARE = 0.5


def _open_h5(path: str):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path}: cannot open as HDF5 ({exc}); the file may be truncated or of another "
                        "format") from None


def _read(path: str, what: str, read: Callable[[], np.ndarray]) -> np.ndarray:
    """`read()` from the HDF5 file at `path`; a read error names the file and `what` was read."""
    try:
        return read()
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc}); the file may be truncated") from None


@dataclass
class FeatureFileInfo:
    path: str
    dataset: str
    shape: tuple[int, ...]
    ids: np.ndarray            # (V,) int64
    row_of: dict[int, int]     # video id -> row


def read_feature_header(path: str, dataset: str, ndim: int, layout: str) -> FeatureFileInfo:
    """Check one feature file's dataset names and shapes; read its ids."""
    require_file(path, "feature file", "make it with preprocess/preprocess_features.py")
    with _open_h5(path) as handle:
        for name in (dataset, IDS_DATASET):
            if name not in handle:
                raise UserError(f"{path}: no dataset {name!r} (found: {', '.join(sorted(handle)) or 'none'}); expected "
                                f"{dataset!r} {layout} and {IDS_DATASET!r} (V,)")
        features, ids_ds = handle[dataset], handle[IDS_DATASET]
        if len(features.shape) != ndim:
            raise UserError(f"{path}: dataset {dataset!r} has shape {tuple(features.shape)}; expected {layout}")
        if features.dtype.kind != "f":
            raise UserError(f"{path}: dataset {dataset!r} has dtype {features.dtype}; expected floats")
        if len(ids_ds.shape) != 1 or ids_ds.dtype.kind not in "iu":
            raise UserError(f"{path}: dataset {IDS_DATASET!r} has shape {tuple(ids_ds.shape)} and dtype "
                            f"{ids_ds.dtype}; expected integer (V,)")
        if ids_ds.shape[0] != features.shape[0]:
            raise UserError(f"{path}: {IDS_DATASET!r} has {ids_ds.shape[0]} entries but {dataset!r} has "
                            f"{features.shape[0]} videos")
        ids = np.asarray(_read(path, repr(IDS_DATASET), lambda: ids_ds[()]), dtype=np.int64)
        shape = tuple(int(s) for s in features.shape)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise UserError(f"{path}: video id {int(unique[counts > 1][0])} appears {int(counts.max())} times in "
                        f"{IDS_DATASET!r}")
    return FeatureFileInfo(path, dataset, shape, ids, {int(v): row for row, v in enumerate(ids.tolist())})


def _first_nonfinite_row(chunk: np.ndarray) -> Optional[int]:
    bad = np.flatnonzero(~np.isfinite(chunk.reshape(chunk.shape[0], -1)).all(axis=1))
    return int(bad[0]) if bad.size else None


def _convert_checked(info: FeatureFileInfo, block: np.ndarray, rows: np.ndarray, dtype_name: str) -> np.ndarray:
    """`block` in the table's dtype; NaN/inf in the file, or values the table's dtype cannot
    hold (a float64 file read as float32 or float16), name the file, dataset and video."""
    bad = _first_nonfinite_row(block)
    if bad is not None:
        raise UserError(f"{info.path}: {info.dataset!r} of video id {int(info.ids[rows[bad]])} holds NaN or "
                        "infinite values")
    with np.errstate(over="ignore"):       # overflow is detected just below, with the video named
        converted = block.astype(dtype_name, copy=False)
    if converted.dtype != block.dtype:
        bad = _first_nonfinite_row(converted)
        if bad is not None:
            largest = float(np.abs(block[bad]).max())
            fits_float32 = largest <= float(np.finfo(np.float32).max)
            advice = ("use data.feature_dtype: float32" if dtype_name == "float16" and fits_float32
                      else "no feature extractor makes such values: re-extract this video's features")
            raise UserError(f"{info.path}: {info.dataset!r} of video id {int(info.ids[rows[bad]])} holds values up "
                            f"to {largest:.3g} ({block.dtype} in the file), too large for {dtype_name}; {advice} "
                            f"({dtype_name} holds at most {float(np.finfo(dtype_name).max):.3g})")
    return converted


class FeatureTable:
    """Appearance and motion features of every video, looked up by table row."""

    def __init__(self, appearance: FeatureFileInfo, motion: FeatureFileInfo, dtype: str = "float32",
                 mode: str = "memory"):
        self.appearance_info = appearance
        self.motion_info = motion
        self.dtype_name = dtype
        self.dtype = getattr(torch, dtype)           # data.feature_dtype: float32 or float16
        self.mode = mode
        self.appearance: Optional[torch.Tensor] = None
        self.motion: Optional[torch.Tensor] = None
        self._handles: Optional[tuple[int, Any, Any]] = None   # (pid, appearance file, motion file)

    @property
    def device(self) -> torch.device:
        return self.appearance.device if self.appearance is not None else torch.device("cpu")

    def row_bytes(self, itemsize: Optional[int] = None) -> int:
        """One video's appearance and motion features, in the table's dtype or `itemsize` bytes."""
        elements = int(np.prod(self.appearance_info.shape[1:])) + int(np.prod(self.motion_info.shape[1:]))
        return elements * (self.dtype.itemsize if itemsize is None else itemsize)

    def nbytes(self, itemsize: Optional[int] = None) -> int:
        return self.row_bytes(itemsize) * self.appearance_info.shape[0]

    def rows(self, video_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The appearance and motion table rows of these videos."""
        return tuple(np.array([info.row_of[int(v)] for v in video_ids], dtype=np.int64)
                     for info in (self.appearance_info, self.motion_info))

    def load(self, progress: bool, device: torch.device) -> None:
        """Read both files into memory on `device`, chunk by chunk, checking every video for
        NaN/inf. Whether it fits is the memory plan's question (vqakd/training/memory.py)."""
        self.appearance = self._load_file(self.appearance_info, progress, device)
        self.motion = self._load_file(self.motion_info, progress, device)

    def _load_file(self, info: FeatureFileInfo, progress: bool, device: torch.device) -> torch.Tensor:
        table = torch.empty(info.shape, dtype=self.dtype, device=device)
        row_bytes = int(np.prod(info.shape[1:])) * 4
        chunk = max(1, LOAD_CHUNK_BYTES // row_bytes)
        bar = progress_bar(total=info.shape[0], desc=f"loading {os.path.basename(info.path)}", unit="video",
                           enabled=progress, dynamic_ncols=True, leave=False)
        with _open_h5(info.path) as handle, bar:
            dataset = handle[info.dataset]
            for start in range(0, info.shape[0], chunk):
                stop = min(start + chunk, info.shape[0])
                block = _read(info.path, f"{info.dataset!r} rows {start}..{stop - 1}", lambda: dataset[start:stop])
                block = _convert_checked(info, block, np.arange(start, stop), self.dtype_name)
                table[start:stop] = torch.from_numpy(block).to(device)
                bar.update(stop - start)
        return table

    def gather(self, app_rows: torch.Tensor, mot_rows: torch.Tensor,
               out: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a batch of rows (float32 or float16, on the table's device); in memory
        mode written into `out` (appearance, motion) when given."""
        if self.mode == "memory":
            app_out, mot_out = (None, None) if out is None else out
            return (torch.index_select(self.appearance, 0, app_rows.to(self.appearance.device), out=app_out),
                    torch.index_select(self.motion, 0, mot_rows.to(self.motion.device), out=mot_out))
        # One handle per file per process: a forked loader worker must not reuse the parent's.
        pid = os.getpid()
        if self._handles is None or self._handles[0] != pid:
            self._handles = (pid, _open_h5(self.appearance_info.path), _open_h5(self.motion_info.path))
        gathered = []
        for info, handle, rows in zip((self.appearance_info, self.motion_info), self._handles[1:],
                                      (app_rows.cpu().numpy(), mot_rows.cpu().numpy())):
            # One HDF5 read of the distinct rows, in increasing order (what h5py accepts).
            unique, inverse = np.unique(rows, return_inverse=True)
            block = _read(info.path, repr(info.dataset), lambda: handle[info.dataset][unique][inverse])
            block = _convert_checked(info, block, rows, self.dtype_name)
            gathered.append(torch.from_numpy(np.ascontiguousarray(block)))
        return gathered[0], gathered[1]

    def __getstate__(self):
        return {**self.__dict__, "_handles": None}       # h5py handles cannot cross process boundaries


def load_feature_table(config: Config, expected_by: str = "model") -> FeatureTable:
    """Check both feature files' layout against `config.model` (`expected_by` names where those
    sizes come from in the messages) and return the (not yet loaded) table."""
    model = config.model
    appearance = read_feature_header(config.data.appearance_feat, APPEARANCE_DATASET, 4,
                                     "(V, N, F, D) = (videos, clips, frames per clip, feature size)")
    motion = read_feature_header(config.data.motion_feat, MOTION_DATASET, 3, "(V, N, D) = (videos, clips, feature size)")
    for info in (appearance, motion):
        clips, size = info.shape[1], info.shape[-1]
        if clips != model.num_nodes:
            raise UserError(f"{info.path}: {info.dataset!r} has {clips} clips per video but {expected_by}.num_nodes "
                            f"is {model.num_nodes}; use features with {model.num_nodes} clips"
                            + (f" or set model.num_nodes: {clips}" if expected_by == "model" else ""))
        if size != model.vision_dim:
            raise UserError(f"{info.path}: {info.dataset!r} has feature size {size} but {expected_by}.vision_dim "
                            f"is {model.vision_dim}")
    if appearance.shape[2] < 1:
        raise UserError(f"{appearance.path}: {APPEARANCE_DATASET!r} has no frames per clip")
    return FeatureTable(appearance, motion, config.data.feature_dtype, config.data.feature_mode)


def choose_table_device(config: Config, table: FeatureTable, device: torch.device, *, mode: Optional[str] = None,
                        nbytes: Optional[int] = None) -> torch.device:
    """Where the in-memory table lives (data.feature_device); `mode` and `nbytes` ask for another
    table setting than `table`'s (the memory plan weighs them all)."""
    want = config.data.feature_device
    mode = table.mode if mode is None else mode
    nbytes = table.nbytes() if nbytes is None else nbytes
    if mode != "memory" or want == "cpu" or device.type != "cuda":
        if want == "cuda":
            raise UserError("data.feature_device: cuda needs a CUDA training device and data.feature_mode: memory")
        return torch.device("cpu")
    free, _total = torch.cuda.mem_get_info(device)
    if want == "cuda":
        if nbytes > free:
            raise UserError(f"data.feature_device: cuda, but the feature table needs {nbytes / 2**30:.1f} GiB "
                            f"and {device} has {free / 2**30:.1f} GiB free; use feature_device: auto or cpu, or "
                            "feature_dtype: float16")
        return device
    # auto: leave at least half of the free memory to the model, its activations and the optimizer.
    return device if nbytes <= GPU_TABLE_SHARE * free else torch.device("cpu")
