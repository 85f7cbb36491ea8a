"""The whole toolkit on the synthetic demo dataset, with the commands a user would type.

    python -m vqakd.demo                       # what `make demo` runs
    python -m vqakd.demo --quiet --device cpu  # step output to log files, only the results shown

Steps (each printed as the command line it runs, then run with this Python as a subprocess):

     1. preprocess/make_demo_dataset.py   videos of moving shapes + MSVD-QA-style annotations + GloVe text
     2. txt2pickle.py                     the demo GloVe text file -> pickle
     3. preprocess/preprocess_questions.py --mode all (train, which builds the vocabulary, then val, test)
   4-5. preprocess/preprocess_features.py --model resnet101 / resnext101 --random-weights (small images,
        few clips: nothing is downloaded, so the networks keep their random initialisation)
   6-7. train.py --stage teacher, then --stage student (distilled from the teacher)
   8-9. validate.py on the test split for both best.pt
    10. the summary: a table (parameters, test accuracy overall and per question type, the
        majority-answer rate, inference ms per question) and <output_dir>/summary.json

Running it again reuses what is done. Every step records in `demo_state.json` (in the data
folder for steps 1-5, in the output folder for 6-10) a fingerprint of its command and of the
contents of the files it reads, and the sha256 of the files it wrote; a step whose fingerprint
and outputs are unchanged is skipped. A step that was interrupted is continued with the
script's own resume (`train.py --resume`; feature extraction resumes from its parts folder); a
step whose inputs changed starts afresh (`--overwrite`). Flags that only change what is shown
(progress bars) are not part of the fingerprint. The scripts' code is not either: after changing
the scene design in vqakd/demo_scenes.py, start afresh with `make clean`.

Inference time per question is measured here, not by validate.py (which does not time itself):
both best.pt are loaded, the test split is evaluated once to warm up and then TIMING_PASSES
times, and the median pass time divided by the number of test questions is reported (batch size
train.eval_batch_size, on the training device). The accuracy of those passes is checked
against validate.py's eval_test.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional

from vqakd.annotations import SPLITS
from vqakd.config import STAGES
from vqakd import demo_data
from vqakd.demo_data import QUESTION_TYPES
from vqakd.demo_steps import Runner, Step, StateFile, display_path
from vqakd.errors import UserError, run_cli
from vqakd.io import ensure_writable_dir, read_json, write_json
from vqakd.provenance_run import provenance_for_config, utc_now

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.yml")
# The demo data is written in the MSVD-QA layout, so every script runs with --dataset msvd-qa
# and names its outputs msvd-qa_* (configs/demo.yml points at those names).
DATASET = "msvd-qa"
DEFAULT_SEED = 0
# Feature extraction settings, sized for a 2-core CPU. Random-weight features keep the global
# make-up of a frame (vqakd/demo_scenes.py), which 32x32 frames show as well as 224x224 ones.
IMAGE_SIZE = 32
APPEARANCE_FRAMES_PER_CLIP = 4
MOTION_FRAMES_PER_CLIP = 8      # a 3D ResNeXt clip: enough frames to see a shape move
FEATURE_WORKERS = 1             # one decoding process beside the network on two cores
TIMING_PASSES = 5
SUMMARY_FILE = "summary.json"


# ----------------------------------------------------------------------------------- settings

@dataclass
class DemoPlan:
    config_path: str
    data_dir: str
    output_dir: str
    device: str
    overrides: list[str]            # --set passed to train.py / validate.py
    num_videos: int
    seed: int
    frame_size: int
    num_clips: int
    image_size: int
    appearance_frames: int
    motion_frames: int
    feature_workers: int
    quiet: bool

    def data_file(self, name: str) -> str:
        return os.path.join(self.data_dir, name)

    @property
    def vocab(self) -> str:
        return self.data_file(f"{DATASET}_vocab.json")

    def questions(self, split: str) -> str:
        return self.data_file(f"{DATASET}_{split}_questions.pt")

    def features(self, kind: str) -> str:
        return self.data_file(f"{DATASET}_{kind}_feat.h5")

    @property
    def glove_txt(self) -> str:
        return self.data_file(demo_data.GLOVE_FILENAME)

    @property
    def glove_pkl(self) -> str:
        return os.path.splitext(self.glove_txt)[0] + ".pkl"

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.output_dir, stage)


def data_overrides(config, data_dir: str) -> list[str]:
    """`--set data.<key>=<path>` for each config data path that is not already the one in `data_dir`."""
    wanted = {"vocab": f"{DATASET}_vocab.json",
              **{f"{split}_questions": f"{DATASET}_{split}_questions.pt" for split in SPLITS},
              "appearance_feat": f"{DATASET}_appearance_feat.h5", "motion_feat": f"{DATASET}_motion_feat.h5"}
    overrides = []
    for key, name in wanted.items():
        path = os.path.join(data_dir, name)
        if os.path.normpath(getattr(config.data, key)) != os.path.normpath(path):
            overrides.append(f"data.{key}={path}")
    return overrides


def make_plan(args: argparse.Namespace) -> DemoPlan:
    from vqakd.config import load_config

    config = load_config(args.cfg, list(args.overrides))
    data_dir = args.data_dir or os.path.dirname(config.data.vocab) or "."
    overrides = data_overrides(config, data_dir) + list(args.overrides)
    config = load_config(args.cfg, overrides)
    for name in ("num_videos", "frame_size", "image_size", "appearance_frames", "motion_frames"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.feature_workers < 0:
        raise UserError(f"--feature-workers must be >= 0, got {args.feature_workers}")
    return DemoPlan(config_path=args.cfg, data_dir=data_dir, output_dir=config.output_dir,
                    device=args.device or config.train.device, overrides=overrides, num_videos=args.num_videos,
                    seed=args.seed, frame_size=args.frame_size, num_clips=config.model.num_nodes,
                    image_size=args.image_size, appearance_frames=args.appearance_frames,
                    motion_frames=args.motion_frames, feature_workers=args.feature_workers, quiet=args.quiet)


# ----------------------------------------------------------------------------------- the steps

def video_files(plan: DemoPlan) -> list[str]:
    """The clips youtube_mapping.txt lists (raises UserError while it does not exist)."""
    from vqakd.annotations import load_msvd_mapping

    mapping = load_msvd_mapping(plan.data_dir)
    return [os.path.join(plan.data_dir, demo_data.VIDEO_FOLDER, f"{name}.avi") for _, name in sorted(mapping.items())]


def build_steps(plan: DemoPlan) -> list[Step]:
    script = lambda *parts: os.path.join(REPO_ROOT, *parts)  # noqa: E731
    data_state = StateFile(plan.data_dir)
    # One object per file: two would overwrite each other's entries when both folders are the same.
    same_folder = os.path.abspath(plan.data_dir) == os.path.abspath(plan.output_dir)
    out_state = data_state if same_folder else StateFile(plan.output_dir)
    annotations = [plan.data_file(f"{split}_qa.json") for split in SPLITS] + [plan.data_file("youtube_mapping.txt")]
    quiet = plan.quiet
    steps = [
        Step("dataset", script("preprocess", "make_demo_dataset.py"),
             ["--out", plan.data_dir, "--seed", str(plan.seed), "--num-videos", str(plan.num_videos),
              "--frame-size", str(plan.frame_size)],
             lambda: [],
             lambda: annotations + [plan.data_file("dataset_info.json"), plan.glove_txt] + video_files(plan),
             data_state, show_args=["--quiet"] if quiet else []),
        Step("glove", script("txt2pickle.py"), ["--glove", plan.glove_txt, "--out", plan.glove_pkl],
             lambda: [plan.glove_txt], lambda: [plan.glove_pkl], data_state,
             show_args=["--no-progress"] if quiet else []),
    ]
    # --mode all: train first (it builds the vocabulary and stores the GloVe matrix), then val and test.
    steps.append(Step(
        "questions", script("preprocess", "preprocess_questions.py"),
        ["--dataset", DATASET, "--annotation-dir", plan.data_dir, "--out-dir", plan.data_dir,
         "--glove", plan.glove_pkl, "--mode", "all"],
        lambda: annotations + [plan.glove_pkl],
        lambda: [plan.vocab] + [plan.data_file(f"{DATASET}_{split}_{kind}") for split in SPLITS
                                for kind in ("questions.pt", "summary.json")],
        data_state, show_args=["--no-progress"] if quiet else []))
    for kind, model, frames in (("appearance", "resnet101", plan.appearance_frames),
                                ("motion", "resnext101", plan.motion_frames)):
        out = plan.features(kind)

        def restart(resuming: bool, out: str = out) -> list[str]:
            # Same inputs as the interrupted run: the script resumes from <out>.parts by itself.
            started = os.path.exists(out) or os.path.exists(out + ".parts")
            return ["--overwrite"] if started and not resuming else []

        steps.append(Step(
            f"features {kind}", script("preprocess", "preprocess_features.py"),
            ["--dataset", DATASET, "--video-dir", plan.data_dir, "--annotation-dir", plan.data_dir,
             "--model", model, "--random-weights", "--num-clips", str(plan.num_clips),
             "--frames-per-clip", str(frames), "--image-height", str(plan.image_size),
             "--image-width", str(plan.image_size), "--device", plan.device, "--out", out],
            lambda: annotations + video_files(plan), lambda out=out: [out, out + ".failures.json"], data_state,
            # Decoding processes change the speed, not the features: not fingerprinted.
            show_args=["--num-workers", str(plan.feature_workers)] + (["--no-progress"] if quiet else []),
            restart_args=restart))

    config_sets = []
    for override in plan.overrides:
        config_sets += ["--set", override]
    train_inputs = [plan.config_path, plan.vocab, *(plan.questions(split) for split in SPLITS),
                    plan.features("appearance"), plan.features("motion")]
    progress_off = ["--set", "train.progress=false"] if quiet else []
    for stage in STAGES:
        folder = plan.stage_dir(stage)
        reads = train_inputs + ([os.path.join(plan.stage_dir("teacher"), "best.pt")] if stage == "student" else [])

        def restart(resuming: bool, folder: str = folder) -> list[str]:
            if not os.path.exists(os.path.join(folder, "last.pt")):
                return []
            return ["--resume"] if resuming else ["--overwrite"]

        steps.append(Step(
            f"train {stage}", script("train.py"),
            ["--cfg", plan.config_path, "--stage", stage, "--device", plan.device, *config_sets],
            lambda reads=reads: reads,
            lambda folder=folder: [os.path.join(folder, name) for name in ("best.pt", "last.pt", "results.json")],
            out_state, show_args=progress_off, restart_args=restart))
    for stage in STAGES:
        checkpoint = os.path.join(plan.stage_dir(stage), "best.pt")
        eval_json = os.path.join(plan.stage_dir(stage), "eval_test.json")
        steps.append(Step(
            f"validate {stage}", script("validate.py"),
            ["--cfg", plan.config_path, "--checkpoint", checkpoint, "--split", "test", "--write-preds",
             "--device", plan.device, *config_sets],
            lambda reads=train_inputs + [checkpoint]: reads,
            lambda eval_json=eval_json: [eval_json, os.path.splitext(eval_json)[0] + "_preds.csv"],
            out_state, show_args=progress_off))
    summary_path = os.path.join(plan.output_dir, SUMMARY_FILE)
    summary_inputs = [plan.data_file("dataset_info.json"), plan.config_path, plan.vocab, plan.questions("test"),
                      plan.features("appearance"), plan.features("motion")]
    for stage in STAGES:
        summary_inputs += [os.path.join(plan.stage_dir(stage), name) for name in ("best.pt", "eval_test.json")]
    steps.append(Step("summary", None, [f"timing passes {TIMING_PASSES}", f"device {plan.device}"],
                      lambda: summary_inputs, lambda: [summary_path], out_state))
    return steps


# ----------------------------------------------------------------------------------- summary

def time_inference(plan: DemoPlan) -> dict:
    """Per stage: median seconds of one pass over the test split, and that pass's accuracy."""
    import torch

    from vqakd.checkpoint import load_checkpoint, model_from_checkpoint
    from vqakd.config import eval_batch_size, load_config
    from vqakd.data import load_data, make_loader
    from vqakd.device import resolve_device
    from vqakd.engine import evaluate

    config = load_config(plan.config_path, plan.overrides)
    device = resolve_device(plan.device)
    bundle = load_data(config, splits=("test",), device=device, progress=False)
    split = bundle.splits["test"]
    batch_size = eval_batch_size(config)
    loader = make_loader(split, bundle.table, batch_size, False, config.train.seed, 0, False)
    timings = {}
    for stage in STAGES:
        path = os.path.join(plan.stage_dir(stage), "best.pt")
        model = model_from_checkpoint(load_checkpoint(path), path, device)
        summary, _ = evaluate(model, loader, device)          # warm-up (and the accuracy check)
        passes = []
        for _ in range(TIMING_PASSES):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            evaluate(model, loader, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            passes.append(time.perf_counter() - started)
        timings[stage] = {"pass_seconds": statistics.median(passes), "questions": len(split),
                          "accuracy": summary["accuracy"]}
    timings["setup"] = {"device": str(device), "batch_size": batch_size, "passes": TIMING_PASSES,
                        "threads": torch.get_num_threads()}
    return timings


def build_summary(plan: DemoPlan, step_times: list[tuple[str, str, float]]) -> dict:
    info = read_json(plan.data_file("dataset_info.json"))
    majority = info["majority_rate"]["test"]
    timings = time_inference(plan)
    blind = demo_data.question_only_rates(read_json(plan.data_file("train_qa.json")),
                                          read_json(plan.data_file("test_qa.json")))
    summary: dict = {
        "majority_rate": majority["overall"],
        "majority_per_type": {qtype: entry["rate"] for qtype, entry in majority["per_type"].items()},
        "majority_answer": majority["overall_answer"],
        "question_only_rate": blind["overall"],
        "question_only_per_type": blind["per_type"],
        "test_questions": timings["teacher"]["questions"],
    }
    for stage in STAGES:
        evaluation = read_json(os.path.join(plan.stage_dir(stage), "eval_test.json"))
        results = read_json(os.path.join(plan.stage_dir(stage), "results.json"))
        timed = timings[stage]
        if abs(timed["accuracy"] - evaluation["accuracy"]) > 1e-9:
            print(f"warning: {stage}: the timing passes scored {timed['accuracy']:.4f}, validate.py "
                  f"{evaluation['accuracy']:.4f}", file=sys.stderr)
        summary[stage] = {
            "params": evaluation["params"],
            "accuracy": evaluation["accuracy"],
            "per_type": {qtype: evaluation["per_type"][qtype]["accuracy"] for qtype in QUESTION_TYPES
                         if qtype in evaluation["per_type"]},
            "ms_per_question": 1000.0 * timed["pass_seconds"] / timed["questions"],
            "per_type_counts": {qtype: {"correct": evaluation["per_type"][qtype]["correct"],
                                        "count": evaluation["per_type"][qtype]["count"]}
                                for qtype in QUESTION_TYPES if qtype in evaluation["per_type"]},
            "graph_layers": results["model_config"]["graph_layers"],
            "best_epoch": results["epoch"],
            "val_accuracy": results["val_accuracy"],
            "checkpoint": display_path(os.path.join(plan.stage_dir(stage), "best.pt")),
        }
    summary["above_majority"] = {stage: summary[stage]["accuracy"] - summary["majority_rate"] for stage in STAGES}
    summary["above_question_only"] = {stage: summary[stage]["accuracy"] - summary["question_only_rate"]
                                      for stage in STAGES}
    summary["timing"] = {**timings["setup"], "method": (
        "measured by the demo runner: best.pt evaluated on the test split, one warm-up pass, then the "
        f"median of {TIMING_PASSES} passes divided by the number of test questions")}
    summary["features"] = {"random_weights": True, "num_clips": plan.num_clips, "image_size": plan.image_size,
                           "appearance_frames_per_clip": plan.appearance_frames,
                           "motion_frames_per_clip": plan.motion_frames}
    summary["step_seconds"] = {name: round(seconds, 2) for name, status, seconds in step_times if status == "ran"}
    return summary


def format_table(summary: dict) -> str:
    teacher, student = summary["teacher"], summary["student"]

    def pct(value: Optional[float]) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    rows = [("", f"teacher (G={teacher['graph_layers']})", f"student (G={student['graph_layers']})",
             "majority answer", "question only"),
            ("parameters", f"{teacher['params']:,}", f"{student['params']:,}", "", "")]
    rows.append(("test accuracy, all", pct(teacher["accuracy"]), pct(student["accuracy"]),
                 pct(summary["majority_rate"]), pct(summary["question_only_rate"])))
    for qtype in QUESTION_TYPES:
        count = teacher["per_type_counts"].get(qtype, {}).get("count", 0)
        rows.append((f"  {qtype} ({count})", pct(teacher["per_type"].get(qtype)), pct(student["per_type"].get(qtype)),
                     pct(summary["majority_per_type"].get(qtype)),
                     pct(summary["question_only_per_type"].get(qtype))))
    rows.append(("inference ms/question", f"{teacher['ms_per_question']:.2f}", f"{student['ms_per_question']:.2f}",
                 "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [f"demo results on the test split ({summary['test_questions']} questions; features from "
             "random-weight networks)"]
    for row in rows:
        lines.append("  ".join([row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in
                                                             zip(row[1:], widths[1:])]).rstrip())
    above = summary["above_majority"]
    lines.append(f"above the majority-answer rate: teacher +{100 * above['teacher']:.1f} points, "
                 f"student +{100 * above['student']:.1f} points")
    blind = summary["above_question_only"]
    lines.append(f"above a blind guesser that reads only the question: teacher {100 * blind['teacher']:+.1f} points, "
                 f"student {100 * blind['student']:+.1f} points")
    timing = summary["timing"]
    lines.append(f"inference time: best.pt on {timing['device']} ({timing['threads']} threads), batch "
                 f"{timing['batch_size']}, median of {timing['passes']} passes over the test split")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main

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
    parser.add_argument("--num-videos", type=int, default=demo_data.DEFAULT_NUM_VIDEOS, help="demo videos; default %(default)s")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the demo dataset; default %(default)s")
    parser.add_argument("--frame-size", type=int, default=demo_data.DEFAULT_FRAME_SIZE,
                        help="side of the generated video frames in pixels; default %(default)s")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help="frame side the feature networks see (224/112 for real data); default %(default)s")
    parser.add_argument("--appearance-frames", type=int, default=APPEARANCE_FRAMES_PER_CLIP,
                        help="frames per clip for the appearance features (16 for real data); default %(default)s")
    parser.add_argument("--motion-frames", type=int, default=MOTION_FRAMES_PER_CLIP,
                        help="frames per clip for the motion features (16 for real data); default %(default)s")
    parser.add_argument("--feature-workers", type=int, default=FEATURE_WORKERS,
                        help="video decoding processes of the feature extraction (0: decode in the main process); default %(default)s")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars; each step's output goes to <output_dir>/demo_logs/<step>.log")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    ensure_writable_dir(plan.data_dir, "demo data folder")
    ensure_writable_dir(plan.output_dir, "demo output folder")
    steps = build_steps(plan)
    runner = Runner(plan.quiet, os.path.join(plan.output_dir, "demo_logs"))
    summary_path = os.path.join(plan.output_dir, SUMMARY_FILE)

    started_utc = utc_now()

    def write_summary() -> None:
        from vqakd.config import load_config

        summary = build_summary(plan, runner.times)
        # The demo's own provenance: code version, command, times, versions, config, vocabulary, features.
        summary["provenance"] = provenance_for_config(load_config(plan.config_path, plan.overrides),
                                                      started=started_utc, device=summary["timing"]["device"])
        write_json(summary_path, summary)

    steps[-1].action = write_summary
    print(f"vqakd demo: data in {display_path(plan.data_dir)}, results in {display_path(plan.output_dir)}; "
          f"'python' below is {sys.executable}", flush=True)
    started = time.perf_counter()
    for number, step in enumerate(steps, 1):
        runner.run(step, number, len(steps))
    total = time.perf_counter() - started

    summary = read_json(summary_path)
    print()
    print("wall time per step: " + ", ".join(f"{name} {seconds:.1f} s" + (" (skipped)" if status == "skipped" else "")
                                             for name, status, seconds in runner.times))
    print(f"demo finished in {total:.1f} s")
    print()
    print(format_table(summary))
    print(f"summary: {display_path(summary_path)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
