"""Training and evaluation: one epoch (`train_one_epoch`), one pass over a split (`evaluate`),
and the whole runs behind `train.py` (`run_training`) and `validate.py` (`run_validation`).

Stages (SPEC §4, §5):
- teacher: hard loss = CE + α·mean C + β·mean H.
- student, `loss.distill`:
    feature (the paper): hard + κ_a·APP + κ_m·MO, the frozen teacher's MFB output against the
      student's appearance / motion features;
    logit: Hinton's logit distillation (mix·τ²·KL + (1 − mix)·CE) + α·mean C + β·mean H;
    none: the hard loss only (no teacher).
  The teacher is frozen (requires_grad False), in eval mode, and runs under torch.no_grad().

Loss values and accuracies stay on the device during an epoch; the host reads them only every
`train.log_every` steps (and every step on the CPU, where reading costs nothing), which is also
when a non-finite loss is reported, naming the epoch, the step and the loss part.

Several processes (`torchrun --nproc_per_node=K`, any number of nodes): DistributedDataParallel
with `train.batch_size` as the GLOBAL batch (B/K questions per process, B must be divisible by
K), so K processes follow the one-process recipe: each step's K shares are exactly the
one-process batch, gradients are averaged, BatchNorm statistics cover the whole batch
(`vqakd.distributed.GlobalBatchNorm1d`) and the HSIC term, a per-question sum, is scaled by K on
each share. With dropout off, K processes and one process train the same network up to float
rounding; with dropout on, each process draws its own masks (seeded by seed, epoch and rank, so
--resume is still exact). Evaluation shards each split without padding and sums correct/total
counts, so every question counts exactly once. Only global rank 0 writes files and logs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import sys
import time
from types import SimpleNamespace
from typing import Any, Mapping, Optional

import numpy as np
import torch
from tqdm import tqdm

from vqakd import distributed as dist
from vqakd.checkpoint import (build_checkpoint, build_model, load_checkpoint, load_state_strict,
                              model_config_from, restore_rng_state, save_checkpoint, seed_everything)
from vqakd.config import Config, LossConfig, config_to_dict, dump_config, eval_batch_size
from vqakd.data import DataBundle, glove_matrix_for, load_data, make_loader
from vqakd.device import resolve_device
from vqakd.errors import UserError
from vqakd.io import atomic_open, ensure_writable_dir, write_json
from vqakd.metrics import QUESTION_TYPES, AccuracyCounter, MetricLogger, format_table
from vqakd.provenance import inference_record

# Loss parts in reporting order; "loss" is the total that is minimised.
LOSS_PARTS = ("loss", "hard", "ce", "common", "dependence", "app", "mo", "kd")
CURVES_REFRESH_S = 60.0


# ----------------------------------------------------------------------------------- the loss

def compute_loss(output, labels: torch.Tensor, loss_cfg: LossConfig, stage: str,
                 teacher_output=None, batch_shards: int = 1) -> dict[str, torch.Tensor]:
    """All loss parts of one batch; "loss" is the one to minimise.

    `batch_shards`: the global batch is split over this many processes whose gradients are
    averaged. Every part is a per-question mean except the HSIC dependence term, a sum over
    the batch: it is multiplied by the shard count, so the averaged gradient (and the logged
    value) equals the one-process one.
    """
    from model.losses import feature_distill_loss, hard_loss, logit_distill_loss

    hard, parts = hard_loss(output, labels, alpha=loss_cfg.alpha, beta=loss_cfg.beta)
    if batch_shards > 1:
        parts = dict(parts, dependence=parts["dependence"] * batch_shards)
        hard = parts["ce"] + loss_cfg.alpha * parts["common"] + loss_cfg.beta * parts["dependence"]
    values = {"hard": hard, "ce": parts["ce"], "common": parts["common"], "dependence": parts["dependence"]}
    distill = loss_cfg.distill if stage == "student" else "none"
    if distill == "feature":
        app, mo = feature_distill_loss(output, teacher_output, loss_cfg.tau_app, loss_cfg.tau_mo)
        values.update(app=app, mo=mo, loss=hard + loss_cfg.kappa_app * app + loss_cfg.kappa_mo * mo)
    elif distill == "logit":
        kd = logit_distill_loss(output.logits, teacher_output.logits, labels, loss_cfg.logit_tau,
                                loss_cfg.logit_mix)
        values.update(kd=kd, loss=kd + loss_cfg.alpha * parts["common"] + loss_cfg.beta * parts["dependence"])
    else:
        values["loss"] = hard
    return values


def _autocast(device: torch.device, amp: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


# Stay on the CPU: the model hands the lengths to pack_padded_sequence, which wants them there.
HOST_KEYS = ("question_len", "index")


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value if key in HOST_KEYS else value.to(device, non_blocking=True) for key, value in batch.items()}


def configure_backends(device: torch.device, tf32: bool = True) -> None:
    """TF32 matmuls and convolutions on CUDA (Ampere and newer): ~same accuracy for this model,
    several times the float32 throughput."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def resolve_training_device(spec: str) -> torch.device:
    """`train.device` for this process: under torchrun, auto/cuda mean cuda:LOCAL_RANK (the GPU
    of this process on its own node)."""
    if dist.env_world_size() <= 1 and not dist.launched_by_torchrun():
        return resolve_device(spec)
    spec = (spec or "auto").strip().lower()
    if spec.startswith("cuda:"):
        raise UserError(f"train.device {spec!r}: under torchrun every process uses cuda:LOCAL_RANK; set train.device "
                        "to auto or cuda (and pick GPUs with CUDA_VISIBLE_DEVICES)")
    device = resolve_device(spec)
    if device.type != "cuda":
        return device
    index = dist.local_rank()
    if index >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {index} but only {torch.cuda.device_count()} CUDA device(s) are visible; use "
                        "--nproc_per_node at most the number of GPUs per node")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def per_process_batch(batch_size: int, world_size: int, what: str = "train.batch_size") -> int:
    """The global batch split over the processes."""
    if batch_size % world_size:
        raise UserError(f"{what} ({batch_size}) is the global batch and must be divisible by the number of processes "
                        f"({world_size}); e.g. --set {what}={batch_size // world_size * world_size or world_size}")
    return batch_size // world_size


def _forward(model, batch):
    return model(batch["appearance"], batch["motion"], batch["question"], batch["question_len"])


class _NonFiniteWatch:
    """Remembers, on the device, the first step whose loss values were not all finite.

    `values` per step: the logged parts (total, hard, ce, common, ...) followed by the weighted
    terms (α·common, β·dependence, ...), so that a finite part times a huge weight is reported
    as such.
    """

    RAW_PARTS = ("ce", "common", "dependence", "app", "mo", "kd")

    def __init__(self, names: tuple[str, ...], weighted: tuple[tuple[str, str, float], ...], device: torch.device):
        self.names = names
        self.weighted = weighted                 # (part, weight name, weight)
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.values = torch.zeros(len(names) + len(weighted), device=device)

    def update(self, step: int, values: torch.Tensor) -> None:
        if self.weighted:
            index = {name: i for i, name in enumerate(self.names)}
            terms = torch.stack([values[index[part]] * weight for part, _name, weight in self.weighted])
            values = torch.cat([values, terms])
        newly = (~torch.isfinite(values)).any() & (self.step < 0)
        self.step = torch.where(newly, torch.full_like(self.step, step), self.step)
        self.values = torch.where(newly, values, self.values)

    def check(self, epoch: int, steps: int) -> None:
        """Raise if a step so far was not finite. Under torchrun every rank calls this at the same
        steps and every rank raises the same error (the earliest bad step of any rank)."""
        world = dist.get_world_size()
        if world > 1:
            never = (steps + 1) * world
            key = torch.where(self.step < 0, torch.full_like(self.step, never), self.step * world + dist.get_rank())
            dist.all_reduce_min(key)
            key = int(key)
            if key >= never:
                return
            step, owner = divmod(key, world)
            values = dist.broadcast(self.values.clone(), owner).cpu().tolist()
        else:
            step = int(self.step)
            if step < 0:
                return
            values = self.values.cpu().tolist()
        parts = dict(zip(self.names, values[:len(self.names)]))
        raw = [f"{name} = {value}" for name, value in parts.items()
               if name in self.RAW_PARTS and not math.isfinite(value)]
        weighted = [f"{weight_name} × {part} = {value} ({part} = {parts[part]:.6g}, {weight_name} = {weight:g})"
                    for (part, weight_name, weight), value in zip(self.weighted, values[len(self.names):])
                    if not math.isfinite(value)]
        bad = raw or weighted or [f"{name} = {value}" for name, value in parts.items() if not math.isfinite(value)]
        error = UserError(f"non-finite loss at epoch {epoch}, step {step} of {steps}: {'; '.join(bad)}; "
                          "lower train.lr or the loss weights, or check the features for extreme values")
        error.shown_by_main = world > 1          # every rank raises it; rank 0 prints it
        raise error


def train_one_epoch(model, loader, optimizer, device: torch.device, epoch: int, *, stage: str,
                    loss_cfg: LossConfig, teacher=None, grad_clip: float = 12.0, amp: str = "none",
                    log_every: int = 50, progress: bool = True, batch_shards: int = 1,
                    check_every: Optional[int] = None) -> dict[str, Any]:
    """One pass over the training loader. Returns averaged loss parts, train accuracy, time
    (summed over every process). `model` may be wrapped in DistributedDataParallel;
    `batch_shards` is then the world size (see `compute_loss`).

    No host synchronisation inside a step on a GPU: the step's values are accumulated on the
    device and read every `log_every` steps (the non-finite check and the progress bar).
    `check_every`: steps between non-finite checks (default: every step on the CPU, where
    reading a value costs nothing, else log_every)."""
    model.train()
    if teacher is not None:
        teacher.eval()
    distill = loss_cfg.distill if stage == "student" else "none"
    names = ("loss", "hard", "ce", "common", "dependence") + {"feature": ("app", "mo"), "logit": ("kd",)}.get(
        distill, ())
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    questions = torch.zeros((), dtype=torch.long, device=device)
    counter = AccuracyCounter(device)
    weighted = (("common", "loss.alpha", loss_cfg.alpha), ("dependence", "loss.beta", loss_cfg.beta))
    if distill == "feature":
        weighted += (("app", "loss.kappa_app", loss_cfg.kappa_app), ("mo", "loss.kappa_mo", loss_cfg.kappa_mo))
    watch = _NonFiniteWatch(names, weighted, device)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else log_every
    logger = MetricLogger()
    steps = len(loader)
    started = time.perf_counter()
    bar = tqdm(loader, total=steps, desc=f"{stage} epoch {epoch}", unit="batch", disable=not progress,
               dynamic_ncols=True, leave=False, file=sys.stderr)
    parameters = [p for p in model.parameters() if p.requires_grad]
    for step, batch in enumerate(bar, start=1):
        batch = _to_device(batch, device)
        labels = batch["answer"]
        teacher_output = None
        if distill != "none":
            with torch.no_grad(), _autocast(device, amp):
                teacher_output = _forward(teacher, batch)
        with _autocast(device, amp):
            output = _forward(model, batch)
        values = compute_loss(output, labels, loss_cfg, stage, teacher_output, batch_shards)
        optimizer.zero_grad(set_to_none=True)
        values["loss"].backward()
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()

        detached = torch.stack([values[name].detach().float() for name in names])
        watch.update(step, detached)
        batch_size = labels.shape[0]
        sums += detached.double() * batch_size
        questions += batch_size
        counter.update(output.logits.detach().argmax(dim=1), labels, batch["qtype"])
        if step % check_every == 0 or step == steps:
            watch.check(epoch, steps)
        if progress and (step % log_every == 0 or step == steps):
            logger.update(**{name: value for name, value in zip(names, detached.cpu().tolist())})
            bar.set_postfix(logger.postfix(), refresh=False)
    bar.close()
    watch.check(epoch, steps)
    dist.all_reduce_sum(sums)
    dist.all_reduce_sum(questions)
    counter.all_reduce()
    count = max(int(questions), 1)
    elapsed = time.perf_counter() - started
    result = {name: float(value) / count for name, value in zip(names, sums.cpu().tolist())}
    result.update(accuracy=counter.summary(), time_s=elapsed, questions=int(questions),
                  questions_per_s=int(questions) / elapsed if elapsed > 0 else 0.0)
    return result


@torch.no_grad()
def evaluate(model, loader, device: torch.device, *, amp: str = "none", return_predictions: bool = False,
             progress: bool = False, desc: str = "eval") -> tuple[dict, Optional[dict[str, np.ndarray]]]:
    """Accuracy overall and per question type (summed over all processes); optionally the
    arg-max prediction of every question ({"index", "prediction"}, this process's share).
    Runs the plain module even when given a DDP wrapper: ranks may hold different numbers of
    batches, and DDP's forward must not be called a different number of times per rank."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    model.eval()
    counter = AccuracyCounter(device)
    indices, predictions = [], []
    for batch in tqdm(loader, total=len(loader), desc=desc, unit="batch", disable=not progress,
                      dynamic_ncols=True, leave=False, file=sys.stderr):
        batch = _to_device(batch, device)
        with _autocast(device, amp):
            logits = _forward(model, batch).logits
        predicted = logits.argmax(dim=1)
        counter.update(predicted, batch["answer"], batch["qtype"])
        if return_predictions:
            indices.append(batch["index"])
            predictions.append(predicted)
    summary = counter.all_reduce().summary()
    if not return_predictions:
        return summary, None
    if indices:
        found = {"index": torch.cat(indices).cpu().numpy(), "prediction": torch.cat(predictions).cpu().numpy()}
    else:
        found = {"index": np.zeros(0, dtype=np.int64), "prediction": np.zeros(0, dtype=np.int64)}
    return summary, found


# ----------------------------------------------------------------------------------- run helpers

class RunLog:
    """Lines to stdout and appended to a log file (main process only)."""

    def __init__(self, path: Optional[str]):
        self.path = path

    def __call__(self, message: str) -> None:
        if not dist.is_main():
            return
        print(message, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(message + "\n")


def metrics_row(epoch: int, lr: float, train: Mapping, val: Mapping, epoch_time: float) -> dict[str, Any]:
    """One metrics.csv row: every column always present (empty where a part does not apply).
    `time_s` is the whole epoch (training and validation)."""
    row: dict[str, Any] = {"epoch": epoch, "lr": lr, "time_s": round(epoch_time, 3),
                           "train_questions_per_s": round(train["questions_per_s"], 2)}
    for name in LOSS_PARTS:
        row[f"train_{name}"] = train.get(name, "")
    for prefix, summary in (("train", train["accuracy"]), ("val", val)):
        row[f"{prefix}_acc"] = summary["accuracy"]
        for qtype in QUESTION_TYPES:
            row[f"{prefix}_acc_{qtype}"] = summary["per_type"][qtype]["accuracy"]
    row["val_count"] = val["count"]
    return row


def write_metrics_csv(path: str, rows: list[Mapping[str, Any]]) -> None:
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(buffer.getvalue())


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def epoch_line(row: Mapping[str, Any], epochs: int, is_best: bool) -> str:
    losses = " ".join(f"{name} {_fmt(row[f'train_{name}'])}" for name in LOSS_PARTS if row[f"train_{name}"] != "")
    per_type = " ".join(f"{qtype} {100 * row[f'val_acc_{qtype}']:.1f}" for qtype in QUESTION_TYPES)
    return (f"epoch {row['epoch']}/{epochs} | {losses} | train acc {100 * row['train_acc']:.2f}% | "
            f"val acc {100 * row['val_acc']:.2f}% ({per_type}) | lr {row['lr']:.3g} | {row['time_s']:.1f}s"
            + (" | best" if is_best else ""))


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_vocab_match(checkpoint: Mapping, path: str, bundle: DataBundle, what: str) -> None:
    model_config = checkpoint["model_config"]
    vocab = bundle.vocab
    for key, size, name in (("question_vocab_size", vocab.question_size, "question"),
                            ("answer_vocab_size", vocab.answer_size, "answer")):
        if model_config.get(key) != size:
            raise UserError(f"{path}: {what} was trained with a {name} vocabulary of {model_config.get(key)} "
                            f"entries but {vocab.path} has {size}; use the vocabulary it was trained with")
    saved_hash = (checkpoint.get("vocab") or {}).get("sha256")
    if saved_hash and saved_hash != vocab.sha256:
        raise UserError(f"{path}: {what} was trained with a different vocabulary file (sha256 "
                        f"{saved_hash[:12]}…, {vocab.path} has {vocab.sha256[:12]}…); token indices would not match")


def _check_nodes_match(model_config: Mapping, path: str, config: Config, what: str) -> None:
    for key in ("num_nodes", "vision_dim"):
        if model_config.get(key) != getattr(config.model, key):
            raise UserError(f"{path}: {what} has {key} {model_config.get(key)} but the config's model.{key} is "
                            f"{getattr(config.model, key)}")


def load_teacher(path: str, config: Config, bundle: DataBundle, device: torch.device):
    """The frozen teacher for distillation, checked against this run's data and student."""
    checkpoint = load_checkpoint(path)
    _check_vocab_match(checkpoint, path, bundle, "the teacher")
    _check_nodes_match(checkpoint["model_config"], path, config, "the teacher")
    if checkpoint["model_config"].get("module_dim") != config.model.module_dim:
        raise UserError(f"{path}: the teacher has module_dim {checkpoint['model_config'].get('module_dim')} but the "
                        f"student has {config.model.module_dim}; feature distillation needs equal sizes")
    teacher = build_model(checkpoint, path, device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher, checkpoint


def build_student_or_teacher(config: Config, stage: str, bundle: DataBundle, device: torch.device,
                             progress: bool):
    from model import DualVGR, ModelConfig

    section = config.model
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {name: getattr(section, name) for name in dataclasses.asdict(section) if name in fields}
    try:
        model_config = ModelConfig(question_vocab_size=bundle.vocab.question_size,
                                   answer_vocab_size=bundle.vocab.answer_size,
                                   graph_layers=config.stage(stage).graph_layers, **values)
    except ValueError as exc:
        raise UserError(f"invalid model settings: {exc}") from None
    model = DualVGR(model_config)
    glove = glove_matrix_for(config, bundle, progress)
    if glove is not None:
        model.load_glove(glove)
    return model.to(device)


# ----------------------------------------------------------------------------------- train.py

STAGE_FILES = {"last": "last.pt", "best": "best.pt", "metrics": "metrics.csv", "results": "results.json",
               "curves": "curves.png", "config": "config.yml", "log": "train.log"}


def stage_files(folder: str) -> SimpleNamespace:
    """`<output_dir>/<stage>/{last.pt, best.pt, metrics.csv, results.json, curves.png, config.yml, train.log}`."""
    return SimpleNamespace(folder=folder, **{key: os.path.join(folder, name) for key, name in STAGE_FILES.items()})


def stale_temporaries(paths: SimpleNamespace) -> list[str]:
    """Temp files of `vqakd.io.atomic_path` for this stage's outputs (`.<name>.<random>.tmp`)."""
    names = tuple(f".{name}." for name in STAGE_FILES.values())
    try:
        entries = os.listdir(paths.folder)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(paths.folder, entry) for entry in entries
                  if entry.startswith(names) and entry.endswith(".tmp"))


def _folders_to_create(path: str) -> list[str]:
    """The folders `os.makedirs(path)` would create, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _start_stage(config: Config, stage: str, paths: SimpleNamespace, teacher_path: Optional[str], resume: bool,
                 overwrite: bool, device: torch.device, log: RunLog) -> SimpleNamespace:
    """Every start-up check and load, before anything in the output folder changes (every rank
    runs it; nothing here writes but the writability probe)."""
    ensure_writable_dir(paths.folder, f"{stage} output folder")
    if os.path.exists(paths.last) and not resume and not overwrite:
        raise UserError(f"{paths.folder} already holds a {stage} run ({paths.last}); pass --resume to continue it "
                        "or --overwrite to start again")
    progress = config.train.progress and dist.is_main()
    distill = config.loss.distill if stage == "student" else "none"
    teacher_file = None
    if distill != "none":
        teacher_file = teacher_path or stage_files(config.stage_dir("teacher")).best
        if not os.path.isfile(teacher_file):
            raise UserError(f"teacher checkpoint not found: {teacher_file}; train the teacher first "
                            "(--stage teacher) or pass --teacher <checkpoint>")

    bundle = load_data(config, device=device, progress=progress)
    # The frozen teacher runs on every rank, on that rank's own share of the batch.
    teacher = load_teacher(teacher_file, config, bundle, device)[0] if teacher_file else None

    seed_everything(config.train.seed)
    model = build_student_or_teacher(config, stage, bundle, device, progress)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.train.lr_halve_every,
                                                gamma=config.train.lr_decay)
    state = SimpleNamespace(bundle=bundle, teacher=teacher, teacher_file=teacher_file, distill=distill, model=model,
                            optimizer=optimizer, scheduler=scheduler, history=[], best={}, start_epoch=1)
    if resume and os.path.isfile(paths.last):
        # Every rank reads the checkpoint (to the CPU; load_state_dict copies to this rank's device).
        checkpoint = load_checkpoint(paths.last)
        ours = dataclasses.asdict(model.config)
        saved = checkpoint["model_config"]
        changed = [key for key in ours if saved.get(key) != ours[key]]
        if changed:
            raise UserError(f"{paths.last}: written for a different model ({changed[0]} {saved.get(changed[0])} "
                            f"vs {ours[changed[0]]} now); use --overwrite to start again")
        _check_vocab_match(checkpoint, paths.last, bundle, "the run being resumed")
        load_state_strict(model, checkpoint["state_dict"], paths.last)
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
        except (KeyError, ValueError, TypeError) as exc:
            raise UserError(f"{paths.last}: cannot restore the optimizer/scheduler state ({exc})") from None
        restore_rng_state(checkpoint["rng"])
        state.history = list(checkpoint.get("history") or [])
        state.best = dict(checkpoint.get("best") or {})
        state.start_epoch = int(checkpoint["epoch"]) + 1
        state.resumed_from = int(checkpoint["epoch"])
    return state


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Under torchrun: each rank's dropout masks for an epoch come from (seed, epoch, rank), so a
    resumed run draws what an uninterrupted one draws without saving every rank's RNG state."""
    torch.manual_seed(seed + 1_000_003 * epoch + 7_919 * rank)


def _wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    dist.convert_batchnorm(model)
    # Every parameter gets a gradient in every stage and distillation mode (checked by
    # tests/test_distributed_train.py), so DDP need not search for unused ones. BatchNorm
    # buffers are identical on every rank (global statistics): no per-step buffer broadcast.
    import inspect

    # torch >= 2.14 renames broadcast_buffers (it still syncs once at start, which is harmless here).
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=False, **no_buffer_sync)


def run_training(config: Config, stage: str, teacher_path: Optional[str] = None, resume: bool = False,
                 overwrite: bool = False) -> dict[str, Any]:
    """Train one stage end to end; returns the results.json content (or {} when stopped early).
    Under torchrun every process calls this; see the module docstring."""
    with dist.session():
        return _run_training(config, stage, teacher_path, resume, overwrite)


def _run_training(config: Config, stage: str, teacher_path: Optional[str], resume: bool,
                  overwrite: bool) -> dict[str, Any]:
    from vqakd.plots import plot_curves

    config.stage(stage)
    world, rank, main = dist.get_world_size(), dist.get_rank(), dist.is_main()
    paths = stage_files(config.stage_dir(stage))
    log = RunLog(paths.log)
    new_folders = _folders_to_create(paths.folder)

    def start():
        device = resolve_training_device(config.train.device)
        batch_train = per_process_batch(config.train.batch_size, world)
        state = _start_stage(config, stage, paths, teacher_path, resume, overwrite, device, log)
        state.device, state.batch_train = device, batch_train
        return state

    try:
        state = dist.agree(start)
    except BaseException:
        # A run that fails its start-up checks leaves no empty output folders behind.
        for folder in new_folders:
            try:
                os.rmdir(folder)
            except OSError:
                break
        raise
    device = state.device
    configure_backends(device, config.train.tf32)
    bundle, model, optimizer, scheduler = state.bundle, state.model, state.optimizer, state.scheduler
    teacher, teacher_file, distill = state.teacher, state.teacher_file, state.distill
    history, best, start_epoch = state.history, state.best, state.start_epoch
    progress = config.train.progress and main
    if main:
        if hasattr(state, "resumed_from"):
            log(f"resuming {stage} from {paths.last} after epoch {state.resumed_from}")
        elif resume:
            log(f"no checkpoint at {paths.last}; starting {stage} from epoch 1")
        elif overwrite:
            # Only now that every rank has passed every check is the old run discarded.
            for name in STAGE_FILES:
                if os.path.exists(getattr(paths, name)):
                    os.remove(getattr(paths, name))
        for leftover in stale_temporaries(paths):
            # A job killed while writing a checkpoint leaves its hidden temp file (the size of a
            # checkpoint); the final files were never touched, so it is only waste.
            os.remove(leftover)
            log(f"removed {leftover}, left by an interrupted write")
        dump_config(config, paths.config)
    dist.barrier()

    params = count_parameters(model)
    processes = (f", DistributedDataParallel: {world} processes x {state.batch_train} questions (global batch "
                 f"{config.train.batch_size})" if dist.is_initialized() else "")
    log(f"{stage}: {params:,} parameters (G={model.config.graph_layers}, U={model.config.unit_layers}), "
        f"device {device}{processes}, features on {bundle.table.device} ({bundle.table.mode}, "
        f"{bundle.table.dtype_name}), {len(bundle.splits['train'])} train / {len(bundle.splits['val'])} val / "
        f"{len(bundle.splits['test'])} test questions" + (f", distill {distill} from {teacher_file}"
                                                          if teacher_file else ""))
    trained = _wrap_ddp(model, device) if dist.is_initialized() else model
    pin = device.type == "cuda"
    train_loader = make_loader(bundle.splits["train"], bundle.table, state.batch_train, True,
                               config.train.seed, config.train.num_workers, pin, rank, world, reuse_buffers=True)
    batch_eval = -(-eval_batch_size(config) // world)
    val_loader = make_loader(bundle.splits["val"], bundle.table, batch_eval, False, config.train.seed,
                             config.train.num_workers, pin, rank, world, reuse_buffers=True)

    vocab_info = bundle.vocab.info()
    inference = inference_record(config.data.appearance_feat, config.data.motion_feat, bundle.vocab)
    config_dict = config_to_dict(config)
    epochs = config.train.epochs
    last_plot = time.monotonic()
    for epoch in range(start_epoch, epochs + 1):
        train_loader.sampler.set_epoch(epoch)
        if world > 1:
            _seed_epoch(config.train.seed, epoch, rank)
        lr = optimizer.param_groups[0]["lr"]
        epoch_started = time.perf_counter()
        train_stats = train_one_epoch(trained, train_loader, optimizer, device, epoch, stage=stage,
                                      loss_cfg=config.loss, teacher=teacher, grad_clip=config.train.grad_clip,
                                      amp=config.train.amp, log_every=config.train.log_every, progress=progress,
                                      batch_shards=world)
        val_summary, _ = evaluate(model, val_loader, device, amp=config.train.amp, progress=progress,
                                  desc=f"val epoch {epoch}")
        scheduler.step()
        row = metrics_row(epoch, lr, train_stats, val_summary, time.perf_counter() - epoch_started)
        history.append(row)
        # val_summary is the whole split's (summed over ranks): every rank takes the same decision.
        is_best = not best or val_summary["accuracy"] > best["val_accuracy"]
        if is_best:
            best = {"epoch": epoch, "val_accuracy": val_summary["accuracy"]}
        if main:
            checkpoint = build_checkpoint(model=model, stage=stage, epoch=epoch, optimizer=optimizer,
                                          scheduler=scheduler, metrics=row, history=history, best=best,
                                          vocab=vocab_info, config=config_dict, inference=inference)
            # best first: if the job dies between the two writes, last.pt still points to the
            # previous epoch and resuming redoes this one, rewriting both.
            if is_best:
                save_checkpoint(paths.best, checkpoint)
            save_checkpoint(paths.last, checkpoint)
            write_metrics_csv(paths.metrics, history)
            stopping = epoch == epochs or config.train.stop_after_epoch == epoch
            # Drawing takes a second or two: refresh the PNG at most once a minute, and at the end.
            if stopping or time.monotonic() - last_plot >= CURVES_REFRESH_S:
                plot_curves(history, paths.curves, stage)
                last_plot = time.monotonic()
        log(epoch_line(row, epochs, is_best))
        if config.train.stop_after_epoch == epoch and epoch < epochs:
            log(f"stopped after epoch {epoch} (train.stop_after_epoch); continue with --resume")
            dist.barrier()
            return {}

    dist.barrier()          # best.pt is complete before any rank reads it

    def load_best():
        if not os.path.isfile(paths.best):
            raise UserError(f"{paths.best} does not exist; nothing to evaluate (was the run trained?)")
        best_checkpoint = load_checkpoint(paths.best)
        return best_checkpoint, build_model(best_checkpoint, paths.best, device)

    best_checkpoint, best_model = dist.agree(load_best, "loading best.pt")
    test_loader = make_loader(bundle.splits["test"], bundle.table, batch_eval, False, config.train.seed,
                              config.train.num_workers, pin, rank, world, reuse_buffers=True)
    test_summary, _ = evaluate(best_model, test_loader, device, amp=config.train.amp, progress=progress,
                               desc="test")
    results = {
        "stage": stage,
        "split": "test",
        "accuracy": test_summary["accuracy"],
        "correct": test_summary["correct"],
        "count": test_summary["count"],
        "per_type": test_summary["per_type"],
        "epoch": int(best_checkpoint["epoch"]),
        "val_accuracy": best_checkpoint.get("best", {}).get("val_accuracy"),
        "params": count_parameters(best_model),
        "checkpoint": paths.best,
        "distill": distill if stage == "student" else None,
        "teacher": teacher_file,
        "model_config": best_checkpoint["model_config"],
        "config": config_dict,
        "world_size": world,
    }
    if main:
        write_json(paths.results, results)
    log(format_table(test_summary, f"{stage} test accuracy (best epoch {results['epoch']} by val accuracy):"))
    log(f"wrote {paths.results}, {paths.metrics}, {paths.curves}")
    dist.barrier()
    return results


# ----------------------------------------------------------------------------------- validate.py

def run_validation(config: Config, checkpoint_path: str, split: str = "test", write_preds: bool = False,
                   out: Optional[str] = None, preds_out: Optional[str] = None) -> dict[str, Any]:
    """Evaluate a checkpoint (ours or original) on a split; write JSON (and predictions CSV).
    Under torchrun each process evaluates its share and rank 0 writes the whole split's figures."""
    with dist.session():
        return _run_validation(config, checkpoint_path, split, write_preds, out, preds_out)


def _run_validation(config: Config, checkpoint_path: str, split: str, write_preds: bool, out: Optional[str],
                    preds_out: Optional[str]) -> dict[str, Any]:
    world, rank, main = dist.get_world_size(), dist.get_rank(), dist.is_main()
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    out = out or os.path.join(folder, f"eval_{split}.json")
    preds_out = preds_out or os.path.splitext(out)[0] + "_preds.csv"

    def start():
        if split not in ("train", "val", "test"):
            raise UserError(f"unknown split {split!r}; choose train, val or test")
        device = resolve_training_device(config.train.device)
        checkpoint = load_checkpoint(checkpoint_path)
        ensure_writable_dir(os.path.dirname(os.path.abspath(out)), "output folder for the evaluation results")
        model_config = model_config_from(checkpoint, checkpoint_path)
        # The checkpoint defines the network: its clip count and feature size are what the data must match.
        config.model.num_nodes = model_config.num_nodes
        config.model.vision_dim = model_config.vision_dim
        bundle = load_data(config, splits=(split,), device=device, progress=config.train.progress and main,
                           expected_by="the checkpoint's model_config")
        _check_vocab_match(checkpoint, checkpoint_path, bundle, "the checkpoint")
        return device, checkpoint, bundle, build_model(checkpoint, checkpoint_path, device)

    device, checkpoint, bundle, model = dist.agree(start)
    configure_backends(device, config.train.tf32)
    loader = make_loader(bundle.splits[split], bundle.table, -(-eval_batch_size(config) // world), False,
                         config.train.seed, config.train.num_workers, device.type == "cuda", rank, world,
                         reuse_buffers=True)
    summary, found = evaluate(model, loader, device, amp=config.train.amp, return_predictions=write_preds,
                              progress=config.train.progress and main, desc=split)
    if write_preds and world > 1:
        shares = dist.all_gather_objects(found)
        found = {key: np.concatenate([share[key] for share in shares]) for key in ("index", "prediction")}
    result = {
        "checkpoint": checkpoint_path,
        "split": split,
        "accuracy": summary["accuracy"],
        "correct": summary["correct"],
        "count": summary["count"],
        "per_type": summary["per_type"],
        "epoch": checkpoint.get("epoch"),
        "stage": checkpoint.get("stage"),
        "original_checkpoint": bool(checkpoint.get("original")),
        "params": count_parameters(model),
    }
    if main:
        print(format_table(summary, f"{checkpoint_path} on {split} ({summary['count']} questions):"))
        write_json(out, result)
        print(f"wrote {out}")
        if write_preds:
            write_predictions(preds_out, bundle, split, found)
            print(f"wrote {preds_out}")
    dist.barrier()
    return result


def write_predictions(path: str, bundle: DataBundle, split: str, found: Mapping[str, np.ndarray]) -> None:
    from vqakd.metrics import FIRST_ANSWER_LABEL

    data = bundle.splits[split]
    answers = bundle.vocab.idx_to_answer
    order = np.argsort(found["index"], kind="stable")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["question_id", "video_id", "question", "predicted_answer", "answer", "correct"])
    for index, predicted in zip(found["index"][order], found["prediction"][order]):
        label = int(data.answers[index])
        writer.writerow([data.question_id[index], int(data.video_ids[index]), data.text(int(index), bundle.vocab),
                         answers[int(predicted)], answers[label],
                         int(int(predicted) == label and label >= FIRST_ANSWER_LABEL)])
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())
