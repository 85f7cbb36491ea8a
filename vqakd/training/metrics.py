"""Accuracy overall and per question type (the question's first token: what / who / how / when /
where; docs/method.md), kept as counts on the device so that updating costs no host
synchronisation; the rows of a run's metrics.csv and its one-line epoch summary.

Labels 0 (`<UNK0>`) and 1 (`<UNK1>`) stand for an answer outside the vocabulary: they never count
as correct, even when the arg-max is that index, and they stay in the denominator.
"""

from __future__ import annotations

import csv
from typing import Any, Mapping, Sequence

import torch

from vqakd.core.distributed import all_reduce_sum
from vqakd.core.files import atomic_open
from vqakd.data.questions import QUESTION_TYPES, TYPE_NAMES

FIRST_ANSWER_LABEL = 2              # 0 and 1 (<UNK0>, <UNK1>) are never a correct prediction
# Loss parts in reporting order; "loss" is the total that is minimised.
LOSS_PARTS = ("loss", "hard", "ce", "common", "dependence", "app", "mo", "kd")


class AccuracyCounter:
    """Correct / total per question-type code (OTHER_TYPE included), on one device."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.correct = torch.zeros(len(TYPE_NAMES), dtype=torch.long, device=device)
        self.total = torch.zeros(len(TYPE_NAMES), dtype=torch.long, device=device)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor, qtypes: torch.Tensor) -> None:
        """Add one batch (on the device, no sync): an exact match with a nameable answer is correct."""
        labels = labels.to(predictions.device)
        hits = (predictions == labels) & (labels >= FIRST_ANSWER_LABEL)
        qtypes = qtypes.to(self.correct.device)
        self.correct.index_add_(0, qtypes, hits.long())
        self.total.index_add_(0, qtypes, torch.ones_like(qtypes))

    def all_reduce(self) -> "AccuracyCounter":
        all_reduce_sum(self.correct)
        all_reduce_sum(self.total)
        return self

    def summary(self) -> dict:
        """{"accuracy", "correct", "count", "per_type": {type: {"accuracy", "correct", "count"}}};
        accuracies are fractions in [0, 1] (0 for an empty group)."""
        return summarize(self.correct.cpu().tolist(), self.total.cpu().tolist())


def summarize(correct: Sequence[int], total: Sequence[int]) -> dict:
    def figures(c: int, t: int) -> dict:
        return {"accuracy": c / t if t else 0.0, "correct": int(c), "count": int(t)}

    per_type = {name: figures(correct[code], total[code]) for code, name in enumerate(QUESTION_TYPES)}
    return {**figures(int(sum(correct)), int(sum(total))), "per_type": per_type}


NO_VALUE = "\u2013"          # en dash: the table cell of a type without questions


def format_table(summary: Mapping, title: str = "") -> str:
    """A plain-text table: overall and per type, accuracy in % with counts ("–" for a type
    without questions: "0.00%" would read as an accuracy)."""
    lines = [title] if title else []
    lines.append(f"{'type':<8} {'accuracy':>9} {'correct':>9} {'count':>9}")
    for name, values in [*summary["per_type"].items(), ("all", summary)]:
        if not values["count"]:
            lines.append(f"{name:<8} {NO_VALUE:>9} {NO_VALUE:>9} {0:>9d}")
            continue
        lines.append(f"{name:<8} {100 * values['accuracy']:>8.2f}% {values['correct']:>9d} {values['count']:>9d}")
    return "\n".join(lines)


def metrics_row(epoch: int, lr: float, train: Mapping, val: Mapping, epoch_time: float) -> dict[str, Any]:
    """One metrics.csv row, every column always present (empty where a part does not apply);
    `val`: `evaluate`'s summary with its "losses" and "node_spread"; `epoch_time`: train and val."""
    row: dict[str, Any] = {"epoch": epoch, "lr": lr, "time_s": round(epoch_time, 3),
                           "train_questions_per_s": round(train["questions_per_s"], 2),
                           "train_steps_per_s": round(train["steps_per_s"], 4),
                           "val_questions_per_s": round(val.get("questions_per_s", 0.0), 2)}
    val_losses = val.get("losses") or {}
    for name in LOSS_PARTS:
        row[f"train_{name}"] = train.get(name, "")
        row[f"val_{name}"] = val_losses.get(name, "")
    for prefix, summary in (("train", train["accuracy"]), ("val", val)):
        row[f"{prefix}_acc"] = summary["accuracy"]
        for qtype in QUESTION_TYPES:
            row[f"{prefix}_acc_{qtype}"] = summary["per_type"][qtype]["accuracy"]
    row["val_count"] = val["count"]
    for qtype in QUESTION_TYPES:
        row[f"val_count_{qtype}"] = val["per_type"][qtype]["count"]
    spread = val.get("node_spread") or {}
    row.update(spread.get("columns", {}))
    if spread:
        row["collapsed_layers"] = " ".join(spread["collapsed"])     # "g1 g2" (model/diagnostics.is_collapsed)
    return row


def write_metrics_csv(path: str, rows: list[Mapping[str, Any]]) -> None:
    """Every column any row has, in first-seen order (a run resumed from a checkpoint written
    before a column existed leaves that column empty in its early rows)."""
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_open(path, "w", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def epoch_line(row: Mapping[str, Any], epochs: int, is_best: bool) -> str:
    """The log line of one epoch, from its metrics.csv row (its losses: floats, "" where absent)."""
    losses = " ".join(f"{name} {row[f'train_{name}']:.4g}" for name in LOSS_PARTS if row[f"train_{name}"] != "")
    # A type without validation questions shows "–" (rows written before the counts existed show the value).
    per_type = " ".join(f"{qtype} –" if row.get(f"val_count_{qtype}") == 0 else
                        f"{qtype} {100 * row[f'val_acc_{qtype}']:.1f}" for qtype in QUESTION_TYPES)
    val_loss = f" | val loss {row['val_loss']:.4g}" if row.get("val_loss", "") != "" else ""
    return (f"epoch {row['epoch']}/{epochs} | {losses}{val_loss} | train acc {100 * row['train_acc']:.2f}% | "
            f"val acc {100 * row['val_acc']:.2f}% ({per_type}) | lr {row['lr']:.3g} | {row['time_s']:.1f}s"
            + (" | best" if is_best else ""))
