"""Training and evaluation steps: the loss of a batch (`compute_loss`), one epoch
(`train_one_epoch`) and one pass over a split (`evaluate`). The runs around them are train.py
and validate.py.

Stages (docs/method.md):
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

Several processes (`torchrun`): each process trains on its share of the global batch; the HSIC
term, a per-question sum, is scaled by the number of shares so that the averaged gradient is the
one-process one (train.py describes the whole recipe). Evaluation sums correct/total counts
over the processes, so every question counts exactly once.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import DualVGROutput
from model.losses import feature_distill_loss, hard_loss, logit_distill_loss, with_regularisers
from vqakd import distributed as dist
from vqakd.config import LossConfig
from vqakd.errors import UserError
from vqakd.metrics import AccuracyCounter, MetricLogger


# ----------------------------------------------------------------------------------- the loss

def compute_loss(output, labels: torch.Tensor, loss_cfg: LossConfig, stage: str,
                 teacher_output=None, batch_shards: int = 1) -> dict[str, torch.Tensor]:
    """All loss parts of one batch; "loss" is the one to minimise.

    `batch_shards`: the global batch is split over this many processes whose gradients are
    averaged. Every part is a per-question mean except the HSIC dependence term, a sum over
    the batch: it is multiplied by the shard count, so the averaged gradient (and the logged
    value) equals the one-process one.
    """
    hard, parts = hard_loss(output, labels, alpha=loss_cfg.alpha, beta=loss_cfg.beta, dependence_scale=batch_shards)
    values = {"hard": hard, "ce": parts["ce"], "common": parts["common"], "dependence": parts["dependence"]}
    distill = loss_cfg.distill if stage == "student" else "none"
    if distill == "feature":
        app, mo = feature_distill_loss(output, teacher_output, loss_cfg.tau_app, loss_cfg.tau_mo)
        values.update(app=app, mo=mo, loss=hard + loss_cfg.kappa_app * app + loss_cfg.kappa_mo * mo)
    elif distill == "logit":
        kd = logit_distill_loss(output.logits, teacher_output.logits, labels, loss_cfg.logit_tau,
                                loss_cfg.logit_mix)
        values.update(kd=kd, loss=with_regularisers(kd, parts["common"], parts["dependence"], loss_cfg.alpha,
                                                    loss_cfg.beta))
    else:
        values["loss"] = hard
    return values


def _autocast(device: torch.device, amp: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


# Stay on the CPU: the model hands the lengths to pack_padded_sequence, which wants them there.
HOST_KEYS = ("question_len", "index")


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value if key in HOST_KEYS else value.to(device, non_blocking=True) for key, value in batch.items()}


# ----------------------------------------------------------------------------------- the device

def configure_backends(device: torch.device, tf32: bool = True) -> None:
    """TF32 matmuls and convolutions on CUDA (Ampere and newer): ~same accuracy for this model,
    several times the float32 throughput."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


# ----------------------------------------------------------------------------------- steps

def forward_batch(model, batch: Mapping[str, torch.Tensor]) -> DualVGROutput:
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
                teacher_output = forward_batch(teacher, batch)
        with _autocast(device, amp):
            output = forward_batch(model, batch)
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
    if isinstance(model, DistributedDataParallel):
        model = model.module
    model.eval()
    counter = AccuracyCounter(device)
    indices, predictions = [], []
    for batch in tqdm(loader, total=len(loader), desc=desc, unit="batch", disable=not progress,
                      dynamic_ncols=True, leave=False, file=sys.stderr):
        batch = _to_device(batch, device)
        with _autocast(device, amp):
            logits = forward_batch(model, batch).logits
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
