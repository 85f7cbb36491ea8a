"""Losses of the method (docs/method.md): common, HSIC dependence, hard, feature distillation (APP / MO)
and the optional logit distillation. All run in at least float32 with autocast off: the HSIC terms
reach 1e5–1e7 per sample and the KL terms are sums of many small differences."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.dualvgr import DualVGROutput, autocast_off


def _at_least_float32(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


COMMON_LOSS_MODES = ("original", "safe")
# "safe" common loss: a node's centred feature is rounding noise when its norm is at most this many
# eps (of the features' dtype) times the sample's largest node norm (8 eps ~ 1e-6 in float32, the
# collapse threshold of model/diagnostics.py).
SAFE_COMMON_EPS_FACTOR = 8.0
# ... or at most this long (F.normalize's eps). Without this floor a sample of all-tiny features
# (~1e-23) has a relative threshold that underflows to 0, and 1/‖x̃‖² of a denormal node overflows
# to inf: NaN gradients.
SAFE_COMMON_ABS_FLOOR = 1e-12


def common_loss(x: Tensor, y: Tensor, mode: str = "original", rel_tol: float | None = None) -> Tensor:
    """mean((n(x̃) n(x̃)ᵀ − n(ỹ) n(ỹ)ᵀ)²) over B·N·N; x, y (B, N, d), x̃ centred over the N nodes,
    n() L2-normalising each node. mode="safe" drops the node pairs where either centred node is
    rounding noise (see SAFE_COMMON_*; `rel_tol` overrides the relative one), still dividing by B·N·N.
    """
    if mode not in COMMON_LOSS_MODES:
        raise ValueError(f"common loss mode must be one of {', '.join(COMMON_LOSS_MODES)}, got {mode!r}")
    with autocast_off(x):
        if mode == "original":
            x, y = (F.normalize(_centred(nodes), p=2, dim=2) for nodes in (x, y))
            return ((_gram(x) - _gram(y)) ** 2).mean()
        (unit_x, real_x), (unit_y, real_y) = (_centred_directions(nodes, rel_tol) for nodes in (x, y))
        real = (real_x & real_y).to(unit_x.dtype)                                   # (B, N)
        keep = real.unsqueeze(2) * real.unsqueeze(1)                                # (B, N, N)
        return (((_gram(unit_x) - _gram(unit_y)) ** 2) * keep).mean()


def _centred(x: Tensor) -> Tensor:
    """x (B, N, d) in at least float32, minus its mean over the N nodes."""
    x = _at_least_float32(x)
    return x - x.mean(dim=1, keepdim=True)


def _gram(x: Tensor) -> Tensor:
    """(B, N, d) -> (B, N, N) inner products of the nodes."""
    return torch.bmm(x, x.transpose(1, 2))


def _centred_directions(x: Tensor, rel_tol: float | None) -> tuple[Tensor, Tensor]:
    """x (B, N, d) -> (unit centred node vectors with noise nodes zeroed, (B, N) bool: node is real)."""
    tol = SAFE_COMMON_EPS_FACTOR * torch.finfo(x.dtype).eps if rel_tol is None else rel_tol
    centred = _centred(x)
    squared = (centred * centred).sum(dim=2)                                        # (B, N)
    values = _at_least_float32(x.detach())
    scale = (values * values).sum(dim=2).amax(dim=1, keepdim=True)                  # (B, 1) max ‖x_i‖²
    real = (squared > (tol * tol) * scale) & (squared > SAFE_COMMON_ABS_FLOOR ** 2)
    # sqrt and division only see real nodes' norms, so no inf/NaN reaches the masked gradient.
    norm = torch.sqrt(torch.where(real, squared, torch.ones_like(squared)))
    return centred / norm.unsqueeze(-1) * real.unsqueeze(-1).to(centred.dtype), real


def hsic_loss(x: Tensor, y: Tensor) -> Tensor:
    """Σ_b trace(R x xᵀ R y yᵀ) with R = I_N − 1/N, on the raw features; x, y (B, N, d); summed over
    the batch, as in the original (R x xᵀ R is the Gram matrix of the centred x)."""
    with autocast_off(x):
        return (_gram(_centred(x)) * _gram(_at_least_float32(y))).sum()


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    with autocast_off(logits):
        return F.cross_entropy(_at_least_float32(logits), labels.to(logits.device).long())


def hard_loss(output: DualVGROutput, labels: Tensor, alpha: float = 100.0, beta: float = 1e-6,
              dependence_scale: float = 1, common_mode: str = "original") -> tuple[Tensor, dict[str, Tensor]]:
    """CE + α · mean_ℓ C_ℓ + β · mean_ℓ (H^a_ℓ + H^m_ℓ) over the U·G graph layers, and its unweighted
    parts {"ce", "common", "dependence"}. `dependence_scale` multiplies the dependence term (a sum over
    the batch): a batch split over K processes with averaged gradients passes K."""
    layers = output.layers
    if not layers:
        raise ValueError("hard_loss needs the per-layer outputs of a DualVGR forward pass")
    ce = _cross_entropy(output.logits, labels)
    common = torch.stack([common_loss(layer.common_appearance, layer.common_motion, common_mode)
                          for layer in layers]).mean()
    dependence = torch.stack([hsic_loss(layer.specific_appearance, layer.common_appearance)
                              + hsic_loss(layer.specific_motion, layer.common_motion)
                              for layer in layers]).mean() * dependence_scale
    return with_regularisers(ce, common, dependence, alpha, beta), {"ce": ce, "common": common,
                                                                    "dependence": dependence}


def with_regularisers(fit: Tensor, common: Tensor, dependence: Tensor, alpha: float, beta: float) -> Tensor:
    """fit + α · common + β · dependence, in this order (`fit`: cross-entropy or logit distillation)."""
    return fit + alpha * common + beta * dependence


def kd_feature_loss(student_feat: Tensor, teacher_feat: Tensor, tau: float = 1.0) -> Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ)) over the last dimension, summed over the other positions and
    divided by the batch size (`reduction="batchmean"`); no τ². The teacher side is detached."""
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"student features {tuple(student_feat.shape)} and teacher features "
                         f"{tuple(teacher_feat.shape)} differ in shape")
    with autocast_off(student_feat):
        log_student = F.log_softmax(_at_least_float32(student_feat) / tau, dim=-1)
        teacher = F.softmax(_at_least_float32(teacher_feat.detach()) / tau, dim=-1)
        return F.kl_div(log_student, teacher, reduction="batchmean")


def feature_distill_loss(student: DualVGROutput, teacher: DualVGROutput, tau_app: float = 1.0,
                         tau_mo: float = 1.0) -> tuple[Tensor, Tensor]:
    """(APP, MO): the teacher's MFB features against the student's appearance / motion before its MFB."""
    return (kd_feature_loss(student.appearance, teacher.visual, tau_app),
            kd_feature_loss(student.motion, teacher.visual, tau_mo))


def logit_distill_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, tau: float = 4.0,
                       mix: float = 0.5) -> Tensor:
    """Hinton distillation: mix · τ² · KL(softmax(t/τ) ‖ softmax(s/τ)) + (1 − mix) · CE(s, y)."""
    kl = kd_feature_loss(student_logits, teacher_logits, tau)
    return mix * tau * tau * kl + (1.0 - mix) * _cross_entropy(student_logits, labels)
