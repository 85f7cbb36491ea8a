#!/usr/bin/env bash
# Every GPU measurement of the toolkit in one run, with a summary table at the end.
#
#   bash bench/gpu_check.sh [--cpu] [--out DIR] [--budget SECONDS] [--steps LIST]
#
# Steps (each with its own time limit; a failure is recorded and the next step runs):
#   model_check       bench/cuda_model_check.py: CPU vs device logits, lengths on the CPU, a bf16
#                     training step, torch.compile vs eager
#   model_step_fp32   bench/model_step.py: teacher vs student training questions/s, eval ms/question
#   model_step_bf16   the same under bf16 autocast
#   data_path         bench/data_path.py: our loader vs an HDF5-per-sample loader, questions/s
#   epoch_fp32        bench/epoch.py: a whole MSVD-QA-sized epoch (train + val, batch 256), teacher
#                     and student, ours vs the original's per-question HDF5 approach; TF32 on
#   epoch_bf16        the same under bf16 autocast (val accuracy after 2 epochs vs epoch_fp32)
#   epoch_bf16_compile  ours only, bf16 + torch.compile (GPU only)
#   epoch_msrvtt      ours only, MSRVTT-QA shape (16 clips, 158,581 train questions), epoch time
#                     extrapolated from 60 steps, and the MSRVTT-QA table's memory plan
#   tiny_data         bench/make_tiny_data.py: a small learnable set for the training run
#   ddp_teacher       torchrun --nproc_per_node=1 --standalone train.py --stage teacher
#   ddp_student       the same, --stage student (distils from the teacher just trained)
#   tiny_bf16         train.py --stage teacher --set train.amp=bf16 on the same set (test accuracy
#                     next to ddp_teacher's float32 one)
#   features          bench/features.py: extractor vs clip-at-a-time baseline, videos/s (needs PyAV;
#                     a wheel in shared/wheels/ or wheels/ is installed when `import av` fails);
#                     GPU utilisation sampled by nvidia-smi meanwhile (features_gpu_util.csv)
#
# --steps LIST runs only the steps whose names start with one of the comma-separated LIST
# entries (e.g. --steps epoch,features); tiny_data runs whenever a step needs it.
#
# --cpu runs the same steps on the CPU with small sizes and one thread per process (how the
# script is tested on a machine without a GPU). Without --cpu a CUDA device is required.
# Outputs (JSON per step, logs, summary.json) go to --out, else $OUT/gpu_check when $OUT is set
# (the device runner's folder), else results/gpu_check/<UTC time>. The whole run stops starting
# steps once --budget seconds (default 560 on a GPU, 290 with --cpu) are used, so it ends within
# 10 minutes on one GPU (5 minutes on a CPU); on a GPU the budget does not reach every step: pick
# them with --steps (bench/README.md gives the command for the epoch figures). Exit status: 0 when no step failed, 1 otherwise.
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)

MODE=gpu
OUT_DIR=""
BUDGET=""
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        --steps) ONLY=${2:?--steps needs a comma-separated list}; shift ;;
        -h|--help) sed -n '2,38p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=$(command -v python3); fi
if [ -z "$OUT_DIR" ]; then
    if [ -n "${OUT:-}" ]; then OUT_DIR="$OUT/gpu_check"; else OUT_DIR="results/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)"; fi
fi
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
STEPS="$OUT_DIR/steps.tsv"
: > "$STEPS"

if [ "$MODE" = cpu ]; then
    DEVICE=cpu
    BUDGET=${BUDGET:-290}
    # One thread per process: on a shared CPU, OpenMP threads that wait on each other make
    # every figure many times slower and noisier.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
    MODEL_CHECK_ARGS=(--tiny-only)
    STEP_ARGS=(--batch 4 --steps 3 --warmup 1)
    DATA_PATH_SIZE=(--videos 80 --questions 1536 --batches 4)
    TINY_ARGS=(--videos 60 --epochs 2 --batch-size 32)
    FEATURES_ARGS=(--small --videos 4 --baseline-videos 1 --models resnet101 --num-workers 1 --threads 1 --torchrun 2)
    EPOCH_ARGS=(--small --threads 1)
    MSRVTT_ARGS=(--small --clips 16 --train-questions 2048 --max-train-steps 2 --max-val-steps 1)
else
    DEVICE=cuda
    BUDGET=${BUDGET:-560}
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check.sh: no CUDA device visible to $PY; run with --cpu for the CPU variant" >&2
        exit 2
    fi
    MODEL_CHECK_ARGS=()
    STEP_ARGS=(--steps 10 --warmup 3)
    DATA_PATH_SIZE=()
    TINY_ARGS=(--videos 1200 --epochs 3 --batch-size 256)
    # 32 videos, and the same run once more under torchrun with 2 ranks sharing the GPU
    FEATURES_ARGS=(--videos 32 --baseline-videos 8 --torchrun 2)
    # full MSVD-QA size (bench/epoch.py's defaults); 1 warm-up + 1 timed epoch of ours per stage
    EPOCH_ARGS=(--epochs 1)
    # a table of 400 videos is enough to time steps; the steps of a whole epoch are extrapolated
    MSRVTT_ARGS=(--clips 16 --videos 400 --train-questions 158581 --val-questions 12278
                 --max-train-steps 60 --max-val-steps 10)
fi

START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

record() {  # name status seconds detail
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS"
}

skip_step() {  # name reason
    echo "=== $1: SKIP ($2)"
    record "$1" skip 0 "$2"
}

wanted() {  # name: selected by --steps (everything when --steps is not given)
    [ -z "$ONLY" ] && return 0
    local prefix
    if [ "$1" = tiny_data ]; then          # the training steps need its data
        wanted ddp_teacher || wanted ddp_student || wanted tiny_bf16
        return
    fi
    for prefix in ${ONLY//,/ }; do
        case $1 in "$prefix"*) return 0 ;; esac
    done
    return 1
}

run_step() {  # name limit_seconds command...
    local name=$1 limit=$2
    shift 2
    wanted "$name" || return 0
    local left=$(( BUDGET - $(elapsed) ))
    if [ "$left" -lt 20 ]; then
        skip_step "$name" "time budget of ${BUDGET}s used up"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local log="$OUT_DIR/$name.log"
    echo "=== $name (limit ${limit}s): ${*#$ROOT/}"
    local t0 rc status
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    local seconds
    seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    grep -v -e '^W[0-9]\{4\} ' -e '^\s*$' "$log" | tail -n 14 | sed 's/^/    /'
    echo "    -> $status (exit $rc) in ${seconds}s; log $log"
    record "$name" "$status" "$seconds" "exit $rc"
    return $rc
}

# (Possibly empty arrays are expanded as ${A[@]+"${A[@]}"}: bash before 4.4 calls "${A[@]}"
# unbound under set -u.)
{
    echo "gpu_check.sh mode=$MODE device=$DEVICE budget=${BUDGET}s started $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "python $PY"
    "$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| devices', torch.cuda.device_count()); [print('  ', torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]" 2>&1
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    git -C "$ROOT" rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /'
} | tee "$OUT_DIR/env.txt"

# 1. numerical check of the network on the device
run_step model_check 180 "$PY" bench/cuda_model_check.py --device "$DEVICE" ${MODEL_CHECK_ARGS[@]+"${MODEL_CHECK_ARGS[@]}"} \
    --json-out "$OUT_DIR/model_check.json"

# 2. teacher vs student step timing, fp32 and bf16
run_step model_step_fp32 100 "$PY" bench/model_step.py --device "$DEVICE" "${STEP_ARGS[@]}" \
    --json-out "$OUT_DIR/model_step_fp32.json"
run_step model_step_bf16 100 "$PY" bench/model_step.py --device "$DEVICE" "${STEP_ARGS[@]}" --amp bf16 \
    --json-out "$OUT_DIR/model_step_bf16.json"

# 3. the data path
run_step data_path 120 "$PY" bench/data_path.py --device "$DEVICE" ${DATA_PATH_SIZE[@]+"${DATA_PATH_SIZE[@]}"} \
    --json-out "$OUT_DIR/data_path.json"

# 4. whole epochs at MSVD-QA size: ours vs the original's approach, float32 (TF32) and bf16;
#    then bf16 + torch.compile, and the MSRVTT-QA shape
run_step epoch_fp32 180 "$PY" bench/epoch.py --device "$DEVICE" "${EPOCH_ARGS[@]}" --amp none \
    --json-out "$OUT_DIR/epoch_fp32.json"
run_step epoch_bf16 180 "$PY" bench/epoch.py --device "$DEVICE" "${EPOCH_ARGS[@]}" --amp bf16 \
    --json-out "$OUT_DIR/epoch_bf16.json"
if [ "$MODE" = cpu ]; then
    wanted epoch_bf16_compile && skip_step epoch_bf16_compile "GPU only (compiling on this CPU takes minutes)"
else
    run_step epoch_bf16_compile 240 "$PY" bench/epoch.py --device "$DEVICE" "${EPOCH_ARGS[@]}" --amp bf16 \
        --compile --no-baseline --json-out "$OUT_DIR/epoch_bf16_compile.json"
fi
run_step epoch_msrvtt 120 "$PY" bench/epoch.py --device "$DEVICE" "${MSRVTT_ARGS[@]}" --amp bf16 --no-baseline \
    --json-out "$OUT_DIR/epoch_msrvtt.json"

# 5. a short DDP training run on one device: teacher, then the student distilled from it; and
#    the teacher once more in one process under bf16, for its accuracy next to float32's
if wanted tiny_data; then
    if run_step tiny_data 60 "$PY" bench/make_tiny_data.py --out "$WORK/tiny" --device "$DEVICE" "${TINY_ARGS[@]}"; then
        CFG="$WORK/tiny/tiny.yml"
        for stage in teacher student; do
            run_step "ddp_$stage" 120 "$PY" -m torch.distributed.run --nproc_per_node=1 --standalone \
                train.py --cfg "$CFG" --stage "$stage"
            for file in results.json metrics.csv train.log; do
                [ -f "$WORK/tiny/results/$stage/$file" ] && cp "$WORK/tiny/results/$stage/$file" "$OUT_DIR/ddp_${stage}_$file"
            done
        done
        run_step tiny_bf16 120 "$PY" train.py --cfg "$CFG" --stage teacher --set train.amp=bf16 \
            --set output_dir="$WORK/tiny/results_bf16"
        for file in results.json metrics.csv; do
            [ -f "$WORK/tiny/results_bf16/teacher/$file" ] && cp "$WORK/tiny/results_bf16/teacher/$file" "$OUT_DIR/tiny_bf16_$file"
        done
    else
        for name in ddp_teacher ddp_student tiny_bf16; do wanted "$name" && skip_step "$name" "no tiny data"; done
    fi
fi

# 6. feature extraction (PyAV needed to make and decode the videos)
if wanted features && ! "$PY" -c "import av" 2>/dev/null; then
    WHEEL=$(ls shared/wheels/av-*.whl wheels/av-*.whl 2>/dev/null | head -n 1)
    if [ -n "$WHEEL" ]; then
        echo "=== installing $WHEEL (PyAV is not installed)"
        "$PY" -m pip install --quiet --no-index --no-deps "$WHEEL" 2>&1 | tail -n 3
    fi
fi
if ! wanted features; then
    :
elif "$PY" -c "import av" 2>/dev/null; then
    # GPU utilisation during the step (baseline and extractor phases alike), one sample per 250 ms
    SAMPLER=""
    if [ "$MODE" = gpu ] && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=timestamp,index,utilization.gpu --format=csv,noheader,nounits -lms 250 \
            > "$OUT_DIR/features_gpu_util.csv" 2>/dev/null &
        SAMPLER=$!
    fi
    run_step features 200 "$PY" bench/features.py --device "$DEVICE" "${FEATURES_ARGS[@]}" --json "$OUT_DIR/features.json"
    [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null && wait "$SAMPLER" 2>/dev/null
else
    skip_step features "PyAV (import av) is not available and no av-*.whl in shared/wheels/ or wheels/"
fi

echo
"$PY" - "$OUT_DIR" "$MODE" "$(elapsed)" <<'PYTHON'
import csv, json, os, sys

out, mode, total = sys.argv[1], sys.argv[2], int(sys.argv[3])


def load(name):
    try:
        with open(os.path.join(out, name), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def numbers(obj, prefix=""):
    """(path, value) of every number in a JSON tree."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from numbers(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield from numbers(value, f"{prefix}[{index}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, obj


def model_check(data):
    checks = data["checks"]
    passed = sum(c["passed"] for c in checks)
    values = {c["check"]: c.get("value") for c in checks}
    parts = [f"{passed}/{len(checks)} passed"]
    for name in ("cpu_vs_device[tiny]", "cpu_vs_device[spec]", "compile_vs_eager"):
        if values.get(name) is not None:
            parts.append(f"{name} {values[name]:.2g}")
    return "; ".join(parts)


def rate(value):
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def model_step(data):
    rows = {r["model"]: r for r in data["results"]}
    return "; ".join(f"{name} {rate(rows[name]['train_questions_per_s'])} q/s train, "
                     f"{rows[name]['eval_ms_per_question']:.3f} ms/q eval" for name in ("teacher", "student")
                     if name in rows)


def generic(data):
    """The ratios first, then the rates (whatever a benchmark's JSON looks like)."""
    keys = ("speedup", "ratio", "per_s")
    found = [(rank, path, value) for path, value in numbers(data)
             for rank, key in enumerate(keys) if key in path.split(".")[-1]]
    found.sort(key=lambda item: item[0])
    return "; ".join(f"{path} {value:.4g}" for _, path, value in found[:4]) or "see JSON"


def ddp(prefix):
    results = load(f"{prefix}_results.json")
    if not results:
        return "no results.json"
    text = f"test acc {100 * results['accuracy']:.1f}% (best epoch {results['epoch']})"
    try:
        with open(os.path.join(out, f"{prefix}_metrics.csv"), newline="") as handle:
            rows = list(csv.DictReader(handle))
        text += f"; last epoch {rate(float(rows[-1]['train_questions_per_s']))} q/s train, {float(rows[-1]['time_s']):.1f}s"
    except (OSError, KeyError, IndexError, ValueError):
        pass
    return text


def epoch(name):
    data = load(f"{name}.json")
    parts = []
    for stage, row in data["stages"].items():
        ours = row["ours"]
        text = (f"{stage} {ours['epoch_s']:.2f}s{' (extrap.)' if ours['extrapolated'] else ''}, "
                f"val acc {100 * ours['epochs'][-1]['val_accuracy']:.1f}%")
        if "ratio" in row:
            text += f", {row['ratio']:.1f}x the original"
        parts.append(text)
    util = data.get("gpu_utilization_percent") or {}
    if util.get("ours_teacher"):
        parts.append(f"GPU busy {util['ours_teacher']['mean']:.0f}% (teacher)")
    if name == "epoch_msrvtt":
        plan = data["msrvtt_qa_memory_plan"]
        parts.append(f"table {plan['table_gib']['float32']:.1f}/{plan['table_gib']['float16']:.1f} GiB fp32/fp16 -> "
                     f"{plan['choice']}")
    return "; ".join(parts)


def features():
    text = generic(load("features.json"))
    try:
        with open(os.path.join(out, "features_gpu_util.csv"), encoding="utf-8") as handle:
            values = [float(line.split(",")[2]) for line in handle if line.count(",") >= 2]
    except (OSError, ValueError):
        values = []
    if values:
        busy = [v for v in values if v > 0]
        text += (f"; GPU utilisation over the step {sum(values) / len(values):.0f}% mean"
                 + (f", {sum(busy) / len(busy):.0f}% while active" if busy else ""))
    return text


describe = {
    "epoch_fp32": lambda: epoch("epoch_fp32"),
    "epoch_bf16": lambda: epoch("epoch_bf16"),
    "epoch_bf16_compile": lambda: epoch("epoch_bf16_compile"),
    "epoch_msrvtt": lambda: epoch("epoch_msrvtt"),
    "tiny_bf16": lambda: ddp("tiny_bf16"),
    "model_check": lambda: model_check(load("model_check.json")),
    "model_step_fp32": lambda: model_step(load("model_step_fp32.json")),
    "model_step_bf16": lambda: model_step(load("model_step_bf16.json")),
    "data_path": lambda: generic(load("data_path.json")),
    "features": features,
    "ddp_teacher": lambda: ddp("ddp_teacher"),
    "ddp_student": lambda: ddp("ddp_student"),
}
steps = []
with open(os.path.join(out, "steps.tsv"), encoding="utf-8") as handle:
    for line in handle:
        name, status, seconds, detail = line.rstrip("\n").split("\t")
        if status == "ok" and name in describe:
            try:
                detail = describe[name]()
            except Exception as exc:          # a step's JSON in another shape: say so, keep going
                detail = f"ok, but its JSON could not be summarised ({type(exc).__name__}: {exc})"
        steps.append({"step": name, "status": status, "seconds": float(seconds), "detail": detail})
env = open(os.path.join(out, "env.txt"), encoding="utf-8").read().splitlines()
failed = [s["step"] for s in steps if s["status"] in ("failed", "timeout")]
print(f"gpu_check summary ({mode}; {env[0] if env else ''})")
print(f"{'step':<17} {'status':<8} {'seconds':>8}  result")
for s in steps:
    print(f"{s['step']:<17} {s['status']:<8} {s['seconds']:>8.1f}  {s['detail']}")
print(f"total {total}s; {len(steps) - len(failed)}/{len(steps)} steps without failure"
      + (f"; failed: {', '.join(failed)}" if failed else "") + f"; outputs in {out}")
with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as handle:
    json.dump({"mode": mode, "env": env, "total_seconds": total, "steps": steps, "failed": failed}, handle, indent=2)
sys.exit(1 if failed else 0)
PYTHON
