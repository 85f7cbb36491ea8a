"""User-facing errors: one clear line, non-zero exit, no traceback.

Library code raises `UserError` for anything the user can fix (a missing file, a bad record,
an inconsistent config). Entry scripts wrap their `main` in `run_cli`, which prints
`error: <message>` on one line to stderr and exits with status 2. Programming errors still
raise normally so that bugs keep their tracebacks.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator


class UserError(Exception):
    """An error caused by the user's input; its message is shown as it is."""


def require_file(path: str | os.PathLike, what: str, how_to_get: str = "") -> str:
    """Return `path` as a string if it is an existing file, else raise a UserError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        from vqakd.paths import missing_file_message     # standard library only

        raise UserError(missing_file_message(path, what, how_to_get))
    return path


def run_cli(main: Callable[[], int | None]) -> None:
    """Run an entry point; turn UserError (and Ctrl-C) into a one-line message and exit code."""
    try:
        code = main()
    except UserError as exc:
        message = " ".join(str(exc).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _exit_interrupted()
    sys.exit(code or 0)


def _exit_interrupted() -> None:
    print("interrupted", file=sys.stderr)
    sys.exit(130)


@contextlib.contextmanager
def interruptible_imports() -> Iterator[None]:
    """Wrap an entry script's slow imports (torch takes seconds) so that Ctrl-C there ends the run
    as it does inside `run_cli`: one line, `interrupted`, exit status 130, no traceback.

    This module imports only `os` and `sys`, so importing it first costs nothing:

        from vqakd.errors import interruptible_imports, run_cli
        with interruptible_imports():
            import torch
            from vqakd.engine import train
    """
    try:
        yield
    except KeyboardInterrupt:
        _exit_interrupted()
