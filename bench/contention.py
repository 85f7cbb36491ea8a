"""Training on a shared CPU: a short demo-sized training alone and beside one CPU-bound process,
with the old thread settings and the new defaults (vqakd/core/script.py), side by side in one run.

    python bench/contention.py [--steps 12] [--rounds 3] [--json-out bench/results/contention_cpu.json]

Each measurement is a fresh Python process (thread settings only take effect before torch is
imported) that trains the demo's network (configs/demo.yml sizes: module_dim 128, N=6 clips,
F=4 frames, 2048-d features, batch 32, teacher G=4) for --steps steps with the engine's
train_one_epoch and reports the seconds of those steps. The settings compared:
- old: what train.py did before: torch's defaults (one thread per core, OpenMP's default
  spin-then-sleep wait);
- new: train.py's defaults now (OMP_WAIT_POLICY=PASSIVE, KMP_BLOCKTIME=0, same thread count);
- new_1thread: the new defaults with VQAKD_THREADS=1.
The competitor is a busy Python loop in another process (`--competitor matmul`: a numpy matmul
loop). Alone and contended runs are interleaved over --rounds and the medians are compared,
so a machine whose load drifts affects both alike. Slowdown = contended / alone seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = {
    "old": {"defaults": False, "threads": None},
    "new": {"defaults": True, "threads": None},
    "new_1thread": {"defaults": True, "threads": "1"},
}
COMPETITORS = {
    "loop": "while True:\n    pass\n",
    "matmul": "import numpy as np\na = np.random.rand(400, 400)\nwhile True:\n    a @ a\n",
}
# The variables a setting may change; they are removed from the worker's environment first so
# that only the setting decides them.
THREAD_VARIABLES = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "VQAKD_THREADS",
                    "GOMP_SPINCOUNT")


def worker(setting: str, steps: int) -> None:
    """Runs in the measured process: apply the setting, then import torch and train."""
    if SETTINGS[setting]["defaults"]:
        from vqakd.core.script import apply_thread_defaults

        apply_thread_defaults()
    import torch

    from model import DualVGR, ModelConfig
    from vqakd.core.config import LossConfig
    from vqakd.training.engine import train_one_epoch

    torch.manual_seed(0)
    batch, nodes, frames, dim, length = 32, 6, 4, 2048, 10
    model = DualVGR(ModelConfig(question_vocab_size=60, answer_vocab_size=40, module_dim=128, num_nodes=nodes,
                                graph_layers=4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        lengths = torch.randint(4, length + 1, (batch,), generator=generator)
        question = torch.randint(2, 60, (batch, length), generator=generator)
        question[torch.arange(length)[None, :] >= lengths[:, None]] = 0
        batches.append({"appearance": torch.randn(batch, nodes, frames, dim, generator=generator),
                        "motion": torch.randn(batch, nodes, dim, generator=generator),
                        "question": question, "question_len": lengths,
                        "answer": torch.randint(2, 40, (batch,), generator=generator),
                        "qtype": torch.zeros(batch, dtype=torch.long), "index": torch.arange(batch)})
    loader = [batches[step % len(batches)] for step in range(steps)]
    device = torch.device("cpu")
    # one untimed step: first-call allocations and library start-up
    train_one_epoch(model, loader[:1], optimizer, device, 0, stage="teacher", loss_cfg=LossConfig(), progress=False)
    started = time.perf_counter()
    train_one_epoch(model, loader, optimizer, device, 1, stage="teacher", loss_cfg=LossConfig(), progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(),
                      "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}))


def measure(setting: str, steps: int, competitor: str | None) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}
    if SETTINGS[setting]["threads"]:
        env["VQAKD_THREADS"] = SETTINGS[setting]["threads"]
    rival = None
    if competitor:
        rival = subprocess.Popen([sys.executable, "-c", COMPETITORS[competitor]], env=env)
        time.sleep(0.3)
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", setting, "--steps", str(steps)],
                             env=env, capture_output=True, text=True, check=True).stdout
    finally:
        if rival is not None:
            rival.terminate()
            rival.wait()
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"subset of {','.join(SETTINGS)}")
    parser.add_argument("--competitor", choices=tuple(COMPETITORS), default="loop")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--worker", choices=tuple(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps)
        return 0
    from vqakd.core.errors import UserError

    settings = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown or not settings:
        raise UserError(f"--settings: unknown {unknown or settings}; choose from {', '.join(SETTINGS)}")
    if args.steps < 1 or args.rounds < 1:
        raise UserError("--steps and --rounds must be >= 1")
    runs = {name: {"alone": [], "contended": []} for name in settings}
    threads = {}
    for round_index in range(args.rounds):
        for name in settings:
            for case, rival in (("alone", None), ("contended", args.competitor)):
                result = measure(name, args.steps, rival)
                runs[name][case].append(result["seconds"])
                threads[name] = result["threads"]
                print(f"round {round_index + 1} {name:<12} {case:<9} {result['seconds']:6.2f}s "
                      f"({result['threads']} thread(s))", flush=True)
    summary = {}
    for name in settings:
        alone, contended = (statistics.median(runs[name][case]) for case in ("alone", "contended"))
        summary[name] = {"threads": threads[name], "alone_s": alone, "contended_s": contended,
                         "slowdown": contended / alone, "alone_runs": runs[name]["alone"],
                         "contended_runs": runs[name]["contended"]}
    print(f"\n{'setting':<12} {'threads':>7} {'alone s':>8} {'contended s':>12} {'slowdown':>9}")
    for name, row in summary.items():
        print(f"{name:<12} {row['threads']:>7} {row['alone_s']:>8.2f} {row['contended_s']:>12.2f} "
              f"{row['slowdown']:>8.2f}x")
    if args.json_out:
        from vqakd.core.files import write_json

        write_json(args.json_out, {"benchmark": "contention", "steps": args.steps, "rounds": args.rounds,
                                   "competitor": args.competitor, "cpus": os.cpu_count(),
                                   "load_average_at_end": list(os.getloadavg()),
                                   "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   "settings": summary})
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    from vqakd.core.errors import run_cli

    run_cli(main)
