"""Losses of SPEC §4: common loss, HSIC dependence loss, the hard loss, feature distillation
(APP / MO) and the optional classic logit distillation.

All of them are computed in at least float32 with autocast switched off: the HSIC terms of raw 768-d
features reach 1e5–1e7 per sample, far outside what bf16 represents faithfully, and the KL
terms are sums of many small differences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.dualvgr import DualVGROutput


def _no_autocast(tensor: Tensor):
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _wide(tensor: Tensor) -> Tensor:
    """Half-precision tensors go to float32; float32/float64 stay as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def common_loss(x: Tensor, y: Tensor) -> Tensor:
    """mean((n(x̃) n(x̃)ᵀ − n(ỹ) n(ỹ)ᵀ)²) over B·N·N; x, y (B, N, d).

    x̃ is x centred over the N nodes, n() L2-normalises each node's feature vector.
    """
    with _no_autocast(x):
        x = _wide(x)
        y = _wide(y)
        x = F.normalize(x - x.mean(dim=1, keepdim=True), p=2, dim=2)
        y = F.normalize(y - y.mean(dim=1, keepdim=True), p=2, dim=2)
        gram_x = torch.bmm(x, x.transpose(1, 2))
        gram_y = torch.bmm(y, y.transpose(1, 2))
        return ((gram_x - gram_y) ** 2).mean()


def hsic_loss(x: Tensor, y: Tensor) -> Tensor:
    """Σ_b trace(R x xᵀ R y yᵀ) with R = I_N − 1/N, on the raw features; x, y (B, N, d).

    R x xᵀ R is the Gram matrix of the node-centred x, and trace(A K) = Σ A ⊙ K for the
    symmetric K = y yᵀ, so the whole batch is two bmm's and one sum (summed, not averaged,
    over the batch, as in the original).
    """
    with _no_autocast(x):
        x = _wide(x)
        y = _wide(y)
        centred = x - x.mean(dim=1, keepdim=True)
        gram_x_centred = torch.bmm(centred, centred.transpose(1, 2))
        gram_y = torch.bmm(y, y.transpose(1, 2))
        return (gram_x_centred * gram_y).sum()


def hard_loss(output: DualVGROutput, labels: Tensor, alpha: float = 100.0, beta: float = 1e-6,
              dependence_scale: float = 1) -> tuple[Tensor, dict[str, Tensor]]:
    """CE + α · mean_ℓ C_ℓ + β · mean_ℓ (H^a_ℓ + H^m_ℓ), ℓ over the U·G graph layers.

    Returns the total and its parts {"ce", "common", "dependence"} (unweighted layer means,
    still attached to the graph so callers can log or reuse them). `dependence_scale`
    multiplies the dependence term, a sum over the batch: a batch split over K processes whose
    gradients are averaged passes K, so the total equals the one-process one.
    """
    layers = output.layers
    if not layers:
        raise ValueError("hard_loss needs the per-layer outputs of a DualVGR forward pass")
    logits = output.logits
    with _no_autocast(logits):
        ce = F.cross_entropy(_wide(logits), labels.to(logits.device).long())
    common = torch.stack([common_loss(layer.common_appearance, layer.common_motion) for layer in layers]).mean()
    dependence = torch.stack([
        hsic_loss(layer.appearance, layer.common_appearance) + hsic_loss(layer.motion, layer.common_motion)
        for layer in layers
    ]).mean()
    if dependence_scale != 1:
        dependence = dependence * dependence_scale
    return with_regularisers(ce, common, dependence, alpha, beta), {"ce": ce, "common": common,
                                                                    "dependence": dependence}


def with_regularisers(fit: Tensor, common: Tensor, dependence: Tensor, alpha: float, beta: float) -> Tensor:
    """fit + α · common + β · dependence, added in this order; `fit` is the cross-entropy of the
    hard loss, or the logit-distillation term that replaces it."""
    return fit + alpha * common + beta * dependence


def kd_feature_loss(student_feat: Tensor, teacher_feat: Tensor, tau: float = 1.0) -> Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ)) over the last (channel) dimension, summed over every
    other position and divided by the batch size (`KLDivLoss(reduction="batchmean")`); no τ².

    The teacher side is detached: no gradient ever reaches the teacher.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"student features {tuple(student_feat.shape)} and teacher features "
                         f"{tuple(teacher_feat.shape)} differ in shape")
    with _no_autocast(student_feat):
        log_student = F.log_softmax(_wide(student_feat) / tau, dim=-1)
        teacher = F.softmax(_wide(teacher_feat.detach()) / tau, dim=-1)
        return F.kl_div(log_student, teacher, reduction="batchmean")


def feature_distill_loss(student: DualVGROutput, teacher: DualVGROutput, tau_app: float = 1.0,
                         tau_mo: float = 1.0) -> tuple[Tensor, Tensor]:
    """(APP, MO): the teacher's fused MFB features against the student's appearance / motion
    features after its last unit (before its own MFB)."""
    app = kd_feature_loss(student.appearance, teacher.visual, tau_app)
    mo = kd_feature_loss(student.motion, teacher.visual, tau_mo)
    return app, mo


def logit_distill_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, tau: float = 4.0,
                       mix: float = 0.5) -> Tensor:
    """Hinton distillation: mix · τ² · KL(softmax(t/τ) ‖ softmax(s/τ)) + (1 − mix) · CE(s, y)."""
    kl = kd_feature_loss(student_logits, teacher_logits, tau)
    with _no_autocast(student_logits):
        ce = F.cross_entropy(_wide(student_logits), labels.to(student_logits.device).long())
    return mix * tau * tau * kl + (1.0 - mix) * ce
