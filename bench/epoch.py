"""A whole training epoch (train + validation) at MSVD-QA size: the toolkit vs the original's approach.

    python bench/epoch.py --device cuda [--amp bf16] [--compile] [--json-out epoch.json]
    python bench/epoch.py --small                      # a few seconds on a CPU

Writes synthetic MSVD-QA-shaped data in the toolkit's file formats (docs/method.md#feature-files):
two HDF5 feature files (V videos x N clips x F frames x D, and V x N x D, float32), a vocabulary
and train / val question files (30,933 / 6,415 questions over 1,970 videos by default). The data
are learnable: "what" questions are answered by a bump on an appearance channel, "who" questions
by one on a motion channel, so the validation accuracy of a few epochs compares precisions.

Then, for the teacher (G=4) and the student (G=1, feature distillation, the frozen teacher's
forward included), side by side in one process:
- ours: the real run's path: `load_data` (the feature table, on the GPU when it fits),
  `make_loader`, `train_one_epoch` and `evaluate` of vqakd/training/engine.py, with TF32 on CUDA and the
  chosen `--amp` / `--compile`. --warmup-epochs untimed epochs first (compilation, cuDNN
  autotuning), then --epochs timed ones;
- original: a Dataset whose __getitem__ opens both HDF5 files and reads one question's video
  (bench/data_path.py PerSampleHDF5), a DataLoader with --workers processes and the default
  collate, and a plain loop: copy to the device, the same network's forward (same precision,
  eager), loss, backward, clip, step, reading the loss every step. It is timed over
  --baseline-batches train and validation batches after one warm-up batch, and its epoch time is
  extrapolated to the whole splits (stated in the output).
The ratio is the original's epoch time over ours (equal to the ratio of questions per second).

On CUDA, GPU utilisation is sampled with nvidia-smi in a background thread for every phase.
The JSON also holds the memory plan of an MSRVTT-QA-sized table (10,000 videos x 16 clips): its
bytes in float32 and float16 against this device's free memory and the host's.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

if __name__ == "__main__":
    from vqakd.core.script import prepare_script

    prepare_script(modules=())  # as train.py: waiting OpenMP threads sleep (before torch is imported)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_path import PerSampleHDF5  # noqa: E402
from vqakd.core.errors import UserError, run_cli  # noqa: E402
from vqakd.core.files import write_json  # noqa: E402

FULL = dict(videos=1970, train_questions=30933, val_questions=6415, clips=8, frames=16, dim=2048,
            batch_size=256, question_vocab=4000, answers=1000, module_dim=768, word_dim=300,
            baseline_batches=8, workers=min(8, os.cpu_count() or 1))
SMALL = dict(videos=32, train_questions=256, val_questions=128, clips=4, frames=4, dim=64,
             batch_size=64, question_vocab=60, answers=20, module_dim=32, word_dim=16,
             baseline_batches=2, workers=1)
MSRVTT = dict(videos=10000, clips=16, frames=16, dim=2048, train_questions=158581)
QUESTION_LENGTH = 12
NOISE_POOL = 64          # videos of noise generated, then reused with each video's own bump
MODELS = {"teacher": 4, "student": 1}


# ----------------------------------------------------------------------------------- data

def write_data(folder: str, a: argparse.Namespace, seed: int = 0) -> dict[str, str]:
    """Feature files, vocabulary and train/val question files; learnable answers."""
    import h5py

    rng = np.random.default_rng(seed)
    half = a.answers // 2
    ids = np.arange(a.videos, dtype=np.int64) * 3 + 1000
    colour = rng.integers(0, half, size=a.videos)           # what -> answer 2 + colour
    person = rng.integers(0, half, size=a.videos)           # who  -> answer 2 + half + person
    paths = {name: os.path.join(folder, f"bench_{name}") for name in
             ("appearance_feat.h5", "motion_feat.h5", "vocab.json", "train_questions.pt", "val_questions.pt")}
    pool = min(NOISE_POOL, a.videos)
    noise_app = 0.5 * rng.standard_normal((pool, a.clips, a.frames, a.dim), dtype=np.float32)
    noise_mot = 0.5 * rng.standard_normal((pool, a.clips, a.dim), dtype=np.float32)
    with h5py.File(paths["appearance_feat.h5"], "w") as app_file, h5py.File(paths["motion_feat.h5"], "w") as mot_file:
        app = app_file.create_dataset("resnet_features", shape=(a.videos, a.clips, a.frames, a.dim), dtype="float32")
        mot = mot_file.create_dataset("resnext_features", shape=(a.videos, a.clips, a.dim), dtype="float32")
        for start in range(0, a.videos, pool):
            rows = np.arange(start, min(start + pool, a.videos))
            block_app, block_mot = noise_app[:len(rows)].copy(), noise_mot[:len(rows)].copy()
            block_app[np.arange(len(rows)), :, :, colour[rows] % a.dim] += 2.0
            block_mot[np.arange(len(rows)), :, person[rows] % a.dim] += 2.0
            app[rows[0]:rows[-1] + 1] = block_app
            mot[rows[0]:rows[-1] + 1] = block_mot
        app_file.create_dataset("ids", data=ids)
        mot_file.create_dataset("ids", data=ids)
    words = ["<NULL>", "<UNK>", "what", "who"] + [f"w{i}" for i in range(a.question_vocab - 4)]
    answers = ["<UNK0>", "<UNK1>"] + [f"a{i}" for i in range(2 * half)]
    with open(paths["vocab.json"], "w") as handle:
        json.dump({"question_token_to_idx": {w: i for i, w in enumerate(words)},
                   "answer_token_to_idx": {w: i for i, w in enumerate(answers)},
                   "question_answer_token_to_idx": {w: i for i, w in enumerate(words + answers[2:])}}, handle)
    for split, count in (("train", a.train_questions), ("val", a.val_questions)):
        video = rng.integers(0, a.videos, size=count)
        kind = rng.integers(0, 2, size=count)                # 0: what, 1: who
        lengths = rng.integers(4, QUESTION_LENGTH + 1, size=count).astype(np.int32)
        tokens = rng.integers(4, len(words), size=(count, QUESTION_LENGTH)).astype(np.int32)
        tokens[:, 0] = 2 + kind
        tokens[np.arange(QUESTION_LENGTH)[None, :] >= lengths[:, None]] = 0
        labels = np.where(kind == 0, 2 + colour[video], 2 + half + person[video])
        with open(paths[f"{split}_questions.pt"], "wb") as handle:
            pickle.dump({"questions": tokens, "questions_len": lengths, "question_id": list(range(count)),
                         "video_ids": ids[video], "video_names": [f"video{v}" for v in ids[video]],
                         "answers": labels.tolist(), "glove": None}, handle)
    return paths


def bench_config(paths: dict[str, str], a: argparse.Namespace, folder: str):
    from vqakd.core.config import config_from_dict

    return config_from_dict({
        "dataset": "msvd-qa", "output_dir": folder,
        "data": {"vocab": paths["vocab.json"], "train_questions": paths["train_questions.pt"],
                 "val_questions": paths["val_questions.pt"], "appearance_feat": paths["appearance_feat.h5"],
                 "motion_feat": paths["motion_feat.h5"], "use_glove": False, "feature_dtype": a.feature_dtype},
        "model": {"num_nodes": a.clips, "vision_dim": a.dim, "module_dim": a.module_dim, "word_dim": a.word_dim},
        "train": {"batch_size": a.batch_size, "amp": a.amp, "lr": a.lr, "device": str(a.device_obj)},
    }, "bench config")


# ----------------------------------------------------------------------------------- measuring

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuSampler:
    """GPU utilisation (%) from nvidia-smi every `interval` seconds, filed under the current phase."""

    def __init__(self, device: torch.device, interval: float = 0.2):
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.interval, self.phase, self.samples = interval, None, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        command = ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            phase = self.phase
            try:
                value = float(subprocess.run(command, capture_output=True, text=True, timeout=5).stdout.split()[0])
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return                                   # no nvidia-smi: no samples
            if phase is not None and phase == self.phase:
                self.samples.setdefault(phase, []).append(value)
            self._stop.wait(self.interval)

    @contextlib.contextmanager
    def measuring(self, phase: str):
        self.phase = phase
        try:
            yield
        finally:
            self.phase = None

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        return {phase: {"mean": statistics.fmean(values), "median": statistics.median(values), "samples": len(values)}
                for phase, values in self.samples.items() if values}


class Limited:
    """The first `steps` batches of a loader (0: all), keeping its len() and sampler."""

    def __init__(self, loader, steps: int):
        self.loader, self.sampler = loader, loader.sampler
        self.steps = min(steps, len(loader)) if steps else len(loader)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.steps)


def make_models(config, stage: str, bundle, device: torch.device, compile_: bool):
    from vqakd.training.checkpoint import build_model_for_stage

    torch.manual_seed(0)
    model = build_model_for_stage(config, stage, bundle, device, progress=False)
    teacher = None
    if stage == "student":
        teacher = build_model_for_stage(config, "teacher", bundle, device, progress=False)
        teacher.eval().requires_grad_(False)
    if compile_:
        model = torch.compile(model)
        teacher = torch.compile(teacher) if teacher is not None else None
    return model, teacher


def ours(stage: str, config, bundle, a: argparse.Namespace, sampler: Optional[GpuSampler]) -> dict[str, Any]:
    """Epochs of the real engine; the last --epochs of them timed."""
    from vqakd.data.batches import make_loader
    from vqakd.training.engine import evaluate, train_one_epoch

    device = a.device_obj
    model, teacher = make_models(config, stage, bundle, device, a.compile)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    pin = device.type == "cuda"
    train = Limited(make_loader(bundle.splits["train"], bundle.table, a.batch_size, True, 0, 0, pin,
                                reuse_buffers=True), a.max_train_steps)
    val = Limited(make_loader(bundle.splits["val"], bundle.table, a.batch_size, False, 0, 0, pin, reuse_buffers=True),
                  a.max_val_steps)
    epochs = []
    for epoch in range(1, a.warmup_epochs + a.epochs + 1):
        train.sampler.epoch = epoch
        phase = f"ours_{stage}" if epoch > a.warmup_epochs else f"ours_{stage}_warmup"
        with (sampler.measuring(phase) if sampler else contextlib.nullcontext()):
            synchronize(device)
            started = time.perf_counter()
            stats = train_one_epoch(model, train, optimizer, device, epoch, stage=stage, loss_cfg=config.loss,
                                    teacher=teacher, grad_clip=config.train.grad_clip, amp=a.amp,
                                    log_every=config.train.log_every, progress=False)
            synchronize(device)
            middle = time.perf_counter()
            summary, _ = evaluate(model, val, device, amp=a.amp)
            synchronize(device)
            ended = time.perf_counter()
        row = {"epoch": epoch, "warmup": epoch <= a.warmup_epochs, "train_s": middle - started,
               "val_s": ended - middle, "train_questions": stats["questions"], "val_questions": summary["count"],
               "loss": stats["loss"], "train_accuracy": stats["accuracy"]["accuracy"],
               "val_accuracy": summary["accuracy"]}
        epochs.append(row)
        print(f"  ours {stage} epoch {epoch}{' (warm-up)' if row['warmup'] else ''}: train {row['train_s']:.2f}s "
              f"val {row['val_s']:.2f}s, loss {row['loss']:.3f}, val acc {100 * row['val_accuracy']:.1f}%", flush=True)
    timed = [row for row in epochs if not row["warmup"]]
    # Extrapolated to the whole splits when --max-*-steps cut the epoch short.
    train_s = statistics.median(row["train_s"] * len(bundle.splits["train"]) / row["train_questions"] for row in timed)
    val_s = statistics.median(row["val_s"] * len(bundle.splits["val"]) / row["val_questions"] for row in timed)
    questions = len(bundle.splits["train"]) + len(bundle.splits["val"])
    return {"epoch_s": train_s + val_s, "train_s": train_s, "val_s": val_s,
            "train_questions_per_s": len(bundle.splits["train"]) / train_s,
            "epoch_questions_per_s": questions / (train_s + val_s),
            "extrapolated": bool(a.max_train_steps or a.max_val_steps), "epochs": epochs,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def original(stage: str, config, bundle, paths, a: argparse.Namespace, sampler: Optional[GpuSampler]) -> dict:
    """The per-question HDF5 loader and a plain loop, over --baseline-batches batches per split."""
    from vqakd.training.engine import compute_loss

    device = a.device_obj
    model, teacher = make_models(config, stage, bundle, device, False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=a.amp == "bf16")
    result = {}
    for split, training in (("train", True), ("val", False)):
        dataset = PerSampleHDF5(paths["appearance_feat.h5"], paths["motion_feat.h5"], paths[f"{split}_questions.pt"])
        loader = torch.utils.data.DataLoader(dataset, batch_size=a.batch_size, shuffle=training,
                                             num_workers=a.workers, pin_memory=device.type == "cuda",
                                             generator=torch.Generator().manual_seed(0))
        model.train(training)
        seen, started, checksum = 0, None, 0.0
        with (sampler.measuring(f"original_{stage}_{split}") if sampler else contextlib.nullcontext()):
            for index, (appearance, motion, question, length, answer) in enumerate(loader):
                if index == 1:                          # batch 0 warms up the workers and the device
                    synchronize(device)
                    started = time.perf_counter()
                if index > a.baseline_batches:
                    break
                appearance, motion = appearance.to(device), motion.to(device)
                question, answer = question.to(device), answer.to(device)
                if training:
                    teacher_output = None
                    if teacher is not None:
                        with torch.no_grad(), autocast:
                            teacher_output = teacher(appearance, motion, question, length)
                    with autocast:
                        output = model(appearance, motion, question, length)
                    loss = compute_loss(output, answer, config.loss, stage, teacher_output)["loss"]
                    optimizer.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
                    optimizer.step()
                    checksum += loss.item()             # the original reads the loss every step
                else:
                    with torch.no_grad(), autocast:
                        logits = model(appearance, motion, question, length).logits
                    checksum += float((logits.argmax(1) == answer).sum().item())
                if index >= 1:
                    seen += int(answer.shape[0])
            synchronize(device)
        if started is None or seen == 0:
            raise UserError(f"the {split} split has too few questions for the original loop's warm-up batch "
                            f"plus one timed batch of {a.batch_size}")
        seconds = time.perf_counter() - started
        result[f"{split}_questions_per_s"] = seen / seconds
        result[f"{split}_timed_questions"] = seen
    train_s = len(bundle.splits["train"]) / result["train_questions_per_s"]
    val_s = len(bundle.splits["val"]) / result["val_questions_per_s"]
    questions = len(bundle.splits["train"]) + len(bundle.splits["val"])
    result.update(epoch_s=train_s + val_s, train_s=train_s, val_s=val_s, extrapolated=True,
                  epoch_questions_per_s=questions / (train_s + val_s), workers=a.workers)
    print(f"  original {stage}: {result['train_questions_per_s']:.0f} train / {result['val_questions_per_s']:.0f} val "
          f"questions/s -> epoch {result['epoch_s']:.1f}s (extrapolated)", flush=True)
    return result


def memory_plan(device: torch.device) -> dict[str, Any]:
    """An MSRVTT-QA-sized table: bytes per dtype, and where it would go on this machine."""
    from vqakd.data.features import GPU_TABLE_SHARE
    from vqakd.training.memory import available_memory_bytes

    values = MSRVTT["videos"] * MSRVTT["clips"] * MSRVTT["dim"] * (MSRVTT["frames"] + 1)
    plan = {"videos": MSRVTT["videos"], "clips": MSRVTT["clips"], "frames": MSRVTT["frames"], "dim": MSRVTT["dim"],
            "table_gib": {"float32": values * 4 / 2**30, "float16": values * 2 / 2**30},
            "host_available_gib": (available_memory_bytes() or 0) / 2**30}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        plan.update(gpu_free_gib=free / 2**30, gpu_total_gib=total / 2**30, gpu_table_share=GPU_TABLE_SHARE)
        fits = {dtype: size * 2**30 <= GPU_TABLE_SHARE * free for dtype, size in plan["table_gib"].items()}
        plan["choice"] = ("GPU, float32 (data.feature_device: auto)" if fits["float32"] else
                          "GPU, float16 (data.feature_dtype: float16)" if fits["float16"] else
                          "host memory (batches pinned by the loader); data.feature_dtype: float16 halves it")
    else:
        host_fits = plan["table_gib"]["float32"] <= plan["host_available_gib"]
        plan["choice"] = "host memory, float32" if host_fits else "host memory needs data.feature_dtype: float16 or lazy"
    return plan


# ----------------------------------------------------------------------------------- the run

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized data and network (a few seconds)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast (losses in float32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks (ours only)")
    parser.add_argument("--no-tf32", action="store_true", help="full float32 matmuls on CUDA")
    parser.add_argument("--stages", default="teacher,student")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs of ours (median reported)")
    parser.add_argument("--warmup-epochs", type=int, default=1,
                        help="untimed epochs of ours before them (compilation, first-call allocations)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the original's approach")
    parser.add_argument("--max-train-steps", type=int, default=0, help="cut ours' epochs short and extrapolate (0: all)")
    parser.add_argument("--max-val-steps", type=int, default=0)
    parser.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    for name in FULL:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default {FULL[name]} ({SMALL[name]} with --small)")
    parser.add_argument("--dir", default=None, help="where to write the data (default: a temporary folder, removed)")
    parser.add_argument("--json-out", default=None, help="default bench/results/epoch_<device type>.json")
    return parser


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    sizes = SMALL if a.small else FULL
    for name, default in sizes.items():
        if getattr(a, name) is None:
            setattr(a, name, default)
        if getattr(a, name) < (0 if name == "workers" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be >= {0 if name == 'workers' else 1}")
    if a.answers < 2 or a.question_vocab < 5 or a.batch_size < 2:
        raise UserError("--answers must be >= 2, --question-vocab >= 5 and --batch-size >= 2")
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    if not stages or any(s not in MODELS for s in stages):
        raise UserError(f"--stages: choose from {', '.join(MODELS)}")
    if a.epochs < 1 or a.warmup_epochs < 0 or a.max_train_steps < 0 or a.max_val_steps < 0:
        raise UserError("--epochs must be >= 1; --warmup-epochs, --max-train-steps, --max-val-steps >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    from vqakd.data.batches import load_data
    from vqakd.core.distributed import resolve_device
    from vqakd.training.engine import configure_backends

    a.device_obj = device = resolve_device(a.device)
    configure_backends(device, tf32=not a.no_tf32)
    folder = a.dir or tempfile.mkdtemp(prefix="vqakd_bench_epoch_")
    os.makedirs(folder, exist_ok=True)
    sampler = GpuSampler(device) if device.type == "cuda" and shutil.which("nvidia-smi") else None
    stack = contextlib.ExitStack()
    if sampler:
        stack.enter_context(sampler)
    results = {}
    try:
        started = time.perf_counter()
        paths = write_data(folder, a)
        write_s = time.perf_counter() - started
        config = bench_config(paths, a, folder)
        started = time.perf_counter()
        bundle = load_data(config, splits=("train", "val"), device=device, progress=False)
        load_s = time.perf_counter() - started
        print(f"data: {a.videos} videos x {a.clips}x{a.frames}x{a.dim}, {a.train_questions} train / "
              f"{a.val_questions} val questions, written in {write_s:.1f}s, table ({bundle.table.nbytes() / 2**30:.2f} "
              f"GiB, {a.feature_dtype}) loaded onto {bundle.table.device} in {load_s:.1f}s", flush=True)
        for stage in stages:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row = {"ours": ours(stage, config, bundle, a, sampler)}
            if not a.no_baseline:
                row["original"] = original(stage, config, bundle, paths, a, sampler)
                row["ratio"] = row["original"]["epoch_s"] / row["ours"]["epoch_s"]
            results[stage] = row
    finally:
        stack.close()
        if not a.dir:
            shutil.rmtree(folder, ignore_errors=True)

    full_size = all(getattr(a, name) == FULL[name] for name in ("videos", "train_questions", "val_questions",
                                                                  "clips", "frames", "dim", "batch_size"))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {
        "benchmark": "epoch", "device": str(device), "device_name": device_name, "torch": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "batch_size": a.batch_size, "precision": {"amp": a.amp, "tf32": device.type == "cuda" and not a.no_tf32,
                                                  "compile": a.compile, "feature_dtype": a.feature_dtype},
        "threads": torch.get_num_threads(),
        "sizes": {name: getattr(a, name) for name in FULL}, "full_msvd_qa_size": full_size,
        "table_device": str(bundle.table.device), "table_gib": bundle.table.nbytes() / 2**30,
        "write_s": write_s, "table_load_s": load_s, "stages": results,
        "gpu_utilization_percent": sampler.summary() if sampler else None,
        "msrvtt_qa_memory_plan": memory_plan(device),
        "targets": {"epoch_s_at_most": 5.0, "ratio_at_least": 10.0,
                    "applies": "full MSVD-QA size on one H100/H200 (full_msvd_qa_size true, device cuda)"},
    }
    print(f"\nepoch on {device_name}, batch {a.batch_size}, amp {a.amp}, compile {a.compile}:")
    print(f"{'stage':<8} {'ours s':>8} {'ours q/s':>10} {'original s':>11} {'original q/s':>13} {'ratio':>7} {'val acc':>8}")
    for stage, row in results.items():
        o, b = row["ours"], row.get("original")
        print(f"{stage:<8} {o['epoch_s']:>8.2f} {o['epoch_questions_per_s']:>10,.0f} "
              + (f"{b['epoch_s']:>11.1f} {b['epoch_questions_per_s']:>13,.0f} {row['ratio']:>6.1f}x" if b else
                 f"{'-':>11} {'-':>13} {'-':>7}")
              + f" {100 * o['epochs'][-1]['val_accuracy']:>7.1f}%")
    if report["gpu_utilization_percent"]:
        print("GPU utilisation %: " + ", ".join(f"{phase} {v['mean']:.0f}"
                                                for phase, v in report["gpu_utilization_percent"].items()))
    plan = report["msrvtt_qa_memory_plan"]
    print(f"MSRVTT-QA table: {plan['table_gib']['float32']:.1f} GiB float32 / {plan['table_gib']['float16']:.1f} GiB "
          f"float16 -> {plan['choice']}")
    out = a.json_out or os.path.join(BENCH, "results", f"epoch_{device.type}.json")
    write_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
