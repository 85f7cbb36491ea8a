"""One training step's losses and gradients, and validate.py's predictions, on the tiny set
(shared by tests/test_numerics_unchanged.py and tests/reference/record_one_step.py).

Gradients are summarised per parameter (sum, L2 norm and 16 evenly spaced elements): enough to
catch any change of the arithmetic without storing every value."""

from __future__ import annotations

import csv
import os

import numpy as np
import torch

from test_train_fixtures import make_dataset, tiny_config_dict, write_config

SAMPLES = 16


def _grad_summary(model: torch.nn.Module) -> dict:
    out = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            out[name] = None
            continue
        flat = param.grad.detach().double().flatten()
        picks = np.linspace(0, flat.numel() - 1, num=min(SAMPLES, flat.numel())).round().astype(int)
        out[name] = {"sum": float(flat.sum()), "norm": float(flat.norm()), "values": flat[picks].tolist()}
    return out


def _one_step(config, stage: str, teacher_path: str | None) -> dict:
    """Losses and gradients of the first training batch of a fresh run of `stage`."""
    from vqakd.training.checkpoint import seed_everything
    from vqakd.data.batches import load_data, make_loader
    from vqakd.training.engine import compute_loss, forward_batch
    from vqakd.training.builders import build_model_for_stage, load_teacher

    device = torch.device("cpu")
    bundle = load_data(config, device=device, progress=False)
    teacher = load_teacher(teacher_path, config, bundle, device)[0] if teacher_path else None
    seed_everything(config.train.seed)
    model = build_model_for_stage(config, stage, bundle, device, False)
    loader = make_loader(bundle.splits["train"], bundle.table, config.train.batch_size, True, config.train.seed, 0,
                         False)
    loader.sampler.set_epoch(1)
    batch = next(iter(loader))
    model.train()
    teacher_output = None
    if teacher is not None:
        with torch.no_grad():
            teacher_output = forward_batch(teacher, batch)
    output = forward_batch(model, batch)
    values = compute_loss(output, batch["answer"], config.loss, stage, teacher_output)
    values["loss"].backward()
    return {"losses": {name: float(value) for name, value in values.items()}, "grads": _grad_summary(model)}


def measure(tmp: str) -> dict:
    import train
    import validate
    from vqakd.core.config import load_config

    data = make_dataset(os.path.join(tmp, "data"))
    cfg = write_config(os.path.join(tmp, "tiny.yml"),
                       tiny_config_dict(data["paths"], os.path.join(tmp, "out"), train={"epochs": 1}))
    torch.set_num_threads(1)
    result = {"teacher": _one_step(load_config(cfg), "teacher", None)}
    # A one-epoch teacher run gives the student's teacher and the checkpoint validate.py reads.
    assert train.main(["--cfg", cfg, "--stage", "teacher"]) == 0
    teacher_ckpt = os.path.join(tmp, "out", "teacher", "best.pt")
    for distill in ("feature", "logit"):
        config = load_config(cfg, [f"loss.distill={distill}"])
        result[f"student_{distill}"] = _one_step(config, "student", teacher_ckpt)
    preds = os.path.join(tmp, "preds.csv")
    assert validate.main(["--cfg", cfg, "--checkpoint", teacher_ckpt, "--split", "test", "--write-preds",
                          "--out", os.path.join(tmp, "eval.json"), "--preds-out", preds]) == 0
    with open(preds, newline="") as handle:
        rows = list(csv.DictReader(handle))
    result["validate"] = {"question_id": [row["question_id"] for row in rows],
                          "predicted_answer": [row["predicted_answer"] for row in rows]}
    return result
