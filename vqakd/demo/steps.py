"""The step runner of the demo: each step is a script run as a subprocess (or an action in this
process), skipped, resumed or started afresh as vqakd/demo/pipeline.py says."""

from __future__ import annotations

import os
import resource
import shlex
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

from vqakd.core.errors import UserError
from vqakd.core.files import atomic_open, ensure_writable_dir, read_json, write_json

STATE_FILE = "demo_state.json"
LOG_TAIL_LINES = 20
NOT_WRITTEN = "demo step {step!r} did not write {path}"


def display_path(path: str) -> str:
    """`path` relative to the current directory when it lies below it, else absolute."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative.startswith("..") else relative


@dataclass
class Step:
    """A script run with `args` (or, without a script, `action` run here), reading the files `inputs`
    lists and writing those `outputs` lists; its record is kept in `state_dir`'s STATE_FILE. Only
    `args` are compared: `show_args` (progress flags) and `env` (thread counts) change what is
    shown or the speed."""
    name: str
    script: Optional[str]
    args: list[str] | Callable[[], list[str]]      # a callable: the arguments once earlier steps ran
    inputs: Callable[[], list[str]]
    outputs: Callable[[], list[str]]
    state_dir: str
    show_args: list[str] = field(default_factory=list)
    # (resuming an interrupted run of the same inputs?) -> extra flags (--resume / --overwrite)
    restart_args: Callable[[bool], list[str]] = lambda resuming: []
    action: Optional[Callable[[], None]] = None
    stdout_path: Optional[str] = None            # the script's standard output is kept in this file
    env: dict[str, str] = field(default_factory=dict)

    def command_line(self, extra: list[str]) -> str:
        if self.script is None:
            return "(in the runner)"
        shown = ["python", display_path(self.script), *self.args, *extra, *self.show_args]
        return " ".join(shlex.quote(part) for part in shown)

    def files(self, paths: list[str], missing: str) -> dict[str, list[int]]:
        """{shown path: [size, mtime_ns]} of `paths`; a missing one raises UserError(missing)."""
        stats = {}
        for path in paths:
            try:
                stat = os.stat(path)
            except OSError:
                raise UserError(missing.format(step=self.name, path=display_path(path))) from None
            stats[display_path(path)] = [stat.st_size, stat.st_mtime_ns]
        return stats


class Runner:
    def __init__(self, quiet: bool, log_dir: str) -> None:
        self.quiet = quiet
        self.log_dir = log_dir
        self.times: list[tuple[str, str, float]] = []      # (step, "ran" | "skipped", seconds)
        # CPU seconds (user + system, all processes) of each step that ran: with the wall times,
        # what a step would take on an idle machine (the demo's machine may be shared).
        self.cpu: dict[str, float] = {}

    def run(self, step: Step, number: int, total: int) -> None:
        started = time.perf_counter()
        cpu_started = _cpu_seconds()
        if callable(step.args):
            step.args = step.args()
        missing = "demo step {step!r}: input file {path} is missing (an earlier step did not write it)"
        key = {"args": step.args, "inputs": step.files(step.inputs(), missing)}
        state_path = os.path.join(step.state_dir, STATE_FILE)
        try:
            state = read_json(state_path) if os.path.isfile(state_path) else {}
        except UserError:
            state = {}          # a damaged state file only costs a re-run of the steps
        state = state if isinstance(state, dict) else {}
        previous = state.get(step.name, {})
        try:
            outputs = step.files(step.outputs(), NOT_WRITTEN)
        except UserError:                   # an output is missing, or the list of outputs is not known yet
            outputs = None
        label = f"[{number}/{total}] {step.name}"
        if outputs and previous == {"key": key, "outputs": outputs}:
            print(f"{label}: skip, outputs up to date: {step.command_line([])}", flush=True)
            self.times.append((step.name, "skipped", time.perf_counter() - started))
            return
        extra = step.restart_args(previous == {"key": key})     # the same inputs, not finished
        write_json(state_path, {**state, step.name: {"key": key}})
        command = step.command_line(extra)
        print(f"{label}: {command}", flush=True)
        if step.script is None:
            step.action()
        else:
            self._call(step, extra, command)
        outputs = step.files(step.outputs(), NOT_WRITTEN)
        write_json(state_path, {**state, step.name: {"key": key, "outputs": outputs}})
        seconds = time.perf_counter() - started
        self.cpu[step.name] = _cpu_seconds() - cpu_started
        print(f"{label}: done in {seconds:.1f} s ({self.cpu[step.name]:.1f} s CPU)", flush=True)
        self.times.append((step.name, "ran", seconds))

    def _call(self, step: Step, extra: list[str], command: str) -> None:
        """Run the step's script; when quiet, its output (stderr only, with `stdout_path`) goes to its log."""
        argv = [sys.executable, step.script, *step.args, *extra, *step.show_args]
        if self.quiet:
            ensure_writable_dir(self.log_dir, "demo log folder")
        log_path = os.path.join(self.log_dir, step.name.replace(" ", "_") + ".log")
        with open(log_path, "w+", encoding="utf-8", errors="replace") if self.quiet else nullcontext() as log:
            result = subprocess.run(argv, stdout=subprocess.PIPE if step.stdout_path else log, stderr=log,
                                    text=True, env={**os.environ, **step.env})
            if step.stdout_path and (not self.quiet or result.returncode != 0):
                print(result.stdout, end="", flush=True)
            elif log is not None and result.returncode != 0:
                log.seek(0)
                print("\n".join(log.read().splitlines()[-LOG_TAIL_LINES:]), file=sys.stderr)
        if result.returncode != 0:
            raise UserError(f"demo step {step.name!r} failed (exit status {result.returncode}): {command}")
        if step.stdout_path:
            with atomic_open(step.stdout_path, "w", encoding="utf-8") as handle:
                handle.write(result.stdout)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)
