"""Where a result came from: the `provenance` record of results.json (train.py), eval_<split>.json
(validate.py) and the demo's summary.json (code version, command line, times, host, software,
device, config and vocabulary digests, feature extraction settings), and the content
fingerprints of a run's input files.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from typing import Any, Mapping, Optional

import vqakd
from vqakd.core.files import REPO_ROOT, file_sha256

GIT_TIMEOUT_S = 10


def utc_now() -> str:
    """The current time as UTC ISO 8601 to the second, e.g. 2026-11-28T15:02:03Z."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):      # no git, or it hung
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """{"git_commit", "git_modified"} in a git checkout of this repository; always "version"."""
    version: dict[str, Any] = {"version": vqakd.__version__}
    commit = _git("rev-parse", "HEAD")
    if commit:
        status = _git("status", "--porcelain", "--untracked-files=no")
        version.update(git_commit=commit, git_modified=None if status is None else bool(status))
    return version


def config_sha256(config: Mapping[str, Any]) -> str:
    """sha256 of the config as run: its dict as canonical JSON (sorted keys), so the same
    settings always hash the same whatever file or flags produced them."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def software_versions() -> dict[str, Any]:
    versions: dict[str, Any] = {"python": platform.python_version()}
    torch = sys.modules.get("torch")            # only when the run has imported it already
    if torch is not None:
        versions.update(torch=torch.__version__, cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    return versions


def device_name(device: Any) -> Optional[str]:
    """`cuda:0 (NVIDIA H200)`, `cpu (x86_64)`, or None when no device is given."""
    if device is None:
        return None
    text = str(device)
    torch = sys.modules.get("torch")
    if text.startswith("cuda") and torch is not None and torch.cuda.is_available():
        try:
            return f"{text} ({torch.cuda.get_device_name(torch.device(text))})"
        except (RuntimeError, AssertionError, ValueError):
            return text
    if text == "cpu":
        return f"cpu ({platform.processor() or platform.machine()})"
    return text


def feature_settings(paths: Mapping[str, Optional[str]]) -> dict[str, Any]:
    """The extraction settings each feature file records (None where it records none or is absent)."""
    from vqakd.core.errors import UserError
    from vqakd.training.inference_record import read_extraction_settings

    settings: dict[str, Any] = {}
    for kind, path in paths.items():
        try:
            settings[kind] = read_extraction_settings(path) if path and os.path.isfile(path) else None
        except UserError as exc:         # provenance never stops a finished run from being written
            settings[kind] = {"unreadable": str(exc)}
    return settings


def provenance_for_config(config, *, started: str, device: Any = None, world_size: int = 1) -> dict[str, Any]:
    """The provenance record of a run of `config` (a vqakd.core.config.Config: its settings, vocabulary
    and feature files) that began at `started` (utc_now()) and ends now."""
    from vqakd.core.config import config_to_dict

    vocab = config.data.vocab
    return {
        "code": code_version(),
        "command": [os.path.basename(sys.executable)] + sys.argv,
        "working_directory": os.getcwd(),
        "started_utc": started,
        "ended_utc": utc_now(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "versions": software_versions(),
        "device": device_name(device),
        "world_size": int(world_size),
        "config_sha256": config_sha256(config_to_dict(config)),
        "vocab_sha256": file_sha256(vocab) if vocab and os.path.isfile(vocab) else None,
        "vocab_path": vocab,
        "features": feature_settings({"appearance": config.data.appearance_feat, "motion": config.data.motion_feat}),
    }


# A run's inputs are named by content, not by path or time: a copy keeps its fingerprint, a file
# rewritten in place changes it. Sampling evenly spaced blocks of a 20 GB feature file costs a
# millisecond, and any re-extraction changes every block of an HDF5 data set.
FINGERPRINT_SAMPLES, FINGERPRINT_BLOCK = 16, 1 << 16


def file_fingerprint(path: str) -> str:
    """sha256 over the size and FINGERPRINT_SAMPLES blocks spread over the file (the whole file
    when it is smaller than those blocks)."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        if size <= FINGERPRINT_SAMPLES * FINGERPRINT_BLOCK:
            digest.update(handle.read())
        else:
            for index in range(FINGERPRINT_SAMPLES):
                handle.seek((size - FINGERPRINT_BLOCK) * index // (FINGERPRINT_SAMPLES - 1))
                digest.update(handle.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()


def input_paths(config, teacher_file: Optional[str] = None) -> dict[str, Optional[str]]:
    """{setting: path} of every input file a run of `config` reads."""
    from vqakd.core.config import data_file_paths

    paths = data_file_paths(config)
    if teacher_file:
        paths["teacher"] = teacher_file
    return paths


def input_fingerprints(paths: Mapping[str, Optional[str]]) -> dict[str, Optional[str]]:
    """{setting: fingerprint} of `paths` (None: not used, or absent)."""
    return {name: file_fingerprint(path) if path and os.path.isfile(path) else None for name, path in paths.items()}


def changed_inputs(recorded: Optional[Mapping[str, Optional[str]]], current: Mapping[str, Optional[str]],
                   paths: Mapping[str, Optional[str]]) -> list[str]:
    """`setting (path)` of each input whose content differs from what a run recorded (inputs it did
    not record are not compared)."""
    recorded = recorded or {}
    return [f"{name} ({paths.get(name)})" for name, value in current.items()
            if recorded.get(name) is not None and value is not None and recorded[name] != value]
