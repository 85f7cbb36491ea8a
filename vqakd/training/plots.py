"""Loss and accuracy curves (PNG) from the metrics.csv rows of a run: the minimised losses
(validation losses dashed), the common and dependence regularisers, train/val accuracy, and the
best epoch (the one best.pt holds) as a dotted vertical line. Losses are on a log scale where
positive: the first epoch's is often tens of times the later ones, which a linear axis flattens.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from vqakd.core.files import atomic_path


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    values = []
    for row in rows:
        try:
            values.append(float(row.get(key, "")))
        except (TypeError, ValueError):
            values.append(math.nan)
    return values


def _present(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    return any(not math.isnan(v) for v in _series(rows, key))


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str, stage: str, best: int) -> None:
    """Write the curves of `rows` (dicts with epoch, train_<part>, train_acc, val_acc) to `path`;
    `best`: the epoch best.pt holds."""
    import matplotlib.pyplot as plt

    figure = curves_figure(rows, stage, best)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def curves_figure(rows: Sequence[Mapping[str, Any]], stage: str, best: int):
    """The matplotlib figure plot_curves saves: axes losses, regularisers, accuracy."""
    # Imported here, not at the top: matplotlib takes a second to load and only rank 0 draws.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [int(row["epoch"]) for row in rows]
    figure, (loss_axis, reg_axis, acc_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = {"loss": "total", "hard": "hard", "ce": "CE", "app": "APP", "mo": "MO", "kd": "logit KD"}
    wanted = ("loss", "hard", "ce", "app", "mo", "kd") if stage == "student" else ("hard", "ce")
    plotted = []
    for part in wanted:
        if _present(rows, f"train_{part}"):
            (line,) = loss_axis.plot(epochs, _series(rows, f"train_{part}"), marker="o", ms=3,
                                     label=f"{labels[part]} (train)")
            plotted.append(f"train_{part}")
            if _present(rows, f"val_{part}"):
                loss_axis.plot(epochs, _series(rows, f"val_{part}"), linestyle="--", marker="x", ms=3,
                               color=line.get_color(), label=f"{labels[part]} (val)")
                plotted.append(f"val_{part}")
    values = [v for key in plotted for v in _series(rows, key) if not math.isnan(v)]
    if values and min(values) > 0:          # a zero or negative part stays linear
        loss_axis.set_yscale("log")
    loss_axis.set_title(f"{stage}: losses" + (" (log scale)" if loss_axis.get_yscale() == "log" else ""))

    for part, label in (("common", "common C"), ("dependence", "dependence H")):
        values = _series(rows, f"train_{part}")
        if any(v > 0 for v in values if not math.isnan(v)):
            reg_axis.plot(epochs, values, marker="o", ms=3, label=label)
    reg_axis.set_yscale("log")
    reg_axis.set_title("regularisers (unweighted)")

    for key, label in (("train_acc", "train"), ("val_acc", "val")):
        acc_axis.plot(epochs, [100 * v for v in _series(rows, key)], marker="o", ms=3, label=label)
    acc_axis.set_title("accuracy (%)")

    for axis in (loss_axis, reg_axis, acc_axis):
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.axvline(best, color="grey", linestyle=":", linewidth=1.2,
                     label=f"best epoch ({best})" if axis is acc_axis else None)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    return figure
