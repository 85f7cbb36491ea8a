"""Evaluate a checkpoint on one split: accuracy per question type, predictions CSV, per-answer
figures, the eval JSON."""

import contextlib
import csv
import os
from collections import Counter
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from vqakd.core import distributed as dist
from vqakd.training.checkpoint import (check_vocab_match, count_parameters, load_checkpoint, model_config_from,
                                       model_from_checkpoint)
from vqakd.core.config import Config, data_file_paths, eval_batch_size, load_config, override_key
from vqakd.data.batches import DataBundle, load_data, make_loader, with_dropped
from vqakd.training.engine import configure_backends, evaluate
from vqakd.core.errors import UserError
from vqakd.core.files import atomic_open, write_json
from vqakd.core.locks import guard_outputs
from vqakd.data.questions import TYPE_NAMES
from vqakd.training.metrics import FIRST_ANSWER_LABEL, format_table
from vqakd.training.inference_record import feature_differences
from vqakd.training.memory import MemoryPlan, plan_run
from vqakd.training.provenance import provenance_for_config, utc_now

# `answer`: the true answer's vocabulary entry (<UNK1> outside the answer vocabulary);
# `true_answer`: the annotation's answer as written (empty for question files made before it was kept);
# `answer_in_vocab`: 1 where the model could name the true answer at all.
PREDICTION_COLUMNS = ("question_id", "video_id", "question", "predicted_answer", "answer", "true_answer",
                      "answer_in_vocab", "correct", "question_type", "probability", "top5")
# Per-answer figures of the split's most frequent true answers; a confusion matrix of fewer.
REPORTED_ANSWERS = 20
CONFUSION_ANSWERS = 10
# The accuracy figures of evaluate's summary that results.json and the eval JSON record.
SUMMARY_FIGURES = ("accuracy", "correct", "count", "accuracy_answered", "count_answered")


def eval_batch_per_process(config: Config) -> int:
    """train.eval_batch_size questions split over the processes (the last process may get fewer)."""
    return -(-eval_batch_size(config) // dist.get_world_size())


def split_loader(config: Config, bundle: DataBundle, split: str, device: torch.device, batch: Optional[int] = None,
                 shuffle: bool = False):
    """This process's share of `split` in batches of `batch` (default: evaluation batches), at most train.max_steps."""
    return make_loader(bundle.splits[split], bundle.table, batch or eval_batch_per_process(config), shuffle,
                       config.train.seed, config.train.num_workers, device.type == "cuda", dist.get_rank(),
                       dist.get_world_size(), reuse_buffers=True, max_batches=config.train.max_steps)


def evaluate_split(config: Config, bundle: DataBundle, split: str, checkpoint: Mapping[str, Any], model,
                   device: torch.device, **options) -> tuple[dict, dict, Optional[dict]]:
    """`evaluate` a checkpoint's network on `split`, questions dropped for missing videos
    (data.missing_videos: drop) counted as wrong: (the record results.json (train.py) and the eval
    JSON (validate.py) both hold, the summary, this process's predictions when asked for)."""
    summary, found = evaluate(model, split_loader(config, bundle, split, device), device, amp=config.train.amp,
                              progress=config.train.progress and dist.is_main(), desc=split, **options)
    summary = with_dropped(summary, bundle.splits[split])
    dropped = {name: data.dropped for name, data in bundle.splits.items()}
    record = {"split": split, **{key: summary[key] for key in SUMMARY_FIGURES}, "dropped_questions": dropped,
              "per_type": summary["per_type"], "epoch": checkpoint.get("epoch"), "params": count_parameters(model)}
    return record, summary, found


def validate_checkpoint(cfg: str, checkpoint_path: str, overrides: Sequence[str] = (), *, split: str = "test",
                        write_preds: bool = False, out: Optional[str] = None, preds_out: Optional[str] = None,
                        device: Optional[str] = None, other_features: bool = False,
                        plan: bool = False) -> dict[str, Any] | MemoryPlan:
    """What `python validate.py` does with its flags: evaluate a checkpoint (ours or original) on a
    split and write the JSON (and the predictions CSV); under torchrun rank 0 writes the whole
    split's figures. The checkpoint defines the network: a model.* override may only repeat it."""
    model_keys = [override_key(text) for text in overrides if override_key(text).startswith("model.")]
    overrides = list(overrides)
    if device is not None:
        overrides.insert(0, f"train.device={device}")
    config = load_config(cfg, overrides)
    out = out or os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), f"eval_{split}.json")
    preds_out = preds_out or os.path.splitext(out)[0] + "_preds.csv"
    answers_out = os.path.splitext(out)[0] + "_answers.json"
    outputs = {"--out": out, "--preds-out": preds_out if write_preds else None,
               "the per-answer figures": answers_out if write_preds else None}
    inputs = {"--checkpoint": checkpoint_path, "--cfg": cfg, **data_file_paths(config)}
    with dist.session(), contextlib.ExitStack() as held:
        # Before any work: never replace the checkpoint; only the main process writes and locks.
        # --plan writes nothing: no output checks, no lock.
        if not plan:
            dist.agree(lambda: held.enter_context(guard_outputs(
                inputs, outputs, "output folder for the evaluation results", file_what="evaluation output",
                lock=dist.is_main())), "the check of the output files")
        started = utc_now()
        world, main = dist.get_world_size(), dist.is_main()

        def start():
            device = dist.resolve_process_device(config.train.device, what="train.device")
            checkpoint = load_checkpoint(checkpoint_path)
            model_config = model_config_from(checkpoint, checkpoint_path)
            for key in model_keys:
                name = key.split(".", 1)[1]
                given, recorded = getattr(config.model, name, None), getattr(model_config, name, None)
                if given != recorded:
                    raise UserError(f"--set {key}={given}: the checkpoint defines the model and has {name} = "
                                    f"{recorded}; validate.py cannot change it (drop the --set)")
            # The checkpoint defines the network: its clip count and feature size are what the data must match.
            config.model.num_nodes = model_config.num_nodes
            config.model.vision_dim = model_config.vision_dim
            planned = {}

            def plan_memory(bundle: DataBundle) -> bool:
                batch = eval_batch_per_process(config)
                planned["plan"] = plan_run(config, bundle, model_config, device, training=False, batch=batch,
                                           eval_batch=batch, refuse=not plan)
                return not plan

            bundle = load_data(config, splits=(split,), device=device, progress=config.train.progress and main,
                               expected_by="the checkpoint's model_config", before_table=plan_memory)
            if plan:
                return planned["plan"]
            check_vocab_match(checkpoint, checkpoint_path, bundle, "the checkpoint")
            differences = feature_differences(checkpoint, {"appearance": config.data.appearance_feat,
                                                           "motion": config.data.motion_feat})
            if differences and not other_features:
                raise UserError(f"{checkpoint_path} was trained on features made otherwise: {'; '.join(differences)}; "
                                "evaluate on the features it was trained on, or pass --other-features to evaluate "
                                "anyway (recorded in the eval JSON)")
            return (device, checkpoint, bundle, model_from_checkpoint(checkpoint, checkpoint_path, device),
                    differences, planned["plan"])

        started_up = dist.agree(start)
        if plan:
            if main:
                print("\n".join(started_up.lines()))
            return started_up
        device, checkpoint, bundle, model, differences, memory_plan = started_up
        configure_backends(device, config.train.tf32)
        # One pass gives the accuracy and, with --write-preds, each question's top answers.
        record, summary, found = evaluate_split(config, bundle, split, checkpoint, model, device,
                                                return_predictions=write_preds)
        if write_preds and world > 1:
            shares = dist.all_gather_objects(found)
            found = {key: np.concatenate([share[key] for share in shares]) for key in found}
        result = {
            "checkpoint": checkpoint_path,
            **record,
            "ceiling": answer_ceiling(bundle.splits[split]),
            "stage": checkpoint.get("stage"),
            "original_checkpoint": bool(checkpoint.get("original")),
            # model_kwargs values of an original checkpoint that its weights contradict (ignored).
            "claimed_model_kwargs": checkpoint.get("claimed_model_kwargs") or {},
            # --other-features: how these features differ from the checkpoint's training features.
            "other_features": differences,
            "memory_plan": memory_plan.record(),
        }
        if main:
            for note in checkpoint.get("notes") or ():
                print(f"note: {note}")
            for difference in differences:
                print(f"warning: features made otherwise than in training (--other-features): {difference}")
            result["provenance"] = provenance_for_config(config, started=started, device=device, world_size=world)
            print(format_table(summary, f"{checkpoint_path} on {split} ({summary['count']} questions):"))
            dropped = bundle.splits[split].dropped
            if dropped:
                print(f"{dropped} of {summary['count']} questions were left out (their videos are missing from a "
                      f"feature file; data.missing_videos: drop) and count as wrong; accuracy over the "
                      f"{summary['count_answered']} answered: {100 * summary['accuracy_answered']:.2f}%")
            print(format_ceiling(result["ceiling"]))
            write_json(out, result)
            print(f"wrote {out}")
            if write_preds:
                write_predictions(preds_out, bundle, split, found)
                print(f"wrote {preds_out}")
                report = answer_report(bundle, split, found)
                write_json(answers_out, report)
                print(format_answer_report(report))
                print(f"wrote {answers_out}")
        dist.barrier()
        return result


def write_predictions(path: str, bundle: DataBundle, split: str, found: Mapping[str, np.ndarray]) -> None:
    """One CSV row per question of `split`, in question order (`found`: from
    `evaluate(..., return_predictions=True)`, every process's share)."""
    data = bundle.splits[split]
    answers = bundle.vocab.idx_to_answer
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(PREDICTION_COLUMNS)
        for at in np.argsort(found["index"], kind="stable"):
            index, predicted = int(found["index"][at]), int(found["prediction"][at])
            label = int(data.answers[index])
            top = "|".join(f"{answers[int(answer)]}:{prob:.4f}"
                           for answer, prob in zip(found["top_answers"][at], found["top_probs"][at]))
            in_vocab = label >= FIRST_ANSWER_LABEL
            truth = (data.answer_text[index] if data.answer_text is not None
                     else answers[label] if in_vocab else "")
            correct = int(predicted == label and in_vocab)
            probability = f"{float(found['top_probs'][at][0]):.4f}"
            writer.writerow([data.display_ids[index], int(data.video_ids[index]),
                             data.text(index, bundle.vocab), answers[predicted], answers[label], truth,
                             int(in_vocab), correct, TYPE_NAMES[int(data.qtypes[index])], probability, top])


def answer_ceiling(data) -> dict[str, Any]:
    """The best accuracy any model can reach on a split, overall and per question type: the share
    of questions whose true answer is inside the answer vocabulary (labels 0/1 are never right)."""
    nameable = data.answers >= FIRST_ANSWER_LABEL
    # Dropped questions (data.missing_videos: drop) count as wrong, so they lower the ceiling too.
    totals = torch.bincount(data.qtypes, minlength=len(TYPE_NAMES))
    if data.dropped:
        totals = totals + torch.bincount(data.dropped_qtypes, minlength=len(TYPE_NAMES))
    reachable = torch.bincount(data.qtypes[nameable], minlength=len(TYPE_NAMES))
    per_type = {name: int(reachable[code]) / int(totals[code]) for code, name in enumerate(TYPE_NAMES) if totals[code]}
    return {"all": int(reachable.sum()) / max(int(totals.sum()), 1), "per_type": per_type}


def format_ceiling(ceiling: Mapping[str, Any]) -> str:
    """One line: the ceiling overall and per type, types the answer vocabulary cannot reach named."""
    types = ", ".join(f"{name} {100 * value:.1f}%" for name, value in ceiling["per_type"].items())
    line = f"ceiling (true answer inside the answer vocabulary): all {100 * ceiling['all']:.1f}%; {types}"
    unreachable = [name for name, value in ceiling["per_type"].items() if value == 0]
    if unreachable:
        line += f"\nno {'/'.join(unreachable)} question has its answer in the answer vocabulary: that type scores 0%"
    return line


def answer_figures(truth: Sequence, predicted: Sequence, nameable: Callable[[Any], bool],
                   answers: int = REPORTED_ANSWERS, square: int = CONFUSION_ANSWERS) -> dict[str, Any]:
    """Precision, recall, F1 and support (scikit-learn) of the `answers` most frequent nameable true
    answers (labels or names; ties in their own order), and the confusion matrix among the `square`
    most frequent (rows: true answer, columns: predicted). The study's report uses this too."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    counts = Counter(answer for answer in truth if nameable(answer))
    frequent = sorted(counts, key=lambda answer: (-counts[answer], answer))[:answers]
    if not frequent:
        return {"answers": [], "confusion": None}
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=frequent,
                                                                     zero_division=0)
    return {"answers": [{"answer": answer, "precision": float(p), "recall": float(r), "f1": float(f),
                         "support": int(n)} for answer, p, r, f, n in zip(frequent, precision, recall, f1, support)],
            "confusion": {"answers": frequent[:square],
                          "matrix": confusion_matrix(truth, predicted, labels=frequent[:square]).tolist()}}


def answer_report(bundle: DataBundle, split: str, found: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """`answer_figures` of the split's answers (nameable ones: <UNK0>/<UNK1> are never correct)."""
    data = bundle.splits[split]
    names = bundle.vocab.idx_to_answer
    truth = [int(label) for label in data.answers.numpy()[found["index"]]]
    figures = answer_figures(truth, [int(label) for label in found["prediction"]],
                             lambda label: label >= FIRST_ANSWER_LABEL)
    for entry in figures["answers"]:
        entry["answer"] = names[entry["answer"]]
    if figures["confusion"] is not None:
        figures["confusion"]["answers"] = [names[label] for label in figures["confusion"]["answers"]]
    return {"split": split, "questions": len(truth), **figures,
            "note": "per-answer figures of the most frequent true answers (scikit-learn); "
                    "confusion rows are true answers, columns predicted answers"}


def format_answer_report(report: Mapping[str, Any], lines: int = 5) -> str:
    """A few printed lines: the most frequent answers' precision / recall / F1."""
    if not report["answers"]:
        return "per-answer figures: no nameable answer in this split"
    out = [f"most frequent answers ({len(report['answers'])} in the JSON): precision / recall / F1 (support)"]
    for entry in report["answers"][:lines]:
        out.append(f"  {entry['answer']:<16} {100 * entry['precision']:5.1f}% {100 * entry['recall']:5.1f}% "
                   f"{100 * entry['f1']:5.1f}% ({entry['support']})")
    return "\n".join(out)
