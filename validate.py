"""Evaluate a checkpoint (ours or one of the original DualVGR/VQAKD code) on a split.

    python validate.py --cfg configs/msvd_qa.yml --checkpoint results/msvd-qa/default/student/best.pt \
        [--split test|val|train] [--write-preds] [--out eval.json]

Prints overall and per-question-type accuracy with counts and writes them as JSON (default
`<checkpoint folder>/eval_<split>.json`); `--write-preds` adds a CSV with one row per question.
Under `torchrun --nproc_per_node=K` each process evaluates a share of the split and rank 0
writes the figures of the whole split (every question counted once).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vqakd.config import load_config  # noqa: E402
from vqakd.distributed import quiet_unless_main  # noqa: E402
from vqakd.errors import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML config naming the data files")
    parser.add_argument("--checkpoint", required=True, help="a best.pt/last.pt, or an original DualVGR checkpoint")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"))
    parser.add_argument("--write-preds", action="store_true",
                        help="also write one CSV row per question (id, video, question, prediction, answer, correct)")
    parser.add_argument("--out", default=None, help="JSON output (default <checkpoint folder>/eval_<split>.json)")
    parser.add_argument("--preds-out", default=None, help="CSV output of --write-preds (default <out>_preds.csv)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (sets train.device)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set data.test_questions=... (repeatable)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun an error every rank hits is printed once, by rank 0.
    return quiet_unless_main(lambda: _main(args))


def _main(args) -> int:
    overrides = list(args.overrides)
    if args.device is not None:
        overrides.insert(0, f"train.device={args.device}")
    config = load_config(args.cfg, overrides)

    from vqakd.engine import run_validation

    run_validation(config, args.checkpoint, split=args.split, write_preds=args.write_preds, out=args.out,
                   preds_out=args.preds_out)
    return 0


if __name__ == "__main__":
    run_cli(main)
