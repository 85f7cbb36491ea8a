"""Training and evaluation steps: the loss of a batch (`compute_loss`), one epoch
(`train_one_epoch`) and one pass over a split (`evaluate`); the losses of each stage are in
docs/method.md. Loss values and accuracies stay on the device during an epoch: the host reads
them only every `train.log_every` steps (every step on the CPU), which is also when a non-finite
loss is reported. Under torchrun each process trains on its share of the global batch and
evaluation sums correct/total counts over the processes (vqakd/training/run.py has the recipe).
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional

import numpy as np
import torch

from model import DualVGROutput
from model.diagnostics import NodeSpreadMeter
from model.losses import feature_distill_loss, hard_loss, logit_distill_loss, with_regularisers
from vqakd.core import distributed as dist
from vqakd.core.config import LossConfig
from vqakd.core.errors import UserError
from vqakd.training.metrics import AccuracyCounter
from vqakd.core.progress import progress_bar


def compute_loss(output, labels: torch.Tensor, loss_cfg: LossConfig, stage: str,
                 teacher_output=None, batch_shards: int = 1) -> dict[str, torch.Tensor]:
    """All loss parts of one batch; "loss" is the one to minimise.

    Every part is a per-question mean except the HSIC dependence term, a sum over the batch: it
    is multiplied by `batch_shards` (the processes sharing the global batch), so the averaged
    gradient equals the one-process one (`evaluate` passes reference batch / batch size)."""
    hard, parts = hard_loss(output, labels, alpha=loss_cfg.alpha, beta=loss_cfg.beta, dependence_scale=batch_shards,
                            common_mode=loss_cfg.common)
    values = {"hard": hard, **parts}
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


def configure_backends(device: torch.device, tf32: bool = True) -> None:
    """TF32 matmuls and convolutions on CUDA: about the same accuracy here, several times faster."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def forward_batch(model, batch: Mapping[str, torch.Tensor]) -> DualVGROutput:
    return model(batch["appearance"], batch["motion"], batch["question"], batch["question_len"])


def _teacher_output(teacher, batch: Mapping[str, torch.Tensor], distill: str, device: torch.device,
                    amp: str) -> Optional[DualVGROutput]:
    """The frozen teacher's output on `batch` (no gradients); None when the stage does not distil."""
    if distill == "none":
        return None
    with torch.no_grad(), _autocast(device, amp):
        return forward_batch(teacher, batch)


class _NonFiniteWatch:
    """The first step whose loss parts or weighted terms (α·common, ...) were not all finite, kept
    on the device (no host sync per step): a finite part times a huge weight is named as such."""

    def __init__(self, names: tuple[str, ...], weighted: tuple[tuple[str, str, float], ...], device: torch.device):
        self.names = names
        self.weighted = weighted                 # (part, weight name, weight)
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.values = torch.zeros(len(names) + len(weighted), device=device)

    def update(self, step: int, values: torch.Tensor) -> None:
        values = torch.cat([values] + [values[self.names.index(part)].reshape(1) * weight
                                       for part, _name, weight in self.weighted])
        newly = (~torch.isfinite(values)).any() & (self.step < 0)
        self.step = torch.where(newly, step, self.step)
        self.values = torch.where(newly, values, self.values)

    def check(self, epoch: int, steps: int) -> None:
        """Raise if a step so far was not finite; every rank raises the earliest bad step of any rank."""
        found = (int(self.step), self.values.cpu().tolist()) if int(self.step) >= 0 else None
        found = min(filter(None, dist.all_gather_objects(found)), default=None, key=lambda f: f[0])
        if found is None:
            return
        step, values = found
        parts = dict(zip(self.names, values))
        # Name the parts themselves, else the weighted terms, and the totals only when nothing else is.
        raw = [f"{name} = {value}" for name, value in parts.items()
               if name not in ("loss", "hard") and not math.isfinite(value)]
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
    """One pass over the training loader: averaged loss parts, train accuracy and time over every
    process. `model` may be wrapped in DistributedDataParallel (`batch_shards`: the world size);
    `teacher` is frozen and in eval mode (run.start_stage).
    `check_every`: steps between non-finite checks (default: every step on the CPU, else log_every)."""
    model.train()
    distill = loss_cfg.distill_of(stage)
    names, weighted = loss_terms(stage, loss_cfg)
    losses = _LossSums(names, device)
    counter = AccuracyCounter(device)
    watch = _NonFiniteWatch(names, weighted, device)
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
        teacher_output = _teacher_output(teacher, batch, distill, device, amp)
        with _autocast(device, amp):
            output = forward_batch(model, batch)
        values = compute_loss(output, labels, loss_cfg, stage, teacher_output, batch_shards)
        optimizer.zero_grad(set_to_none=True)
        values["loss"].backward()
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        optimizer.step()
        if step == 1:
            first_step_done = time.perf_counter()     # steps/s leaves out the first (warm-up) step

        detached = losses.add(values, labels.shape[0])
        watch.update(step, detached)
        counter.update(output.logits.detach().argmax(dim=1), labels, batch["qtype"])
        if step % check_every == 0 or step == steps:
            watch.check(epoch, steps)
        if progress and (step % log_every == 0 or step == steps):
            bar.set_postfix({name: f"{value:.4g}" for name, value in zip(names, detached.cpu().tolist())},
                            refresh=False)
        # Held over, this step's outputs would sit beside the next step's peak (and split the heap).
        del output, values, teacher_output
    bar.close()
    result = losses.means()
    counter.all_reduce()
    elapsed = time.perf_counter() - started
    after_first = time.perf_counter() - first_step_done if steps > 1 else elapsed
    questions = int(losses.questions)
    result.update(accuracy=counter.summary(), time_s=elapsed, questions=questions,
                  questions_per_s=questions / elapsed if elapsed > 0 else 0.0,
                  steps_per_s=max(steps - 1, 1) / after_first if after_first > 0 else 0.0)
    return result


class _LossSums:
    """The loss parts of every question seen, summed on the device (no host sync per batch)."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names = names
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        self.questions = torch.zeros((), dtype=torch.long, device=device)

    def add(self, values: Mapping[str, torch.Tensor], size: int) -> torch.Tensor:
        """Add a batch of `size` questions whose per-question means are `values`; returns them stacked."""
        detached = torch.stack([values[name].detach().float() for name in self.names])
        self.sums += detached.double() * size
        self.questions += size
        return detached

    def means(self) -> dict[str, float]:
        """{part: sum / questions}, both summed over every process first."""
        dist.all_reduce_sum(self.sums)
        dist.all_reduce_sum(self.questions)
        count = max(int(self.questions), 1)
        return {name: float(value) / count for name, value in zip(self.names, self.sums.cpu().tolist())}


def loss_terms(stage: str, loss_cfg: LossConfig) -> tuple[tuple[str, ...], tuple[tuple[str, str, float], ...]]:
    """The loss parts a stage logs (in LOSS_PARTS order), and its weighted terms: (loss part, the
    setting that weights it, its weight)."""
    distill = loss_cfg.distill_of(stage)
    weighted = (("common", "loss.alpha", loss_cfg.alpha), ("dependence", "loss.beta", loss_cfg.beta))
    if distill == "feature":
        weighted += (("app", "loss.kappa_app", loss_cfg.kappa_app), ("mo", "loss.kappa_mo", loss_cfg.kappa_mo))
    extra = {"feature": ("app", "mo"), "logit": ("kd",)}.get(distill, ())
    return ("loss", "hard", "ce", "common", "dependence") + extra, weighted


# A weighted term this many times the cross-entropy drowns the answer's training signal.
LOSS_SCALE_WARNING = 10.0


def loss_scale_warnings(train: Mapping[str, float], stage: str, loss_cfg: LossConfig) -> list[str]:
    """One line per weighted term over LOSS_SCALE_WARNING x the cross-entropy of an epoch."""
    ce = train.get("ce")
    if not ce or ce <= 0:
        return []
    found = []
    for name, setting, weight in loss_terms(stage, loss_cfg)[1]:
        value = weight * train.get(name, 0.0)
        if value > LOSS_SCALE_WARNING * ce:
            found.append(f"warning: {setting} x {name} = {value:.4g} is {value / ce:.0f}x the cross-entropy "
                         f"({ce:.4g}) in the first epoch: the {name} term, not the answer, drives training; a "
                         f"smaller {setting} balances them (features of random-weight networks, whose values are "
                         "large, make this likely)")
    return found


@torch.no_grad()
def evaluate(model, loader, device: torch.device, *, amp: str = "none", return_predictions: bool = False,
             progress: bool = False, desc: str = "eval", loss_cfg: Optional[LossConfig] = None,
             stage: str = "teacher", teacher=None, reference_batch: Optional[int] = None,
             node_spread: bool = False, top_k: int = 5) -> tuple[dict, Optional[dict[str, np.ndarray]]]:
    """Accuracy overall and per question type (summed over all processes); optionally this
    process's predictions: {"index", "prediction", "top_answers" (Q, k), "top_probs" (Q, k)},
    column 0 the arg-max itself. Give the plain module, not a DistributedDataParallel wrapper:
    ranks may hold different numbers of batches.

    From the same forward passes, on request (summed over every process):
    - `loss_cfg`: summary["losses"], every loss part the training of `stage` logs, per question
      (a distilling student needs its frozen `teacher`, in eval mode); the HSIC term of each batch
      is rescaled to `reference_batch` questions (default the evaluation batch), as the training logs it;
    - `node_spread`: summary["node_spread"] = {"columns", "collapsed"} (model/diagnostics.py)."""
    model.eval()
    counter = AccuracyCounter(device)
    indices, top_answers, top_probs = [], [], []
    if loss_cfg is not None:
        losses = _LossSums(loss_terms(stage, loss_cfg)[0], device)
        reference_batch = reference_batch or getattr(loader, "batch_size", None) or 1
    meter = NodeSpreadMeter() if node_spread else None
    started = time.perf_counter()
    for batch in progress_bar(loader, total=len(loader), desc=desc, unit="batch", enabled=progress,
                              dynamic_ncols=True, leave=False):
        batch = _to_device(batch, device)
        with _autocast(device, amp):
            output = forward_batch(model, batch)
        logits = output.logits
        predicted = logits.argmax(dim=1)
        counter.update(predicted, batch["answer"], batch["qtype"])
        if loss_cfg is not None:
            size = batch["answer"].shape[0]
            teacher_output = _teacher_output(teacher, batch, loss_cfg.distill_of(stage), device, amp)
            parts = compute_loss(output, batch["answer"], loss_cfg, stage, teacher_output,
                                 batch_shards=reference_batch / size)
            losses.add(parts, size)
            del teacher_output, parts
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
        del output, logits
    summary = counter.all_reduce().summary()
    elapsed = time.perf_counter() - started
    summary["questions_per_s"] = summary["count"] / elapsed if elapsed > 0 else 0.0
    if loss_cfg is not None:
        summary["losses"] = losses.means()
    if meter is not None:
        config = model.config
        meter.all_reduce(dist.all_reduce_sum, config.graph_layers * config.unit_layers, device)
        summary["node_spread"] = ({"columns": meter.columns(config.graph_layers),
                                   "collapsed": meter.collapsed_names(config.graph_layers)} if meter.samples else {})
    if not return_predictions:
        return summary, None
    if not indices:             # this process saw no batch
        indices, top_answers = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, top_k, dtype=torch.long)]
        top_probs = [torch.zeros(0, top_k)]
    answers = torch.cat(top_answers).cpu().numpy()
    return summary, {"index": torch.cat(indices).cpu().numpy(), "prediction": answers[:, 0].copy(),
                     "top_answers": answers, "top_probs": torch.cat(top_probs).cpu().numpy()}
