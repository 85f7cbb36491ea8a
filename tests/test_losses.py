"""The losses of docs/method.md#losses, against straightforward per-sample reference implementations."""

import pytest
import torch
import torch.nn.functional as F

from model import DualVGROutput, LayerOutput
from model.losses import (common_loss, feature_distill_loss, hard_loss, hsic_loss, kd_feature_loss,
                          logit_distill_loss)


def reference_hsic(x, y):
    """The original DualVGR loss_dependence: an explicit R = I - 1/N and a loop over the batch."""
    nodes = x.size(1)
    centring = torch.eye(nodes, dtype=x.dtype) - torch.ones(nodes, nodes, dtype=x.dtype) / nodes
    total = torch.zeros((), dtype=x.dtype)
    for b in range(x.size(0)):
        kx = x[b] @ x[b].T
        ky = y[b] @ y[b].T
        total = total + torch.trace(centring @ kx @ centring @ ky)
    return total


def reference_common(x, y):
    values = []
    for b in range(x.size(0)):
        xb = F.normalize(x[b] - x[b].mean(0), dim=1)
        yb = F.normalize(y[b] - y[b].mean(0), dim=1)
        values.append(((xb @ xb.T - yb @ yb.T) ** 2).flatten())
    return torch.cat(values).mean()


def test_batched_hsic_equals_per_sample_loop():
    torch.manual_seed(0)
    x = torch.randn(5, 8, 48, dtype=torch.float64) * 3 + 1
    y = torch.randn(5, 8, 48, dtype=torch.float64) + x * 0.5
    torch.testing.assert_close(hsic_loss(x, y), reference_hsic(x, y), rtol=1e-10, atol=0)
    # summed over the batch, not averaged
    torch.testing.assert_close(hsic_loss(x[:2], y[:2]) + hsic_loss(x[2:], y[2:]), hsic_loss(x, y))
    # float32 path agrees too
    torch.testing.assert_close(hsic_loss(x.float(), y.float()), reference_hsic(x, y).float(), rtol=1e-5, atol=0)
    # independent of a constant shift of the nodes (R centres), but not of the features themselves
    torch.testing.assert_close(hsic_loss(x + 4.0, y), hsic_loss(x, y))
    assert not torch.isclose(hsic_loss(x, y), hsic_loss(x, torch.randn_like(y)))


def test_common_loss_zero_for_identical_inputs_and_scale_invariant():
    torch.manual_seed(1)
    x = torch.randn(4, 6, 32)
    y = torch.randn(4, 6, 32)
    assert common_loss(x, x).item() == pytest.approx(0.0, abs=1e-12)
    value = common_loss(x, y)
    assert value > 0.01
    torch.testing.assert_close(value, reference_common(x, y))
    # positive rescaling of a sample (all its nodes) or of a whole input does not matter
    per_sample = torch.rand(4, 1, 1) * 10 + 0.1
    torch.testing.assert_close(common_loss(x * per_sample, y), value)
    torch.testing.assert_close(common_loss(x, y * 7.5), value)
    torch.testing.assert_close(common_loss(x * per_sample, x), torch.tensor(0.0), atol=1e-6, rtol=0)
    # nor a feature-wise shift shared by all nodes (centring), while real changes do matter
    torch.testing.assert_close(common_loss(x + torch.randn(4, 1, 32), y), value)
    assert not torch.isclose(common_loss(x, y + torch.randn_like(y)), value)


def fake_output(layers, logits):
    empty = torch.zeros(logits.size(0), 1, 1)
    return DualVGROutput(logits=logits, visual=empty, appearance=empty, motion=empty, layers=tuple(layers))


def test_hard_loss_is_ce_plus_weighted_layer_means():
    torch.manual_seed(2)
    layers = [LayerOutput(*(torch.randn(3, 5, 16) for _ in range(4))) for _ in range(3)]
    logits = torch.randn(3, 7)
    labels = torch.tensor([0, 6, 2])
    total, parts = hard_loss(fake_output(layers, logits), labels, alpha=2.0, beta=0.01)
    ce = F.cross_entropy(logits, labels)
    common = sum(reference_common(l.common_appearance, l.common_motion) for l in layers) / 3
    dependence = sum(reference_hsic(l.specific_appearance, l.common_appearance)
                     + reference_hsic(l.specific_motion, l.common_motion) for l in layers) / 3
    torch.testing.assert_close(parts["ce"], ce)
    torch.testing.assert_close(parts["common"], common)
    torch.testing.assert_close(parts["dependence"], dependence)
    torch.testing.assert_close(total, ce + 2.0 * common + 0.01 * dependence)
    default_total, _ = hard_loss(fake_output(layers, logits), labels)
    torch.testing.assert_close(default_total, ce + 100.0 * common + 1e-6 * dependence)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_kd_loss_equals_kldivloss_batchmean_and_spares_the_teacher(tau):
    torch.manual_seed(3)
    student = torch.randn(4, 6, 20, requires_grad=True)
    teacher = torch.randn(4, 6, 20, requires_grad=True)
    expected = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student / tau, dim=2),
                                                         F.softmax(teacher / tau, dim=2))
    loss = kd_feature_loss(student, teacher, tau)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    # zero when the distributions agree
    same = torch.randn(2, 3, 5)
    assert kd_feature_loss(same, same, tau).abs() < 1e-6


def test_feature_distill_uses_teacher_visual_against_student_appearance_and_motion():
    torch.manual_seed(4)
    shape = (2, 3, 10)

    def output(**tensors):
        base = {name: torch.randn(shape) for name in ("visual", "appearance", "motion")}
        base.update(tensors)
        return DualVGROutput(logits=torch.randn(2, 4), layers=(), **base)

    teacher, student = output(), output()
    app, mo = feature_distill_loss(student, teacher, tau_app=2.0, tau_mo=0.5)
    torch.testing.assert_close(app, kd_feature_loss(student.appearance, teacher.visual, 2.0))
    torch.testing.assert_close(mo, kd_feature_loss(student.motion, teacher.visual, 0.5))
    aligned, _ = feature_distill_loss(output(appearance=teacher.visual), teacher)
    assert aligned.abs() < 1e-6


def test_logit_distillation_mixes_scaled_kl_and_ce():
    torch.manual_seed(5)
    student, teacher = torch.randn(6, 9), torch.randn(6, 9)
    labels = torch.randint(0, 9, (6,))
    tau, mix = 3.0, 0.3
    kl = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student / tau, 1), F.softmax(teacher / tau, 1))
    expected = mix * tau ** 2 * kl + (1 - mix) * F.cross_entropy(student, labels)
    torch.testing.assert_close(logit_distill_loss(student, teacher, labels, tau=tau, mix=mix), expected)


def test_losses_stay_float32_under_bf16_autocast():
    torch.manual_seed(6)
    x = torch.randn(2, 4, 64) * 10
    y = torch.randn(2, 4, 64) * 10
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = hsic_loss(x.bfloat16(), y)
        kd = kd_feature_loss(x, y)
    assert inside.dtype == torch.float32 and kd.dtype == torch.float32
    torch.testing.assert_close(inside, hsic_loss(x.bfloat16().float(), y))
