"""Training data: vocabulary, question files and the video feature table (SPEC §2 formats).

Layout in memory:
- `FeatureTable`: both HDF5 files read ONCE into two tensors (appearance (V, N, F, Dv), motion
  (V, N, Dv)), optionally as float16, optionally on the GPU; rows are looked up by video id.
  In lazy mode (feature files larger than RAM) nothing is read up front; each process that
  gathers a batch keeps one open handle per file and reads the batch's rows in one call.
- `QuestionSplit`: one split's question tensors plus, per question, the feature-table rows of its
  video and its question-type code.
- `QuestionBatches`: a Dataset indexed by a *batch* of question indices (fed by
  `EpochBatchSampler` through a DataLoader with `batch_size=None`), so a batch is one
  index-tensor gather, never one HDF5 read or `__getitem__` per sample.

Everything checkable is checked before training starts, with errors that name the file:
dataset names and shapes, clips per video == `model.num_nodes`, feature size == `model.vision_dim`,
every question's video present in both files, NaN/inf features (naming the video), token and
answer indices inside the vocabulary, GloVe rows == question vocabulary size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from vqakd.annotations import SPLITS
from vqakd.config import Config
from vqakd.distributed import local_world_size
from vqakd.errors import UserError, require_file
from vqakd.io import file_sha256
from vqakd.metrics import question_type_codes
from vqakd.questions import load_question_file, load_vocab

APPEARANCE_DATASET = "resnet_features"
MOTION_DATASET = "resnext_features"
IDS_DATASET = "ids"
# Rows read from an HDF5 file per chunk while building the in-memory table.
LOAD_CHUNK_BYTES = 256 << 20
# Keep this share of free memory unused when deciding whether the table fits.
MEMORY_HEADROOM = 0.9
# The GPU table may use at most this share of the free GPU memory (the model needs the rest).
GPU_TABLE_SHARE = 0.5
MISSING_IDS_SHOWN = 5
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


# ----------------------------------------------------------------------------------- vocabulary

@dataclass
class Vocabulary:
    path: str
    sha256: str
    question_token_to_idx: dict[str, int]
    answer_token_to_idx: dict[str, int]
    idx_to_question_token: list[str] = field(repr=False, default_factory=list)
    idx_to_answer: list[str] = field(repr=False, default_factory=list)

    @property
    def question_size(self) -> int:
        return len(self.question_token_to_idx)

    @property
    def answer_size(self) -> int:
        return len(self.answer_token_to_idx)

    def decode_question(self, tokens: np.ndarray, length: int) -> str:
        return " ".join(self.idx_to_question_token[int(t)] for t in tokens[:length])

    def info(self) -> dict[str, Any]:
        """What a checkpoint records about the vocabulary it was trained with."""
        return {"question_size": self.question_size, "answer_size": self.answer_size, "sha256": self.sha256,
                "path": self.path}


def load_vocabulary(path: str) -> Vocabulary:
    vocab = load_vocab(path)

    def inverse(table: dict[str, int]) -> list[str]:
        tokens = [""] * len(table)
        for token, index in table.items():
            tokens[index] = token
        return tokens

    return Vocabulary(path=path, sha256=file_sha256(path), question_token_to_idx=vocab.question_token_to_idx,
                      answer_token_to_idx=vocab.answer_token_to_idx,
                      idx_to_question_token=inverse(vocab.question_token_to_idx),
                      idx_to_answer=inverse(vocab.answer_token_to_idx))


# ----------------------------------------------------------------------------------- features

def _open_h5(path: str):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path}: cannot open as HDF5 ({exc}); the file may be truncated or of another "
                        "format") from None


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
        names = sorted(handle.keys())
        for name in (dataset, IDS_DATASET):
            if name not in handle:
                raise UserError(f"{path}: no dataset {name!r} (found: {', '.join(names) or 'none'}); expected "
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
        try:
            ids = np.asarray(ids_ds[()], dtype=np.int64)
        except OSError as exc:
            raise UserError(f"{path}: cannot read {IDS_DATASET!r} ({exc}); the file may be truncated") from None
        shape = tuple(int(s) for s in features.shape)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise UserError(f"{path}: video id {int(unique[counts > 1][0])} appears {int(counts.max())} times in "
                        f"{IDS_DATASET!r}")
    return FeatureFileInfo(path, dataset, shape, ids, {int(v): row for row, v in enumerate(ids.tolist())})


def _available_memory_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _first_nonfinite_row(chunk: np.ndarray) -> Optional[int]:
    finite = np.isfinite(chunk.reshape(chunk.shape[0], -1)).all(axis=1)
    bad = np.flatnonzero(~finite)
    return int(bad[0]) if bad.size else None


def _read_rows(info: FeatureFileInfo, handle, rows: np.ndarray) -> np.ndarray:
    """Rows (any order, repeats allowed) of one feature file in one HDF5 read."""
    unique, inverse = np.unique(rows, return_inverse=True)
    try:
        block = handle[info.dataset][unique]
    except OSError as exc:
        raise UserError(f"{info.path}: cannot read {info.dataset!r} ({exc}); the file may be truncated") from None
    return block[inverse]


def _convert_checked(info: FeatureFileInfo, block: np.ndarray, rows: np.ndarray, dtype_name: str) -> np.ndarray:
    """`block` in the table's dtype; NaN/inf in the file, or values float16 cannot hold, name the video."""
    bad = _first_nonfinite_row(block)
    if bad is not None:
        raise UserError(f"{info.path}: {info.dataset!r} of video id {int(info.ids[rows[bad]])} holds NaN or "
                        "infinite values")
    with np.errstate(over="ignore"):       # overflow is detected just below, with the video named
        converted = block.astype(NUMPY_DTYPES[dtype_name], copy=False)
    if converted.dtype != block.dtype:
        bad = _first_nonfinite_row(converted)
        if bad is not None:
            raise UserError(f"{info.path}: {info.dataset!r} of video id {int(info.ids[rows[bad]])} holds values "
                            "too large for float16; use data.feature_dtype: float32")
    return converted


class FeatureTable:
    """Appearance and motion features of every video, looked up by table row."""

    def __init__(self, appearance: FeatureFileInfo, motion: FeatureFileInfo, dtype: str = "float32",
                 mode: str = "memory"):
        self.appearance_info = appearance
        self.motion_info = motion
        self.dtype_name = dtype
        self.dtype = TORCH_DTYPES[dtype]
        self.mode = mode
        self.appearance: Optional[torch.Tensor] = None
        self.motion: Optional[torch.Tensor] = None
        self._handles: Optional[tuple[int, Any, Any]] = None   # (pid, appearance file, motion file)

    @property
    def num_nodes(self) -> int:
        return self.appearance_info.shape[1]

    @property
    def device(self) -> torch.device:
        return self.appearance.device if self.appearance is not None else torch.device("cpu")

    def nbytes(self) -> int:
        size = TORCH_DTYPES[self.dtype_name].itemsize
        return (int(np.prod(self.appearance_info.shape)) + int(np.prod(self.motion_info.shape))) * size

    def rows(self, video_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        app = np.array([self.appearance_info.row_of[int(v)] for v in video_ids], dtype=np.int64)
        mot = np.array([self.motion_info.row_of[int(v)] for v in video_ids], dtype=np.int64)
        return app, mot

    def load(self, progress: bool = True, device: torch.device | None = None, copies_per_node: int = 1) -> None:
        """Read both files into memory on `device` (default CPU), checking every video for NaN/inf.

        A GPU table is filled chunk by chunk, so host memory never holds the whole table.
        `copies_per_node`: processes on this machine that each hold a CPU copy (torchrun's
        LOCAL_WORLD_SIZE); they share its RAM.
        """
        device = torch.device("cpu") if device is None else device
        if device.type == "cpu":
            available = _available_memory_bytes()
            needed = self.nbytes() * copies_per_node
            if available is not None and needed > MEMORY_HEADROOM * available:
                copies = f" ({copies_per_node} processes on this machine, one copy each)" if copies_per_node > 1 else ""
                raise UserError(
                    f"the feature table needs {needed / 2**30:.1f} GiB{copies} but only {available / 2**30:.1f} GiB "
                    "of memory is available; set data.feature_dtype: float16 (half the size) or "
                    "data.feature_mode: lazy")
        self.appearance = self._load_file(self.appearance_info, progress, device)
        self.motion = self._load_file(self.motion_info, progress, device)

    def _load_file(self, info: FeatureFileInfo, progress: bool, device: torch.device) -> torch.Tensor:
        table = torch.empty(info.shape, dtype=self.dtype, device=device)
        row_bytes = int(np.prod(info.shape[1:])) * 4
        chunk = max(1, LOAD_CHUNK_BYTES // row_bytes)
        with _open_h5(info.path) as handle:
            dataset = handle[info.dataset]
            bar = tqdm(total=info.shape[0], desc=f"loading {os.path.basename(info.path)}", unit="video",
                       disable=not progress, dynamic_ncols=True, leave=False)
            for start in range(0, info.shape[0], chunk):
                stop = min(start + chunk, info.shape[0])
                try:
                    block = dataset[start:stop]
                except OSError as exc:
                    raise UserError(f"{info.path}: cannot read {info.dataset!r} rows {start}..{stop - 1} ({exc}); "
                                    "the file may be truncated") from None
                block = _convert_checked(info, block, np.arange(start, stop), self.dtype_name)
                table[start:stop] = torch.from_numpy(block).to(device)
                bar.update(stop - start)
            bar.close()
        return table

    def _lazy_handles(self):
        # One handle per file per process: a forked loader worker must not reuse the parent's.
        pid = os.getpid()
        if self._handles is None or self._handles[0] != pid:
            self._handles = (pid, _open_h5(self.appearance_info.path), _open_h5(self.motion_info.path))
        return self._handles[1], self._handles[2]

    def gather(self, app_rows: torch.Tensor, mot_rows: torch.Tensor,
               out: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a batch of rows (float32 or float16, on the table's device); in memory
        mode written into `out` (appearance, motion) when given."""
        if self.mode == "memory":
            app_rows, mot_rows = app_rows.to(self.appearance.device), mot_rows.to(self.motion.device)
            if out is None:
                return self.appearance.index_select(0, app_rows), self.motion.index_select(0, mot_rows)
            return (torch.index_select(self.appearance, 0, app_rows, out=out[0]),
                    torch.index_select(self.motion, 0, mot_rows, out=out[1]))
        app_file, mot_file = self._lazy_handles()
        rows_a, rows_m = app_rows.cpu().numpy(), mot_rows.cpu().numpy()
        app = _convert_checked(self.appearance_info, _read_rows(self.appearance_info, app_file, rows_a), rows_a,
                               self.dtype_name)
        mot = _convert_checked(self.motion_info, _read_rows(self.motion_info, mot_file, rows_m), rows_m,
                               self.dtype_name)
        return torch.from_numpy(np.ascontiguousarray(app)), torch.from_numpy(np.ascontiguousarray(mot))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = None       # h5py handles cannot cross process boundaries
        return state


# ----------------------------------------------------------------------------------- questions

@dataclass
class QuestionSplit:
    name: str
    path: str
    questions: torch.Tensor          # (Q, L) long
    lengths: torch.Tensor            # (Q,) long
    answers: torch.Tensor            # (Q,) long
    qtypes: torch.Tensor             # (Q,) long question-type codes (vqakd.metrics)
    app_rows: torch.Tensor           # (Q,) long rows in the feature table
    mot_rows: torch.Tensor
    question_id: list
    video_ids: np.ndarray
    video_names: list[str]
    question_text: Optional[list[str]]
    glove: Optional[np.ndarray]

    def __len__(self) -> int:
        return int(self.questions.shape[0])

    def text(self, index: int, vocab: Vocabulary) -> str:
        if self.question_text is not None:
            return self.question_text[index]
        return vocab.decode_question(self.questions[index].numpy(), int(self.lengths[index]))


def _check_video_ids(path: str, video_ids: np.ndarray, info: FeatureFileInfo) -> None:
    missing = sorted({int(v) for v in np.unique(video_ids)} - info.row_of.keys())
    if missing:
        shown = ", ".join(str(v) for v in missing[:MISSING_IDS_SHOWN])
        more = ", ..." if len(missing) > MISSING_IDS_SHOWN else ""
        raise UserError(f"{path}: {len(missing)} video id(s) used by its questions are missing from "
                        f"{info.path}: {shown}{more}")


def load_split(name: str, path: str, vocab: Vocabulary, table: FeatureTable) -> QuestionSplit:
    require_file(path, f"{name} question file", "make it with preprocess/preprocess_questions.py")
    data = load_question_file(path, vocab.question_size, vocab.answer_size)
    _check_video_ids(path, data["video_ids"], table.appearance_info)
    _check_video_ids(path, data["video_ids"], table.motion_info)
    app_rows, mot_rows = table.rows(data["video_ids"])
    questions = torch.from_numpy(data["questions"]).long()
    first_tokens = [vocab.idx_to_question_token[int(t)] for t in data["questions"][:, 0]]
    return QuestionSplit(
        name=name, path=path, questions=questions,
        lengths=torch.from_numpy(data["questions_len"]).long(),
        answers=torch.from_numpy(data["answers"]).long(),
        qtypes=question_type_codes(first_tokens),
        app_rows=torch.from_numpy(app_rows), mot_rows=torch.from_numpy(mot_rows),
        question_id=data["question_id"], video_ids=data["video_ids"], video_names=data["video_names"],
        question_text=data["question_text"], glove=data["glove"],
    )


# ----------------------------------------------------------------------------------- batches

class QuestionBatches(Dataset):
    """`dataset[indices]` -> one whole batch (a dict of tensors); indices is a 1-D index tensor.

    When the feature table is on a GPU, the split's per-question tensors are copied there once
    and a batch is gathered entirely on the device: one small non-blocking copy of the index,
    no host synchronisation. `question_len` always stays on the CPU (pack_padded_sequence
    wants CPU lengths; reading them back from a GPU would wait for the GPU).

    `reuse_buffers` (a CPU table gathered in the main process): the features are written into
    one of BUFFER_RING preallocated batch buffers in turn instead of a fresh tensor per batch.
    A fresh 256 MiB tensor costs ~65k page faults (the allocator returns such blocks to the OS),
    six times the copy itself. A batch's feature tensors are therefore only valid until
    BUFFER_RING - 1 further batches have been drawn: right for a training/eval loop, wrong for
    code that keeps batches (which must leave it off, the default).
    """

    ON_DEVICE = ("questions", "answers", "qtypes", "app_rows", "mot_rows")
    BUFFER_RING = 2

    def __init__(self, split: QuestionSplit, table: FeatureTable, reuse_buffers: bool = False):
        self.split = split
        self.table = table
        self.device = table.device if table.mode == "memory" else torch.device("cpu")
        self.columns = {name: getattr(split, name).to(self.device) for name in self.ON_DEVICE}
        self.reuse_buffers = reuse_buffers and table.mode == "memory" and self.device.type == "cpu"
        self._ring: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = []
        self._turn = -1

    def _buffers(self, size: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if not self.reuse_buffers:
            return None
        self._turn = (self._turn + 1) % self.BUFFER_RING
        if len(self._ring) <= self._turn:
            self._ring.append(None)
        pair = self._ring[self._turn]
        if pair is None or pair[0].shape[0] < size:
            table = self.table
            pair = (torch.empty((size,) + tuple(table.appearance.shape[1:]), dtype=table.appearance.dtype),
                    torch.empty((size,) + tuple(table.motion.shape[1:]), dtype=table.motion.dtype))
            self._ring[self._turn] = pair
        return pair[0][:size], pair[1][:size]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ring"] = []          # a worker process builds its own (never used there: see make_loader)
        return state

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, indices: Any) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        at = index.to(self.device, non_blocking=True)
        columns = self.columns
        appearance, motion = self.table.gather(columns["app_rows"][at], columns["mot_rows"][at],
                                               out=self._buffers(int(index.shape[0])))
        return {
            "index": index,
            "appearance": appearance,
            "motion": motion,
            "question": columns["questions"][at],
            "question_len": self.split.lengths[index],
            "answer": columns["answers"][at],
            "qtype": columns["qtypes"][at],
        }


class EpochBatchSampler(Sampler):
    """Batches of question indices; shuffled with a generator seeded by (seed + epoch), so a run
    resumed at any epoch sees exactly the batches an uninterrupted run sees.

    With several processes each rank takes every world_size-th index of the same permutation;
    for training the permutation is padded (with its own first indices) to a multiple of the
    world size so every rank runs the same number of steps; for evaluation nothing is padded, so
    every question is counted exactly once.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_single_last: bool = False):
        self.size = size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        # A final training batch of one question would make BatchNorm fail; it is dropped.
        self.drop_single_last = drop_single_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        if self.world_size > 1:
            if self.shuffle:
                padding = (-self.size) % self.world_size
                order = torch.cat([order, order[:padding]])
            order = order[self.rank::self.world_size]
        return order

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = self._indices()
        batches = list(torch.split(order, self.batch_size))
        if self.drop_single_last and batches and len(batches[-1]) == 1 and len(batches) > 1:
            batches.pop()
        return iter(batches)

    def __len__(self) -> int:
        count = len(self._indices())
        batches = -(-count // self.batch_size)
        if self.drop_single_last and batches > 1 and count % self.batch_size == 1:
            batches -= 1
        return batches


def make_loader(split: QuestionSplit, table: FeatureTable, batch_size: int, shuffle: bool, seed: int,
                num_workers: int, pin_memory: bool, rank: int = 0, world_size: int = 1,
                reuse_buffers: bool = False) -> DataLoader:
    """Batches of `split` (this rank's share). `reuse_buffers`: see QuestionBatches; only used
    when batches are gathered in this process (no workers: a worker's tensors travel through
    shared memory, which a reused buffer would overwrite)."""
    sampler = EpochBatchSampler(len(split), batch_size, shuffle, seed, rank, world_size, drop_single_last=shuffle)
    on_gpu = table.device.type != "cpu"
    workers = 0 if on_gpu else num_workers
    return DataLoader(
        QuestionBatches(split, table, reuse_buffers=reuse_buffers and workers == 0),
        sampler=sampler,
        batch_size=None,                          # the sampler yields whole batches
        num_workers=workers,
        pin_memory=pin_memory and not on_gpu,
        # A private generator: creating loader iterators must not consume the global RNG that
        # dropout draws from (a resumed run restores that RNG exactly).
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


# ----------------------------------------------------------------------------------- everything

@dataclass
class DataBundle:
    vocab: Vocabulary
    table: FeatureTable
    splits: dict[str, QuestionSplit]


def load_feature_table(config: Config, expected_by: str = "model") -> FeatureTable:
    """Check both feature files' layout against `config.model` (`expected_by` names where those
    sizes come from in the messages) and return the (not yet loaded) table."""
    model = config.model
    appearance = read_feature_header(config.data.appearance_feat, APPEARANCE_DATASET, 4,
                                     "(V, N, F, D) = (videos, clips, frames per clip, feature size)")
    motion = read_feature_header(config.data.motion_feat, MOTION_DATASET, 3, "(V, N, D) = (videos, clips, feature size)")
    for info, clips, size in ((appearance, appearance.shape[1], appearance.shape[3]),
                              (motion, motion.shape[1], motion.shape[2])):
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


def choose_table_device(config: Config, table: FeatureTable, device: torch.device) -> torch.device:
    """Where the in-memory table lives (data.feature_device)."""
    want = config.data.feature_device
    if table.mode != "memory" or want == "cpu" or device.type != "cuda":
        if want == "cuda" and (device.type != "cuda" or table.mode != "memory"):
            raise UserError("data.feature_device: cuda needs a CUDA training device and data.feature_mode: memory")
        return torch.device("cpu")
    free, _total = torch.cuda.mem_get_info(device)
    if want == "cuda":
        if table.nbytes() > free:
            raise UserError(f"data.feature_device: cuda, but the feature table needs {table.nbytes() / 2**30:.1f} GiB "
                            f"and {device} has {free / 2**30:.1f} GiB free; use feature_device: auto or cpu, or "
                            "feature_dtype: float16")
        return device
    # auto: leave at least half of the free memory to the model, its activations and the optimizer.
    return device if table.nbytes() <= GPU_TABLE_SHARE * free else torch.device("cpu")


def load_data(config: Config, splits: tuple[str, ...] = SPLITS, device: torch.device | None = None,
              progress: bool = True, expected_by: str = "model") -> DataBundle:
    """Vocabulary, the requested question splits and the feature table, all checked."""
    vocab_path = require_file(config.data.vocab, "vocabulary file", "make it with preprocess/preprocess_questions.py")
    vocab = load_vocabulary(vocab_path)
    table = load_feature_table(config, expected_by)
    paths = {"train": config.data.train_questions, "val": config.data.val_questions,
             "test": config.data.test_questions}
    loaded = {name: load_split(name, paths[name], vocab, table) for name in splits}
    if table.mode == "memory":
        target = choose_table_device(config, table, device) if device is not None else torch.device("cpu")
        table.load(progress, target, copies_per_node=local_world_size() if target.type == "cpu" else 1)
    return DataBundle(vocab, table, loaded)


def glove_matrix_for(config: Config, bundle: DataBundle, progress: bool = True) -> Optional[np.ndarray]:
    """The embedding initialisation: the train file's GloVe matrix, else `data.glove`, else None."""
    if not config.data.use_glove:
        return None
    train = bundle.splits.get("train")
    if train is not None and train.glove is not None:
        return train.glove
    if config.data.glove:
        from vqakd.glove import load_glove
        from vqakd.questions import glove_matrix

        words = {token for token in bundle.vocab.question_token_to_idx if token not in ("<NULL>", "<UNK>")}
        vectors = load_glove(config.data.glove, keep=words, progress=progress)
        if not vectors:
            raise UserError(f"{config.data.glove}: none of the question words is in this GloVe file")
        matrix, _found = glove_matrix(bundle.vocab.question_token_to_idx, vectors)
        return matrix
    return None
