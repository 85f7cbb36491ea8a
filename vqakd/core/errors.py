"""User-facing errors: one clear line, non-zero exit, no traceback.

Library code raises `UserError` for anything the user can fix; entry scripts wrap their `main` in
`run_cli`, which prints `error: <message>` to stderr and exits with status 2; a Ctrl-C (in `main`
or in `interruptible_imports`) prints `interrupted` and exits with 130. Programming errors keep
their tracebacks. Standard library only, so a script can import it first at no cost.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
from typing import Callable, Iterator


class UserError(Exception):
    """An error caused by the user's input; its message is shown as it is."""


def require_file(path: str | os.PathLike, what: str, how_to_get: str = "") -> str:
    """Return `path` as a string if it is an existing file, else raise a UserError naming it; a
    relative path also names the folder it was looked up in (the likely cause of a miss)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()}, the current folder)"
        hint = f"; {how_to_get}" if how_to_get else ""
        raise UserError(f"{what} not found: {path}{where}{hint}")
    return path


def run_cli(main: Callable[[], int | None]) -> None:
    """Run an entry point; turn UserError (and Ctrl-C) into a one-line message and exit code."""
    interrupted = False
    hook = sys.unraisablehook
    sys.unraisablehook = lambda info: _interrupt_again(info, hook)
    try:
        code = main()
    except UserError as exc:
        print("error: " + str(exc).replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # Restored before the clean-up below: an interrupt a __del__ meets there is not re-raised.
        sys.unraisablehook = hook
    if interrupted:
        _exit_interrupted()
    sys.exit(code or 0)


def _interrupt_again(info, hook: Callable) -> None:
    """Do not let a Ctrl-C vanish in a __del__ (say a data loader's), where Python ignores it: send
    SIGINT again a moment later, from another thread (raised here, it would be ignored too)."""
    if isinstance(info.exc_value, KeyboardInterrupt):
        threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGINT)).start()
    else:
        hook(info)


@contextlib.contextmanager
def interruptible_imports() -> Iterator[None]:
    """Wrap an entry script's slow imports so that Ctrl-C there ends the run as in `run_cli`."""
    try:
        yield
        return
    except KeyboardInterrupt:
        pass
    _exit_interrupted()


def _exit_interrupted() -> None:
    """Called after leaving the `except KeyboardInterrupt` block: what the interrupt left half-built
    (a data loader starting its workers) is freed here, with its complaints and further Ctrl-Cs muted."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:          # not the main thread: signals cannot be changed
        previous = None
    try:
        print("interrupted", file=sys.stderr)
        gc.collect()
    finally:
        sys.unraisablehook = hook
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    sys.exit(130)
