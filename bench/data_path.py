"""Benchmark 1 — the training data path: questions per second at batch 256, ours vs the original.

    python bench/data_path.py [--videos 160] [--questions 4096] [--batch-size 256] [--batches 8]
                              [--rounds 3] [--workers 0] [--device cpu|cuda] [--json-out data_path.json]

Writes synthetic feature files in the layout of docs/method.md#feature-files (V videos x N clips x F frames x 2048
appearance, V x N x 2048 motion, float32) plus a vocabulary and a train question file, then
reads the same batches of the same files two ways, side by side in one run:
- ours: `vqakd.data.batches` as `train.py` uses it — both HDF5 files read once into the feature table
  (`load_data`, time reported separately as a one-off), each batch one index gather
  (`make_loader` / `QuestionBatches` / `FeatureTable.gather`);
- original: the HCRN/DualVGR approach — `Dataset.__getitem__` opens both HDF5 files and reads one
  video's rows for one question, and a `DataLoader` with the same batch size collates them.
Both loaders run with the same number of worker processes (`--workers`, default 0) and torch
threads (`--threads`, default 1), start from a warm page cache (the files were just written), and
are timed in interleaved rounds whose medians are compared, so the difference is the access
pattern, not the machine's load. On the CPU our gather is bound by memory bandwidth (one batch of
256 MSVD-QA questions is 272 MiB of features); with `--device cuda` the table sits on the GPU.
Prints one comparison line and writes the figures as JSON with `--json-out`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import statistics
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vqakd.core.errors import UserError, run_cli  # noqa: E402
from vqakd.core.files import write_json  # noqa: E402

DEFAULT_VIDEOS = 160
DEFAULT_QUESTIONS = 4096
DEFAULT_BATCH = 256
DEFAULT_BATCHES = 8
DEFAULT_ROUNDS = 3
QUESTION_LENGTH = 12
VOCAB_WORDS = 50
ANSWERS = 40


def write_synthetic(folder: str, videos: int, clips: int, frames: int, dim: int, questions: int,
                    seed: int = 0) -> dict[str, str]:
    """Feature files, vocabulary and a train question file in the formats of docs/method.md#file-formats."""
    import h5py

    rng = np.random.default_rng(seed)
    ids = np.arange(videos, dtype=np.int64) * 3 + 1000        # sparse ids, as real datasets have
    paths = {name: os.path.join(folder, f"bench_{name}") for name in
             ("appearance_feat.h5", "motion_feat.h5", "vocab.json", "train_questions.pt")}
    with h5py.File(paths["appearance_feat.h5"], "w") as handle:
        data = handle.create_dataset("resnet_features", shape=(videos, clips, frames, dim), dtype="float32")
        for row in range(videos):                              # one video at a time: bounded memory
            data[row] = rng.standard_normal((clips, frames, dim), dtype=np.float32)
        handle.create_dataset("ids", data=ids)
    with h5py.File(paths["motion_feat.h5"], "w") as handle:
        handle.create_dataset("resnext_features", data=rng.standard_normal((videos, clips, dim), dtype=np.float32))
        handle.create_dataset("ids", data=ids)
    words = ["<NULL>", "<UNK>", "what", "who", "how"] + [f"w{i}" for i in range(VOCAB_WORDS)]
    answers = ["<UNK0>", "<UNK1>"] + [f"a{i}" for i in range(ANSWERS)]
    with open(paths["vocab.json"], "w") as handle:
        json.dump({"question_token_to_idx": {w: i for i, w in enumerate(words)},
                   "answer_token_to_idx": {a: i for i, a in enumerate(answers)},
                   "question_answer_token_to_idx": {w: i for i, w in enumerate(words + answers[2:])}}, handle)
    lengths = rng.integers(4, QUESTION_LENGTH + 1, size=questions).astype(np.int32)
    tokens = rng.integers(5, len(words), size=(questions, QUESTION_LENGTH)).astype(np.int32)
    tokens[:, 0] = rng.integers(2, 5, size=questions)
    tokens[np.arange(QUESTION_LENGTH)[None, :] >= lengths[:, None]] = 0
    video_ids = ids[rng.integers(0, videos, size=questions)]
    with open(paths["train_questions.pt"], "wb") as handle:
        pickle.dump({"questions": tokens, "questions_len": lengths, "question_id": list(range(questions)),
                     "video_ids": video_ids, "video_names": [f"video{v}" for v in video_ids],
                     "answers": rng.integers(2, len(answers), size=questions).tolist(), "glove": None}, handle)
    return paths


class PerSampleHDF5(torch.utils.data.Dataset):
    """The original loader: every question opens both HDF5 files and reads its video's rows."""

    def __init__(self, appearance_path: str, motion_path: str, questions_path: str):
        import h5py

        self.appearance_path, self.motion_path = appearance_path, motion_path
        with open(questions_path, "rb") as handle:
            data = pickle.load(handle)
        self.questions = torch.from_numpy(data["questions"]).long()
        self.lengths = torch.from_numpy(data["questions_len"]).long()
        self.answers = torch.tensor(data["answers"])
        with h5py.File(appearance_path, "r") as handle:
            app_ids = handle["ids"][()]
        with h5py.File(motion_path, "r") as handle:
            mot_ids = handle["ids"][()]
        app_row = {int(v): i for i, v in enumerate(app_ids)}
        mot_row = {int(v): i for i, v in enumerate(mot_ids)}
        self.app_index = [app_row[int(v)] for v in data["video_ids"]]
        self.mot_index = [mot_row[int(v)] for v in data["video_ids"]]

    def __len__(self) -> int:
        return len(self.app_index)

    def __getitem__(self, index: int):
        import h5py

        with h5py.File(self.appearance_path, "r") as handle:
            appearance = torch.from_numpy(handle["resnet_features"][self.app_index[index]])
        with h5py.File(self.motion_path, "r") as handle:
            motion = torch.from_numpy(handle["resnext_features"][self.mot_index[index]])
        return appearance, motion, self.questions[index], self.lengths[index], self.answers[index]


def _features_on(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's features where the model would read them (as the training loop moves them)."""
    appearance, motion = (batch["appearance"], batch["motion"]) if isinstance(batch, dict) else batch[:2]
    return appearance.to(device, non_blocking=True), motion.to(device, non_blocking=True)


def time_batches(loader, batches: int, batch_size: int, device: torch.device) -> dict[str, float]:
    """Questions per second over `batches` full batches on `device`, after one warm-up batch."""
    iterator = iter(loader)
    _features_on(next(iterator), device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    seen = 0
    for _ in range(batches):
        appearance, _motion = _features_on(next(iterator), device)
        seen += int(appearance.shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    if seen != batches * batch_size:
        raise UserError(f"expected {batches} full batches of {batch_size}; use more --questions")
    return {"questions": seen, "seconds": elapsed, "questions_per_s": seen / elapsed}


def summarize(rounds: list[dict[str, float]]) -> dict[str, Any]:
    rates = sorted(r["questions_per_s"] for r in rounds)
    return {"questions_per_s": statistics.median(rates), "min_questions_per_s": rates[0],
            "max_questions_per_s": rates[-1], "rounds": rounds}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=DEFAULT_VIDEOS)
    parser.add_argument("--clips", type=int, default=8, help="N (8 for MSVD-QA, 16 for MSRVTT-QA)")
    parser.add_argument("--frames", type=int, default=16, help="F frames per clip")
    parser.add_argument("--dim", type=int, default=2048, help="feature size")
    parser.add_argument("--questions", type=int, default=DEFAULT_QUESTIONS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--batches", type=int, default=DEFAULT_BATCHES, help="timed batches per loader and round")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help="interleaved timing rounds (ours, original, ours, ...); the median is reported")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes, both loaders")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the gather uses them)")
    parser.add_argument("--device", default="cpu",
                        help="where batches go: cpu, or cuda (ours then keeps the table on the GPU when it fits, "
                             "data.feature_device: auto; the baseline's batches are copied there)")
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--json-out", default=None)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("videos", "clips", "frames", "dim", "questions", "batch_size", "batches", "rounds", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.questions < (args.batches + 1) * args.batch_size:
        raise UserError(f"--questions must be at least (batches + 1) x batch size = "
                        f"{(args.batches + 1) * args.batch_size}")
    torch.set_num_threads(args.threads)
    from vqakd.core.distributed import resolve_device

    device = resolve_device(args.device)
    from vqakd.core.config import config_from_dict
    from vqakd.data.batches import load_data, make_loader

    folder = args.dir or tempfile.mkdtemp(prefix="vqakd_bench_data_")
    os.makedirs(folder, exist_ok=True)
    try:
        started = time.perf_counter()
        paths = write_synthetic(folder, args.videos, args.clips, args.frames, args.dim, args.questions)
        write_s = time.perf_counter() - started
        config = config_from_dict({
            "dataset": "msvd-qa", "output_dir": folder,
            "data": {"vocab": paths["vocab.json"], "train_questions": paths["train_questions.pt"],
                     "appearance_feat": paths["appearance_feat.h5"], "motion_feat": paths["motion_feat.h5"],
                     "use_glove": False},
            "model": {"num_nodes": args.clips, "vision_dim": args.dim},
        }, "bench config")
        started = time.perf_counter()
        bundle = load_data(config, splits=("train",), device=device, progress=False)
        load_s = time.perf_counter() - started
        pin = device.type == "cuda"
        ours_loader = make_loader(bundle.splits["train"], bundle.table, args.batch_size, True, 0, args.workers, pin,
                                  reuse_buffers=True)        # as train.py's loaders
        baseline_set = PerSampleHDF5(paths["appearance_feat.h5"], paths["motion_feat.h5"],
                                     paths["train_questions.pt"])
        baseline_loader = torch.utils.data.DataLoader(baseline_set, batch_size=args.batch_size, shuffle=True,
                                                      num_workers=args.workers, pin_memory=pin,
                                                      generator=torch.Generator().manual_seed(0))
        # Interleaved rounds, median per loader: a busy machine slows both loaders alike.
        rounds = {"ours": [], "per_sample_hdf5": []}
        for _ in range(args.rounds):
            rounds["ours"].append(time_batches(ours_loader, args.batches, args.batch_size, device))
            rounds["per_sample_hdf5"].append(time_batches(baseline_loader, args.batches, args.batch_size, device))
        ours, baseline = (summarize(rounds[name]) for name in ("ours", "per_sample_hdf5"))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(folder, ignore_errors=True)

    speedup = ours["questions_per_s"] / baseline["questions_per_s"]
    table_gib = bundle.table.nbytes() / 2**30
    print(f"data path on {device} (table on {bundle.table.device}), batch {args.batch_size}, {args.videos} videos x {args.clips}x{args.frames}x{args.dim} "
          f"({table_gib:.2f} GiB), {args.workers} workers, {args.threads} thread(s): ours "
          f"{ours['questions_per_s']:.0f} questions/s vs per-sample HDF5 {baseline['questions_per_s']:.0f} "
          f"questions/s = {speedup:.1f}x (medians of {args.rounds} interleaved rounds; one-off table load "
          f"{load_s:.1f}s)")
    result = {"benchmark": "data_path", "batch_size": args.batch_size, "videos": args.videos, "clips": args.clips,
              "frames": args.frames, "dim": args.dim, "questions": args.questions, "batches": args.batches, "rounds": args.rounds,
              "workers": args.workers, "threads": args.threads, "device": str(device),
              "table_device": str(bundle.table.device), "table_gib": table_gib,
              "write_s": write_s, "table_load_s": load_s, "ours": ours, "per_sample_hdf5": baseline,
              "speedup": speedup, "torch": torch.__version__}
    if args.json_out:
        write_json(args.json_out, result)
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
