"""The step runner of the demo: each step is a script run as a subprocess (or an action in this
process), skipped when a fingerprint of its command and of its input files' contents, and the
sha256 of its outputs, match what `demo_state.json` recorded; an interrupted step is resumed,
one whose inputs changed is started afresh (see vqakd/demo/pipeline.py for the demo's steps).
"""

from __future__ import annotations

import functools
import hashlib
import json
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
from vqakd.core.files import atomic_open, ensure_writable_dir, file_sha256, read_json, write_json

STATE_FILE = "demo_state.json"
LOG_TAIL_LINES = 20
IN_THE_RUNNER = "(in the runner)"      # what a step without a script shows as its command
NOT_WRITTEN = "demo step {step!r} did not write {path}"


def display_path(path: str) -> str:
    """`path` relative to the current directory when it lies below it, else absolute."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative.startswith("..") else relative


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def file_hash(path: str) -> Optional[str]:
    """sha256 of a file (computed once per path, size and mtime), None when it does not exist."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return _sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


class StateFile:
    """`demo_state.json` of one folder: {step name: {inputs, done, outputs, seconds, command}}."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, STATE_FILE)
        try:
            loaded = read_json(self.path) if os.path.isfile(self.path) else {}
        except UserError:
            loaded = {}     # a damaged state file only costs a re-run of the steps
        steps = loaded.get("steps") if isinstance(loaded, dict) else None
        self.steps: dict = steps if isinstance(steps, dict) else {}

    def get(self, name: str) -> dict:
        entry = self.steps.get(name)
        return entry if isinstance(entry, dict) else {}

    def put(self, name: str, entry: dict) -> None:
        self.steps[name] = entry
        ensure_writable_dir(os.path.dirname(self.path) or ".", "demo state folder")
        write_json(self.path, {"steps": self.steps})


@dataclass
class Step:
    """A script run with `args` (or, without a script, `action` run here), reading the files `inputs`
    lists and writing those `outputs` lists. Only `args` and the inputs' contents are fingerprinted:
    `show_args` (progress flags) and `env` (thread counts) change what is shown or the speed."""
    name: str
    script: Optional[str]
    args: list[str]
    inputs: Callable[[], list[str]]
    outputs: Callable[[], list[str]]
    state: StateFile
    show_args: list[str] = field(default_factory=list)
    # (resuming an interrupted run of the same inputs?) -> extra flags (--resume / --overwrite)
    restart_args: Callable[[bool], list[str]] = lambda resuming: []
    action: Optional[Callable[[], None]] = None
    late_args: Optional[Callable[[], list[str]]] = None     # replace `args` once earlier steps ran
    stdout_path: Optional[str] = None            # the script's standard output is kept in this file
    env: dict[str, str] = field(default_factory=dict)

    def command_line(self, extra: list[str]) -> str:
        if self.script is None:
            return IN_THE_RUNNER
        shown = ["python", display_path(self.script), *self.args, *extra, *self.show_args]
        return " ".join(shlex.quote(part) for part in shown)


def file_digests(step: Step, paths: list[str], missing: str) -> dict[str, str]:
    """{shown path: sha256} of `paths`; a missing file raises UserError(missing.format(step=, path=))."""
    digests = {}
    for path in paths:
        digest = file_hash(path)
        if digest is None:
            raise UserError(missing.format(step=step.name, path=display_path(path)))
        digests[display_path(path)] = digest
    return digests


def fingerprint(step: Step) -> str:
    """What the step's result depends on: its arguments and the contents of its inputs."""
    missing = "demo step {step!r}: input file {path} is missing (an earlier step did not write it)"
    files = file_digests(step, step.inputs(), missing)
    text = json.dumps({"script": os.path.basename(step.script or step.name), "args": step.args, "inputs": files},
                      sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_up_to_date(step: Step, inputs_fp: str) -> bool:
    entry = step.state.get(step.name)
    if not entry.get("done") or entry.get("inputs") != inputs_fp:
        return False
    try:
        outputs = file_digests(step, step.outputs(), NOT_WRITTEN)
    except UserError:                   # an output is missing, or the list of outputs is not known yet
        return False
    recorded = entry.get("outputs") or {}
    return bool(outputs) and all(recorded.get(name) == digest for name, digest in outputs.items())


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
        if step.late_args is not None:
            step.args = step.late_args()
        inputs_fp = fingerprint(step)
        label = f"[{number}/{total}] {step.name}"
        if is_up_to_date(step, inputs_fp):
            print(f"{label}: skip, outputs up to date: {step.command_line([])}", flush=True)
            self.times.append((step.name, "skipped", time.perf_counter() - started))
            return
        previous = step.state.get(step.name)
        extra = step.restart_args(previous.get("inputs") == inputs_fp and not previous.get("done"))
        step.state.put(step.name, {"inputs": inputs_fp, "done": False})
        command = step.command_line(extra)
        print(f"{label}: {command}", flush=True)
        if step.script is None:
            step.action()
        else:
            self._call(step, extra, command)
        outputs = file_digests(step, step.outputs(), NOT_WRITTEN)
        seconds = time.perf_counter() - started
        step.state.put(step.name, {"inputs": inputs_fp, "done": True, "outputs": outputs,
                                   "seconds": round(seconds, 2), "command": step.command_line([])})
        self.cpu[step.name] = _cpu_seconds() - cpu_started
        print(f"{label}: done in {seconds:.1f} s ({self.cpu[step.name]:.1f} s CPU)", flush=True)
        self.times.append((step.name, "ran", seconds))

    def _call(self, step: Step, extra: list[str], command: str) -> None:
        """Run the step's script; when quiet, its output (stderr only, with `stdout_path`) goes to its log."""
        argv = [sys.executable, step.script, *step.args, *extra, *step.show_args]
        env = {**os.environ, **step.env} if step.env else None
        if self.quiet:
            ensure_writable_dir(self.log_dir, "demo log folder")
        log_path = os.path.join(self.log_dir, step.name.replace(" ", "_") + ".log")
        with open(log_path, "w+", encoding="utf-8", errors="replace") if self.quiet else nullcontext() as log:
            if step.stdout_path:
                result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
                if not self.quiet or result.returncode != 0:
                    print(result.stdout, end="", flush=True)
            else:
                result = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT if log else None, env=env)
                if log is not None and result.returncode != 0:
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
