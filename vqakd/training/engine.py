"""Training and evaluation steps: the loss of a batch (`compute_loss`), one epoch
(`train_one_epoch`) and one pass over a split (`evaluate`). The runs around them are
vqakd/training/run.py (train.py) and vqakd/training/validation.py (validate.py).

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
one-process one (vqakd/training/run.py describes the whole recipe). Evaluation sums correct/total counts
over the processes, so every question counts exactly once.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from model import DualVGROutput
from model.diagnostics import STREAMS, NodeSpreadMeter
from model.losses import feature_distill_loss, hard_loss, logit_distill_loss, with_regularisers
from vqakd.core import distributed as dist
from vqakd.core.config import LossConfig
from vqakd.core.errors import UserError
from vqakd.training.metrics import AccuracyCounter
from vqakd.core.progress import progress_bar


# ----------------------------------------------------------------------------------- the loss

def compute_loss(output, labels: torch.Tensor, loss_cfg: LossConfig, stage: str,
                 teacher_output=None, batch_shards: int = 1) -> dict[str, torch.Tensor]:
    """All loss parts of one batch; "loss" is the one to minimise.

    `batch_shards`: the global batch is split over this many processes whose gradients are
    averaged. Every part is a per-question mean except the HSIC dependence term, a sum over
    the batch: it is multiplied by the shard count, so the averaged gradient (and the logged
    value) equals the one-process one. (`evaluate` passes a fractional count: the reference batch
    over this batch's size.) `loss_cfg.common` chooses the common loss (original or safe).
    """
    hard, parts = hard_loss(output, labels, alpha=loss_cfg.alpha, beta=loss_cfg.beta, dependence_scale=batch_shards,
                            common_mode=loss_cfg.common)
    values = {"hard": hard, "ce": parts["ce"], "common": parts["common"], "dependence": parts["dependence"]}
    distill = loss_cfg.distill_of(stage)
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
    """Remembers, on the device (no host sync per step), the first step whose loss values were not
    all finite: the logged parts (total, hard, ce, common, ...) and the weighted terms (α·common,
    β·dependence, ...), so that a finite part times a huge weight is reported as such."""

    RAW_PARTS = ("ce", "common", "dependence", "app", "mo", "kd")

    def __init__(self, names: tuple[str, ...], weighted: tuple[tuple[str, str, float], ...], device: torch.device):
        self.names = names
        self.weighted = weighted                 # (part, weight name, weight)
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.values = torch.zeros(len(names) + len(weighted), device=device)

    def update(self, step: int, values: torch.Tensor) -> None:
        index = {name: i for i, name in enumerate(self.names)}
        values = torch.cat([values] + [values[index[part]:index[part] + 1] * weight
                                       for part, _name, weight in self.weighted])
        newly = (~torch.isfinite(values)).any() & (self.step < 0)
        self.step = torch.where(newly, torch.full_like(self.step, step), self.step)
        self.values = torch.where(newly, values, self.values)

    def check(self, epoch: int, steps: int) -> None:
        """Raise if a step so far was not finite. Under torchrun every rank calls this at the same
        steps and raises the same error (the earliest bad step of any rank; rank 0 prints it)."""
        found = (int(self.step), self.values.cpu().tolist()) if int(self.step) >= 0 else None
        found = min((each for each in dist.all_gather_objects(found) if each), default=None, key=lambda f: f[0])
        if found is None:
            return
        step, values = found
        parts = dict(zip(self.names, values))
        raw = [f"{name} = {value}" for name, value in parts.items()
               if name in self.RAW_PARTS and not math.isfinite(value)]
        weighted = [f"{weight_name} × {part} = {value} ({part} = {parts[part]:.6g}, {weight_name} = {weight:g})"
                    for (part, weight_name, weight), value in zip(self.weighted, values[len(self.names):])
                    if not math.isfinite(value)]
        bad = raw or weighted or [f"{name} = {value}" for name, value in parts.items() if not math.isfinite(value)]
        error = UserError(f"non-finite loss at epoch {epoch}, step {step} of {steps}: {'; '.join(bad)}; "
                          "lower train.lr or the loss weights, or check the features for extreme values")
        error.shown_by_main = dist.get_world_size() > 1      # every rank raises it; rank 0 prints it
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
    distill = loss_cfg.distill_of(stage)
    names = loss_names(stage, loss_cfg)
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    questions = torch.zeros((), dtype=torch.long, device=device)
    counter = AccuracyCounter(device)
    watch = _NonFiniteWatch(names, weighted_terms(stage, loss_cfg), device)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else log_every
    steps = len(loader)
    started = time.perf_counter()
    bar = progress_bar(loader, total=steps, desc=f"{stage} epoch {epoch}", unit="batch", enabled=progress,
                       dynamic_ncols=True, leave=False)
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
            bar.set_postfix({name: f"{value:.4g}" for name, value in zip(names, detached.cpu().tolist())},
                            refresh=False)
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


def weighted_terms(stage: str, loss_cfg: LossConfig) -> tuple[tuple[str, str, float], ...]:
    """(loss part, the setting that weights it, its weight) of each weighted term a stage trains with."""
    terms = (("common", "loss.alpha", loss_cfg.alpha), ("dependence", "loss.beta", loss_cfg.beta))
    if loss_cfg.distill_of(stage) == "feature":
        terms += (("app", "loss.kappa_app", loss_cfg.kappa_app), ("mo", "loss.kappa_mo", loss_cfg.kappa_mo))
    return terms


# A weighted term this many times the cross-entropy drowns the answer's training signal.
LOSS_SCALE_WARNING = 10.0


def loss_scale_warnings(train: Mapping[str, float], stage: str, loss_cfg: LossConfig) -> list[str]:
    """One line per weighted term over LOSS_SCALE_WARNING x the cross-entropy (`train`: an epoch's
    averaged loss parts), naming the setting that scales it."""
    ce = train.get("ce")
    if not ce or ce <= 0:
        return []
    found = []
    for name, setting, weight in weighted_terms(stage, loss_cfg):
        value = weight * train.get(name, 0.0)
        if value > LOSS_SCALE_WARNING * ce:
            found.append(f"warning: {setting} x {name} = {value:.4g} is {value / ce:.0f}x the cross-entropy "
                         f"({ce:.4g}) in the first epoch: the {name} term, not the answer, drives training; a "
                         f"smaller {setting} balances them (features of random-weight networks, whose values are "
                         "large, make this likely)")
    return found


def loss_names(stage: str, loss_cfg: LossConfig) -> tuple[str, ...]:
    """The loss parts a stage logs, in LOSS_PARTS order."""
    distill = loss_cfg.distill_of(stage)
    return ("loss", "hard", "ce", "common", "dependence") + {"feature": ("app", "mo"), "logit": ("kd",)}.get(
        distill, ())


class _ValidationLosses:
    """Every training loss part on evaluation batches, summed per question on the device.

    The HSIC dependence term is a sum over a batch, so its value depends on the batch size: each
    batch's is rescaled to `reference_batch` questions (the global training batch), which makes
    val_dependence, val_hard and val_loss the quantities the training logs, on other questions.
    """

    def __init__(self, device: torch.device, loss_cfg: LossConfig, stage: str, teacher, reference_batch: int,
                 amp: str):
        self.loss_cfg, self.stage, self.teacher, self.amp = loss_cfg, stage, teacher, amp
        self.reference_batch = reference_batch
        self.names = loss_names(stage, loss_cfg)
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self.questions = torch.zeros((), dtype=torch.long, device=device)
        self.distill = loss_cfg.distill_of(stage)
        if self.distill != "none" and teacher is None:
            raise ValueError(f"validation losses of a student with distill={self.distill!r} need the teacher")
        if teacher is not None:
            teacher.eval()

    def update(self, output: DualVGROutput, batch: Mapping[str, torch.Tensor], device: torch.device) -> None:
        labels = batch["answer"]
        size = labels.shape[0]
        teacher_output = None
        if self.distill != "none":
            with _autocast(device, self.amp):
                teacher_output = forward_batch(self.teacher, batch)
        values = compute_loss(output, labels, self.loss_cfg, self.stage, teacher_output,
                              batch_shards=self.reference_batch / size)
        self.sums += torch.stack([values[name].detach().double() for name in self.names]) * size
        self.questions += size

    def result(self) -> dict[str, float]:
        """{part: mean per question over every process's questions}."""
        dist.all_reduce_sum(self.sums)
        dist.all_reduce_sum(self.questions)
        count = max(int(self.questions), 1)
        return {name: float(value) / count for name, value in zip(self.names, self.sums.cpu().tolist())}


def _spread_result(meter: NodeSpreadMeter, layers: int, graph_layers: int, device: torch.device) -> dict:
    """The node-spread columns of the whole split (sums over every process first); {} when no
    process saw a batch."""
    total = meter.total if meter.total is not None else torch.zeros(layers, len(STREAMS), device=device)
    collapsed = meter.collapsed if meter.collapsed is not None else torch.zeros(layers, dtype=torch.long,
                                                                                  device=device)
    samples = torch.tensor(meter.samples, dtype=torch.long, device=device)
    total, collapsed = total.double(), collapsed.long()
    dist.all_reduce_sum(total)
    dist.all_reduce_sum(collapsed)
    dist.all_reduce_sum(samples)
    if int(samples) == 0:
        return {}
    meter.total, meter.collapsed, meter.samples = total.float(), collapsed, int(samples)
    return {"columns": meter.columns(graph_layers), "collapsed": meter.collapsed_names(graph_layers)}


@torch.no_grad()
def evaluate(model, loader, device: torch.device, *, amp: str = "none", return_predictions: bool = False,
             progress: bool = False, desc: str = "eval", loss_cfg: Optional[LossConfig] = None,
             stage: str = "teacher", teacher=None, reference_batch: Optional[int] = None,
             node_spread: bool = False, top_k: int = 5) -> tuple[dict, Optional[dict[str, np.ndarray]]]:
    """Accuracy overall and per question type (summed over all processes); optionally the
    arg-max prediction of every question and its `top_k` answers by softmax probability
    ({"index", "prediction", "top_answers" (Q, k), "top_probs" (Q, k)}, this process's share;
    column 0 is the arg-max itself, whatever order topk gives ties).
    Runs the plain module even when given a DDP wrapper: ranks may hold different numbers of
    batches, and DDP's forward must not be called a different number of times per rank.

    From the same forward passes, on request (both summed over every process):
    - `loss_cfg`: summary["losses"], every loss part the training of `stage` logs, per question
      (a distilling student needs the frozen `teacher`, run on each batch; `reference_batch`:
      see `_ValidationLosses`, default the evaluation batch);
    - `node_spread`: summary["node_spread"] = {"columns": node_spread_* and node_collapsed_*
      columns, "collapsed": names of the graph layers whose clips are identical}; see
      model/diagnostics.py."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    model.eval()
    counter = AccuracyCounter(device)
    indices, top_answers, top_probs = [], [], []
    losses = None
    if loss_cfg is not None:
        losses = _ValidationLosses(device, loss_cfg, stage, teacher,
                                   reference_batch or getattr(loader, "batch_size", None) or 1, amp)
    meter = NodeSpreadMeter() if node_spread else None
    for batch in progress_bar(loader, total=len(loader), desc=desc, unit="batch", enabled=progress,
                              dynamic_ncols=True, leave=False):
        batch = _to_device(batch, device)
        with _autocast(device, amp):
            output = forward_batch(model, batch)
        logits = output.logits
        predicted = logits.argmax(dim=1)
        counter.update(predicted, batch["answer"], batch["qtype"])
        if losses is not None:
            losses.update(output, batch, device)
        if meter is not None:
            meter.update(output)
        if return_predictions:
            probs = torch.softmax(logits.float(), dim=1)
            values, answers = probs.topk(min(top_k, probs.shape[1]), dim=1)
            answers[:, 0] = predicted
            values[:, 0] = probs.gather(1, predicted.unsqueeze(1)).squeeze(1)
            indices.append(batch["index"])
            top_answers.append(answers)
            top_probs.append(values)
    summary = counter.all_reduce().summary()
    if losses is not None:
        summary["losses"] = losses.result()
    if meter is not None:
        config = model.config
        summary["node_spread"] = _spread_result(meter, config.graph_layers * config.unit_layers,
                                                config.graph_layers, device)
    if not return_predictions:
        return summary, None
    if not indices:
        return summary, {"index": np.zeros(0, dtype=np.int64), "prediction": np.zeros(0, dtype=np.int64),
                         "top_answers": np.zeros((0, top_k), dtype=np.int64),
                         "top_probs": np.zeros((0, top_k), dtype=np.float32)}
    answers = torch.cat(top_answers).cpu().numpy()
    return summary, {"index": torch.cat(indices).cpu().numpy(), "prediction": answers[:, 0].copy(),
                     "top_answers": answers, "top_probs": torch.cat(top_probs).cpu().numpy()}
