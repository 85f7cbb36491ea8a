"""Loss and accuracy curves (PNG) from the metrics.csv rows of a run.

Panels: the minimised losses per epoch (teacher: hard loss and its CE; student: hard, APP and MO,
as the paper's figures show, or the logit-distillation term), the common and dependence
regularisers (log scale: they differ by orders of magnitude), and train/val accuracy.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from vqakd.io import atomic_path


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    values = []
    for row in rows:
        value = row.get(key, "")
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            values.append(math.nan)
    return values


def _present(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    return any(not math.isnan(v) for v in _series(rows, key))


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str, stage: str) -> None:
    """Write the curves of `rows` (dicts with epoch, train_<part>, train_acc, val_acc) to `path`."""
    if not rows:
        return
    # Imported here, not at the top: matplotlib takes a second to load and only rank 0 draws.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [int(row["epoch"]) for row in rows]
    figure, (loss_axis, reg_axis, acc_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = {"loss": "total", "hard": "hard", "ce": "CE", "app": "APP", "mo": "MO", "kd": "logit KD"}
    wanted = ("hard", "ce", "app", "mo", "kd") if stage == "student" else ("hard", "ce")
    if stage == "student":
        wanted = ("loss",) + wanted
    for part in wanted:
        if _present(rows, f"train_{part}"):
            loss_axis.plot(epochs, _series(rows, f"train_{part}"), marker="o", ms=3, label=labels[part])
    loss_axis.set_title(f"{stage}: training losses")
    loss_axis.set_xlabel("epoch")
    if loss_axis.get_legend_handles_labels()[0]:
        loss_axis.legend()
    loss_axis.grid(alpha=0.3)

    for part, label in (("common", "common C"), ("dependence", "dependence H")):
        values = _series(rows, f"train_{part}")
        if any(v > 0 for v in values if not math.isnan(v)):
            reg_axis.plot(epochs, values, marker="o", ms=3, label=label)
    reg_axis.set_yscale("log")
    reg_axis.set_title("regularisers (unweighted)")
    reg_axis.set_xlabel("epoch")
    if reg_axis.get_legend_handles_labels()[0]:
        reg_axis.legend()
    reg_axis.grid(alpha=0.3)

    for key, label in (("train_acc", "train"), ("val_acc", "val")):
        acc_axis.plot(epochs, [100 * v for v in _series(rows, key)], marker="o", ms=3, label=label)
    acc_axis.set_title("accuracy (%)")
    acc_axis.set_xlabel("epoch")
    acc_axis.legend()
    acc_axis.grid(alpha=0.3)

    for axis in (loss_axis, reg_axis, acc_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
