"""Process-group helpers that are no-ops in a single process and work under `torchrun`.

Without torchrun's RANK / WORLD_SIZE everything here behaves as rank 0 of a world of size 1. With
CUDA the group is "cpu:gloo,cuda:nccl": gradients and metrics go through NCCL, control messages
(agreement, error texts, gathered predictions) through gloo, which needs no GPU; a `control_only`
group (feature extraction) is gloo alone. Each rank uses `cuda:LOCAL_RANK`; only global rank 0
writes files. Metrics are sums and counts, so `all_reduce_sum` gives the figures of the whole split.

A check that fails on one rank must stop every rank, not leave the others waiting in a
collective: `agree(fn)` runs a phase on every rank, `from_main(fn)` on rank 0 alone, and if any
rank failed every rank raises (the others a `UserError` marked `shown_by_main`, printed by rank 0
only: see `quiet_unless_main`). Collectives time out after `DEFAULT_TIMEOUT_S` (env
VQAKD_DIST_TIMEOUT_S), so a rank that dies mid-epoch ends the job instead of hanging it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from vqakd.core.errors import UserError

DEFAULT_TIMEOUT_S = 1800
TIMEOUT_ENV = "VQAKD_DIST_TIMEOUT_S"
T = TypeVar("T")


def env_int(name: str, default: int = 0) -> int:
    """An integer from the environment: torchrun's RANK, WORLD_SIZE, LOCAL_RANK (which GPU of the node),
    LOCAL_WORLD_SIZE (processes sharing its RAM), ...; `default` when unset or not a number (in a
    process torchrun did not start: ranks 0, sizes 1)."""
    try:
        return int(os.environ.get(name, str(default)))
    except ValueError:
        return default


def under_torchrun() -> bool:
    """Several processes, or torchrun started this one even as a world of one (the DDP code path runs too)."""
    return (env_int("WORLD_SIZE", 1) > 1
            or {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys())


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Only the main process (global rank 0) writes files and logs."""
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (and return it); identity in a single process."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, through gloo; [obj] in a single process."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj, group=_CPU_GROUP)
    return gathered


# The gloo group of control messages that `session` makes beside NCCL (None: the default group, gloo already).
_CPU_GROUP: Any = None


def barrier() -> None:
    """Wait for every rank (a CPU all-reduce: never touches a GPU of the wrong process)."""
    if get_world_size() > 1:
        dist.all_reduce(torch.zeros(1), group=_CPU_GROUP)


@contextlib.contextmanager
def session(*, timeout: datetime.timedelta | None = None, control_only: bool = False) -> Iterator[None]:
    """The process group for the duration of a script, when launched by torchrun or with several
    processes. `control_only`: gloo alone, no CUDA device selected. `timeout` (default
    DEFAULT_TIMEOUT_S, or VQAKD_DIST_TIMEOUT_S) bounds every collective, barriers included. A session
    inside another (a study's train and validate calls) keeps the outer group: under torchrun the
    next call could not rejoin."""
    global _CPU_GROUP
    started = not is_initialized() and under_torchrun()
    if started:
        if not dist.is_available():
            raise UserError("this PyTorch build has no torch.distributed; run a single process")
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise UserError(f"WORLD_SIZE is {env_int('WORLD_SIZE', 1)} but {name} is not set; launch with "
                                "torchrun (python -m torch.distributed.run) or unset WORLD_SIZE")
        backend = "gloo"
        if torch.cuda.is_available() and not control_only:
            if env_int("LOCAL_RANK") < torch.cuda.device_count():
                torch.cuda.set_device(env_int("LOCAL_RANK"))
            backend = "cpu:gloo,cuda:nccl"
        seconds = env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
        timeout = timeout or datetime.timedelta(seconds=seconds if seconds > 0 else DEFAULT_TIMEOUT_S)
        dist.init_process_group(backend=backend, timeout=timeout)
        if backend != "gloo":
            _CPU_GROUP = dist.new_group(backend="gloo")
    try:
        yield
    finally:
        if started:
            if is_initialized():
                dist.destroy_process_group()
            _CPU_GROUP = None


def agree(fn: Callable[[], T], what: str = "start-up") -> T:
    """Run `fn` on every rank; if it raised on any rank, raise on every rank: the first failing
    rank its own exception (with its traceback), the others a UserError naming that rank, marked
    `shown_by_main` (rank 0 prints it, the rest stay quiet). In a single process: `fn()`."""
    if get_world_size() == 1:
        return fn()
    try:
        result, failure = fn(), None
    except Exception as exc:       # noqa: BLE001 - reported to every rank, then re-raised
        result, failure = None, exc
    outcome = (None if failure is None
               else str(failure) if isinstance(failure, UserError) else f"{type(failure).__name__}: {failure}")
    failed = [(rank, text) for rank, text in enumerate(all_gather_objects(outcome)) if text is not None]
    if not failed:
        return result  # type: ignore[return-value]
    rank, text = failed[0]
    if failure is not None and rank == get_rank():
        # Rank 0 prints its own error; another rank's UserError is printed by rank 0 (below).
        if isinstance(failure, UserError) and rank != 0:
            failure.shown_by_main = True   # type: ignore[attr-defined]
        raise failure
    error = UserError(text if rank == 0 else f"rank {rank} failed during {what}: {text}")
    error.shown_by_main = True      # type: ignore[attr-defined]
    raise error


def from_main(fn: Callable[[], T], what: str = "start-up") -> T:
    """Run `fn` on rank 0 only and return its (picklable) value on every rank; failures as in `agree`."""
    value = agree(lambda: fn() if get_rank() == 0 else None, what)
    return all_gather_objects(value)[0]


def quiet_unless_main(fn: Callable[[], int]) -> int:
    """Run an entry point's body; on ranks other than 0, an error that rank 0 also raised and
    prints (see `agree`) ends the process with status 2 without printing it a second time."""
    try:
        return fn()
    except UserError as exc:
        rank = env_int("RANK")
        if rank != 0 and getattr(exc, "shown_by_main", False):
            return 2
        if rank != 0 and env_int("WORLD_SIZE", 1) > 1:
            raise UserError(f"rank {rank}: {exc}") from None
        raise


class _DifferentiableAllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks (what SyncBatchNorm does).
    Written here because torch.distributed.nn's all_reduce is deprecated, and its backward
    aborted one of two test processes now and then ("terminate called without an active exception")."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.contiguous().clone())


class GlobalBatchNorm1d(torch.nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the whole global batch on any device and backend
    (SyncBatchNorm refuses CPU tensors): K processes with B/K questions match one with B, up to
    rounding; two reductions (sum, then squared deviations) keep the two-pass variance's accuracy.
    The reductions are differentiable: their backward sums the gradients over ranks."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and get_world_size() > 1):
            return super().forward(input)
        all_reduce_with_grad = _DifferentiableAllReduceSum.apply
        self._check_input_dim(input)
        out_dtype = input.dtype
        if input.dtype in (torch.float16, torch.bfloat16):
            input = input.float()       # statistics (and the count) in float32, as F.batch_norm does
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        local_count = input.numel() // input.size(1)
        count_and_sum = all_reduce_with_grad(torch.cat([input.new_full((1,), float(local_count)),
                                                        input.sum(dim=dims)]))
        count = count_and_sum[0].detach()
        mean = count_and_sum[1:] / count
        centred = input - mean.view(shape)
        var = all_reduce_with_grad((centred * centred).sum(dim=dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(out_dtype)


def convert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Make every BatchNorm1d in `module` a GlobalBatchNorm1d, in place (the same objects, parameters
    and buffers: the subclass adds no state); returns `module`."""
    for child in module.modules():
        if type(child) is torch.nn.BatchNorm1d:
            child.__class__ = GlobalBatchNorm1d
    return module


# ----------------------------------------------------------------------------------- devices

def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a user's device string into a torch.device, checking that it exists."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {spec!r} requested but only {torch.cuda.device_count()} "
                        "CUDA device(s) are visible")
    return device


def resolve_process_device(spec: str = "auto", what: str = "--device") -> torch.device:
    """The device of this process, for training and feature extraction alike: `resolve_device(spec)`,
    but under torchrun auto/cuda mean cuda:LOCAL_RANK and cuda:N is refused (every process would
    share one GPU). A GPU with an index becomes the current CUDA device, so stray allocations
    (pin-memory thread, workspaces) do not open a context on GPU 0. `what` names the setting."""
    spec = (spec or "auto").strip().lower()
    if under_torchrun() and spec.startswith("cuda:"):
        raise UserError(f"{what} {spec!r}: under torchrun every process uses cuda:LOCAL_RANK; set {what} "
                        "to auto or cuda (and pick GPUs with CUDA_VISIBLE_DEVICES)")
    device = resolve_device(spec)
    if under_torchrun() and device.type == "cuda":
        local_rank = env_int("LOCAL_RANK")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                            "visible; use --nproc_per_node at most the number of GPUs per node")
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device
