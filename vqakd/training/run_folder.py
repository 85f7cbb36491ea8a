"""The folder of one training stage, `<output_dir>/<stage>/` (checkpoints last.pt and best.pt,
metrics.csv, results.json with the test figures of best.pt, curves.png, config.yml, resumes.json
when resumed), and its train.log: every line the run printed, each prefixed with its UTC time.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping, Optional

from vqakd.core import distributed as dist
from vqakd.core.locks import guard_outputs
from vqakd.training.provenance import utc_now

STAGE_FILES = {"last": "last.pt", "best": "best.pt", "metrics": "metrics.csv", "results": "results.json",
               "curves": "curves.png", "config": "config.yml", "log": "train.log", "resumes": "resumes.json"}


class RunFolder:
    """The paths of one stage's outputs (`folder.last`, `folder.best`, ...: the keys of
    STAGE_FILES), and the housekeeping around them."""

    def __init__(self, folder: str):
        self.folder = folder
        for key, name in STAGE_FILES.items():
            setattr(self, key, os.path.join(folder, name))

    def remove_outputs(self) -> None:
        """Discard a previous run of this stage (--overwrite)."""
        for name in STAGE_FILES.values():
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.folder, name))


@contextlib.contextmanager
def stage_guard(folder: RunFolder, stage: str, inputs: Mapping[str, Optional[str]]) -> Iterator[None]:
    """For the whole run of one stage, `vqakd.core.locks.guard_outputs`: refuse stage files that are
    one of the run's `inputs`, lock the stage folder (main process only; a refusal stops every rank)
    and clear the temporaries of an interrupted write. A folder the guard created is removed again
    if the run leaves it empty (failed start-up checks)."""
    outputs = {f"{stage} {name}": os.path.join(folder.folder, name) for name in STAGE_FILES.values()}
    new_folders = []                    # the folders the guard creates, deepest first
    path = os.path.abspath(folder.folder)
    while not os.path.exists(path):
        new_folders.append(path)
        path = os.path.dirname(path)
    try:
        with contextlib.ExitStack() as held:
            dist.agree(lambda: held.enter_context(guard_outputs(inputs, outputs, f"{stage} output folder",
                                                                lock=dist.is_main(), log=RunLog(folder.log))),
                       "the check of the output folder")
            yield
    finally:
        for path in new_folders:
            try:
                os.rmdir(path)          # only while empty
            except OSError:
                break


class RunLog:
    """Lines to stdout and appended to a log file (main process only), each prefixed in the file
    with its UTC time (`2026-11-28T15:02:03Z epoch 3/25 | ...`)."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, message: str) -> None:
        if not dist.is_main():
            return
        print(message, flush=True)
        stamp = utc_now()           # one time for every line: a table stays one block
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(f"{stamp} {line}\n" for line in message.split("\n")))
