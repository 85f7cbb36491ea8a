"""Feature extraction speed: the toolkit's extractor against a clip-at-a-time, decode-everything baseline.

    python bench/features.py                 # default settings (N=8, F=16, 224 / 112) on --device auto
    python bench/features.py --small         # reduced sizes for a CPU-only machine
    python bench/features.py --precision-check   # also fp16 / bf16 against fp32 (CUDA)
    python bench/features.py --torchrun 2        # also the command line: 2 torchrun ranks vs 1 process

Both paths use the same generated MSVD-like videos (mpeg4 AVI with moving content), the same
network object with random weights (speed does not depend on the weight values) and the same
numerics. The baseline does what the original preprocessing did: decode every frame of the
video to RGB, then resize and run each clip through the network on its own. The extractor
decodes only the needed frames in worker processes, batches frames across clips and videos,
and writes its resumable parts and the final HDF5 file (included in its time). The report
prints videos per second for each and their ratio, and the largest difference between the two
outputs relative to the largest feature value. With --torchrun K the command line
(preprocess/preprocess_features.py) also runs on the same videos once as one process and once
under `torchrun --nproc_per_node=K` (ranks share the GPU when there are fewer GPUs than ranks),
timed from launch to merged file (start-up included), and the two files are compared.

The videos are made and decoded with PyAV; without it the benchmark prints one skip line and
exits with status 0.
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vqakd.data.annotations import Video  # noqa: E402
from vqakd.core.distributed import resolve_device  # noqa: E402
from vqakd.extraction import ExtractionSettings, make_extractor  # noqa: E402
from vqakd.extraction.video import RESIZE_FILTER, clip_frame_indices, read_clip_frames  # noqa: E402

DEFAULT = {"videos": 32, "width": 320, "height": 240, "frames": 300, "fps": 30,
           "num_clips": 8, "frames_per_clip": 16, "resnet_size": 224, "resnext_size": 112}
SMALL = {"videos": 6, "width": 160, "height": 120, "frames": 90, "fps": 30,
         "num_clips": 4, "frames_per_clip": 4, "resnet_size": 64, "resnext_size": 64}


DISTINCT_VIDEOS = 4   # the rest are copies: decoding cost is the same, generating them is not


def make_videos(folder: str, count: int, width: int, height: int, frames: int, fps: int) -> list[Video]:
    """MSVD-like clips: a moving gradient with moving noise, so the codec has real work to do."""
    import av
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    noise = rng.integers(0, 24, (height, width * 2, 3), dtype=np.int16)
    videos = []
    for number in range(count):
        path = os.path.join(folder, f"bench{number}.avi")
        if number >= DISTINCT_VIDEOS:
            shutil.copyfile(videos[number % DISTINCT_VIDEOS].path, path)
            videos.append(Video(number, f"bench{number}", path))
            continue
        container = av.open(path, "w")
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.bit_rate = 800_000
        for index in range(frames):
            phase = index * 3 + number * 17
            image = np.stack([(xx + phase) % 256, (yy + 2 * phase) % 256, (xx + yy - phase) % 256], axis=2)
            shift = (index * 5) % width
            image = (image + noise[:, shift:shift + width]).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        container.close()
        videos.append(Video(number, f"bench{number}", path))
    return videos


def calibrate_batchnorm(extractor, video: Video, passes: int = 4) -> None:
    """Give the random network realistic activation scales, as trained weights have: BatchNorm
    statistics measured on real frames (speed is unaffected; the fp16/bf16 comparison needs it)."""
    s = extractor.settings
    clips = torch.from_numpy(read_clip_frames(video.path, s.num_clips, s.frames_per_clip,
                                              (s.image_height, s.image_width)).clips())
    inputs = clips.reshape((-1,) + clips.shape[2:]) if extractor.model.per_frame else clips
    network = extractor.network
    norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None   # cumulative average over the passes
    network.train()
    with torch.no_grad():
        for _ in range(passes):
            network(extractor.model.prepare(inputs.to(extractor.device)))
    network.eval()


def baseline(extractor, videos: list[Video]) -> np.ndarray:
    """Decode all frames to RGB, then each clip alone: resize its frames, one forward pass."""
    import av
    s = extractor.settings
    outputs = []
    with extractor.numerics():
        for video in videos:
            with av.open(video.path) as container:
                frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
            per_clip = []
            for clip in clip_frame_indices(len(frames), s.num_clips, s.frames_per_clip):
                images = np.stack([np.asarray(Image.fromarray(frames[i]).resize(
                    (s.image_width, s.image_height), RESIZE_FILTER)) for i in clip])
                batch = torch.from_numpy(images).to(extractor.device)
                if not extractor.model.per_frame:
                    batch = batch[None]                       # one clip (1, F, H, W, 3)
                per_clip.append(extractor.forward(batch).cpu())
            outputs.append(torch.stack(per_clip).reshape(extractor.video_shape()).numpy())
    return np.stack(outputs)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_extractor(extractor, videos, folder, name) -> tuple[float, np.ndarray]:
    out = os.path.join(folder, f"{name}.h5")
    synchronize(extractor.device)
    start = time.perf_counter()
    result = extractor.run(videos, out)
    synchronize(extractor.device)
    elapsed = time.perf_counter() - start
    assert result.written == len(videos), result.failures
    with h5py.File(out, "r") as h5:
        features = h5[extractor.model.feature_dataset][()]
    os.remove(out)
    os.remove(out + ".failures.json")
    return elapsed, features


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    scale = float(np.abs(reference).max())
    flat_ref, flat_other = reference.reshape(-1, reference.shape[-1]), other.reshape(-1, other.shape[-1])
    norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_other, axis=1)
    cosine = (flat_ref * flat_other).sum(1) / (norms + 1e-12)
    return {"max_abs_diff": float(np.abs(reference - other).max()), "max_abs_value": scale,
            "max_diff_over_max_value": float(np.abs(reference - other).max() / scale),
            "min_cosine": float(cosine.min()), "finite": bool(np.isfinite(other).all())}


def bench_model(model: str, sizes: dict, videos, folder, device, args) -> dict:
    size = sizes["resnet_size"] if model == "resnet101" else sizes["resnext_size"]
    settings = ExtractionSettings("msvd-qa", model, num_clips=sizes["num_clips"],
                                  frames_per_clip=sizes["frames_per_clip"], image_height=size,
                                  image_width=size, random_weights=True)
    extractor = make_extractor(settings, device, args.batch_size, args.num_workers, progress=False)
    calibrate_batchnorm(extractor, videos[0])   # builds the network outside the timed region
    baseline(extractor, videos[:1])                      # warm-up (CUDA context, kernels)
    # The baseline is sequential, so its rate on the first videos is its rate on all of them.
    baseline_videos = videos[:args.baseline_videos or len(videos)]
    start = time.perf_counter()
    reference = baseline(extractor, baseline_videos)
    synchronize(device)
    baseline_rate = len(baseline_videos) / (time.perf_counter() - start)
    ours_s, ours = run_extractor(extractor, videos, folder, model)
    ours_rate = len(videos) / ours_s
    row = {"model": model, "videos": len(videos), "baseline_videos": len(baseline_videos),
           "baseline_videos_per_s": baseline_rate, "extractor_videos_per_s": ours_rate,
           "speedup": ours_rate / baseline_rate, "agreement": compare(reference, ours[:len(baseline_videos)]),
           "batch_size": extractor.batch_size, "num_workers": extractor.num_workers}
    if args.precision_check and device.type == "cuda":
        for precision in ("fp16", "bf16"):
            low = make_extractor(dataclasses.replace(settings, precision=precision),
                                 device, args.batch_size, args.num_workers, progress=False)
            low.network = extractor.network
            low_s, low_features = run_extractor(low, videos, folder, f"{model}_{precision}")
            row[precision] = {"videos_per_s": len(videos) / low_s, **compare(ours, low_features)}
    return row


def cli_comparison(videos: list[Video], folder: str, sizes: dict, device: torch.device, args) -> dict:
    """The command line on the generated videos: one process, then K torchrun ranks; same settings."""
    annotations = os.path.join(folder, "annotations")
    os.makedirs(annotations, exist_ok=True)
    with open(os.path.join(annotations, "youtube_mapping.txt"), "w", encoding="utf-8") as handle:
        handle.writelines(f"{video.name} vid{video.video_id + 1}\n" for video in videos)
    with open(os.path.join(annotations, "train_qa.json"), "w", encoding="utf-8") as handle:
        json.dump([{"question": "what?", "answer": "a", "video_id": video.video_id + 1, "id": video.video_id}
                   for video in videos], handle)
    model = args.models.split(",")[0]
    size = sizes["resnet_size"] if model == "resnet101" else sizes["resnext_size"]
    script = os.path.join(ROOT, "preprocess", "preprocess_features.py")
    common = ["--dataset", "msvd-qa", "--video-dir", folder, "--annotation-dir", annotations, "--model", model,
              "--random-weights", "--num-clips", str(sizes["num_clips"]), "--frames-per-clip",
              str(sizes["frames_per_clip"]), "--image-height", str(size), "--image-width", str(size),
              "--num-workers", str(args.num_workers), "--no-progress"]
    if args.batch_size:
        common += ["--batch-size", str(args.batch_size)]
    if device.type == "cuda" and torch.cuda.device_count() < args.torchrun:
        # More ranks than GPUs: all share this one (a plain "cuda" would mean cuda:LOCAL_RANK).
        index = device.index if device.index is not None else torch.cuda.current_device()
        common += ["--device", f"cuda:{index}"]
    elif device.type == "cpu":
        common += ["--device", "cpu"]
    launches = {"1 process": [sys.executable, script],
                f"torchrun {args.torchrun} ranks": [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc_per_node={args.torchrun}", "--standalone", script]}
    row, outputs = {"model": model, "videos": len(videos)}, {}
    for name, launch in launches.items():
        out = os.path.join(folder, name.replace(" ", "_") + ".h5")
        start = time.perf_counter()
        result = subprocess.run(launch + common + ["--out", out], capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise SystemExit(f"{name} command line failed (status {result.returncode}): " + " | ".join(tail))
        with h5py.File(out, "r") as h5:
            outputs[name] = (h5["ids"][()], h5[list(k for k in h5 if k != "ids")[0]][()])
        row[name] = {"seconds": elapsed, "videos_per_s": len(videos) / elapsed}
    (single_ids, single), (ranks_ids, ranks) = outputs.values()
    row["same_ids"] = bool(np.array_equal(single_ids, ranks_ids))
    row["bit_identical"] = bool(row["same_ids"] and np.array_equal(single, ranks))
    row["agreement"] = compare(single, ranks) if row["same_ids"] else None
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true", help="reduced sizes, for CPU")
    parser.add_argument("--videos", type=int, default=None, help="number of generated videos")
    parser.add_argument("--baseline-videos", type=int, default=None,
                        help="time the (slow, sequential) baseline on this many of the videos only")
    parser.add_argument("--models", default="resnet101,resnext101")
    parser.add_argument("--batch-size", type=int, default=None, help="extractor batch (default: the model's)")
    parser.add_argument("--num-workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--precision-check", action="store_true", help="also run fp16 and bf16 (CUDA)")
    parser.add_argument("--torchrun", type=int, default=0, metavar="K",
                        help="also time the command line under torchrun with K ranks against one process")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)
    try:
        import av  # noqa: F401
    except ImportError:
        print("bench/features.py: skipped, PyAV (package av) is not installed here, so no video can be "
              "made or decoded (pip install av)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sizes = dict(SMALL if args.small else DEFAULT)
    if args.videos:
        sizes["videos"] = args.videos
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}; {sizes['videos']} videos {sizes['width']}x{sizes['height']}, {sizes['frames']} "
          f"frames; N={sizes['num_clips']} F={sizes['frames_per_clip']}; {args.num_workers} decoding workers")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        videos = make_videos(folder, sizes["videos"], sizes["width"], sizes["height"], sizes["frames"], sizes["fps"])
        print(f"generated videos in {time.perf_counter() - start:.1f} s")
        for model in args.models.split(","):
            row = bench_model(model, sizes, videos, folder, device, args)
            results.append(row)
            agreement = row["agreement"]
            print(f"{model}: extractor {row['extractor_videos_per_s']:.2f} videos/s, baseline "
                  f"{row['baseline_videos_per_s']:.2f} videos/s, ratio {row['speedup']:.2f}x; "
                  f"max |diff| / max |feature| = {agreement['max_diff_over_max_value']:.2e}")
            for precision in ("fp16", "bf16"):
                if precision in row:
                    p = row[precision]
                    print(f"  {precision}: {p['videos_per_s']:.2f} videos/s; vs fp32 max |diff| / max |feature| "
                          f"= {p['max_diff_over_max_value']:.2e}, min cosine {p['min_cosine']:.6f}, "
                          f"finite {p['finite']}")
        if args.torchrun:
            row = cli_comparison(videos, folder, sizes, device, args)
            results.append({"command_line": row})
            names = [name for name in row if name.endswith("process") or name.endswith("ranks")]
            timings = ", ".join(f"{name} {row[name]['videos_per_s']:.2f} videos/s ({row[name]['seconds']:.1f} s)"
                                for name in names)
            agreement = ("bit-identical" if row["bit_identical"] else
                         f"max |diff| / max |feature| = {row['agreement']['max_diff_over_max_value']:.2e}"
                         if row["agreement"] else "DIFFERENT VIDEO IDS")
            print(f"command line, {row['model']}, {row['videos']} videos, start-up included: {timings}; "
                  f"merged output vs one process: {agreement}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": name, "sizes": sizes, "results": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
