"""Write a small learnable VideoQA set in the formats of docs/method.md#file-formats plus a training config for it.

Used by bench/gpu_check.sh for its short `torchrun` training run (teacher, then student); the
data are the training tests' generator (tests/test_train_fixtures.py): colour / direction
questions answerable from bumps on the feature channels.

    python bench/make_tiny_data.py --out /tmp/tiny --device cuda --videos 600 --epochs 3
    torchrun --nproc_per_node=1 --standalone train.py --cfg /tmp/tiny/tiny.yml --stage teacher
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from test_train_fixtures import make_dataset, tiny_config_dict, write_config  # noqa: E402

from vqakd.core.errors import UserError, run_cli  # noqa: E402

DEFAULT_VIDEOS = 120
DEFAULT_QUESTIONS_PER_VIDEO = 6
DEFAULT_EPOCHS = 3
DEFAULT_BATCH = 32


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the data, the config and the run's results")
    parser.add_argument("--device", default="auto", help="train.device of the config (auto, cpu, cuda)")
    parser.add_argument("--videos", type=int, default=DEFAULT_VIDEOS, help="videos (2/3 train, 1/6 val, 1/6 test)")
    parser.add_argument("--questions-per-video", type=int, default=DEFAULT_QUESTIONS_PER_VIDEO)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    args = parser.parse_args(argv)
    if args.videos < 12:
        raise UserError("--videos must be at least 12 (each split needs videos)")
    out = os.path.abspath(args.out)
    data = make_dataset(os.path.join(out, "data"), videos=args.videos, questions_per_video=args.questions_per_video)
    config = tiny_config_dict(data["paths"], os.path.join(out, "results"),
                              train={"epochs": args.epochs, "batch_size": args.batch_size, "device": args.device,
                                     "lr_halve_every": max(1, args.epochs - 1)})
    path = write_config(os.path.join(out, "tiny.yml"), config)
    print(path)
    return 0


if __name__ == "__main__":
    run_cli(main)
