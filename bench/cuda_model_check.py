"""Numerical check of model/ on an accelerator (or on the CPU, where every check still runs).

    python bench/cuda_model_check.py [--device auto|cpu|cuda:N] [--no-compile] [--json-out check.json]

Checks, each printed as PASS/FAIL with the measured value and its tolerance; exit status 1 if
any fails:
- cpu_vs_device: eval-mode logits on the CPU and on the device (tiny and SPEC-size networks);
- lengths_on_cpu: question lengths left on the CPU give the same logits as lengths on the device;
- bf16_train_step: a forward under bf16 autocast plus the teacher and student losses and the
  backward pass: logits in bf16, every loss float32 and finite, every gradient finite;
- compile_vs_eager: torch.compile against eager, eval mode, on the same weights and buffers.

Differences are measured relative to the logit scale: max|a - b| / max|b|. A tiny random network
has logits of about 0.2, so an absolute tolerance says little.

Why the compile check once failed on an H100 by 9.5e-3: the old script computed the eager
reference, then ran the bf16 training step on the same model (in train mode, which updates the
BatchNorm running statistics of the answer head), then compiled and compared against the stale
reference. On the CPU the same sequence gives 1.26e-2 with or without compile, while compiled vs
eager on the same state differ by 3.7e-8. Each check now works on its own copy of the network.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import DualVGR, ModelConfig  # noqa: E402
from model.losses import feature_distill_loss, hard_loss  # noqa: E402
from vqakd.core.distributed import resolve_device  # noqa: E402
from vqakd.core.errors import run_cli  # noqa: E402
from vqakd.core.files import write_json  # noqa: E402

TINY = dict(question_vocab_size=30, answer_vocab_size=11, vision_dim=24, module_dim=32, word_dim=12, num_nodes=4,
            graph_layers=2, num_heads=4, fusion_dim=16)
SPEC_SIZE = dict(question_vocab_size=4000, answer_vocab_size=1002, num_nodes=8, graph_layers=4)
TINY_LENGTHS = [3, 5, 2, 4]
SPEC_LENGTHS = [12, 7, 3, 9]
FRAMES = {"tiny": 3, "spec": 16}
# Relative tolerances (max|a - b| / max|b|). fp32 everywhere (TF32 off): cuDNN's LSTM and cuBLAS
# sum in other orders than the CPU, which gave 5.2e-5 absolute on logits of about 0.2 on an H100.
TOLERANCE = {"cpu_vs_device": 1e-3, "lengths_on_cpu": 1e-6, "compile_vs_eager": 1e-4}


def make_inputs(config: ModelConfig, lengths, frames: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, max_len = len(lengths), max(lengths)
    appearance = torch.randn(batch, config.num_nodes, frames, config.vision_dim, generator=generator)
    motion = torch.randn(batch, config.num_nodes, config.vision_dim, generator=generator)
    question = torch.zeros(batch, max_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        question[row, :length] = torch.randint(2, config.question_vocab_size, (length,), generator=generator)
    return appearance, motion, question, torch.tensor(lengths, dtype=torch.long)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class Report:
    def __init__(self):
        self.checks = []

    def add(self, name: str, passed: bool, detail: str, **values) -> None:
        self.checks.append({"check": name, "passed": bool(passed), "detail": detail, **values})
        print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}", flush=True)

    def compare(self, name: str, value: float, tolerance: float, what: str) -> None:
        self.add(name, value <= tolerance, f"{what}: {value:.3g} (tolerance {tolerance:g})",
                 value=value, tolerance=tolerance)


def build(size: str, seed: int = 0) -> tuple[DualVGR, tuple]:
    torch.manual_seed(seed)
    config = ModelConfig(**(TINY if size == "tiny" else SPEC_SIZE))
    model = DualVGR(config).eval()
    return model, make_inputs(config, TINY_LENGTHS if size == "tiny" else SPEC_LENGTHS, FRAMES[size])


def check_cpu_vs_device(report: Report, device: torch.device, sizes) -> None:
    for size in sizes:
        model, inputs = build(size)
        with torch.no_grad():
            reference = model(*inputs).logits
            on_device = copy.deepcopy(model).to(device)
            moved = [t.to(device) for t in inputs]
            logits = on_device(*moved).logits
            lengths_on_cpu = on_device(*moved[:3], inputs[3]).logits
        report.compare(f"cpu_vs_device[{size}]", relative_difference(logits, reference), TOLERANCE["cpu_vs_device"],
                       f"eval logits, CPU vs {device}, relative to max|logit| = {reference.abs().max():.3g}")
        report.compare(f"lengths_on_cpu[{size}]", relative_difference(lengths_on_cpu, logits),
                       TOLERANCE["lengths_on_cpu"], "question_len on the CPU vs on the device")


def check_bf16_train_step(report: Report, device: torch.device) -> None:
    model, inputs = build("tiny")
    model = model.to(device).train()
    inputs = [t.to(device) for t in inputs]
    labels = torch.tensor([1, 2, 3, 4], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        output = model(*inputs)
    total, parts = hard_loss(output, labels)
    app, mo = feature_distill_loss(output, output._replace(visual=torch.randn_like(output.visual)))
    (total + app + mo).backward()
    losses = {**parts, "total": total, "app": app, "mo": mo}
    bad_losses = [name for name, value in losses.items() if value.dtype != torch.float32 or not torch.isfinite(value)]
    bad_grads = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    passed = output.logits.dtype == torch.bfloat16 and not bad_losses and not bad_grads
    report.add("bf16_train_step", passed,
               f"logits {output.logits.dtype}, losses {'float32 and finite' if not bad_losses else bad_losses}, "
               f"gradients {'all finite' if not bad_grads else 'bad: ' + ', '.join(bad_grads[:3])}")


def check_compile(report: Report, device: torch.device) -> None:
    import logging

    torch._logging.set_logs(dynamo=logging.ERROR)     # graph-break notes (the packed LSTMs) are expected
    model, inputs = build("tiny")
    model = model.to(device).eval()
    inputs = [t.to(device) for t in inputs]
    started = time.perf_counter()
    with torch.no_grad():
        compiled = torch.compile(model)(*inputs).logits
        compile_s = time.perf_counter() - started
        eager = model(*inputs).logits          # same weights and buffers, computed right after
    report.compare("compile_vs_eager", relative_difference(compiled, eager), TOLERANCE["compile_vs_eager"],
                   f"eval logits, first call {compile_s:.1f}s, relative to max|logit| = {eager.abs().max():.3g}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    parser.add_argument("--tiny-only", action="store_true", help="skip the SPEC-size network (faster on a CPU)")
    parser.add_argument("--json-out", "--json", dest="json_out", help="also write the results here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        # fp32 means fp32 here, whatever a caller's environment enabled
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"model check on {name} ({device}), torch {torch.__version__}", flush=True)
    report = Report()
    check_cpu_vs_device(report, device, ("tiny",) if args.tiny_only else ("tiny", "spec"))
    check_bf16_train_step(report, device)
    if args.no_compile:
        print("skip compile_vs_eager: --no-compile")
    else:
        check_compile(report, device)
    failed = [c["check"] for c in report.checks if not c["passed"]]
    print(f"model check: {len(report.checks) - len(failed)}/{len(report.checks)} passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.json_out:
        write_json(args.json_out, {"device": str(device), "device_name": name, "torch": torch.__version__,
                                   "checks": report.checks, "passed": not failed})
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
