"""Training throughput and eval latency of the DualVGR teacher (G=4) and student (G=1), side by side.

Times, on the chosen device, one training step of each model with its own loss (teacher: hard
loss; student: hard loss + APP + MO against a fixed teacher feature tensor; forward + backward,
no optimizer step) at B=32, N=8, F=16, L=12, |Q|=4000, |A|=1002 by default, as the median over
--steps steps after --warmup untimed ones; then the eval-mode forward of the same batch.
Reports training throughput in questions/s (B / median step time) and eval latency per question
(median eval batch time / B), teacher and student in one table with their ratio.

    python bench/model_step.py --device auto --steps 10 [--amp bf16] [--compile] [--json-out out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import DualVGR, ModelConfig  # noqa: E402
from model.losses import feature_distill_loss, hard_loss  # noqa: E402
from vqakd.core.distributed import resolve_device  # noqa: E402
from vqakd.core.errors import UserError, run_cli  # noqa: E402
from vqakd.core.files import write_json  # noqa: E402

DEFAULT_BATCH = 32
DEFAULT_NODES = 8
DEFAULT_FRAMES = 16
DEFAULT_LENGTH = 12
DEFAULT_QUESTION_VOCAB = 4000
DEFAULT_ANSWER_VOCAB = 1002
DEFAULT_STEPS = 10
DEFAULT_WARMUP = 2
MODELS = {"teacher": 4, "student": 1}      # name -> graph layers G


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed steps before timing")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES, help="clips per video N")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="frames per clip F")
    parser.add_argument("--length", type=int, default=DEFAULT_LENGTH, help="padded question length L")
    parser.add_argument("--question-vocab", type=int, default=DEFAULT_QUESTION_VOCAB)
    parser.add_argument("--answer-vocab", type=int, default=DEFAULT_ANSWER_VOCAB)
    parser.add_argument("--amp", choices=("none", "bf16"), default="none",
                        help="run forward passes under torch.autocast with this dtype (default none)")
    parser.add_argument("--compile", action="store_true", help="wrap the models in torch.compile")
    parser.add_argument("--models", default="teacher,student", help="comma-separated subset of teacher,student")
    parser.add_argument("--json-out", "--json", dest="json_path", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "nodes", "frames", "length", "question_vocab", "answer_vocab"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise UserError("--warmup must be >= 0")
    if args.batch < 2:
        raise UserError("--batch must be at least 2 (BatchNorm in training mode)")
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in args.models if name not in MODELS]
    if unknown or not args.models:
        raise UserError(f"--models: unknown {unknown or args.models}; choose from {', '.join(MODELS)}")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def make_inputs(args, device: torch.device, generator: torch.Generator):
    batch, length = args.batch, args.length
    appearance = torch.randn(batch, args.nodes, args.frames, 2048, generator=generator).to(device)
    motion = torch.randn(batch, args.nodes, 2048, generator=generator).to(device)
    lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=generator)
    lengths[0] = length
    question = torch.randint(2, args.question_vocab, (batch, length), generator=generator)
    question[torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    labels = torch.randint(0, args.answer_vocab, (batch,), generator=generator)
    return (appearance, motion, question.to(device), lengths.to(device)), labels.to(device)


def bench_model(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    config = ModelConfig(question_vocab_size=args.question_vocab, answer_vocab_size=args.answer_vocab,
                         num_nodes=args.nodes, graph_layers=MODELS[name])
    model = DualVGR(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    runner = torch.compile(model) if args.compile else model
    inputs, labels = make_inputs(args, device, generator)
    teacher_visual = torch.randn(args.batch, args.nodes, config.module_dim, generator=generator).to(device)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if args.amp == "bf16" \
        else contextlib.nullcontext

    def train_step():
        model.zero_grad(set_to_none=True)
        with autocast():
            output = runner(*inputs)
        loss, _ = hard_loss(output, labels)
        if name == "student":
            app, mo = feature_distill_loss(output, output._replace(visual=teacher_visual))
            loss = loss + app + mo
        loss.backward()

    def eval_step():
        with torch.inference_mode(), autocast():
            runner(*inputs)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    train_times = timed(train_step, device, args.steps, args.warmup)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    model.eval()
    eval_times = timed(eval_step, device, args.steps, args.warmup)
    train_ms = statistics.median(train_times) * 1e3
    eval_ms = statistics.median(eval_times) * 1e3
    return {
        "model": name, "graph_layers": config.graph_layers, "parameters": params,
        "train_step_ms_median": round(train_ms, 3),
        "train_step_ms_min": round(min(train_times) * 1e3, 3),
        "eval_batch_ms_median": round(eval_ms, 3),
        "eval_ms_per_question": round(eval_ms / args.batch, 4),
        "train_questions_per_s": round(args.batch / (train_ms / 1e3), 1),
        "eval_questions_per_s": round(args.batch / (eval_ms / 1e3), 1),
        "train_peak_memory_mib": None if peak is None else round(peak / 2 ** 20, 1),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    setting = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "batch": args.batch, "nodes": args.nodes, "frames": args.frames, "length": args.length,
        "question_vocab": args.question_vocab, "answer_vocab": args.answer_vocab,
        "amp": args.amp, "compile": args.compile, "steps": args.steps, "warmup": args.warmup,
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    results = [bench_model(name, args, device) for name in args.models]

    print(f"DualVGR step benchmark on {setting['device_name']} ({device}), torch {torch.__version__}, "
          f"B={args.batch} N={args.nodes} F={args.frames} L={args.length} |Q|={args.question_vocab} "
          f"|A|={args.answer_vocab}, amp={args.amp}, compile={args.compile}, median of {args.steps} "
          f"after {args.warmup} warm-up")
    rows = [("graph layers G", "graph_layers", "{:d}"), ("parameters", "parameters", "{:,}"),
            ("train step ms (fwd+bwd)", "train_step_ms_median", "{:.1f}"),
            ("train questions/s", "train_questions_per_s", "{:,.0f}"),
            ("eval ms per batch", "eval_batch_ms_median", "{:.2f}"),
            ("eval ms per question", "eval_ms_per_question", "{:.3f}"),
            ("eval questions/s", "eval_questions_per_s", "{:,.0f}")]
    if device.type == "cuda":
        rows.append(("train peak MiB", "train_peak_memory_mib", "{:.0f}"))
    by_name = {row["model"]: row for row in results}
    names = [name for name in MODELS if name in by_name]
    both = len(names) == 2
    print(f"{'':<24}" + "".join(f"{name:>12}" for name in names) + (f"{'student/teacher':>17}" if both else ""))
    for label, key, fmt in rows:
        line = f"{label:<24}" + "".join(f"{fmt.format(by_name[name][key]):>12}" for name in names)
        if both and key not in ("graph_layers",):
            line += f"{by_name['student'][key] / by_name['teacher'][key]:>16.2f}x"
        print(line)
    if args.json_path:
        write_json(args.json_path, {"setting": setting, "results": results})
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
