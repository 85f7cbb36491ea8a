"""The whole toolkit on the synthetic demo dataset, with the commands a user would type.

    python -m vqakd.demo                       # what `make demo` runs
    python -m vqakd.demo --quiet --device cpu  # step output to log files, only the results shown

Steps, each printed as the command line it runs (with this Python, as a subprocess):

  1. preprocess/make_demo_dataset.py     videos of moving shapes, MSVD-QA-style annotations, GloVe text
  2. txt2pickle.py                       the demo GloVe text file -> pickle
  3. preprocess/preprocess_questions.py  --mode all: train (it builds the vocabulary), then val and test
  4-5. preprocess/preprocess_features.py --random-weights, resnet101 / resnext101 (nothing is downloaded)
  6. study.py    the teacher, the student alone and the student distilled from its seed's teacher,
                 over 3 seeds, evaluated on the test split, timed and reported (<output_dir>/study/report/)
  7. predict.py  the distilled student answers one test question about one demo video
  8. the summary, <output_dir>/summary.json, and its table (vqakd/demo/table.py renders README.md's)

Running it again skips each step whose arguments, input and output files (their sizes and
modification times) are unchanged (`demo_state.json` records them); an interrupted step resumes,
one whose inputs changed starts afresh. Progress flags and the scripts' code are not compared:
after changing the scene design in vqakd/demo/scenes.py, start afresh with `make clean`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from functools import cached_property
from typing import Optional

from vqakd.data.annotations import SPLITS, load_msvd_mapping
from vqakd.data.questions import question_type
from vqakd.demo import data as demo_data, table as demo_table
from vqakd.demo.steps import Runner, Step, display_path
from vqakd.demo.table import ARMS
from vqakd.core.errors import UserError
from vqakd.core.files import REPO_ROOT, ensure_writable_dir, read_json, write_json
from vqakd.study.report import EVAL_FILE
from vqakd.training.provenance import provenance_for_config, utc_now

DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.yml")
# The demo data is written in the MSVD-QA layout, so every script runs with --dataset msvd-qa
# and names its outputs msvd-qa_* (configs/demo.yml points at those names).
DATASET = "msvd-qa"
# The config's data keys and the preprocessed files (in the data folder) the demo's steps write for them.
DATA_FILES = {"vocab": f"{DATASET}_vocab.json",
              **{f"{split}_questions": f"{DATASET}_{split}_questions.pt" for split in SPLITS},
              **{f"{kind}_feat": f"{DATASET}_{kind}_feat.h5" for kind in ("appearance", "motion")}}
# Training seeds per arm: one seed moved the demo's accuracies by ~10 points, more than any
# difference between the arms, so the table shows each arm's spread over seeds.
DEFAULT_TRAINING_SEEDS = 3
# Feature extraction settings, sized for a 2-core CPU. Random-weight features keep the global
# make-up of a frame (vqakd/demo/scenes.py), which 32x32 frames show as well as 224x224 ones.
IMAGE_SIZE = 32
# Two frames per clip: the appearance questions ask what every frame shows, and the appearance
# BiLSTM over a clip's frames was most of a training step's time (181 ms a step with 4 frames, 115 with 2).
APPEARANCE_FRAMES_PER_CLIP = 2
MOTION_FRAMES_PER_CLIP = 8      # a 3D ResNeXt clip: enough frames to see a shape move
FEATURE_WORKERS = 1             # one decoding process beside the network on two cores
# Every step that runs a network uses one thread: the demo's small trainings and feature extraction
# take about a quarter of the CPU time of two threads (which mostly wait on each other), and the
# demo's numbers do not depend on the core count (floating-point sums split differently across threads).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PREDICT_ARM = "student-feature"        # the distilled student answers the example question
EXAMPLE_TYPES = ("what", "where", "how", "when", "who")   # the example question's type, in this preference


class DemoPlan:
    """The demo's folders, files and settings: the command line (`args`) resolved against the config
    (a UserError for a bad config, override or size)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from vqakd.core.config import load_config

        config = load_config(args.cfg, list(args.overrides))
        # Without --out, the study writes below the config's own output_dir (before --set).
        self.default_output_dir = load_config(args.cfg, []).output_dir
        self.data_dir = args.data_dir or os.path.dirname(config.data.vocab) or "."
        self.prepared = {key: self.data_file(name) for key, name in DATA_FILES.items()}
        # --set data.<key>=<path> for each config data path that is not already the one in data_dir
        self.overrides = [f"data.{key}={path}" for key, path in self.prepared.items()
                          if os.path.normpath(getattr(config.data, key)) != os.path.normpath(path)]
        self.overrides += args.overrides
        self.config = config = load_config(args.cfg, self.overrides)
        for name in ("num_videos", "frame_size", "image_size", "appearance_frames", "motion_frames",
                     "training_seeds", "feature_workers"):
            least = 0 if name == "feature_workers" else 1
            if getattr(args, name) < least:
                raise UserError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
        self.args = args
        self.output_dir = config.output_dir
        self.device = args.device or config.train.device
        self.training_seeds = list(range(config.train.seed, config.train.seed + args.training_seeds))
        self.study_dir = os.path.join(self.output_dir, "study")
        self.report_json = os.path.join(self.study_dir, "report", "report.json")
        self.predict_output = os.path.join(self.output_dir, "predict_example.txt")
        self.summary_path = os.path.join(self.output_dir, "summary.json")

    def data_file(self, name: str) -> str:
        return os.path.join(self.data_dir, name)

    def video(self, clip_name: str) -> str:
        return os.path.join(self.data_dir, demo_data.VIDEO_FOLDER, f"{clip_name}.avi")

    def run_file(self, arm: str, name: str, seed: Optional[int] = None) -> str:
        """<study>/seed<S>/<arm>/<stage>/<name> of the study's run of `arm` (default: the first seed)."""
        stage = "teacher" if arm.startswith("teacher") else "student"
        seed = self.training_seeds[0] if seed is None else seed
        return os.path.join(self.study_dir, f"seed{seed}", arm, stage, name)

    @cached_property
    def example(self) -> dict:
        """The question predict.py is asked: the first test question (by id) of the first type in
        EXAMPLE_TYPES that the test split has, chosen before any model is trained."""
        records = sorted(read_json(self.data_file("test_qa.json")), key=lambda record: record["id"])
        mapping = load_msvd_mapping(self.data_dir)
        for qtype in EXAMPLE_TYPES:
            for record in records:
                if question_type(record["question"]) == qtype and record["video_id"] in mapping:
                    return {"video": self.video(mapping[record["video_id"]]), "question": record["question"],
                            "truth": record["answer"]}
        raise UserError(f"{display_path(self.data_file('test_qa.json'))}: no test question to ask predict.py")


def build_steps(plan: DemoPlan) -> list[Step]:
    from vqakd.core.config import override_key      # here: it imports torch (DemoPlan loads it first)

    script = lambda *parts: os.path.join(REPO_ROOT, *parts)  # noqa: E731
    annotations = [plan.data_file(f"{split}_qa.json") for split in SPLITS] + [plan.data_file("youtube_mapping.txt")]

    def videos() -> list[str]:
        """The clips youtube_mapping.txt lists (a UserError while it does not exist)."""
        return [plan.video(name) for _, name in sorted(load_msvd_mapping(plan.data_dir).items())]

    glove_txt = plan.data_file(demo_data.GLOVE_FILENAME)
    glove_pkl = os.path.splitext(glove_txt)[0] + ".pkl"
    args = plan.args
    no_progress = ["--no-progress"] if args.quiet else []
    steps = [
        Step("dataset", script("preprocess", "make_demo_dataset.py"),
             ["--out", plan.data_dir, "--seed", str(args.seed), "--num-videos", str(args.num_videos),
              "--frame-size", str(args.frame_size)],
             lambda: [], lambda: annotations + [plan.data_file("dataset_info.json"), glove_txt] + videos(),
             plan.data_dir, show_args=["--quiet"] if args.quiet else []),
        Step("glove", script("txt2pickle.py"), ["--glove", glove_txt, "--out", glove_pkl],
             lambda: [glove_txt], lambda: [glove_pkl], plan.data_dir, show_args=no_progress),
        # --mode all: train first (it builds the vocabulary and stores the GloVe matrix), then val and test.
        Step("questions", script("preprocess", "preprocess_questions.py"),
             ["--dataset", DATASET, "--annotation-dir", plan.data_dir, "--out-dir", plan.data_dir,
              "--glove", glove_pkl, "--mode", "all"],
             lambda: annotations + [glove_pkl],
             lambda: [plan.prepared["vocab"]] + [plan.data_file(f"{DATASET}_{split}_{kind}") for split in SPLITS
                                                 for kind in ("questions.pt", "summary.json")],
             plan.data_dir, show_args=no_progress),
    ]
    for kind, model, frames in (("appearance", "resnet101", args.appearance_frames),
                                ("motion", "resnext101", args.motion_frames)):
        out = plan.prepared[f"{kind}_feat"]

        def restart(resuming: bool, out: str = out) -> list[str]:
            # Same inputs as the interrupted run: the script resumes from <out>.parts by itself.
            started = os.path.exists(out) or os.path.exists(out + ".parts")
            return ["--overwrite"] if started and not resuming else []

        steps.append(Step(
            f"features {kind}", script("preprocess", "preprocess_features.py"),
            ["--dataset", DATASET, "--video-dir", plan.data_dir, "--annotation-dir", plan.data_dir,
             "--model", model, "--random-weights", "--num-clips", str(plan.config.model.num_nodes),
             "--frames-per-clip", str(frames), "--image-height", str(args.image_size),
             "--image-width", str(args.image_size), "--device", plan.device, "--out", out],
            lambda: annotations + videos(), lambda out=out: [out, out + ".failures.json"], plan.data_dir,
            # Decoding processes change the speed, not the features: not compared.
            show_args=["--num-workers", str(args.feature_workers)] + no_progress,
            restart_args=restart, env=ONE_THREAD))

    # The study names its runs' folders: output_dir is not passed on.
    config_sets = [part for override in plan.overrides if override_key(override) != "output_dir"
                   for part in ("--set", override)]
    same_study = os.path.normpath(plan.output_dir) == os.path.normpath(plan.default_output_dir)
    out_args = [] if same_study else ["--out", plan.study_dir]

    def restart_study(resuming: bool) -> list[str]:
        # The study reuses a finished run whose settings match, whatever features it was trained
        # on: when the inputs changed, its runs must go (an interrupted study resumes by itself).
        if not resuming and os.path.isdir(plan.study_dir):
            print(f"inputs changed: removing {display_path(plan.study_dir)}", flush=True)
            shutil.rmtree(plan.study_dir)
        return []

    steps.append(Step(
        "study", script("study.py"),
        ["--cfg", args.cfg, "--seeds", str(len(plan.training_seeds)), "--arms", ",".join(ARMS), *out_args,
         "--device", plan.device, *config_sets],
        lambda: [args.cfg, *plan.prepared.values()],
        lambda: [plan.report_json] + [plan.run_file(arm, name, seed) for seed in plan.training_seeds for arm in ARMS
                                      for name in ("best.pt", "results.json", EVAL_FILE)],
        plan.output_dir, show_args=["--set", "train.progress=false"] if args.quiet else [],
        restart_args=restart_study, env=ONE_THREAD))
    best = plan.run_file(PREDICT_ARM, "best.pt")
    steps.append(Step(      # the example question is read once the dataset is written
        "predict", script("predict.py"), lambda: ["--checkpoint", best, "--video", plan.example["video"],
                                                  "--question", plan.example["question"], "--device", plan.device],
        lambda: [best, plan.example["video"]], lambda: [plan.predict_output], plan.output_dir,
        stdout_path=plan.predict_output, env=ONE_THREAD))
    summary_inputs = [plan.data_file("dataset_info.json"), plan.data_file("train_qa.json"),
                      plan.data_file("test_qa.json"), plan.report_json, plan.predict_output]
    steps.append(Step("summary", None, [], lambda: summary_inputs, lambda: [plan.summary_path], plan.output_dir))
    return steps


def write_summary(plan: DemoPlan, runner: Runner, predict_command: str, started: str) -> None:
    majority = read_json(plan.data_file("dataset_info.json"))["majority_rate"]["test"]
    blind = demo_data.question_only_rates(read_json(plan.data_file("train_qa.json")),
                                          read_json(plan.data_file("test_qa.json")))
    report = read_json(plan.report_json)
    seeds = report["seeds"]
    summary: dict = {
        "majority_rate": majority["overall"],
        "majority_per_type": {qtype: entry["rate"] for qtype, entry in majority["per_type"].items()},
        "majority_answer": majority["overall_answer"],
        "question_only_rate": blind["overall"],
        "question_only_per_type": blind["per_type"],
        "seeds": seeds,
        "arms": {},
    }
    for arm in ARMS:
        entry = report["arms"][arm]
        runs = [entry["seeds"][str(seed)] for seed in seeds]
        summary["test_questions"] = runs[0]["count"]
        per_type = {qtype: values for qtype, values in entry["per_type"].items() if values["count"]}
        summary["arms"][arm] = {
            "note": entry["note"], "distill": entry["distill"], "graph_layers": entry["graph_layers"],
            "params": entry["params"],
            # Means and sample standard deviations over the seeds (the study's report computes them).
            "accuracy": entry["accuracy"]["mean"], "accuracy_std": entry["accuracy"]["std"],
            "accuracy_per_seed": {str(seed): run["accuracy"] for seed, run in zip(seeds, runs)},
            "per_type": {qtype: values["mean"] for qtype, values in per_type.items()},
            "per_type_std": {qtype: values["std"] for qtype, values in per_type.items()},
            "per_type_counts": {qtype: values["count"] for qtype, values in per_type.items()},
            "ms_per_question": entry["ms_per_question"]["mean"] if entry["ms_per_question"] else None,
            "best_epoch": {str(seed): run["epoch"] for seed, run in zip(seeds, runs)},
            "val_accuracy": entry["val_accuracy"]["mean"],
            "checkpoints": [display_path(plan.run_file(arm, "best.pt", seed)) for seed in seeds],
        }
    # Each arm against the student trained alone, seed by seed (the report's paired differences).
    paired_keys = ("baseline", "seeds", "mean", "std", "n", "interval", "verdict")
    summary["paired"] = {arm: {key: values[key] for key in paired_keys}
                         for arm, values in report["paired"].items() if arm in ARMS}
    for key, rate in (("above_majority", "majority_rate"), ("above_question_only", "question_only_rate")):
        summary[key] = {arm: summary["arms"][arm]["accuracy"] - summary[rate] for arm in ARMS}
    summary["not_carried"] = demo_table.not_carried(summary)
    timing = read_json(plan.run_file("teacher", "timing_test.json"))
    summary["timing"] = {"device": timing["device"], "batch_size": timing["batch_size"], "passes": timing["passes"],
                         "method": "measured by study.py: best.pt evaluated on the test split, one warm-up pass, "
                                   "then the median of the timed passes divided by the number of test questions"}
    args = plan.args
    summary["features"] = {"random_weights": report["features"]["random_weights"],
                           "num_clips": plan.config.model.num_nodes, "image_size": args.image_size,
                           "appearance_frames_per_clip": args.appearance_frames,
                           "motion_frames_per_clip": args.motion_frames}
    with open(plan.predict_output, encoding="utf-8") as handle:       # the first of its ranked answers
        top = next(filter(None, (re.match(r"^\s+\d+\. (\S+)\s+([0-9.]+)\s*$", line) for line in handle)), None)
    if top is None:
        raise UserError(f"{display_path(plan.predict_output)}: no ranked answers in predict.py's output")
    example = plan.example
    summary["prediction"] = {"command": predict_command,
                             "checkpoint": display_path(plan.run_file(PREDICT_ARM, "best.pt")),
                             "video": display_path(example["video"]), "question": example["question"],
                             "truth": example["truth"], "answer": top[1], "probability": float(top[2]),
                             "correct": top[1] == example["truth"]}
    summary["step_seconds"] = {name: round(seconds, 2) for name, status, seconds in runner.times if status == "ran"}
    summary["step_cpu_seconds"] = {name: round(seconds, 2) for name, seconds in runner.cpu.items()}
    summary["provenance"] = provenance_for_config(plan.config, started=started, device=timing["device"])
    write_json(plan.summary_path, summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vqakd.demo", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1] + "\nA tiny run (a smoke test in a minute): --num-videos 10 "
               "--frame-size 32 --set model.num_nodes=2 --set train.epochs=1 --set model.module_dim=16\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", default=display_path(DEFAULT_CONFIG),
                        help="training config (its model.num_nodes is the number of clips per video); default %(default)s")
    parser.add_argument("--data-dir", default=None,
                        help="folder of the demo dataset and its preprocessed files (default: the folder of the "
                             "config's data.vocab, data/demo)")
    parser.add_argument("--device", default=None,
                        help="auto, cpu, cuda or cuda:N for features, training and timing (default: the "
                             "config's train.device, cpu)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to train.py and validate.py, e.g. --set train.epochs=2 "
                             "(repeatable; output_dir and model.num_nodes apply to the whole demo)")
    for flag, default, text in (
            ("--num-videos", demo_data.DEFAULT_NUM_VIDEOS, "demo videos"),
            ("--seed", 0, "seed of the demo dataset"),
            ("--training-seeds", DEFAULT_TRAINING_SEEDS,
             "seeds each arm is trained with (the config's train.seed and the next ones); the table shows "
             "mean ± std over them"),
            ("--frame-size", demo_data.DEFAULT_FRAME_SIZE, "side of the generated video frames in pixels"),
            ("--image-size", IMAGE_SIZE, "frame side the feature networks see (224/112 for real data)"),
            ("--appearance-frames", APPEARANCE_FRAMES_PER_CLIP,
             "frames per clip for the appearance features (16 for real data)"),
            ("--motion-frames", MOTION_FRAMES_PER_CLIP,
             "frames per clip for the motion features (16 for real data)"),
            ("--feature-workers", FEATURE_WORKERS,
             "video decoding processes of the feature extraction (0: decode in the main process)")):
        parser.add_argument(flag, type=int, default=default, help=text + "; default %(default)s")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars; each step's output goes to <output_dir>/demo_logs/<step>.log")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    plan = DemoPlan(args)
    ensure_writable_dir(plan.data_dir, "demo data folder")
    ensure_writable_dir(plan.output_dir, "demo output folder")
    steps = build_steps(plan)
    predict = next(step for step in steps if step.name == "predict")
    runner = Runner(args.quiet, os.path.join(plan.output_dir, "demo_logs"))
    started_utc = utc_now()
    steps[-1].action = lambda: write_summary(plan, runner, predict.command_line([]), started_utc)
    print(f"vqakd demo: data in {display_path(plan.data_dir)}, results in {display_path(plan.output_dir)}; "
          f"'python' below is {sys.executable}", flush=True)
    started = time.perf_counter()
    for number, step in enumerate(steps, 1):
        runner.run(step, number, len(steps))

    summary = read_json(plan.summary_path)
    print("\ntime per step (wall / CPU): " + ", ".join(
        f"{name} {seconds:.1f} s" + (" (skipped)" if status == "skipped" else f" / {runner.cpu.get(name, 0):.1f} s")
        for name, status, seconds in runner.times))
    print(f"demo finished in {time.perf_counter() - started:.1f} s\n")
    print(demo_table.format_table(summary))
    print(f"summary: {display_path(plan.summary_path)}; the study's report: "
          f"{display_path(os.path.join(plan.study_dir, 'report', 'report.md'))}\n")
    example = summary["prediction"]
    verdict = "right" if example["correct"] else "wrong"
    print(f"asked the distilled student ({example['command']}):")
    print(f"{example['video']}: {example['question']}\n"
          f"  {PREDICT_ARM} answers {example['answer']!r} (probability {example['probability']:.2f}); "
          f"the truth is {example['truth']!r}: {verdict}")
    return 0
