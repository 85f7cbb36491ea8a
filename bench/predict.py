"""predict.py speed on CPU: seconds per new video (decode + both feature networks + cache write +
the answer; the first video of a process also builds the networks: reported apart) and per question about a cached video (sha256 of the file + cache read + the model).

    python bench/predict.py [--videos 3] [--questions 20] [--full] [--json-out predict.json]

Generates demo videos (vqakd/demo/data.py) and a student-sized checkpoint whose record says
"random-weight networks" (nothing to download), with the demo's extraction settings (6 clips,
32x32 images, 4 / 8 frames per clip), or the real datasets' with --full (8 clips, 224x224 /
112x112 images, 16 frames per clip; minutes per video on a small CPU). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_checkpoint(path: str, num_clips: int, sizes: dict, frames: dict, words: list[str], answers: list[str]) -> None:
    import torch

    from model import DualVGR, ModelConfig
    from vqakd.training.checkpoint import build_checkpoint, save_checkpoint
    from vqakd.extraction.networks import MODEL_OF_KIND

    question_vocab = {"<NULL>": 0, "<UNK>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    answer_vocab = {"<UNK0>": 0, "<UNK1>": 1, **{a: i + 2 for i, a in enumerate(answers)}}
    torch.manual_seed(0)
    model = DualVGR(ModelConfig(question_vocab_size=len(question_vocab), answer_vocab_size=len(answer_vocab),
                                num_nodes=num_clips, graph_layers=1))
    features = {kind: {"model": MODEL_OF_KIND[kind], "num_clips": num_clips, "frames_per_clip": frames[kind],
                       "image_height": sizes[kind], "image_width": sizes[kind], "kinetics_mean": False,
                       "precision": "fp32", "random_weights": True, "random_seed": 0,
                       "weights_sha256": "random (seed 0)", "weights": "random", "dataset": "msvd-qa"}
                for kind in ("appearance", "motion")}
    inference = {"format": 1, "features": features,
                 "vocabulary": {"question_token_to_idx": question_vocab, "answer_token_to_idx": answer_vocab,
                                "sha256": "bench"}}
    save_checkpoint(path, build_checkpoint(model=model, stage="student", epoch=1, inference=inference))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=3, help="new videos timed")
    parser.add_argument("--questions", type=int, default=20, help="questions timed about a cached video")
    parser.add_argument("--full", action="store_true", help="the real datasets' extraction settings")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    import torch

    from vqakd.demo import data as demo_data
    from vqakd.predict import Answerer, encode_question

    torch.set_num_threads(args.threads)
    if args.full:
        num_clips, sizes, frames = 8, {"appearance": 224, "motion": 112}, {"appearance": 16, "motion": 16}
    else:
        num_clips, sizes, frames = 6, {"appearance": 32, "motion": 32}, {"appearance": 4, "motion": 8}
    with tempfile.TemporaryDirectory() as folder:
        settings = demo_data.DemoSettings(num_videos=max(args.videos, 5), seed=0)
        demo_data.write_dataset(folder, settings, progress=False)
        clips = sorted(os.path.join(folder, demo_data.VIDEO_FOLDER, name)
                       for name in os.listdir(os.path.join(folder, demo_data.VIDEO_FOLDER)))[:args.videos]
        questions = [record["question"] for record in json.load(open(os.path.join(folder, "train_qa.json")))]
        words = sorted({word for q in questions for word in q[:-1].split()})
        answers = sorted({record["answer"] for record in json.load(open(os.path.join(folder, "train_qa.json")))})
        checkpoint = os.path.join(folder, "best.pt")
        make_checkpoint(checkpoint, num_clips, sizes, frames, words, answers)
        answerer = Answerer(checkpoint, torch.device("cpu"), cache_dir=os.path.join(folder, "cache"))
        started = time.perf_counter()
        answerer.answer(clips[0], questions[0])      # cold: builds both networks, imports nltk
        cold = time.perf_counter() - started
        for name in os.listdir(os.path.join(folder, "cache")):
            if not name.startswith("."):
                shutil.rmtree(os.path.join(folder, "cache", name))
        new_video = []
        for clip in clips:
            started = time.perf_counter()
            answer = answerer.answer(clip, questions[0])
            new_video.append(time.perf_counter() - started)
            assert not answer["features_cached"]
        cached = []
        for question in (questions * args.questions)[:args.questions]:
            started = time.perf_counter()
            answer = answerer.answer(clips[0], question)
            cached.append(time.perf_counter() - started)
            assert answer["features_cached"]
        features = answerer.features([clips[0]])[clips[0]]
        encoded = [encode_question(questions[0], answerer.vocab)]
        forward = []
        for _ in range(args.questions):
            started = time.perf_counter()
            answerer.answer_encoded(features, encoded)
            forward.append(time.perf_counter() - started)
        video_bytes = os.path.getsize(clips[0])
    result = {
        "device": "cpu", "threads": torch.get_num_threads(),
        "settings": {"num_clips": num_clips, "image_size": sizes, "frames_per_clip": frames, "random_weights": True,
                     "video": f"{settings.frame_size}x{settings.frame_size}, {settings.seconds} s at {settings.fps} fps, "
                              f"{video_bytes} bytes"},
        "model": "student (G=1), module_dim 768",
        "seconds_first_video_cold": cold,
        "seconds_per_new_video": statistics.median(new_video),
        "seconds_per_cached_question": statistics.median(cached),
        "seconds_model_forward_one_question": statistics.median(forward),
        "new_video_runs": new_video, "cached_question_runs": len(cached),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
