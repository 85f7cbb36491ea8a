"""One training step's losses and gradients, and validate.py's predictions, on the tiny set
(shared by tests/test_numerics_unchanged.py and tests/reference/record_one_step.py).

The step runs in float64: the model is converted with `.double()` and the batch's features with
it, so the losses and gradients are the code's arithmetic with rounding errors near 1e-16 instead
of 1e-7. A float32 step is not reproducible across CPUs: the kernel set (ATEN_CPU_CAPABILITY
default / avx2 / avx512) and the thread count change the order of the reductions, which moved
float32 gradient sums by up to 2.5e-5 relative. In float64 the same reorderings stay far below
the test's tolerance, while a change of the computation itself (another order of a
normalisation and an addition, another epsilon, a missing term) moves the values by orders of
magnitude more.

The students distil from the freshly initialised (seeded) teacher in float64, not from a trained
checkpoint: a float32 training epoch would carry the kernel set's rounding into the teacher's
weights and from there into every student value.

Gradients are summarised per parameter (sum, sum of absolute values, L2 norm and 16 evenly
spaced elements): enough to catch any change of the arithmetic without storing every value. The
sum of absolute values is the scale of the sum's rounding error (its conditioning).

Run as a script (`python tests/one_step_probe.py OUT.json`) it writes the float64 steps only:
tests/test_numerics_unchanged.py runs it so under a second kernel set.
"""

from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
import torch

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from test_train_fixtures import make_dataset, tiny_config_dict, write_config  # noqa: E402

SAMPLES = 16
STEP_RUNS = ("teacher", "student_feature", "student_logit")


def _grad_summary(model: torch.nn.Module) -> dict:
    out = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            out[name] = None
            continue
        flat = param.grad.detach().double().flatten()
        picks = np.linspace(0, flat.numel() - 1, num=min(SAMPLES, flat.numel())).round().astype(int)
        out[name] = {"sum": float(flat.sum()), "abs_sum": float(flat.abs().sum()), "norm": float(flat.norm()),
                     "values": flat[picks].tolist()}
    return out


def _in_double(batch: dict) -> dict:
    return {key: value.double() if torch.is_tensor(value) and value.is_floating_point() else value
            for key, value in batch.items()}


def _fresh_model(config, stage: str, bundle) -> torch.nn.Module:
    from vqakd.training.checkpoint import build_model_for_stage
    from vqakd.training.checkpoint import seed_everything

    # Built with float64 as the default dtype, so that the random initialisation itself is drawn
    # in float64: uniform_ in float32 gives 1-ulp different LSTM weights under the avx2 and the
    # default kernels, which alone moved the float64 step's losses by ~1e-8.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        seed_everything(config.train.seed)
        return build_model_for_stage(config, stage, bundle, torch.device("cpu"), False).double()
    finally:
        torch.set_default_dtype(previous)


def _one_step(config, stage: str, bundle, teacher: torch.nn.Module | None) -> dict:
    """Losses and gradients (float64) of the first training batch of a fresh run of `stage`."""
    from vqakd.data.batches import make_loader
    from vqakd.training.engine import compute_loss, forward_batch

    model = _fresh_model(config, stage, bundle)
    loader = make_loader(bundle.splits["train"], bundle.table, config.train.batch_size, True, config.train.seed, 0,
                         False)
    loader.sampler.epoch = 1
    batch = _in_double(next(iter(loader)))
    model.train()
    teacher_output = None
    if teacher is not None:
        with torch.no_grad():
            teacher_output = forward_batch(teacher, batch)
    output = forward_batch(model, batch)
    values = compute_loss(output, batch["answer"], config.loss, stage, teacher_output)
    values["loss"].backward()
    return {"losses": {name: float(value.detach()) for name, value in values.items()}, "grads": _grad_summary(model)}


def _tiny_config(tmp: str) -> str:
    data = make_dataset(os.path.join(tmp, "data"))
    return write_config(os.path.join(tmp, "tiny.yml"),
                        tiny_config_dict(data["paths"], os.path.join(tmp, "out"), train={"epochs": 1}))


def measure_steps(tmp: str, cfg: str | None = None) -> dict:
    """{run: {"losses", "grads"}} for the float64 one-step runs of STEP_RUNS."""
    from vqakd.core.config import load_config
    from vqakd.data.batches import load_data

    cfg = cfg or _tiny_config(tmp)
    config = load_config(cfg)
    bundle = load_data(config, device=torch.device("cpu"), progress=False)
    result = {"teacher": _one_step(config, "teacher", bundle, None)}
    teacher = _fresh_model(config, "teacher", bundle)
    teacher.eval()
    teacher.requires_grad_(False)
    for distill in ("feature", "logit"):
        student_config = load_config(cfg, [f"loss.distill={distill}"])
        result[f"student_{distill}"] = _one_step(student_config, "student", bundle, teacher)
    return result


def measure(tmp: str) -> dict:
    """measure_steps, plus the test predictions of validate.py after a one-epoch teacher run of
    train.py (float32: an argmax, far from rounding in this set)."""
    import train
    import validate

    cfg = _tiny_config(tmp)
    result = measure_steps(tmp, cfg)
    assert train.main(["--cfg", cfg, "--stage", "teacher"]) == 0
    teacher_ckpt = os.path.join(tmp, "out", "teacher", "best.pt")
    preds = os.path.join(tmp, "preds.csv")
    assert validate.main(["--cfg", cfg, "--checkpoint", teacher_ckpt, "--split", "test", "--write-preds",
                          "--out", os.path.join(tmp, "eval.json"), "--preds-out", preds]) == 0
    with open(preds, newline="") as handle:
        rows = list(csv.DictReader(handle))
    result["validate"] = {"question_id": [row["question_id"] for row in rows],
                          "predicted_answer": [row["predicted_answer"] for row in rows]}
    return result


if __name__ == "__main__":
    import tempfile

    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/one_step_probe.py OUT.json")
    with tempfile.TemporaryDirectory() as tmp:
        values = measure_steps(tmp)
    values["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    values["threads"] = torch.get_num_threads()
    with open(sys.argv[1], "w") as handle:
        json.dump(values, handle)
