"""The paper's study in one command: every arm for several seeds, then a report.

    python study.py --cfg configs/msvd_qa.yml --seeds 3
    python study.py --cfg configs/msvd_qa.yml --seeds 1,2,3 --arms teacher,student-feature --out results/study1

Arms (default: teacher, student-none, student-feature, student-logit): each is a train.py stage
with its own settings; a student distils from the teacher trained with the same seed. Every
(arm, seed) run has its own folder, <out>/seed<S>/<arm>/<stage>/, holding what train.py writes
plus the study's test evaluation (study_test.json, study_test_preds.csv). Finished runs are
reused, interrupted ones resumed: run the same command again after a crash. When every run is
finished, <out>/report/ gets report.md, report.json and PNG figures: test accuracy overall and
per question type (mean ± std over seeds, every seed's value, the published numbers),
parameters, inference ms/question, training curves, per-answer precision/recall/F1 with the
main confusions, and test questions on which the arms disagree.

Several GPUs: `torchrun --nproc_per_node=K study.py ...` trains each run on all K processes, one
run after another (as train.py does); only rank 0 writes the report.
"""

from __future__ import annotations

import argparse

from vqakd.core.errors import interruptible_imports, run_cli
from vqakd.core.script import prepare_script

ARM_NAMES = ("teacher, student-none, student-feature, student-logit (default); teacher-gatv2, "
             "student-feature-gatv2, teacher-safe, student-feature-safe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML config (configs/msvd_qa.yml, configs/msrvtt_qa.yml)")
    parser.add_argument("--seeds", default="3",
                        help="a count (3: the config's train.seed and the next ones, 666,667,668 by default) or a "
                             "comma-separated list (1,2,3; one seed: 42,)")
    parser.add_argument("--arms", default=None, help=f"comma-separated arms: {ARM_NAMES}")
    parser.add_argument("--out", default=None, help="study folder (default <output_dir>/study)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (sets train.device)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every run, e.g. --set train.epochs=10 (repeatable)")
    parser.add_argument("--overwrite", action="store_true",
                        help="retrain runs recorded with other settings instead of stopping")
    parser.add_argument("--timing-passes", type=int, default=3,
                        help="timed test passes per run for ms/question, after one warm-up (0: no timing)")
    parser.add_argument("--examples", type=int, default=8, help="disagreement examples in the report")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with interruptible_imports():
        from vqakd.core.distributed import quiet_unless_main
        from vqakd.study.runner import run_study
    # Under torchrun an error every rank hits is printed once, by rank 0.
    return quiet_unless_main(lambda: run_study(args.cfg, args.seeds, args.arms, args.out, args.device, args.overrides,
                                               args.overwrite, args.timing_passes, args.examples))


if __name__ == "__main__":
    prepare_script(build_parser(), "matplotlib", "sklearn")     # thread settings, then --help before torch loads
    run_cli(main)
