"""Write the synthetic demo dataset (moving coloured shapes, MSVD-QA layout) under --out.

    python preprocess/make_demo_dataset.py --out data/demo --seed 0

The same seed and settings always give the same files (vqakd/demo/data.py, vqakd/demo/scenes.py).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))     # the repository root
from vqakd.core.errors import interruptible_imports, run_cli  # noqa: E402
from vqakd.core.script import prepare_script  # noqa: E402

if __name__ == "__main__":
    prepare_script(modules=("numpy", "tqdm", "av"))

with interruptible_imports():
    from vqakd.demo import data as demo_data


def build_parser() -> argparse.ArgumentParser:
    defaults = demo_data.DemoSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="data/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")
    parser.add_argument("--num-videos", type=int, default=defaults.num_videos,
                        help="number of videos, split into train/val/test")
    parser.add_argument("--frame-size", type=int, default=defaults.frame_size,
                        help="frame width and height in pixels")
    parser.add_argument("--fps", type=int, default=defaults.fps, help="frames per second")
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="video length")
    parser.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                        default=list(defaults.split_fractions),
                        help="fractions of the videos in train, val and test")
    parser.add_argument("--transient-rate", type=float, default=defaults.transient_rate,
                        help="share of videos with one shape visible in only half of the video")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = demo_data.DemoSettings(num_videos=args.num_videos, seed=args.seed, frame_size=args.frame_size,
                                      fps=args.fps, seconds=args.seconds, split_fractions=tuple(args.split),
                                      transient_rate=args.transient_rate)
    info = demo_data.write_dataset(args.out, settings, progress=not args.quiet)
    print(demo_data.format_info(info, args.out))
    return 0


if __name__ == "__main__":
    run_cli(main)
