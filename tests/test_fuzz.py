"""Property-based fuzzing of the network over batch shapes (issue 7).

Every combination hypothesis draws of batch size B, clips N, frames per clip F, padded
question length L (with the true lengths mixed, all 1, or all L), teacher (G=2) or student
(G=1) graph depth, one or two reasoning units, train or eval mode and feature scale goes
through the forward pass and every loss; the logits, the features handed to the student, each
loss part and (in train mode) every gradient must be finite, with the documented shapes.

Training batches of one question are the one shape the network refuses (BatchNorm cannot
normalise over one sample); the training loader never builds them (tests/test_data.py,
test_epoch_batch_sampler_edge_cases), so train mode is drawn with B >= 2 and B = 1 is run in
eval mode, the way validation and inference see it.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from model import DualVGR, ModelConfig
from model.losses import feature_distill_loss, hard_loss, logit_distill_loss

QUESTION_VOCAB = 9
ANSWER_VOCAB = 5
VISION_DIM = 8
# Small sizes keep one example at a few milliseconds; num_heads must divide module_dim.
SMALL_MODEL = dict(question_vocab_size=QUESTION_VOCAB, answer_vocab_size=ANSWER_VOCAB, vision_dim=VISION_DIM,
                   module_dim=16, word_dim=6, num_heads=4, fusion_dim=4)
GRAPH_LAYERS = {"teacher": 2, "student": 1}
# VQAKD_FUZZ_EXAMPLES=1000 for a longer hunt; 60 keeps the default run at a few seconds.
FUZZ_EXAMPLES = int(os.environ.get("VQAKD_FUZZ_EXAMPLES", "60"))


_models: dict[tuple, DualVGR] = {}


def model_for(role: str, nodes: int, units: int) -> DualVGR:
    """One network per shape, built once (construction dominates a tiny forward)."""
    key = (role, nodes, units)
    if key not in _models:
        torch.manual_seed(len(_models))
        _models[key] = DualVGR(ModelConfig(**SMALL_MODEL, num_nodes=nodes, graph_layers=GRAPH_LAYERS[role],
                                           unit_layers=units))
    return _models[key]


@st.composite
def batches(draw):
    train = draw(st.booleans())
    batch = draw(st.integers(min_value=2 if train else 1, max_value=5))
    max_len = draw(st.integers(min_value=1, max_value=6))
    pattern = draw(st.sampled_from(["mixed", "all_one", "all_full"]))
    if pattern == "mixed":
        lengths = draw(st.lists(st.integers(1, max_len), min_size=batch, max_size=batch))
    else:
        lengths = [1 if pattern == "all_one" else max_len] * batch
    return {
        "train": train,
        "batch": batch,
        "nodes": draw(st.integers(min_value=1, max_value=4)),
        "frames": draw(st.integers(min_value=1, max_value=3)),
        "max_len": max_len,
        "lengths": lengths,
        "role": draw(st.sampled_from(sorted(GRAPH_LAYERS))),
        "units": draw(st.integers(min_value=1, max_value=2)),
        # constant features make every centred node vector zero (normalising 0 must not give NaN)
        "features": draw(st.sampled_from(["normal", "tiny", "large", "constant"])),
        "lengths_dtype": draw(st.sampled_from([torch.long, torch.int32])),
        "seed": draw(st.integers(min_value=0, max_value=2 ** 16)),
    }


def make_batch(case):
    generator = torch.Generator().manual_seed(case["seed"])
    shape_app = (case["batch"], case["nodes"], case["frames"], VISION_DIM)
    shape_mot = (case["batch"], case["nodes"], VISION_DIM)
    scale = {"normal": 1.0, "tiny": 1e-6, "large": 1e3, "constant": 0.0}[case["features"]]
    appearance = torch.randn(shape_app, generator=generator) * scale
    motion = torch.randn(shape_mot, generator=generator) * scale
    if case["features"] == "constant":
        appearance += 0.5
        motion += 0.5
    lengths = torch.tensor(case["lengths"], dtype=case["lengths_dtype"])
    # Tokens anywhere in the vocabulary, <NULL> and <UNK> included; padding is 0.
    question = torch.randint(0, QUESTION_VOCAB, (case["batch"], case["max_len"]), generator=generator)
    question[torch.arange(case["max_len"])[None, :] >= lengths[:, None].long()] = 0
    labels = torch.randint(0, ANSWER_VOCAB, (case["batch"],), generator=generator)
    return (appearance, motion, question, lengths), labels


def assert_finite(name, tensor):
    assert torch.isfinite(tensor).all(), f"{name} is not finite: {tensor}"


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=batches())
@example(case=dict(train=False, batch=1, nodes=1, frames=1, max_len=1, lengths=[1], role="student", units=1,
                   features="normal", lengths_dtype=torch.long, seed=0))
@example(case=dict(train=True, batch=2, nodes=1, frames=1, max_len=1, lengths=[1, 1], role="teacher", units=2,
                   features="constant", lengths_dtype=torch.long, seed=1))
@example(case=dict(train=True, batch=5, nodes=4, frames=3, max_len=6, lengths=[6, 1, 3, 6, 2], role="teacher",
                   units=1, features="large", lengths_dtype=torch.int32, seed=2))
def test_any_batch_shape_gives_finite_outputs_losses_and_gradients(case):
    model = model_for(case["role"], case["nodes"], case["units"])
    model.train(case["train"])
    model.zero_grad(set_to_none=True)
    inputs, labels = make_batch(case)
    torch.manual_seed(case["seed"])                 # dropout masks
    batch, nodes, d = case["batch"], case["nodes"], SMALL_MODEL["module_dim"]
    with torch.set_grad_enabled(case["train"]):
        output = model(*inputs)
        assert output.logits.shape == (batch, ANSWER_VOCAB)
        for name in ("visual", "appearance", "motion"):
            assert getattr(output, name).shape == (batch, nodes, d), name
            assert_finite(name, getattr(output, name))
        assert len(output.layers) == case["units"] * GRAPH_LAYERS[case["role"]]
        assert_finite("logits", output.logits)

        total, parts = hard_loss(output, labels)
        for name, value in parts.items():
            assert_finite(name, value)
        # distillation from a frozen teacher (G=2, eval mode, no grad), as the student stage runs it
        teacher = model_for("teacher", nodes, case["units"]).eval()
        with torch.no_grad():
            teacher_output = teacher(*inputs)
        model.train(case["train"])        # the same network when this case is the teacher
        assert_finite("teacher visual", teacher_output.visual)
        app, mo = feature_distill_loss(output, teacher_output)
        logit = logit_distill_loss(output.logits, teacher_output.logits, labels)
        for name, value in (("hard", total), ("app", app), ("mo", mo), ("logit", logit)):
            assert value.dim() == 0
            assert_finite(name, value)
            # KL terms are >= 0 up to rounding (-4e-8 seen when the two distributions coincide)
            assert value >= -1e-5 or name == "hard", (name, value)
    if case["train"]:
        (total + app + mo + logit).backward()
        for name, parameter in model.named_parameters():
            # every parameter stays connected to the loss, whatever the shape
            assert parameter.grad is not None, f"no gradient reaches {name}"
            assert_finite(f"gradient of {name}", parameter.grad)


def test_a_training_batch_of_one_is_refused_clearly():
    """The one shape the network cannot train on: a clear ValueError, never NaN or silence."""
    model = model_for("student", 2, 1).train()
    case = dict(batch=1, nodes=2, frames=2, max_len=3, lengths=[2], features="normal", lengths_dtype=torch.long,
                seed=0)
    inputs, _ = make_batch(case)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(*inputs)
