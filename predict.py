"""Ask a trained checkpoint about any video file.

    python predict.py --checkpoint results/msvd-qa/default/student/best.pt --video clips/dog.mp4 \
        --question "what is the dog doing?"
    python predict.py --checkpoint ... --questions questions.csv --out answers.csv

One question: prints the top-k answers with their probabilities (--json: one JSON object).
Many: a CSV with the columns video,question[,id] (or JSON lines with those keys; video paths
relative to that file's folder); each distinct video is extracted once, and the answers go to
--out (.csv, or .jsonl) or stdout. Failing rows are reported and the others answered (exit 1).

The video is turned into features exactly as the checkpoint's training features were (the
checkpoint records how; older checkpoints need those settings as flags), cached under
<checkpoint folder>/predict_cache so that another question about it is answered at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from vqakd.core.errors import UserError, run_cli
from vqakd.core.script import prepare_script


def image_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", " ").split()
    try:
        values = tuple(int(part) for part in (parts * 2 if len(parts) == 1 else parts))
    except ValueError:
        values = ()
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW or one number, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a best.pt/last.pt of train.py (or an original checkpoint)")
    parser.add_argument("--video", help="the video file to ask about")
    parser.add_argument("--question", help="the question (ending with '?', as in the training data)")
    parser.add_argument("--questions", help="CSV (video,question[,id]) or JSON-lines file of many questions")
    parser.add_argument("--out", help="--questions: write the answers here (.csv or .jsonl) instead of stdout")
    parser.add_argument("--top-k", type=int, default=5, help="answers shown per question (default 5)")
    parser.add_argument("--json", action="store_true", help="JSON output (one object per question)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", help="feature cache folder (default <checkpoint folder>/predict_cache)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images (resnet101) or clips (resnext101) per forward pass of the feature networks")
    weights = parser.add_argument_group("weights files (default: the path recorded at training time, then "
                                        "data/weights/<published name>, then torchvision's cache)")
    weights.add_argument("--appearance-weights", help="ResNet-101 weights file")
    weights.add_argument("--motion-weights", help="3D ResNeXt-101 weights file")
    old = parser.add_argument_group("extraction settings, for a checkpoint that does not record them")
    old.add_argument("--vocab", help="vocabulary JSON it was trained with (default: the recorded one)")
    old.add_argument("--appearance-frames-per-clip", dest="appearance_frames", type=int)
    old.add_argument("--motion-frames-per-clip", dest="motion_frames", type=int)
    old.add_argument("--appearance-image-size", dest="appearance_size", type=image_size, metavar="HxW")
    old.add_argument("--motion-image-size", dest="motion_size", type=image_size, metavar="HxW")
    old.add_argument("--motion-normalisation", choices=("raw", "kinetics-mean"))
    old.add_argument("--random-weights", action="store_true", default=None,
                     help="the features came from randomly initialised networks (tests, the demo)")
    old.add_argument("--seed", type=int, default=None, help="seed of --random-weights (default 0)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    single = args.video is not None or args.question is not None
    if single == (args.questions is not None):
        parser.error("give either --video and --question, or --questions")
    if single and (args.video is None or args.question is None):
        parser.error("--video and --question go together")
    if args.out and not args.questions:
        parser.error("--out goes with --questions")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be at least 1")
    if args.cache_dir and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        raise UserError(f"--cache-dir {args.cache_dir} is a file; name a folder for the cached features")
    # Before any work: the answers never replace an input (the questions, the checkpoint...), go to
    # a writable folder, and one run at a time writes them (the guard every command uses).
    from vqakd.core.locks import guard_outputs

    inputs = {"--questions": args.questions, "--checkpoint": args.checkpoint, "--vocab": args.vocab,
              "--appearance-weights": args.appearance_weights, "--motion-weights": args.motion_weights}
    with guard_outputs(inputs, {"--out": args.out}, "folder of --out", file_what="answers file", log=None):
        from vqakd.core.distributed import resolve_device
        from vqakd.predict import Answerer, ExtractionFlags, format_answer
        from vqakd.predict_batch import answer_rows, read_question_rows

        rows = read_question_rows(args.questions) if args.questions else None
        if single and not os.path.isfile(args.video):
            raise UserError(f"video not found: {args.video}")
        flags = ExtractionFlags(**{field.name: getattr(args, field.name)
                                   for field in dataclasses.fields(ExtractionFlags)})
        answerer = Answerer(args.checkpoint, resolve_device(args.device), flags, cache_dir=args.cache_dir,
                            use_cache=not args.no_cache, top_k=args.top_k, batch_size=args.batch_size)
        if single:
            answer = answerer.answer(args.video, args.question)
            print(json.dumps(answer) if args.json else format_answer(answer))
            return 0
        return answer_rows(answerer, rows, args.questions, args.out, args.json)


if __name__ == "__main__":
    prepare_script(build_parser(), "torchvision", "av")     # --help and flag errors answer before torch loads
    run_cli(main)
