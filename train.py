"""Train the DualVGR teacher, then distil the one-graph-layer student.

    python train.py --cfg configs/msvd_qa.yml --stage teacher
    python train.py --cfg configs/msvd_qa.yml --stage student [--teacher <checkpoint>] [--distill feature|logit|none]

Writes `<output_dir>/<stage>/{last.pt, best.pt, metrics.csv, results.json, curves.png, config.yml,
train.log}`; `--resume` continues a stopped run exactly where it stopped.

Several GPUs / nodes (DistributedDataParallel; `train.batch_size` is the global batch, split
evenly over the processes; only global rank 0 writes):
    torchrun --nproc_per_node=4 train.py --cfg configs/msrvtt_qa.yml --stage teacher
    # on every node (same command):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=<job id> --rdzv_backend=c10d \
        --rdzv_endpoint=<host of node 0>:29500 train.py --cfg configs/msrvtt_qa.yml --stage teacher
"""

import argparse

from vqakd.core.errors import run_cli
from vqakd.core.script import ORIGINAL_FLAGS, STAGES, distributed_main, prepare_script


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML config (configs/msvd_qa.yml, configs/msrvtt_qa.yml)")
    parser.add_argument("--stage", required=True, choices=STAGES,
                        help="teacher: the 4-graph-layer DualVGR; student: the 1-graph-layer network distilled "
                             "from the teacher's best.pt (graph layers: teacher.graph_layers, student.graph_layers)")
    parser.add_argument("--teacher", default=None,
                        help="teacher checkpoint for the student stage (default: <output_dir>/teacher/best.pt)")
    parser.add_argument("--distill", default=None, choices=("feature", "logit", "none"),
                        help="student loss (sets loss.distill; default from the config: feature)")
    parser.add_argument("--resume", action="store_true", help="continue from <output_dir>/<stage>/last.pt")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing run of this stage")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (sets train.device)")
    parser.add_argument("--plan", action="store_true",
                        help="print what the run will need (host and GPU memory, feature reads) for its feature-table "
                             "mode and dtype, and the other modes, then stop before the features are read "
                             "(exit status 1 when it would not fit)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set train.lr=2e-4 (repeatable)")
    original = parser.add_argument_group("flags of the original code")
    for flag, key in ORIGINAL_FLAGS.items():
        kind = int if flag == "unit_layers" else float
        original.add_argument(f"--{flag}", type=kind, default=None, help=f"sets {key}")
    return parser


def run(args) -> int:
    from vqakd.training.run import train_stage

    original = {flag: getattr(args, flag) for flag in ORIGINAL_FLAGS}
    return train_stage(args.cfg, args.stage, args.overrides, teacher=args.teacher, distill=args.distill,
                       device=args.device, resume=args.resume, overwrite=args.overwrite, original_flags=original,
                       plan=args.plan)


main = distributed_main(build_parser, run)

if __name__ == "__main__":
    prepare_script(build_parser(), "matplotlib")      # --help and flag errors answer before torch loads
    run_cli(main)
