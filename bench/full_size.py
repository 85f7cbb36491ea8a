"""MSVD-QA and MSRVTT-QA at their real sizes on this machine: the memory plan against the measured
peak, start-up time and speed of the real `train.py`, per feature-table mode.

    python bench/full_size_data.py --dataset msvd-qa --out DATA/msvd-qa      # first (bench/full_size_data.py)
    python bench/full_size_data.py --dataset msrvtt-qa --out DATA/msrvtt-qa
    python bench/full_size.py --data DATA [--steps 3] [--json-out bench/results/full_size_cpu.json]
    python bench/full_size.py --data DATA --scaling          # MSRVTT-QA at 1/8, 1/4, 1/2 and full size

Each measurement is one `train.py --stage teacher` process, bounded by `train.max_steps` (that many
training batches in epoch 1, and as many batches of each evaluation), with the dataset's config
(batch 256). While it runs, the resident memory of its process tree is sampled every 0.1 s; the
kernel's peak for the training process comes from wait4. Recorded per run:
- `predicted_peak_gib`: the plan's host peak (results.json `memory_plan`, or the refusal line);
- `measured_peak_gib`: the process's peak resident memory (ru_maxrss), and the tree's sampled peak;
- `startup_s`: launch to the line announcing the model (data loaded, model built: training starts);
- `train_steps_per_s`: steps after the first (warm-up) one, from metrics.csv's time columns;
- `eval_questions_per_s`: the validation pass (metrics.csv `val_questions_per_s`).
A mode the plan refuses is recorded with its refusal, and is not run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Optional

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

from full_size_data import make_dataset  # noqa: E402

GIB = 2**30
MODES = {"memory-float32": ("memory", "float32"), "memory-float16": ("memory", "float16"),
         "lazy": ("lazy", "float32")}
STARTED_LINE = re.compile(r"^teacher: [\d,]+ parameters")
REFUSAL = re.compile(r"needs ([\d.]+) GiB of memory")


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants (loader workers), proportional share of pages
    they share (smaps_rollup Pss), so forked copies are not counted twice."""
    total = 0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            pids += [int(child) for child in handle.read().split()]
    except OSError:
        pass
    for one in pids:
        try:
            with open(f"/proc/{one}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def drop_page_cache() -> bool:
    """Start from a cold page cache (needs root); False where the kernel refuses."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("1\n")
        return True
    except OSError:
        return False


def run_teacher(config: str, out: str, mode: str, dtype: str, steps: int, workers: int,
                batch_size: Optional[int], cold: bool) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--cfg", config, "--stage", "teacher", "--device", "cpu",
               "--set", f"output_dir={out}", "--set", f"data.feature_mode={mode}", "--set", f"data.feature_dtype={dtype}",
               "--set", f"train.max_steps={steps}", "--set", "train.epochs=1", "--set", "train.progress=false",
               "--set", f"train.num_workers={workers}"]
    if batch_size:
        command += ["--set", f"train.batch_size={batch_size}"]
    cold = cold and drop_page_cache()
    launched = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    peak = {"tree": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["tree"] = max(peak["tree"], tree_rss(process.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines, startup = [], None
    for line in process.stdout:
        lines.append(line.rstrip())
        if startup is None and STARTED_LINE.match(line):
            startup = time.perf_counter() - launched
        print("   |", line.rstrip(), flush=True)
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    sampler.join()
    result: dict[str, Any] = {"mode": mode, "dtype": dtype, "exit_status": os.waitstatus_to_exitcode(status),
                              "wall_s": round(time.perf_counter() - launched, 1), "cold_page_cache": cold}
    refused = next(filter(None, map(REFUSAL.search, lines)), None)
    if result["exit_status"] != 0:
        result["refused"] = refused is not None
        result["message"] = lines[-1] if lines else ""
        if refused:
            result["predicted_peak_gib"] = float(refused.group(1))
        return result
    with open(os.path.join(out, "teacher", "results.json")) as handle:
        results = json.load(handle)
    with open(os.path.join(out, "teacher", "metrics.csv")) as handle:
        row = next(csv.DictReader(handle))
    plan = results["memory_plan"]
    measured = usage.ru_maxrss * 1024
    result.update(
        predicted_peak_gib=round(plan["host_peak_bytes"] / GIB, 2),
        plan=plan,
        measured_peak_gib=round(measured / GIB, 2),
        measured_tree_pss_peak_gib=round(peak["tree"] / GIB, 2),
        prediction_error=round(plan["host_peak_bytes"] / measured - 1, 3),
        startup_s=round(startup, 1) if startup is not None else None,
        train_steps_per_s=float(row["train_steps_per_s"]) if row.get("train_steps_per_s") else None,
        eval_questions_per_s=float(row["val_questions_per_s"]) if row.get("val_questions_per_s") else None,
    )
    return result


def markdown_table(report: dict[str, Any]) -> str:
    """The runs of a --json-out file as the table in bench/README.md."""
    from vqakd.training.memory import table_setting

    lines = ["| dataset | size | table | batch | steps | predicted peak | measured peak | error | start-up "
             "| train steps/s | eval questions/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        setting = table_setting(run["mode"], run["dtype"])
        size = "full" if run["fraction"] == 1 else f"1/{round(1 / run['fraction'])}"
        if run["exit_status"] != 0:
            measured = "refused by the plan" if run.get("refused") else f"failed ({run['exit_status']})"
            lines.append(f"| {run['dataset']} | {size} | {setting} | {run['batch_size']} | | "
                         f"{run.get('predicted_peak_gib', '?')} GiB | {measured} | | | | |")
            continue
        lines.append(f"| {run['dataset']} | {size} | {setting} | {run['batch_size']} | {run['max_steps']} | "
                     f"{run['predicted_peak_gib']} GiB | "
                     f"{run['measured_peak_gib']} GiB | {run['prediction_error']:+.1%} | {run['startup_s']} s | "
                     f"{run['train_steps_per_s']:.4f} | {run['eval_questions_per_s']:.1f} |")
    return "\n".join(lines)


def dataset_config(data: str, dataset: str, fraction: float = 1.0) -> tuple[str, dict]:
    folder = os.path.join(data, dataset if fraction == 1 else f"{dataset}-x{fraction:g}")
    made = make_dataset(dataset, folder, fraction)
    return made["config"], made["sizes"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="folder of the full-size data (made here if missing)")
    parser.add_argument("--datasets", default="msvd-qa,msrvtt-qa")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=3, help="train.max_steps of each run")
    parser.add_argument("--workers", type=int, default=0, help="train.num_workers of each run")
    parser.add_argument("--batch-size", type=int, default=None, help="train.batch_size (default: the config's, 256)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run (needs root)")
    parser.add_argument("--append", action="store_true", help="add the runs to an existing --json-out")
    parser.add_argument("--scaling", action="store_true", help="MSRVTT-QA at --fractions of its size (--modes: the first)")
    parser.add_argument("--fractions", default="0.125,0.25,0.5,1")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--table", metavar="JSON", help="print the runs of a --json-out file as a table, and stop")
    a = parser.parse_args(argv)
    if a.table:
        with open(a.table) as handle:
            print(markdown_table(json.load(handle)))
        return 0
    if not a.data:
        parser.error("--data is required (unless --table)")
    report: dict[str, Any] = {"cpus": os.cpu_count(), "runs": []}
    if a.append and a.json_out and os.path.exists(a.json_out):
        with open(a.json_out) as handle:
            report = json.load(handle)
    if a.scaling:
        jobs = [("msrvtt-qa", float(fraction), a.modes.split(",")[0]) for fraction in a.fractions.split(",")]
    else:
        jobs = [(dataset, 1.0, mode) for dataset in a.datasets.split(",") for mode in a.modes.split(",")]
    for dataset, fraction, mode_name in jobs:
        config, sizes = dataset_config(a.data, dataset, fraction)
        print(f"== {dataset} x{fraction:g} {mode_name}", flush=True)
        result = run_teacher(config, os.path.join(a.data, "runs", f"{dataset}-x{fraction:g}-{mode_name}-b{a.batch_size or 256}"),
                             *MODES[mode_name], a.steps, a.workers, a.batch_size, a.cold)
        result.update(dataset=dataset, fraction=fraction, videos=sizes["videos"], train_questions=sizes["train"],
                      batch_size=a.batch_size or 256, max_steps=a.steps, workers=a.workers,
                      scaling=a.scaling)
        report["runs"].append(result)
        summary = {key: result.get(key) for key in ("predicted_peak_gib", "measured_peak_gib", "startup_s",
                                                    "train_steps_per_s", "eval_questions_per_s", "exit_status")}
        print(f"   {dataset} x{fraction:g} {mode_name}: {summary}", flush=True)
        if a.json_out:
            with open(a.json_out, "w") as handle:
                json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
