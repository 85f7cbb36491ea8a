"""The study's report: `<study>/report/{report.md, report.json, *.png}` from the runs' files.

Per (arm, seed) run it reads results.json, metrics.csv, study_test_preds.csv (validate.py
--write-preds) and the inference timing. Tables give mean ± sample std (n − 1) over seeds beside
every seed's value, each arm minus the student trained alone seed by seed (95% t interval), each
question type's ceiling and the published numbers. Per-answer figures are validate.py's
(vqakd.training.validation.answer_figures) on all seeds' predictions pooled.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import itertools
import math
import os
import statistics
from typing import Any, Iterable, Iterator, Optional, Sequence

from vqakd.core.files import atomic_open, atomic_path, read_json, write_json
from vqakd.data.questions import QUESTION_TYPES, TYPE_NAMES
from vqakd.data.vocab import ANSWER_SPECIALS
from vqakd.training.metrics import LOSS_PARTS

# The study's own evaluation files in a run's stage folder (runner.py writes them): validate.py's
# defaults (eval_<split>*) there may hold another split or another evaluation, and are never read.
EVAL_FILE = "study_test.json"
PREDS_FILE = "study_test_preds.csv"
TOP_ANSWERS = 10
# The arm every other arm is compared with, seed by seed: the student trained alone.
BASELINE_ARM = "student-none"

# Published test accuracy (%) for the teacher's architecture (DualVGR) and HCRN; see
# docs/method.md#published-numbers. The distillation paper's own tables are not machine-readable.
PUBLISHED = {
    "msvd-qa": [{"model": "DualVGR (published)", "accuracy": 39.03,
                 "per_type": {"what": 28.65, "who": 53.82, "how": 80.00, "when": 70.69, "where": 46.43}},
                {"model": "HCRN (published)", "accuracy": 36.1, "per_type": {}}],
    "msrvtt-qa": [{"model": "DualVGR (published)", "accuracy": 35.52,
                   "per_type": {"what": 29.40, "who": 45.56, "how": 79.76, "when": 76.66, "where": 36.40}},
                  {"model": "HCRN (published)", "accuracy": 35.6, "per_type": {}}],
}


def mean_std(values: Iterable[Optional[float]]) -> dict[str, Any]:
    """Mean and sample standard deviation of the values that are not None (std None for fewer than two)."""
    values = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def collect(runs) -> dict[str, Any]:
    """Everything the tables show, per arm: per-seed values and their mean ± std."""
    arms: dict[str, Any] = {}
    for run in runs:
        results = read_json(run.path("results.json"))
        entry = arms.setdefault(run.arm.name, {"stage": run.arm.stage, "distill": run.arm.distill,
                                               "overrides": list(run.arm.overrides), "note": run.arm.note,
                                               "teacher_arm": run.arm.teacher, "seeds": {}})
        entry["seeds"][str(run.seed)] = {
            "accuracy": results["accuracy"], "count": results["count"], "params": results["params"],
            "epoch": results["epoch"], "val_accuracy": results.get("val_accuracy"),
            "per_type": {t: {"accuracy": v["accuracy"], "count": v["count"]} for t, v in results["per_type"].items()},
            "ms_per_question": (run.timing or {}).get("ms_per_question"), "teacher": results.get("teacher"),
            "graph_layers": (results.get("model_config") or {}).get("graph_layers"),
            "features": feature_origin(results), "run_dir": run.stage_dir}
    for entry in arms.values():
        seeds = list(entry["seeds"].values())
        times = mean_std(s["ms_per_question"] for s in seeds)
        entry.update(accuracy=mean_std(s["accuracy"] for s in seeds),
                     val_accuracy=mean_std(s["val_accuracy"] for s in seeds), params=seeds[0]["params"],
                     graph_layers=seeds[0]["graph_layers"], ms_per_question=times if times["n"] else None)
        counts = {qtype: seeds[0]["per_type"].get(qtype, {}).get("count", 0) for qtype in QUESTION_TYPES}
        entry["per_type"] = {qtype: dict(mean_std(s["per_type"][qtype]["accuracy"] for s in seeds), count=count)
                             if count else {"mean": None, "std": None, "n": len(seeds), "count": 0}
                             for qtype, count in counts.items()}
    return arms


def answer_metrics(preds: dict[str, list[dict]]) -> dict[str, Any]:
    """Per arm, all seeds pooled: per-answer precision/recall/F1 and the confusions among the
    TOP_ANSWERS most frequent true test answers in the vocabulary, as validate.py computes them."""
    from vqakd.training.validation import answer_figures

    out: dict[str, Any] = {"labels": [], "arms": {}}
    for arm, rows in preds.items():
        # A true answer outside the answer vocabulary is written <UNK1> in the predictions CSV.
        figures = answer_figures([row["answer"] for row in rows], [row["predicted_answer"] for row in rows],
                                 lambda answer: answer not in ANSWER_SPECIALS, answers=TOP_ANSWERS, square=TOP_ANSWERS)
        if figures["confusion"] is None:
            continue
        # Every arm answers the same test questions with the same seeds: the same labels.
        labels = out["labels"] = figures["confusion"]["answers"]
        matrix = figures["confusion"]["matrix"]
        pairs = sorted((-matrix[i][j], true, predicted) for i, true in enumerate(labels)
                       for j, predicted in enumerate(labels) if i != j and matrix[i][j] > 0)
        out["arms"][arm] = {
            "per_answer": {entry["answer"]: {key: entry[key] for key in ("precision", "recall", "f1", "support")}
                           for entry in figures["answers"]},
            "confusion": matrix,
            "most_confused": [{"answer": a, "predicted": b, "count": -n} for n, a, b in pairs[:5]]}
    return out


def ceilings(rows: list[dict]) -> dict[str, Any]:
    """Per question type and overall: the share of test answers inside the answer vocabulary, the
    best accuracy a model can reach (an answer outside it is never predicted)."""
    def share(selected: list[dict]) -> dict[str, Any]:
        inside = sum(row["answer_in_vocab"] == "1" for row in selected)     # as validate.py recorded it
        return {"count": len(selected), "in_vocabulary": inside,
                "ceiling": inside / len(selected) if selected else None}

    per_type = {qtype: share([row for row in rows if row["question_type"] == qtype]) for qtype in TYPE_NAMES}
    return {"overall": share(rows), "per_type": per_type}


def paired_difference(arm: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy of `arm` minus `baseline`, seed by seed (the seeds both have), with the mean,
    the sample standard deviation and a 95% t interval of the mean (None for one seed)."""
    from scipy.stats import t     # comes with scikit-learn, a requirement

    differences = {seed: values["accuracy"] - baseline["seeds"][seed]["accuracy"]
                   for seed, values in arm["seeds"].items() if seed in baseline["seeds"]}
    stats = mean_std(differences.values())
    interval = None
    if stats["std"] is not None:
        half = float(t.ppf(0.975, stats["n"] - 1)) * stats["std"] / math.sqrt(stats["n"])
        interval = [stats["mean"] - half, stats["mean"] + half]
    return dict(stats, seeds=differences, interval=interval)


def detectability(name: str, baseline: str, paired: dict[str, Any]) -> str:
    """One sentence: whether the paired difference of `name` over `baseline` is told from noise."""
    mean = paired["mean"]
    if mean is None:
        return f"{name} − {baseline}: no seed in common."
    head = f"{name} − {baseline}: {100 * mean:+.2f} points"
    if paired["interval"] is None:
        return f"{head} on one seed: no spread to judge it by, so not detectable; run more seeds (--seeds 3)."
    low, high = paired["interval"]
    span = f"mean over {paired['n']} seeds, 95% interval [{100 * low:+.2f}, {100 * high:+.2f}]"
    if low > 0 or high < 0:
        word = "gain" if mean > 0 else "loss"
        return f"{head} ({span}): the interval excludes 0, a {word} detectable over these seeds."
    return (f"{head} ({span}): the interval includes 0, so no difference is detectable with {paired['n']} seeds; "
            "another set of seeds may reverse its sign.")


def paired_differences(arms: dict[str, Any], baseline: str = BASELINE_ARM) -> dict[str, Any]:
    """Every other arm's paired difference from the baseline arm (when present), and its sentence."""
    pairs = {name: paired_difference(arm, arms[baseline]) for name, arm in arms.items()
             if baseline in arms and name != baseline}
    return {name: dict(paired, baseline=baseline, verdict=detectability(name, baseline, paired))
            for name, paired in pairs.items()}


def feature_origin(results: dict[str, Any]) -> dict[str, Any]:
    """Per kind, the model and random_weights of results.json's provenance; None for a file that
    records none."""
    features = (results.get("provenance") or {}).get("features") or {}
    return {kind: None if not isinstance(settings, dict) or "model" not in settings else
            {"model": settings["model"], "random_weights": bool(settings.get("random_weights"))}
            for kind, settings in features.items()}


def features_summary(arms: dict[str, Any]) -> dict[str, Any]:
    """Whether any run's features come from random-weight networks, or carry no record at all; and
    the note on what the published numbers beside these runs mean then (None otherwise)."""
    records = [kind for arm in arms.values() for values in arm["seeds"].values()
               for kind in (values["features"] or {None: None}).values()]
    summary = {"random_weights": any(record and record["random_weights"] for record in records),
               "unrecorded": any(record is None for record in records), "note": None}
    if summary["random_weights"]:
        summary["note"] = ("These runs' features come from random-weight networks (their feature files record "
                           "random_weights), not the pretrained ResNet-101 / 3D ResNeXt-101 of the paper: the "
                           "published numbers beside them are for orientation, not a target they could be "
                           "expected to reach.")
    elif summary["unrecorded"]:
        summary["note"] = ("The feature files record no extraction settings: whether they match the published "
                           "setup is not known, so the published numbers beside them may not be comparable.")
    return summary


def disagreements(preds: dict[str, list[dict]], limit: int) -> list[dict[str, Any]]:
    """Test questions on which the arms (one seed) answer differently, one question type after
    another so that the handful shown covers several types."""
    arms = list(preds)
    by_id = [{row["question_id"]: row for row in preds[arm]} for arm in arms]
    common = set(by_id[0]).intersection(*by_id[1:]) if by_id else set()
    found: dict[str, list] = {}
    # Questions with a nameable true answer first, then in question-id order.
    for qid in sorted(common, key=lambda q: (by_id[0][q]["answer_in_vocab"] == "0", len(q), q)):
        rows = [table[qid] for table in by_id]
        if len({row["predicted_answer"] for row in rows}) < 2:
            continue
        first = rows[0]
        found.setdefault(first["question_type"], []).append({
            "question_id": qid, "video_id": first["video_id"], "question": first["question"],
            # The annotation's answer (true_answer), not <UNK1>, where the vocabulary lacks it.
            "type": first["question_type"], "answer": first["true_answer"] or first["answer"],
            "predictions": {arm: row["predicted_answer"] for arm, row in zip(arms, rows)},
            "correct": {arm: row["correct"] == "1" for arm, row in zip(arms, rows)}})
    # Round by round: the first question of each type in turn, then the second of each...
    rounds = itertools.zip_longest(*(found[t] for t in TYPE_NAMES if t in found))
    return [item for items in rounds for item in items if item is not None][:limit]


# ----------------------------------------------------------------------------------- figures

@contextlib.contextmanager
def _figure(path: str, *grid: int, figsize: tuple[float, float]) -> Iterator[tuple[Any, Any]]:
    """A figure and its axes, laid out and saved atomically to `path` (PNG) when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(*grid, figsize=figsize)
    try:
        yield figure, axes
        figure.tight_layout()
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(figure)


def _number(value: Any) -> float:
    """A metrics.csv cell as a number; NaN where it is empty (a loss part the stage does not have)."""
    return float(value) if value not in (None, "") else math.nan


def plot_arm_curves(arm: str, metrics: dict[str, list[dict]], best: dict[str, int], path: str) -> None:
    """Train (solid) and val (dashed) loss parts, mean over seeds, on a log scale (they differ by
    orders of magnitude), and val accuracy per seed; dotted lines / stars mark the best epochs."""
    with _figure(path, 1, 2, figsize=(13, 4.5)) as (_, (loss_axis, acc_axis)):
        seeds = list(metrics)
        epochs = [int(row["epoch"]) for row in metrics[seeds[0]]]
        for index, part in enumerate(LOSS_PARTS):
            for prefix, style in (("train", "-"), ("val", "--")):
                series = [[_number(row.get(f"{prefix}_{part}")) for row in metrics[s]][:len(epochs)] for s in seeds]
                # A mean over seeds is NaN where a seed lacks the part; log scale: only positive values.
                values = [mean if mean > 0 else math.nan for mean in map(statistics.fmean, zip(*series))]
                if any(not math.isnan(v) for v in values):
                    loss_axis.plot(epochs, values, style, marker="o", ms=3, color=f"C{index}",
                                   label=f"{prefix} {part}")
        loss_axis.set_yscale("log")
        loss_axis.set_title(f"{arm}: loss parts (mean over {len(seeds)} seeds; dotted: best epochs)")
        acc_axis.set_title(f"{arm}: validation accuracy (star: best epoch)")
        for seed in seeds:
            loss_axis.axvline(best[seed], color="grey", linestyle=":", linewidth=1)
            accuracy = [100 * _number(row.get("val_acc")) for row in metrics[seed]]
            line, = acc_axis.plot(epochs[:len(accuracy)], accuracy, marker="o", ms=3, label=f"seed {seed}")
            acc_axis.plot([best[seed]], [accuracy[best[seed] - 1]], "*", ms=14, color=line.get_color())
        acc_axis.set_ylabel("%")
        for axis in (loss_axis, acc_axis):
            axis.set_xlabel("epoch")
            if len(epochs) <= 30:
                axis.set_xticks(epochs)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7, ncol=2)


def error_bars(stats: Sequence[dict]) -> list[list[float]]:
    """Matplotlib's (below, above) error bars in %: one standard deviation, clipped to [0, 100]%."""
    means = [100 * s["mean"] for s in stats]
    spreads = [100 * (s["std"] or 0) for s in stats]
    return [[min(spread, mean) for mean, spread in zip(means, spreads)],
            [min(spread, 100 - mean) for mean, spread in zip(means, spreads)]]


def plot_per_type(arms: dict[str, Any], published: list[dict], path: str, published_note: Optional[str] = None) -> None:
    """Accuracy per question type with test questions: one bar per arm (mean ± std over seeds),
    the published DualVGR numbers as black markers (labelled with `published_note`)."""
    types = [t for t in QUESTION_TYPES if any(a["per_type"][t]["count"] for a in arms.values())] + ["all"]
    width = 0.8 / max(1, len(arms))
    centres = [i + 0.4 - width / 2 for i in range(len(types))]
    with _figure(path, figsize=(max(6, 1.6 * len(types) * max(1, len(arms)) / 3), 4.5)) as (_, axis):
        for index, (name, arm) in enumerate(arms.items()):
            stats = [arm["per_type"][t] if t != "all" else arm["accuracy"] for t in types]
            axis.bar([i + index * width for i in range(len(types))], [100 * s["mean"] for s in stats], width,
                     yerr=error_bars(stats), capsize=3, label=name)
        for row in published[:1]:
            values = [row["per_type"].get(t, math.nan) if t != "all" else row["accuracy"] for t in types]
            label = row["model"] + (f" ({published_note})" if published_note else "")
            axis.plot(centres, values, "k_", ms=30, mew=2, label=label)
        axis.set_xticks(centres, types)
        axis.set_ylabel("test accuracy (%)")
        axis.set_ylim(0, 100)
        axis.legend(fontsize=8)
        axis.grid(axis="y", alpha=0.3)


def plot_confusion(arm: str, labels: list[str], matrix: list[list[int]], path: str) -> None:
    with _figure(path, figsize=(1.0 + 0.55 * len(labels), 0.8 + 0.5 * len(labels))) as (figure, axis):
        image = axis.imshow(matrix, cmap="Blues")
        axis.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        axis.set_yticks(range(len(labels)), labels, fontsize=8)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true answer")
        axis.set_title(f"{arm}:\nconfusion among the {len(labels)} most frequent answers", fontsize=9)
        peak = max((max(row) for row in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                if value:
                    axis.text(j, i, str(value), ha="center", va="center", fontsize=7,
                              color="white" if value > peak / 2 else "black")
        figure.colorbar(image, ax=axis)


# ----------------------------------------------------------------------------------- markdown

def _pct(stats: Optional[dict], sign: str = "") -> str:
    """Mean ± std in %, "–" without a value (a type without questions has none); `sign` "+": signed."""
    if not stats or stats.get("mean") is None:
        return "–"
    text = f"{100 * stats['mean']:{sign}.2f}"
    return text + (f" ± {100 * stats['std']:.2f}" if stats.get("std") is not None else "")


def _paired_markdown(paired: dict[str, Any]) -> list[str]:
    """The paired differences against the baseline arm: a table, then one sentence per arm."""
    if not paired:
        return []
    baseline = next(iter(paired.values()))["baseline"]
    out = ["", f"## Paired by seed: each arm − {baseline}", "",
           "A seed sets the initialisation and batch order of every arm alike: the difference seed by seed takes "
           "out what a seed does to all arms together, and its interval, not the arms' ± side by side, tells a "
           "gain from noise.", ""]
    rows = [[name, ", ".join(f"{seed}: {100 * value:+.2f}" for seed, value in entry["seeds"].items()),
             _pct(entry, sign="+"),
             "[{:+.2f}, {:+.2f}]".format(*(100 * end for end in entry["interval"])) if entry["interval"] else "–"]
            for name, entry in paired.items()]
    out += _table(["arm", "difference per seed (points)", "mean ± std", "95% interval (t)"], rows)
    return out + [""] + [f"- {entry['verdict']}" for entry in paired.values()]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(report: dict[str, Any]) -> str:
    arms, seeds, published = report["arms"], report["seeds"], report["published"]
    types = list(QUESTION_TYPES)
    first = next(iter(arms.values()))
    counts = {t: first["per_type"][t]["count"] for t in types}
    total = next(iter(first["seeds"].values()))["count"]
    ceiling = report["ceilings"]
    out = [f"# Study report: {report['dataset']}", "",
           f"Seeds: {', '.join(map(str, seeds))}. Test accuracy (%) of each run's best.pt (chosen by validation "
           f"accuracy), mean ± sample standard deviation over seeds; {total} test questions. Question types: "
           "the first token of the question, validate.py's rule (vqakd.data.questions.question_type).", ""]
    if report.get("left_out"):
        out += [f"Runs in the study folder not in this report (other --arms or --seeds): "
                f"{', '.join(report['left_out'])}.", ""]
    if report["features"]["random_weights"]:
        out += ["**Features from random-weight networks** (the feature files record `random_weights`): these "
                "numbers measure the method on such features, not the paper's setup with pretrained networks.", ""]
    out += ["## Overall", ""]
    rows = [[name, arm["note"], str(arm["graph_layers"]), f"{arm['params']:,}", _pct(arm["accuracy"]),
             _pct(arm["val_accuracy"]), f"{arm['ms_per_question']['mean']:.3f}" if arm["ms_per_question"] else "–"]
            for name, arm in arms.items()]
    origin = "published, pretrained features" if report["features"]["random_weights"] else "published"
    rows += [[row["model"], origin, "", "", f"{row['accuracy']:.2f}", "", ""] for row in published]
    rows.append(["ceiling", "share of test answers in the answer vocabulary", "", "",
                 _pct({"mean": ceiling["overall"]["ceiling"]}), "", ""])
    out += _table(["arm", "what it is", "graph layers", "parameters", "test accuracy", "val accuracy",
                   "ms/question"], rows)
    out += ["", "ms/question: inference of best.pt over the test split at the config's evaluation batch size "
            "(median of timed passes after a warm-up), mean over seeds."]
    if published and report["features"]["note"]:
        out += ["", report["features"]["note"]]
    out += _paired_markdown(report["paired"])
    out += ["", "## Per question type", ""]
    rows = [[name] + [_pct(arm["per_type"][t]) for t in types] + [_pct(arm["accuracy"])]
            for name, arm in arms.items()]
    rows += [[row["model"]] + [f"{row['per_type'][t]:.2f}" if t in row["per_type"] and counts[t] else "–"
                               for t in types] + [f"{row['accuracy']:.2f}"] for row in published]
    rows.append(["ceiling"] + [_pct({"mean": ceiling["per_type"][t]["ceiling"]}) for t in types]
                + [_pct({"mean": ceiling["overall"]["ceiling"]})])
    out += _table(["arm"] + [f"{t} ({counts[t]})" for t in types] + [f"all ({total})"], rows)
    out += ["", "\"–\": no test question of that type. Ceiling: the share of the type's test answers inside the "
            "answer vocabulary (built from the train answers), the most any model can score; an answer outside "
            "it is never predicted.", "", "![per-type accuracy](per_type.png)", "",
            "## Every seed", ""]
    rows = [[name, seed, f"{100 * values['accuracy']:.2f}"]
            + [f"{100 * values['per_type'][t]['accuracy']:.2f}" if counts[t] else "–" for t in types]
            + [str(values["epoch"]),
               os.path.relpath(values["teacher"], report["study_dir"]) if values["teacher"] else "–"]
            for name, arm in arms.items() for seed, values in arm["seeds"].items()]
    out += _table(["arm", "seed", "all"] + types + ["best epoch", "teacher"], rows)
    out += ["", "## Training curves", ""] + [f"![{name}]({name}_curves.png)" for name in arms]
    examples = report["examples"]
    out += ["", f"## Where the arms disagree (seed {examples['seed']})", ""]
    if not examples.get("limit", 1):
        out.append("No examples asked for (--examples 0).")
    elif examples["items"]:
        rows = [[item["video_id"], item["question"].replace("|", "\\|")]
                + [item["predictions"][a] + (" ✓" if item["correct"][a] else "") for a in arms] + [item["answer"]]
                for item in examples["items"]]
        out += _table(["video", "question"] + list(arms) + ["true answer"], rows)
    else:
        out.append("The arms gave the same answer to every test question.")
    answers = report["answers"]
    if answers["labels"]:
        out += ["", f"## The {len(answers['labels'])} most frequent test answers (all seeds pooled)", "",
                "F1 per arm (precision and recall are in report.json); support = test questions × seeds.", ""]
        rows = [[label, str(next(iter(answers["arms"].values()))["per_answer"][label]["support"])]
                + [f"{answers['arms'][a]['per_answer'][label]['f1']:.2f}" for a in answers["arms"]]
                for label in answers["labels"]]
        out += _table(["answer", "support"] + list(answers["arms"]), rows)
        out += ["", "Most frequent confusions (true → predicted, count):", ""]
        for name, values in answers["arms"].items():
            pairs = ", ".join(f"{p['answer']} → {p['predicted']} ({p['count']})" for p in values["most_confused"])
            out.append(f"- {name}: {pairs or 'none'} ([matrix]({name}_confusion.png))")
    return "\n".join(out) + "\n"


def runs_left_out(study_dir: str, arms, seeds) -> list[str]:
    """`seed<S>/<arm>` folders of the study that this report does not cover (other --arms or --seeds)."""
    folders = (os.path.relpath(path, study_dir).split(os.sep)
               for path in sorted(glob.glob(os.path.join(glob.escape(study_dir), "seed*", "*", ""))))
    return [f"{seed_dir}/{arm}" for seed_dir, arm in folders if arm not in arms or seed_dir[4:] not in map(str, seeds)]


def write_report(runs, report_dir: str, dataset: str, examples: int = 8) -> dict[str, Any]:
    """Write report.json, report.md and the figures; returns the report dict."""
    os.makedirs(report_dir, exist_ok=True)
    study_dir = os.path.dirname(os.path.abspath(report_dir))
    arms = collect(runs)
    seeds = list(dict.fromkeys(run.seed for run in runs))
    preds: dict[str, list] = {name: [] for name in arms}
    first_seed_preds: dict[str, list] = {}
    for run in runs:
        rows = read_csv(run.path(PREDS_FILE))
        preds[run.arm.name] += rows
        first_seed_preds.setdefault(run.arm.name, rows)         # the runs come seed by seed
    published = PUBLISHED.get(dataset, [])
    features = features_summary(arms)
    # Every run answers the same test questions: one run's predictions give the ceilings.
    report = {"dataset": dataset, "seeds": seeds, "study_dir": study_dir,
              "arms": arms, "published": published, "features": features,
              "ceilings": ceilings(first_seed_preds[runs[0].arm.name]), "paired": paired_differences(arms),
              "answers": answer_metrics(preds),
              "examples": {"seed": seeds[0], "limit": examples,
                           "items": disagreements(first_seed_preds, examples) if examples > 0 else []},
              "left_out": runs_left_out(study_dir, arms, seeds),
              "std": "sample standard deviation over seeds (n - 1)"}
    # Figures of an earlier report (an arm left out of this --arms) would sit beside it unexplained.
    for old in glob.glob(os.path.join(glob.escape(report_dir), "*.png")):
        os.remove(old)
    answers = report["answers"]
    for name, arm in arms.items():
        metrics = {str(run.seed): read_csv(run.path("metrics.csv")) for run in runs if run.arm.name == name}
        best = {seed: values["epoch"] for seed, values in arm["seeds"].items()}
        plot_arm_curves(name, metrics, best, os.path.join(report_dir, f"{name}_curves.png"))
        if name in answers["arms"]:
            plot_confusion(name, answers["labels"], answers["arms"][name]["confusion"],
                           os.path.join(report_dir, f"{name}_confusion.png"))
    plot_per_type(arms, published, os.path.join(report_dir, "per_type.png"),
                  "pretrained features; these runs: random weights" if features["random_weights"] else None)
    write_json(os.path.join(report_dir, "report.json"), report)
    with atomic_open(os.path.join(report_dir, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(render_markdown(report))
    return report
