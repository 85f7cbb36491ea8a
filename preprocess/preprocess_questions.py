"""Encode MSVD-QA / MSRVTT-QA questions into HCRN / DualVGR-format vocab and question files.

    python preprocess/preprocess_questions.py --dataset msvd-qa --annotation-dir <folder with
        {train,val,test}_qa.json> --out-dir data/msvd-qa --glove data/glove/glove.840.300d.pkl --mode all

The train split builds `{name}_vocab.json` (and the GloVe matrix, from the pickle or the `.txt`);
val and test are encoded with it, so they need train done first (`--mode all` runs all three).
The files hold the original code's keys and values (docs/method.md#question-files).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))     # the repository root
from vqakd.core.errors import interruptible_imports, require_file, run_cli  # noqa: E402
from vqakd.core.script import prepare_script  # noqa: E402

if __name__ == "__main__":
    prepare_script(modules=("numpy", "tqdm", "nltk"))

with interruptible_imports():       # numpy, nltk and tqdm take a moment: Ctrl-C there is a clean exit too
    from vqakd.core.files import expand_template
    from vqakd.core.locks import guard_outputs
    from vqakd.data.annotations import DATASETS, SPLITS, qa_path
    from vqakd.data.questions import format_summary, preprocess_split
    from vqakd.data.vocab import DEFAULT_ANSWER_TOP


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--annotation-dir", "--annotation_dir", required=True,
                        help="folder with {train,val,test}_qa.json (and youtube_mapping.txt for MSVD-QA)")
    parser.add_argument("--out-dir", "--out_dir", default=None, help="output folder (default: data/<dataset>)")
    parser.add_argument("--glove", "--glove-pt", "--glove_pt", default="data/glove/glove.840.300d.pkl",
                        help="GloVe pickle from txt2pickle.py, or the GloVe .txt file (train only; "
                             "default: %(default)s)")
    parser.add_argument("--no-glove", action="store_true",
                        help="store no GloVe matrix (the model then keeps its random word embedding)")
    parser.add_argument("--mode", default="all", choices=SPLITS + ("all",),
                        help="split to encode (default: %(default)s)")
    parser.add_argument("--answer-top", "--answer_top", type=int, default=DEFAULT_ANSWER_TOP,
                        help="answer vocabulary size, besides <UNK0>/<UNK1> (default: %(default)s)")
    parser.add_argument("--output-pt", "--output_pt", default=None,
                        help="question file path template: {dataset} and {split} are filled in, and "
                             "HCRN-style '{}' placeholders get (dataset, dataset, split)")
    parser.add_argument("--vocab-json", "--vocab_json", default=None,
                        help="vocab file path template: {dataset} is filled in, and HCRN-style '{}' "
                             "placeholders get (dataset, dataset)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.answer_top < 0:
        parser.error("--answer-top must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    splits = SPLITS if args.mode == "all" else (args.mode,)
    out_dir = args.out_dir or os.path.join("data", args.dataset)
    vocab_file = (expand_template(args.vocab_json, "--vocab-json", (args.dataset, args.dataset),
                                  dataset=args.dataset)
                  if args.vocab_json else os.path.join(out_dir, f"{args.dataset}_vocab.json"))

    def output(split: str) -> str:
        if args.output_pt:
            return expand_template(args.output_pt, "--output-pt", (args.dataset, args.dataset, split),
                                   dataset=args.dataset, split=split)
        return os.path.join(out_dir, f"{args.dataset}_{split}_questions.pt")

    def summary(split: str) -> str:
        return os.path.join(os.path.dirname(output(split)), f"{args.dataset}_{split}_summary.json")

    glove = None if args.no_glove else args.glove
    inputs = {f"the {split} annotation file": qa_path(args.annotation_dir, split) for split in splits}
    inputs["the youtube_mapping.txt file"] = os.path.join(args.annotation_dir, "youtube_mapping.txt")
    outputs = [(f"--output-pt ({split} split)", output(split)) for split in splits]
    outputs += [(f"the {split} summary", summary(split)) for split in splits]
    if "train" in splits:
        inputs["--glove"] = glove
        outputs.append(("--vocab-json", vocab_file))
    else:
        inputs["--vocab-json (the vocabulary of the train split)"] = vocab_file
    with guard_outputs(inputs, outputs, hint="put {split} in the --output-pt template, or run one --mode at a time"):
        if "train" in splits and glove is not None:
            require_file(glove, "GloVe file", "make it with `python txt2pickle.py`, pass the GloVe .txt file "
                         "itself, or use --no-glove")
        for split in splits:
            result = preprocess_split(args.dataset, args.annotation_dir, split, output(split), vocab_file,
                                      summary(split), glove_source=glove, answer_top=args.answer_top,
                                      progress=not args.no_progress)
            print(format_summary(result), flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
