"""Does a training run give the same network for 1 or 2 threads and 1 or 2 processes?

Trains the teacher (G=4, dropout off) on a small learnable set (the training tests' generator,
tests/test_train_fixtures.py, scaled up) once per configuration:

    loss.common in {original, safe}  x  threads per process in {1, 2}  x  processes in {1, 2}

(2 processes: `python -m torch.distributed.run --standalone --nproc_per_node=2 train.py`, gloo
on the CPU; `train.batch_size` is the global batch either way). Reports per configuration the
test accuracy of best.pt, the last epoch's losses, the graph layers' node spread on the val
split, and how far the final weights (last.pt) are from the 1-thread, 1-process run of the same
common loss. Then trains the same teacher with `model.attention: gatv2` and reports the node
spread per graph layer next to GAT's.

    python bench/reproducibility.py [--epochs 5] [--videos 96] [--json-out bench/results/reproducibility.json]

Writes the JSON and a markdown table (same name, .md). About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

from test_train_fixtures import make_dataset, tiny_config_dict, write_config  # noqa: E402

from vqakd.core.errors import UserError, run_cli  # noqa: E402

NO_DROPOUT = {name: 0.0 for name in ("word_dropout", "frame_dropout", "encoder_dropout", "graph_dropout",
                                     "head_dropout")}
STREAMS = ("specific_appearance", "common_appearance", "specific_motion", "common_motion")
SETTINGS = [(threads, processes) for processes in (1, 2) for threads in (1, 2)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--videos", type=int, default=96, help="videos of the generated set (6 questions each)")
    parser.add_argument("--nodes", type=int, default=8, help="clips per video (graph nodes)")
    parser.add_argument("--graph-layers", type=int, default=4, help="teacher graph layers G")
    parser.add_argument("--work", default=None, help="folder for the data and runs (default: a temporary one)")
    parser.add_argument("--json-out", default=os.path.join(ROOT, "bench", "results", "reproducibility.json"))
    return parser


def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def train(config_path: str, threads: int, processes: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    script = os.path.join(ROOT, "train.py")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    started = time.perf_counter()
    result = subprocess.run([*launcher, script, "--cfg", config_path, "--stage", "teacher", "--overwrite"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if result.returncode != 0:
        raise UserError(f"training with {config_path} ({threads} threads, {processes} processes) failed: "
                        + " | ".join(result.stderr.strip().splitlines()[-3:]))
    return time.perf_counter() - started


def weights(folder: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(folder, "last.pt"), map_location="cpu", weights_only=True)["state_dict"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[key].double() - b[key].double()).abs().max()) for key in a if a[key].is_floating_point())


def spread_by_layer(row: dict, layers: int) -> dict[str, dict[str, float]]:
    return {f"g{g}": {stream: float(row[f"node_spread_g{g}_{stream}"]) for stream in STREAMS}
            for g in range(1, layers + 1)}


def run(args) -> dict:
    work = args.work or tempfile.mkdtemp(prefix="vqakd_repro_")
    data = make_dataset(os.path.join(work, "data"), videos=args.videos, num_nodes=args.nodes)
    model = dict(tiny_config_dict(data["paths"], work)["model"], num_nodes=args.nodes, **NO_DROPOUT)
    runs, references = [], {}
    for common in ("original", "safe"):
        for threads, processes in SETTINGS:
            name = f"{common}_t{threads}_p{processes}"
            out = os.path.join(work, name)
            config = tiny_config_dict(data["paths"], out, model=model, teacher={"graph_layers": args.graph_layers},
                                      train={"epochs": args.epochs}, loss={"common": common})
            seconds = train(write_config(os.path.join(work, f"{name}.yml"), config), threads, processes)
            folder = os.path.join(out, "teacher")
            last = read_rows(os.path.join(folder, "metrics.csv"))[-1]
            with open(os.path.join(folder, "results.json")) as handle:
                results = json.load(handle)
            state = weights(folder)
            references.setdefault(common, state)
            entry = {
                "common": common, "threads": threads, "processes": processes,
                "test_accuracy": results["accuracy"], "best_epoch": results["epoch"],
                "train_loss": float(last["train_loss"]), "train_common": float(last["train_common"]),
                "val_loss": float(last["val_loss"]), "val_common": float(last["val_common"]),
                "collapsed_layers": [f"g{g}" for g in range(1, args.graph_layers + 1)
                                     if float(last[f"node_collapsed_g{g}"]) > 0.5],
                "max_weight_difference_vs_1_thread_1_process": max_difference(state, references[common]),
                "seconds": round(seconds, 1),
            }
            if common == "original" and (threads, processes) == (1, 1):
                entry["node_spread"] = spread_by_layer(last, args.graph_layers)
            runs.append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k != "node_spread"}), flush=True)

    out = os.path.join(work, "gatv2")
    config = tiny_config_dict(data["paths"], out, model=dict(model, attention="gatv2"),
                              teacher={"graph_layers": args.graph_layers}, train={"epochs": args.epochs})
    train(write_config(os.path.join(work, "gatv2.yml"), config), 1, 1)
    gatv2_last = read_rows(os.path.join(out, "teacher", "metrics.csv"))[-1]
    with open(os.path.join(out, "teacher", "results.json")) as handle:
        gatv2_accuracy = json.load(handle)["accuracy"]
    gat = runs[0]
    attention = {
        "gat": {"test_accuracy": gat["test_accuracy"], "node_spread": gat["node_spread"]},
        "gatv2": {"test_accuracy": gatv2_accuracy, "node_spread": spread_by_layer(gatv2_last, args.graph_layers)},
    }
    return {
        "setting": {"videos": args.videos, "questions_per_video": 6, "nodes": args.nodes,
                    "teacher_graph_layers": args.graph_layers, "epochs": args.epochs, "dropout": 0.0,
                    "global_batch": 32, "device": "cpu", "torch": torch.__version__,
                    "model": {k: v for k, v in model.items() if not k.endswith("dropout")}},
        "runs": runs,
        "attention": attention,
    }


def markdown(report: dict) -> str:
    s = report["setting"]
    lines = [f"Teacher G={s['teacher_graph_layers']}, N={s['nodes']} clips, {s['videos']} videos, {s['epochs']} epochs, "
             f"dropout off, global batch {s['global_batch']}, CPU, torch {s['torch']}.", "",
             "| loss.common | threads | processes | test acc | last train loss | last train common | "
             "last val loss | collapsed layers (val) | max weight diff vs 1 thread/1 process |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['common']} | {r['threads']} | {r['processes']} | {100 * r['test_accuracy']:.2f}% | "
                     f"{r['train_loss']:.6g} | {r['train_common']:.6g} | {r['val_loss']:.6g} | "
                     f"{', '.join(r['collapsed_layers']) or '-'} | "
                     f"{r['max_weight_difference_vs_1_thread_1_process']:.3g} |")
    lines += ["", "Node spread on the val split after the last epoch (relative std over the clips; "
              "< 1e-6 = collapsed):", "",
              "| attention | test acc | layer | " + " | ".join(STREAMS) + " |",
              "|---|---|---|" + "---|" * len(STREAMS)]
    for kind, values in report["attention"].items():
        for layer, spread in values["node_spread"].items():
            lines.append(f"| {kind} | {100 * values['test_accuracy']:.2f}% | {layer} | "
                         + " | ".join(f"{spread[stream]:.3g}" for stream in STREAMS) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    report = run(args)
    report["seconds"] = round(time.perf_counter() - started, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    table = markdown(report)
    with open(os.path.splitext(args.json_out)[0] + ".md", "w", encoding="utf-8") as handle:
        handle.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    run_cli(main)
