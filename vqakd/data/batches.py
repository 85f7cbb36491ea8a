"""A run's training data: the vocabulary, the question splits and the feature table, checked
together (`load_data` -> `DataBundle`) and served in batches: `QuestionBatches` is indexed by a
whole batch of question indices (from `EpochBatchSampler`, see `make_loader`), so a batch is one
index gather, never one HDF5 read or `__getitem__` per sample.

Everything checkable is checked before training starts, with errors that name the file; with
`data.missing_videos: drop`, a question whose video is missing is left out and counted (`with_dropped`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vqakd.data.annotations import SPLITS
from vqakd.core.config import Config
from vqakd.core.errors import UserError, require_file
from vqakd.data.features import FeatureFileInfo, FeatureTable, choose_table_device, load_feature_table
from vqakd.data.questions import (QUESTION_TYPES, TYPE_NAMES, check_vocab_binding, glove_matrix, load_question_file,
                                  question_type_code)
from vqakd.data.vocab import Vocabulary

MISSING_IDS_SHOWN = 5


# ----------------------------------------------------------------------------------- questions

@dataclass
class QuestionSplit:
    name: str
    path: str
    questions: torch.Tensor          # (Q, L) long
    lengths: torch.Tensor            # (Q,) long
    answers: torch.Tensor            # (Q,) long
    qtypes: torch.Tensor             # (Q,) long question-type codes (vqakd.training.metrics)
    app_rows: torch.Tensor           # (Q,) long rows in the feature table
    mot_rows: torch.Tensor
    # The ids a user finds in the annotations: the records' ids, else (HCRN's files) the file's question_id.
    display_ids: list
    video_ids: np.ndarray
    question_text: Optional[list[str]]
    answer_text: Optional[list[str]]          # the annotation's answers (question files made before lack them)
    glove: Optional[np.ndarray]
    # Questions left out because their video is missing (data.missing_videos: drop): their
    # question-type codes, so val/test accuracy can keep them in its denominators.
    dropped_qtypes: torch.Tensor

    @property
    def dropped(self) -> int:
        return int(self.dropped_qtypes.numel())

    def __len__(self) -> int:
        return int(self.questions.shape[0])

    def text(self, index: int, vocab: Vocabulary) -> str:
        if self.question_text is not None:
            return self.question_text[index]
        # A file without the text (HCRN's): its tokens, as the vocabulary spells them.
        return " ".join(vocab.idx_to_question_token[int(t)] for t in self.questions[index, :self.lengths[index]])


def _missing_video_ids(path: str, video_ids: np.ndarray, info: FeatureFileInfo, policy: str) -> set[int]:
    """Video ids used by the questions of `path` that `info`'s file lacks; an error unless
    `policy` is drop."""
    missing = sorted({int(v) for v in np.unique(video_ids)} - info.row_of.keys())
    if missing and policy != "drop":
        shown = ", ".join(str(v) for v in missing[:MISSING_IDS_SHOWN])
        more = ", ..." if len(missing) > MISSING_IDS_SHOWN else ""
        raise UserError(f"{path}: {len(missing)} video id(s) used by its questions are missing from "
                        f"{info.path}: {shown}{more}; set data.missing_videos: drop to leave their questions "
                        "out (they then count as wrong in val/test accuracy)")
    return set(missing)


def load_split(name: str, path: str, vocab: Vocabulary, table: FeatureTable,
               missing_videos: str = "error") -> QuestionSplit:
    """One question file, checked against the vocabulary and the feature table.
    `missing_videos`: error, or drop (questions of videos missing from a feature file are left
    out and recorded in `dropped_qtypes`)."""
    require_file(path, f"{name} question file", "make it with preprocess/preprocess_questions.py")
    data = load_question_file(path, vocab.question_size, vocab.answer_size)
    check_vocab_binding(data, path, vocab.path, vocab.sha256)
    video_ids = data["video_ids"]
    missing = (_missing_video_ids(path, video_ids, table.appearance_info, missing_videos)
               | _missing_video_ids(path, video_ids, table.motion_info, missing_videos))
    first_tokens = [vocab.idx_to_question_token[int(t)] for t in data["questions"][:, 0]]
    qtypes = torch.tensor([question_type_code(token) for token in first_tokens], dtype=torch.long)
    keep = ~np.isin(video_ids, np.array(sorted(missing), dtype=np.int64))
    if not keep.any():
        raise UserError(f"{path}: none of its {len(video_ids)} questions has its video in both feature files "
                        f"({table.appearance_info.path}, {table.motion_info.path})")

    def kept(values: Optional[list]) -> Optional[list]:
        return None if values is None else [value for value, flag in zip(values, keep) if flag]

    app_rows, mot_rows = table.rows(video_ids[keep])
    return QuestionSplit(
        name=name, path=path, questions=torch.from_numpy(data["questions"][keep]),
        lengths=torch.from_numpy(data["questions_len"][keep]), answers=torch.from_numpy(data["answers"][keep]),
        qtypes=qtypes[torch.from_numpy(keep)], app_rows=torch.from_numpy(app_rows),
        mot_rows=torch.from_numpy(mot_rows), video_ids=video_ids[keep],
        display_ids=kept(data["question_id"] if data["record_id"] is None else data["record_id"]),
        question_text=kept(data["question_text"]), answer_text=kept(data["answer_text"]), glove=data["glove"],
        dropped_qtypes=qtypes[torch.from_numpy(~keep)],
    )


def with_dropped(summary: dict, split: QuestionSplit) -> dict:
    """An evaluation summary (vqakd.training.metrics.summarize) of `split` in which the questions
    dropped for missing videos count as wrong (in every denominator, overall and per type), with
    the figures on the answered questions alone (`accuracy_answered`, `count_answered`) and
    `dropped` next to them; a split with nothing dropped gets the same keys."""
    dropped_per_code = torch.bincount(split.dropped_qtypes, minlength=len(TYPE_NAMES)).tolist()

    def adjust(values: dict, dropped: int) -> dict:
        count = values["count"] + dropped
        return {**values, "accuracy": values["correct"] / count if count else 0.0, "count": count,
                "accuracy_answered": values["accuracy"], "count_answered": values["count"], "dropped": dropped}

    result = adjust(summary, split.dropped)
    result["per_type"] = {name: adjust(summary["per_type"][name], dropped_per_code[code])
                          for code, name in enumerate(QUESTION_TYPES)}
    return result


# ----------------------------------------------------------------------------------- batches

class QuestionBatches(Dataset):
    """`dataset[indices]` -> one whole batch (a dict of tensors); indices is a 1-D index tensor.
    With the feature table on a GPU, the per-question tensors are copied there once and a batch
    is gathered on the device without a host sync; `question_len` stays on the CPU (what
    pack_padded_sequence wants). `reuse_buffers` (a CPU table gathered in the main process):
    features go into one of BUFFER_RING preallocated buffers in turn (a fresh 256 MiB tensor costs
    six times the copy in page faults), so a batch is only valid until BUFFER_RING - 1 more have
    been drawn: right for a training/eval loop, wrong for code that keeps batches."""

    ON_DEVICE = ("questions", "answers", "qtypes", "app_rows", "mot_rows")
    BUFFER_RING = 2

    def __init__(self, split: QuestionSplit, table: FeatureTable, reuse_buffers: bool = False):
        self.split = split
        self.table = table
        self.device = table.device          # the CPU in lazy mode
        self.columns = {name: getattr(split, name).to(self.device) for name in self.ON_DEVICE}
        self.reuse_buffers = reuse_buffers and table.mode == "memory" and self.device.type == "cpu"
        self._ring: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * self.BUFFER_RING
        self._turn = -1

    def _buffers(self, size: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if not self.reuse_buffers:
            return None
        self._turn = (self._turn + 1) % self.BUFFER_RING
        pair = self._ring[self._turn]
        if pair is None or pair[0].shape[0] < size:
            pair = tuple(torch.empty((size, *features.shape[1:]), dtype=features.dtype)
                         for features in (self.table.appearance, self.table.motion))
            self._ring[self._turn] = pair
        return pair[0][:size], pair[1][:size]

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


@dataclass(eq=False)
class EpochBatchSampler(Sampler):
    """Batches of question indices, shuffled by (seed + epoch), so a resumed run sees exactly the
    batches of an uninterrupted one. Each rank takes every world_size-th index of the same
    permutation, padded with its first indices when shuffling (training: every rank runs the same
    steps), never when evaluating (every question counted once)."""
    size: int
    batch_size: int
    shuffle: bool
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    max_batches: Optional[int] = None      # train.max_steps: the first batches only
    epoch: int = field(default=0, init=False)      # set by the training loop before each epoch

    def _batches(self) -> list[torch.Tensor]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator)
            order = torch.cat([order, order[:(-self.size) % self.world_size]])
        else:
            order = torch.arange(self.size)
        order = order[self.rank::self.world_size]
        batches = list(torch.split(order, self.batch_size))
        # A final training batch of one question would make BatchNorm fail; it is dropped.
        if self.shuffle and len(batches) > 1 and len(batches[-1]) == 1:
            batches.pop()
        return batches[:self.max_batches]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def make_loader(split: QuestionSplit, table: FeatureTable, batch_size: int, shuffle: bool, seed: int,
                num_workers: int, pin_memory: bool, rank: int = 0, world_size: int = 1,
                reuse_buffers: bool = False, max_batches: Optional[int] = None) -> DataLoader:
    """Batches of `split` (this rank's share). `reuse_buffers`: see QuestionBatches; only without
    workers (a worker's tensors travel through shared memory, which a reused buffer would overwrite)."""
    sampler = EpochBatchSampler(len(split), batch_size, shuffle, seed, rank, world_size, max_batches=max_batches)
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
    )


# ----------------------------------------------------------------------------------- everything

@dataclass
class DataBundle:
    vocab: Vocabulary
    table: FeatureTable
    splits: dict[str, QuestionSplit]


def load_data(config: Config, splits: tuple[str, ...] = SPLITS, device: torch.device | None = None,
              progress: bool = True, expected_by: str = "model",
              before_table: Optional[Callable[[DataBundle], bool]] = None) -> DataBundle:
    """Vocabulary, the requested question splits and the feature table, all checked.
    `before_table(bundle)` runs once the question splits are loaded and the table's headers read:
    the memory plan (vqakd/training/memory.py); when it returns False the table is not read."""
    vocab = Vocabulary.load(config.data.vocab)
    table = load_feature_table(config, expected_by)
    loaded = {name: load_split(name, getattr(config.data, f"{name}_questions"), vocab, table,
                               config.data.missing_videos) for name in splits}
    bundle = DataBundle(vocab, table, loaded)
    if before_table is not None and not before_table(bundle):
        return bundle
    if table.mode == "memory":
        table.load(progress, choose_table_device(config, table, device) if device is not None else torch.device("cpu"))
    return bundle


def glove_matrix_for(config: Config, bundle: DataBundle, progress: bool = True) -> Optional[np.ndarray]:
    """The embedding initialisation: the train file's GloVe matrix, else `data.glove`, else None."""
    if not config.data.use_glove:
        return None
    train = bundle.splits.get("train")
    if train is not None and train.glove is not None:
        return train.glove
    if config.data.glove:
        return glove_matrix(config.data.glove, bundle.vocab.question_token_to_idx, progress)[0]
    return None
