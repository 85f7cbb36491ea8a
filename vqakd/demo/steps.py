"""The step runner of the demo: each step is a script run as a subprocess (or an action in this
process), skipped when a fingerprint of its command and of its input files' contents, and the
sha256 of its outputs, match what `demo_state.json` recorded; an interrupted step is resumed,
one whose inputs changed is started afresh (see vqakd/demo/pipeline.py for the demo's steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from vqakd.core.errors import UserError
from vqakd.core.files import atomic_open, ensure_writable_dir, file_sha256, read_json, write_json

STATE_FILE = "demo_state.json"
LOG_TAIL_LINES = 20


def display_path(path: str) -> str:
    """`path` relative to the current directory when it lies below it, else absolute."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative.startswith("..") else relative


class FileHashes:
    """sha256 of files, computed once per (path, size, mtime) in this process."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], str] = {}

    def __call__(self, path: str) -> Optional[str]:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._cache:
            self._cache[key] = file_sha256(path)
        return self._cache[key]


class StateFile:
    """`demo_state.json` of one folder: {step name: {inputs, done, outputs, seconds, command}}."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, STATE_FILE)
        self.steps: dict = {}
        if os.path.isfile(self.path):
            try:
                loaded = read_json(self.path)
            except UserError:
                loaded = None   # a damaged state file only costs a re-run of the steps
            if isinstance(loaded, dict) and isinstance(loaded.get("steps"), dict):
                self.steps = loaded["steps"]

    def get(self, name: str) -> dict:
        entry = self.steps.get(name)
        return entry if isinstance(entry, dict) else {}

    def put(self, name: str, entry: dict) -> None:
        self.steps[name] = entry
        ensure_writable_dir(os.path.dirname(self.path) or ".", "demo state folder")
        write_json(self.path, {"steps": self.steps})


@dataclass
class Step:
    name: str
    script: Optional[str]                       # None: done in this process by `action`
    args: list[str]                             # the arguments that decide the result
    inputs: Callable[[], list[str]]             # files whose contents the step reads
    outputs: Callable[[], list[str]]            # files it leaves behind
    state: StateFile
    show_args: list[str] = field(default_factory=list)    # progress/quiet flags: not fingerprinted
    # (resuming an interrupted run of the same inputs?) -> extra flags (--resume / --overwrite)
    restart_args: Callable[[bool], list[str]] = lambda resuming: []
    action: Optional[Callable[[], None]] = None
    # Arguments known only once earlier steps ran (they replace `args` before the fingerprint).
    late_args: Optional[Callable[[], list[str]]] = None
    stdout_path: Optional[str] = None            # the script's standard output is kept in this file
    # Environment variables set for the script (not fingerprinted: they change speed, not results).
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, extra: list[str]) -> list[str]:
        return [sys.executable, self.script, *self.args, *extra, *self.show_args]

    def command_line(self, extra: list[str]) -> str:
        shown = ["python", display_path(self.script), *self.args, *extra, *self.show_args]
        return " ".join(shlex.quote(part) for part in shown)


def fingerprint(step: Step, hashes: FileHashes) -> str:
    """What the step's result depends on: its arguments and the contents of its inputs."""
    files = {}
    for path in step.inputs():
        digest = hashes(path)
        if digest is None:
            raise UserError(f"demo step {step.name!r}: input file {display_path(path)} is missing "
                            "(an earlier step did not write it)")
        files[display_path(path)] = digest
    text = json.dumps({"script": os.path.basename(step.script or step.name), "args": step.args, "inputs": files},
                      sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_up_to_date(step: Step, inputs_fp: str, hashes: FileHashes) -> bool:
    entry = step.state.get(step.name)
    if not entry.get("done") or entry.get("inputs") != inputs_fp:
        return False
    recorded = entry.get("outputs") or {}
    try:
        expected = step.outputs()
    except UserError:
        return False
    if not expected or any(display_path(path) not in recorded for path in expected):
        return False
    return all(hashes(path) == recorded[display_path(path)] for path in expected)


# ----------------------------------------------------------------------------------- the runner

class Runner:
    def __init__(self, quiet: bool, log_dir: str) -> None:
        self.quiet = quiet
        self.log_dir = log_dir
        self.hashes = FileHashes()
        self.times: list[tuple[str, str, float]] = []      # (step, "ran" | "skipped", seconds)
        # CPU seconds (user + system, all processes) of each step that ran: with the wall times,
        # what a step would take on an idle machine (the demo's machine may be shared).
        self.cpu: dict[str, float] = {}

    def run(self, step: Step, number: int, total: int) -> None:
        started = time.perf_counter()
        cpu_started = _cpu_seconds()
        if step.late_args is not None:
            step.args = step.late_args()
        inputs_fp = fingerprint(step, self.hashes)
        label = f"[{number}/{total}] {step.name}"
        if is_up_to_date(step, inputs_fp, self.hashes):
            shown = step.command_line([]) if step.script else "(in the runner)"
            print(f"{label}: skip, outputs up to date: {shown}", flush=True)
            self.times.append((step.name, "skipped", time.perf_counter() - started))
            return
        previous = step.state.get(step.name)
        resuming = previous.get("inputs") == inputs_fp and not previous.get("done")
        extra = step.restart_args(resuming)
        step.state.put(step.name, {"inputs": inputs_fp, "done": False})
        if step.script is None:
            print(f"{label}: (in the runner)", flush=True)
            step.action()
        else:
            command = step.command_line(extra)
            print(f"{label}: {command}", flush=True)
            self._call(step, extra, command)
        outputs = {}
        for path in step.outputs():
            digest = self.hashes(path)
            if digest is None:
                raise UserError(f"demo step {step.name!r} did not write {display_path(path)}")
            outputs[display_path(path)] = digest
        seconds = time.perf_counter() - started
        step.state.put(step.name, {"inputs": inputs_fp, "done": True, "outputs": outputs,
                                   "seconds": round(seconds, 2), "command": step.command_line([])
                                   if step.script else "(in the runner)"})
        self.cpu[step.name] = _cpu_seconds() - cpu_started
        print(f"{label}: done in {seconds:.1f} s ({self.cpu[step.name]:.1f} s CPU)", flush=True)
        self.times.append((step.name, "ran", seconds))

    def _call(self, step: Step, extra: list[str], command: str) -> None:
        argv = step.argv(extra)
        env = {**os.environ, **step.env} if step.env else None
        if step.stdout_path:
            stderr = None
            if self.quiet:
                ensure_writable_dir(self.log_dir, "demo log folder")
                stderr = open(os.path.join(self.log_dir, step.name.replace(" ", "_") + ".log"), "w",
                              encoding="utf-8")
            try:
                result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
            finally:
                if stderr is not None:
                    stderr.close()
            code = result.returncode
            if not self.quiet or code != 0:
                print(result.stdout, end="", flush=True)
            if code == 0:
                with atomic_open(step.stdout_path, "w", encoding="utf-8") as handle:
                    handle.write(result.stdout)
        elif self.quiet:
            ensure_writable_dir(self.log_dir, "demo log folder")
            log_path = os.path.join(self.log_dir, step.name.replace(" ", "_") + ".log")
            with open(log_path, "w", encoding="utf-8") as log:
                code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
            if code != 0:
                with open(log_path, encoding="utf-8", errors="replace") as log:
                    tail = log.read().splitlines()[-LOG_TAIL_LINES:]
                print("\n".join(tail), file=sys.stderr)
        else:
            code = subprocess.call(argv, env=env)
        if code != 0:
            raise UserError(f"demo step {step.name!r} failed (exit status {code}): {command}")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total
