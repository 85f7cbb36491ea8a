"""Extract appearance (ResNet-101) or motion (3D ResNeXt-101) features of every video.

    python preprocess/preprocess_features.py --dataset msvd-qa --video-dir data/msvd-qa \\
        --annotation-dir data/msvd-qa --model resnet101 --weights data/weights/resnet101-63fe2227.pth
    python preprocess/preprocess_features.py --dataset msvd-qa --video-dir data/msvd-qa \\
        --annotation-dir data/msvd-qa --model resnext101 --weights data/weights/resnext-101-kinetics.pth

Writes `data/<dataset>/<dataset>_{appearance,motion}_feat.h5` (or `--out`) and `<out>.failures.json`;
a killed run resumes when started again. Exit status 1 when some video failed (0 with
--allow-failures), 2 for a usage or input error. Many GPUs: run it under torchrun; machines without
a shared disk: `--num-shards S --shard-index i` on each, then preprocess/merge_features.py.
"""

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))     # the repository root
from vqakd.core.errors import UserError, interruptible_imports, run_cli  # noqa: E402
from vqakd.core.script import prepare_script  # noqa: E402

if __name__ == "__main__":
    prepare_script(None, "torchvision", "av")

with interruptible_imports():       # torch takes seconds to import: Ctrl-C there is a clean exit too
    from vqakd.core.distributed import agree, is_main, quiet_unless_main, resolve_process_device, session
    from vqakd.core.files import ensure_writable_dir
    from vqakd.core.locks import guard_outputs
    from vqakd.data.annotations import DATASETS, list_videos
    from vqakd.extraction import (DEFAULT_CHUNK_VIDEOS, DEFAULT_FRAMES_PER_CLIP, DEFAULT_NUM_CLIPS,
                                  DEFAULT_RANDOM_SEED, NETWORKS, NORMALIZATIONS, PROCESS_GROUP_TIMEOUT,
                                  ExtractionSettings, Shard, make_extractor)
    from vqakd.extraction.parts import failures_report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--video-dir", "--video_dir", required=True,
                        help="folder holding the videos (or their YouTubeClips / TrainValVideo / TestVideo folders)")
    parser.add_argument("--annotation-dir", "--annotation_dir", required=True,
                        help="folder holding {train,val,test}_qa.json (and youtube_mapping.txt for MSVD-QA)")
    parser.add_argument("--model", required=True, choices=sorted(NETWORKS))
    parser.add_argument("--num-clips", "--num_clips", type=int, default=DEFAULT_NUM_CLIPS,
                        help="clips per video, N (8 for MSVD-QA, 16 for MSRVTT-QA)")
    parser.add_argument("--frames-per-clip", "--frames_per_clip", type=int, default=DEFAULT_FRAMES_PER_CLIP,
                        help="frames per clip, F (even; default 16)")
    parser.add_argument("--image-height", "--image_height", type=int,
                        help="default 224 for resnet101, 112 for resnext101. As in the original, the "
                             "resize is given (height, width) in Pillow's (width, height) order: a "
                             "non-square size gives frames --image-width rows by --image-height columns")
    parser.add_argument("--image-width", "--image_width", type=int,
                        help="see --image-height (the same by default)")
    parser.add_argument("--normalization", choices=sorted(NORMALIZATIONS), default="original",
                        help="resnet101 mean/std: 'original' (the original work's, std 0.229, 0.224, "
                             "0.224; default) or 'torchvision' (std 0.229, 0.224, 0.225)")
    parser.add_argument("--decode-past-damage", action="store_true",
                        help="skip packets the decoder rejects and go on (default: stop there, as the "
                             "original did; either way such videos are listed in <out>.failures.json)")
    parser.add_argument("--weights", default=None,
                        help="weights file (default: data/weights/<published name>, then torchvision's cache)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random initialisation (for tests; the output is marked random_weights=True)")
    parser.add_argument("--seed", type=int, default=DEFAULT_RANDOM_SEED, help="seed of --random-weights")
    parser.add_argument("--kinetics-mean", action="store_true",
                        help="resnext101: subtract the Kinetics mean RGB (default: raw 0-255, as the original work)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="float16 autocast (CUDA only)")
    precision.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--out", default=None,
                        help="output HDF5 (default data/<dataset>/<dataset>_{appearance,motion}_feat.h5)")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--gpu-id", "--gpu_id", type=int,
                        help="the original script's spelling of --device cuda:N")
    parser.add_argument("--batch-size", "--batch_size", type=int,
                        help="images (resnet101, default 128) or clips (resnext101, default 16) per forward pass")
    parser.add_argument("--num-workers", "--num_workers", type=int, default=4,
                        help="video decoding processes (0: decode in this process)")
    parser.add_argument("--chunk-videos", type=int, default=DEFAULT_CHUNK_VIDEOS,
                        help="videos per saved chunk: the most work a killed run can lose")
    parser.add_argument("--allow-failures", action="store_true",
                        help="exit with status 0 even when some videos could not be used")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output (or unfinished run) made with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--num-shards", type=int, default=1,
                        help="split the work into this many separate runs (e.g. one per machine); each "
                             "writes <out>.parts, merged afterwards by preprocess/merge_features.py")
    parser.add_argument("--shard-index", type=int, help="which of the --num-shards runs this is (0-based)")
    return parser.parse_args(argv)


def choose_device(args: argparse.Namespace):
    """--device / --gpu_id, by the rule of `resolve_process_device` (under torchrun: this rank's GPU)."""
    if args.gpu_id is not None and args.device is not None:
        raise UserError("give either --device or --gpu_id, not both")
    if args.gpu_id is not None:
        return resolve_process_device(f"cuda:{args.gpu_id}", what="--gpu_id")
    return resolve_process_device(args.device or "auto", what="--device")


def choose_shard(args: argparse.Namespace) -> Shard:
    if args.shard_index is None and args.num_shards != 1:
        raise UserError(f"--num-shards {args.num_shards} needs --shard-index (0..{args.num_shards - 1})")
    return Shard(args.num_shards, args.shard_index or 0)


def main(argv=None) -> int:
    args = parse_args(argv)
    return quiet_unless_main(lambda: extract(args))


def prepare(args: argparse.Namespace, held: contextlib.ExitStack):
    """Check the command line and the folders, list the videos, set up the extractor; the process
    that will write `<out>` locks it until `held` closes."""
    shard = choose_shard(args)
    device = choose_device(args)
    out = args.out or os.path.join("data", args.dataset, f"{args.dataset}_{NETWORKS[args.model].kind}_feat.h5")
    ensure_writable_dir(os.path.dirname(os.path.abspath(out)), "output folder")
    if not os.path.isdir(args.video_dir):
        raise UserError(f"video folder not found: {args.video_dir}")
    if not os.access(args.video_dir, os.R_OK | os.X_OK):
        raise UserError(f"video folder is not readable: {args.video_dir}")
    videos = list_videos(args.dataset, args.annotation_dir, args.video_dir)
    inputs = [("--weights", args.weights)]
    inputs += [("annotation file", os.path.join(args.annotation_dir, name))
               for name in ("train_qa.json", "val_qa.json", "test_qa.json", "youtube_mapping.txt")]
    inputs += [(f"video {video.video_id}", video.path) for video in videos]
    # Shards of --num-shards share <out>.parts by design; the run that merges owns <out>.
    held.enter_context(guard_outputs(inputs, {"--out": out, "its failure report": failures_report(out)},
                                     file_what="feature output", lock=is_main() and shard.count == 1))
    # The flags are named as the settings, but for --seed and the precision.
    precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    settings = ExtractionSettings.from_record({**vars(args), "random_seed": args.seed, "precision": precision})
    extractor = make_extractor(settings, device, args.batch_size, args.num_workers,
                               progress=not args.no_progress and is_main())
    return shard, out, videos, extractor


def extract(args: argparse.Namespace) -> int:
    # Control only (gloo); the long timeout covers the final barrier waiting for the slowest rank.
    with session(timeout=PROCESS_GROUP_TIMEOUT, control_only=True), contextlib.ExitStack() as held:
        # Every rank checks; a problem on any rank stops all of them and is printed once.
        shard, out, videos, extractor = agree(lambda: prepare(args, held), what="start-up")
        result = extractor.run(videos, out, overwrite=args.overwrite, shard=shard)
    if result is None:      # torchrun ranks other than 0: rank 0 reports
        return 0
    if not result.merged:
        print(f"shard {shard.index} of {shard.count}: {result.written} of its {result.videos} videos written, "
              f"{len(result.failures)} failed; parts in {result.output}. When every shard is done, "
              f"bring the parts folders together and run: python preprocess/merge_features.py --out {out}")
    else:
        print(written_line(result) + ("; output already complete" if result.already_complete else ""))
        if result.failures:
            print("to retry the failed videos, fix or add their files and run the same command again: a video "
                  "whose file appeared or changed is extracted again and the output re-merged (--overwrite "
                  "extracts every video again)")
    return 1 if result.failures and not args.allow_failures else 0


def written_line(result) -> str:
    """What a finished extraction (or merge) prints: videos written and failed, and where."""
    damaged = f", {len(result.damaged)} written from damaged files" if result.damaged else ""
    return (f"{result.written} videos written{damaged}, {len(result.failures)} failed (see {result.report}); "
            f"features in {result.output}")


if __name__ == "__main__":
    run_cli(main)
