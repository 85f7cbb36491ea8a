"""What a run will need, said before the feature table is read: host memory, GPU memory and feature
reads, for the run's feature-table mode and dtype (`train.py --plan`, `validate.py --plan`), and
the one-line refusal when it will not fit.

How each part is known:
- the process: its resident memory after the step probe: torch and the libraries imported, the
  vocabulary and question splits loaded (they are small), what the probe made once per process
  (oneDNN's kernels), the feature table not;
- the feature table: the files' shapes (read from their headers) times the dtype's size;
- the networks: parameters counted on the meta device; training holds four float32 copies
  (weights, gradients, Adam's two moments), evaluation and a frozen teacher one;
- one step: the network runs on PROBE_QUESTIONS random questions of the run's shapes, forward
  and backward for training, forward only for evaluation (a distilling student's teacher runs
  inside the probe too), and the step grows in proportion to the batch from there. On the CPU the probe's
  cost is the rise of the process's resident memory as the kernel counts it (`_ResidentGrowth`);
  for the GPU it is the peak of live tensor bytes (`_LiveBytes`), what the caching allocator holds;
- batches in flight: the gathered features (two reused buffers in memory mode; in lazy mode
  the batch, and with loader workers each worker's prefetched batches).
Measured against the peak of real runs in bench/full_size.py (bench/README.md): 3-14% over for the
teacher, 22% over for a distilling student on MSVD-QA.
"""

from __future__ import annotations

import ctypes
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model import DualVGR, ModelConfig
from vqakd.core.config import Config
from vqakd.core.distributed import env_int
from vqakd.core.errors import UserError
from vqakd.data.features import LOAD_CHUNK_BYTES, choose_table_device
from vqakd.training.checkpoint import count_parameters

GIB = 2**30
PROBE_QUESTIONS = 16                  # the probe's batch: from here on a step's memory per question is steady
PREFETCH_FACTOR = 2                   # DataLoader's default: batches each worker keeps ready
WORKER_BYTES = 256 << 20              # a loader worker's own memory besides its batches (estimate)
CUDA_CONTEXT_BYTES = 600 << 20        # CUDA runtime and kernels on the GPU (estimate)


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors created inside the block that are still alive, and their peak: what a
    GPU's caching allocator holds.

    A storage's Python object lives exactly as long as the storage (torch keeps the two
    together), so a finalizer on it says when the memory is freed. Storages in `known` (weights,
    gradients, inputs: counted elsewhere) are not counted when an in-place op returns them."""

    def __init__(self, known: set[int]):
        super().__init__()
        self.counted = set(known)
        self.live = self.peak = 0

    def _freed(self, key: int, size: int) -> None:
        self.counted.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.counted:
                    self.counted.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


try:
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim        # glibc
except (OSError, AttributeError, TypeError):
    _MALLOC_TRIM = None


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere), so
    that a measurement that follows sees its own growth, not pages freed earlier and reused."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _proc_kib(path: str, key: str) -> Optional[int]:
    """A "Key:  N kB" line of a Linux /proc file, in bytes; None where there is none."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory_bytes() -> Optional[int]:
    """The kernel's estimate of memory available to a new process (MemAvailable), None where unknown."""
    return _proc_kib("/proc/meminfo", "MemAvailable")


def _peak_rss() -> Optional[int]:
    """The kernel's peak resident memory of this process since the last reset (Linux), or None."""
    return _proc_kib("/proc/self/status", "VmHWM")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _peak_rss() is not None
    except OSError:
        return False


class _ResidentGrowth:
    """How far the process's resident memory rose inside the block, at its peak, as the kernel
    counts it: pages written, not bytes allocated. It sees what tensors do not show: oneDNN's LSTM
    workspace is allocated whole and about half written; its backward scratch lives inside the op."""

    def __enter__(self):
        release_free_heap()          # free heap pages would hide the block's growth
        _reset_peak_rss()
        self.start = process_rss()
        self.peak = 0
        return self

    def __exit__(self, *exc) -> None:
        self.peak = max(0, (_peak_rss() or 0) - self.start)


@dataclass
class StepCost:
    """Peak bytes of one step (inputs, weights and gradients excluded), per question."""

    train_per_question: float
    eval_per_question: float

    def train(self, batch: int) -> int:
        return int(self.train_per_question * batch)

    def eval(self, batch: int) -> int:
        return int(self.eval_per_question * batch)


def measure_step(model_config: ModelConfig, frames: int, *, stage: str = "teacher", loss_cfg=None,
                 teacher_config: Optional[ModelConfig] = None, amp: str = "none", question_width: int = 30,
                 question_length: int = 8, count: str = "resident") -> StepCost:
    """Run the network (and a distilling student's teacher) on PROBE_QUESTIONS random questions of
    the run's shapes (`question_width`: the padded width, `question_length`: the mean length), on
    the CPU, forward and backward, then forward only. `count`: "resident", the growth of this
    process's resident memory (host memory; where the kernel cannot say, live tensor bytes, an
    upper bound), or "tensors", the bytes of live tensors (GPU memory). The global RNG is left
    untouched."""
    from vqakd.training.engine import compute_loss

    resident = count == "resident" and _reset_peak_rss()
    per_question = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DualVGR(model_config)
        teacher = DualVGR(teacher_config).eval().requires_grad_(False) if teacher_config is not None else None
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        kept = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters())]
        kept += [*teacher.parameters(), *teacher.buffers()] if teacher is not None else []
        # A first pass at two questions pays what happens once per process (oneDNN's kernels,
        # lazily made buffers); the plan counts it with the process, not once per question.
        for training, size, measured in ((True, 2, False), (False, 2, False),
                                         (True, PROBE_QUESTIONS, True), (False, PROBE_QUESTIONS, True)):
            model.train(training)
            appearance = torch.rand(size, model_config.num_nodes, frames, model_config.vision_dim)
            motion = torch.rand(size, model_config.num_nodes, model_config.vision_dim)
            question = torch.randint(2, model_config.question_vocab_size, (size, question_width))
            length = torch.full((size,), min(question_length, question_width))
            labels = torch.randint(0, model_config.answer_vocab_size, (size,))
            known = {t.untyped_storage().data_ptr() for t in kept + [appearance, motion, question, length, labels]}
            meter = _ResidentGrowth() if resident else _LiveBytes(known)
            with meter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                with torch.no_grad():
                    teacher_output = teacher(appearance, motion, question, length) if teacher is not None else None
                with torch.set_grad_enabled(training):
                    output = model(appearance, motion, question, length)
                    if training:
                        compute_loss(output, labels, loss_cfg, stage, teacher_output, 1)["loss"].backward()
                del output, teacher_output
            if measured:
                per_question[training] = meter.peak / size
    release_free_heap()
    return StepCost(per_question[True], per_question[False])


def process_rss() -> int:
    """This process's resident memory now (Linux; 0 where unknown)."""
    return _proc_kib("/proc/self/status", "VmRSS") or 0


def table_setting(mode: str, dtype: str) -> str:
    """How the plan names a feature-table setting: "memory float16", "lazy"."""
    return f"{mode} {dtype}" if mode == "memory" else "lazy"


@dataclass
class MemoryPlan:
    """A run's needs; `host` and `gpu` map each part to its bytes (the peak is their sum)."""

    what: str
    mode: str
    dtype: str
    table_on: str
    batch: int
    host: dict[str, int]
    gpu: dict[str, int]
    host_available: Optional[int]
    gpu_free: Optional[int]
    disk_at_start: int
    disk_per_epoch: int
    others: dict[str, dict[str, int]] = field(default_factory=dict)   # "memory float16" -> {"host", "gpu"}
    processes: int = 1          # processes of this run on this machine (torchrun), each with `host`

    @property
    def host_peak(self) -> int:
        return sum(self.host.values()) * self.processes

    @property
    def gpu_peak(self) -> int:
        return sum(self.gpu.values())

    def fits(self, need: Optional[dict[str, int]] = None) -> bool:
        """Whether the run fits, or with `need` another feature-table setting (an entry of `others`)."""
        need = need or {"host": self.host_peak, "gpu": self.gpu_peak}
        return ((self.host_available is None or need["host"] <= self.host_available)
                and (self.gpu_free is None or need["gpu"] <= self.gpu_free))

    def setting(self) -> str:
        return table_setting(self.mode, self.dtype)

    def lines(self) -> list[str]:
        available = "" if self.host_available is None else f" of {self.host_available / GIB:.1f} GiB available"
        each = f" ({self.processes} processes on this machine, one share each)" if self.processes > 1 else ""
        out = [f"memory plan ({self.what}, feature table: {self.setting()} on {self.table_on}, batch {self.batch}):",
               f"  host memory: {self.host_peak / GIB:.1f} GiB at the peak{available}{each}"]
        out += [f"    {name:<38}{value / GIB:6.2f} GiB" for name, value in self.host.items()]
        if self.gpu:
            free = "" if self.gpu_free is None else f" of {self.gpu_free / GIB:.1f} GiB free"
            out.append(f"  GPU memory: {self.gpu_peak / GIB:.1f} GiB at the peak{free}")
            out += [f"    {name:<38}{value / GIB:6.2f} GiB" for name, value in self.gpu.items()]
        out.append(f"  feature reads: {self.disk_at_start / GIB:.1f} GiB at start-up, "
                   f"{self.disk_per_epoch / GIB:.1f} GiB per epoch (from disk or the page cache)")
        for name, need in self.others.items():
            gpu = f", GPU {need['gpu'] / GIB:.1f} GiB" if self.gpu else ""
            verdict = "fits" if self.fits(need) else "does not fit"
            out.append(f"  with {name}: host {need['host'] / GIB:.1f} GiB{gpu} ({verdict})")
        out.append("  verdict: " + ("fits" if self.fits() else "does NOT fit"))
        return out

    def record(self) -> dict[str, Any]:
        return {"what": self.what, "mode": self.mode, "dtype": self.dtype, "table_on": self.table_on,
                "batch": self.batch, "host_peak_bytes": self.host_peak, "gpu_peak_bytes": self.gpu_peak,
                "host": self.host, "gpu": self.gpu, "host_available_bytes": self.host_available,
                "gpu_free_bytes": self.gpu_free, "feature_reads_at_start_bytes": self.disk_at_start,
                "feature_reads_per_epoch_bytes": self.disk_per_epoch, "others": self.others,
                "processes": self.processes}

    def refusal(self) -> Optional[str]:
        """The one-line refusal when the run will not fit, naming a setting that would."""
        if self.fits():
            return None
        if self.host_available is not None and self.host_peak > self.host_available:
            where, side, need, have = "memory", "host", self.host_peak, self.host_available
        else:
            where, side, need, have = "GPU memory", "gpu", self.gpu_peak, self.gpu_free
        biggest = max(getattr(self, side).items(), key=lambda item: item[1])
        would = [name for name, other in self.others.items() if self.fits(other)]
        advice = (f"data.feature_{'dtype: float16' if would[0] == 'memory float16' else 'mode: lazy'} would fit "
                  f"({would[0]}: {self.others[would[0]][side] / GIB:.1f} GiB)"
                  if would else f"no feature-table setting fits: lower the batch size "
                  f"(train.batch_size / train.eval_batch_size is {self.batch})")
        return (f"this run needs {need / GIB:.1f} GiB of {where} (largest part: {biggest[0]}, "
                f"{biggest[1] / GIB:.1f} GiB; feature table: {self.setting()}) but {have / GIB:.1f} GiB is available; "
                f"{advice}; see the plan with --plan")


def check_model_fits_memory(model_config: ModelConfig) -> int:
    """Refuse a network whose weights alone (float32, with Adam's two moments and the gradient:
    4 copies) exceed this machine's memory, sized on the meta device before the step probe builds
    it: `model.module_dim=4194304` would otherwise die deep inside the allocator. Returns its
    parameter count."""
    with torch.device("meta"):
        parameters = count_parameters(DualVGR(model_config))
    need = 4 * 4 * parameters
    try:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return parameters   # the size of memory is unknown here: let the allocator decide
    if need > memory_bytes:
        sizes = ", ".join(f"model.{key}={getattr(model_config, key)}"
                          for key in ("module_dim", "word_dim", "vision_dim"))
        raise UserError(f"the network would have {parameters:,} parameters, {need / 2**30:,.1f} GiB to train "
                        f"(weights, gradients, Adam state), more than this machine's {memory_bytes / 2**30:,.1f} GiB "
                        f"of memory; check the model sizes ({sizes})")
    return parameters


def plan_run(config: Config, bundle, model_config: ModelConfig, device: torch.device, *, training: bool,
             batch: int, eval_batch: int, stage: str = "teacher", teacher_config: Optional[ModelConfig] = None,
             processes: Optional[int] = None, refuse: bool = False) -> MemoryPlan:
    """The plan of a run of `model_config` on `bundle` (vocabulary and question splits loaded, the
    feature table not yet): `batch` / `eval_batch` are this process's batch sizes, `processes`
    the run's processes on this machine (default: torchrun's LOCAL_WORLD_SIZE). `refuse`: raise
    the plan's one-line refusal when the run will not fit."""
    processes = processes or env_int("LOCAL_WORLD_SIZE", 1)
    table = bundle.table
    videos, _, frames, _ = table.appearance_info.shape
    file_bytes = sum(os.path.getsize(info.path) for info in (table.appearance_info, table.motion_info))
    state = ((16 if training else 4) * check_model_fits_memory(model_config)
             + (4 * check_model_fits_memory(teacher_config) if teacher_config is not None else 0))
    gpu_free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    questions = bundle.splits.get("train") or next(iter(bundle.splits.values()))
    cost = measure_step(model_config, frames, stage=stage, loss_cfg=config.loss, teacher_config=teacher_config,
                        amp=config.train.amp, question_width=int(questions.questions.shape[1]),
                        question_length=max(1, round(float(questions.lengths.float().mean()))),
                        count="tensors" if device.type == "cuda" else "resident")
    rss = process_rss()              # after the probe: what it made once per process stays
    big = max(batch, eval_batch) if training else eval_batch
    working = max(cost.train(batch), cost.eval(eval_batch)) if training else cost.eval(eval_batch)
    networks = {"networks (weights" + (", gradients, Adam)" if training else ")"): state,
                f"one step (batch {big})": working}

    def needs(mode: str, dtype: str) -> tuple[dict[str, int], dict[str, int], str]:
        itemsize = 2 if dtype == "float16" else 4
        table_bytes = table.nbytes(itemsize) if mode == "memory" else 0
        table_on = str(choose_table_device(config, table, device, mode=mode, nbytes=table_bytes))
        batch_bytes = table.row_bytes(itemsize) * big
        if mode == "memory":
            # Loading converts float32 chunks; after that, two reused batch buffers.
            in_flight = max(LOAD_CHUNK_BYTES * (4 + itemsize) // 4, 2 * batch_bytes if table_on == "cpu" else 0)
        else:
            # The batch being trained on; the rows read for the next one are freed before the step's
            # tensors grow. Each loader worker adds its own process and its prefetched batches.
            in_flight = batch_bytes + config.train.num_workers * (WORKER_BYTES + PREFETCH_FACTOR * batch_bytes)
        host = {"process (libraries, question splits)": rss, "feature table": table_bytes if table_on == "cpu" else 0,
                "batches in flight": in_flight}
        if device.type != "cuda":
            return {**host, **networks}, {}, table_on
        return host, {"CUDA context": CUDA_CONTEXT_BYTES, **networks, "batches on the GPU": 2 * batch_bytes,
                      "feature table": table_bytes if table_on != "cpu" else 0}, table_on

    mode, dtype = config.data.feature_mode, config.data.feature_dtype
    host, gpu, table_on = needs(mode, dtype)
    per_epoch = 0
    if mode == "lazy":
        row = table.row_bytes(4)          # lazy mode reads the files' float32 rows
        sizes = {"train": batch, "val": eval_batch} if training else dict.fromkeys(bundle.splits, eval_batch)
        for name, size in sizes.items():
            batches = math.ceil(len(bundle.splits[name]) / size)
            rows = videos * (1.0 - (1.0 - 1.0 / videos) ** size)     # distinct videos in a batch, expected
            per_epoch += int(min(batches, config.train.max_steps or batches) * rows * row)
    others = {}
    for other_mode, other_dtype in (("memory", "float32"), ("memory", "float16"), ("lazy", dtype)):
        name = table_setting(other_mode, other_dtype)
        if name == table_setting(mode, dtype):
            continue
        try:
            other_host, other_gpu, _ = needs(other_mode, other_dtype)
        except UserError:           # a setting data.feature_device rules out
            continue
        others[name] = {"host": sum(other_host.values()) * processes, "gpu": sum(other_gpu.values())}
    plan = MemoryPlan(f"{stage} training" if training else "evaluation", mode, dtype, table_on,
                      batch if training else eval_batch, host, gpu, available_memory_bytes(), gpu_free,
                      file_bytes if mode == "memory" else 0, per_epoch, others, processes)
    if refuse and (refusal := plan.refusal()):
        raise UserError(refusal)
    return plan
