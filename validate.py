"""Evaluate a checkpoint (ours or one of the original DualVGR/VQAKD code) on a split.

    python validate.py --cfg configs/msvd_qa.yml --checkpoint results/msvd-qa/default/student/best.pt \
        [--split test|val|train] [--write-preds] [--out eval.json]

Prints overall and per-question-type accuracy with counts and writes them as JSON (default
`<checkpoint folder>/eval_<split>.json`, with the run's provenance); `--write-preds` adds a CSV with
one row per question (its type, the predicted answer's probability and the five most probable
answers) and `<out>_answers.json`: precision, recall and F1 of the most frequent answers and the
confusion among them (scikit-learn).
Under `torchrun --nproc_per_node=K` each process evaluates a share of the split and rank 0
writes the figures of the whole split (every question counted once).
"""

import argparse

from vqakd.core.errors import run_cli
from vqakd.core.script import distributed_main, prepare_script


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML config naming the data files")
    parser.add_argument("--checkpoint", required=True, help="a best.pt/last.pt, or an original DualVGR checkpoint")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"))
    parser.add_argument("--write-preds", action="store_true",
                        help="also write one CSV row per question (id, video, question, prediction, answer, correct, "
                             "type, probability, top 5) and per-answer precision/recall/F1 (<out>_answers.json)")
    parser.add_argument("--out", default=None, help="JSON output (default <checkpoint folder>/eval_<split>.json)")
    parser.add_argument("--preds-out", default=None, help="CSV output of --write-preds (default <out>_preds.csv)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (sets train.device)")
    parser.add_argument("--plan", action="store_true",
                        help="print what the evaluation will need (host and GPU memory, feature reads), then stop "
                             "before the features are read (exit status 1 when it would not fit)")
    parser.add_argument("--other-features", action="store_true",
                        help="evaluate on feature files made otherwise than those the checkpoint was trained on "
                             "(refused without it; the differences go into the eval JSON as other_features)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.test_questions=... (repeatable; a model.* value must "
                             "equal the checkpoint's: the checkpoint defines the model)")
    return parser


def run(args) -> int:
    from vqakd.training.validation import validate_checkpoint

    result = validate_checkpoint(args.cfg, args.checkpoint, args.overrides, split=args.split,
                                 write_preds=args.write_preds, out=args.out, preds_out=args.preds_out,
                                 device=args.device, other_features=args.other_features, plan=args.plan)
    return (0 if result.fits() else 1) if args.plan else 0


main = distributed_main(build_parser, run)

if __name__ == "__main__":
    prepare_script(build_parser(), "sklearn")      # --help and flag errors answer before torch loads
    run_cli(main)
