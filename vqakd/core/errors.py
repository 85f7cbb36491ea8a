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


def shown_path(path: str | os.PathLike) -> str:
    """`path`, and for a relative path the folder it was looked up in (the likely cause of a miss)."""
    text = os.fspath(path)
    if os.path.isabs(text):
        return text
    return f"{text} (relative to {os.getcwd()}, the current folder)"


def missing_file_message(path: str | os.PathLike, what: str, how_to_get: str = "") -> str:
    """The one-line message of a missing input file."""
    hint = f"; {how_to_get}" if how_to_get else ""
    return f"{what} not found: {shown_path(path)}{hint}"


def require_file(path: str | os.PathLike, what: str, how_to_get: str = "") -> str:
    """Return `path` as a string if it is an existing file, else raise a UserError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(missing_file_message(path, what, how_to_get))
    return path


def run_cli(main: Callable[[], int | None]) -> None:
    """Run an entry point; turn UserError (and Ctrl-C) into a one-line message and exit code."""
    forward_interrupts_from_children()
    interrupted = False
    hook = sys.unraisablehook
    sys.unraisablehook = lambda info: _interrupt_again(info, hook)
    try:
        code = main()
    except UserError as exc:
        message = " ".join(str(exc).split("\n"))
        print(f"error: {message}", file=sys.stderr)
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
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
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


_FORWARDING_TO: list[int] = []


def forward_interrupts_from_children() -> None:
    """Make a Ctrl-C that reaches a forked child (a data-loader or video-decoding worker) stop
    this process too: PyTorch's workers exit quietly on KeyboardInterrupt, assuming the main
    process got it too, and when it did not the run carried on. The child sends SIGINT on first."""
    if _FORWARDING_TO or not hasattr(os, "register_at_fork"):
        return
    _FORWARDING_TO.append(os.getpid())

    def forward(signum, frame):
        if os.getppid() in _FORWARDING_TO:
            with contextlib.suppress(OSError):
                os.kill(os.getppid(), signal.SIGINT)
        raise KeyboardInterrupt

    def in_child() -> None:
        # Only children whose SIGINT is the default handler (not one that ignores it).
        if os.getppid() in _FORWARDING_TO and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, forward)

    os.register_at_fork(after_in_child=in_child)
