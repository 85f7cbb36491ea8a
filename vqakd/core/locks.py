"""One run per output: an exclusive lock on an output folder (or one output file), held for a
whole run, and `guard_outputs`, the start of every command that writes. A second run is refused at
once with one line naming the folder and the holder's pid.

The lock is `fcntl.flock` on `<folder>/.vqakd.lock`, released by the kernel however the holder
dies (a folder left by a killed run is simply taken over); the file records the holder (pid, host,
command, start time) for the message. Without flock (some network mounts) the record alone
decides: a live pid on this host, or any holder on another host, keeps the folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from typing import Any, Callable, Iterator

from vqakd.core.errors import UserError
from vqakd.core.files import (Labelled, check_output_paths, ensure_writable_dir, labelled_paths,
                              remove_stale_temporaries)

try:
    import fcntl
except ImportError:         # Windows: only the record-based check is available
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".vqakd.lock"
RECORD_WAIT_TRIES, RECORD_WAIT_S = 100, 0.02     # up to 2 s for a new holder's record
# The descriptors of the locks this process holds. A forked child (a loader worker) closes its
# copies at once, else one that outlived a killed run would keep the folder locked.
_HELD_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _describe(record: dict[str, Any]) -> str:
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return (f"pid {record.get('pid', '?')} on {record.get('host', '?')}, started {when}: "
            f"{record.get('command', '?')}")


def _read_record(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 1 << 16)
        record = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv) or "python",
              "started": time.time()}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
    os.fsync(fd)


def _record_holds(record: dict[str, Any] | None) -> bool:
    """Without flock: does this record name a run that may still be alive?"""
    if not record or not isinstance(record.get("pid"), int):
        return False
    if record.get("host") != socket.gethostname():
        return True             # its pid cannot be checked from here
    if record["pid"] == os.getpid():
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # alive, owned by someone else
        pass
    return True


def _flock(fd: int) -> bool | None:
    """True if locked, False if another holder has it, None if the file system has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    return True


class FolderLock:
    """Context manager: hold an exclusive lock on `folder` (created if needed) while inside.
    `what` names the folder in messages; `log` gets one line when a dead run's lock is taken over.
    Not re-entrant: a second FolderLock on the same folder is refused even in the same process."""

    def __init__(self, folder: str | os.PathLike, what: str = "output folder",
                 log: Callable[[str], Any] | None = print, lock_name: str = LOCK_NAME,
                 shown: str | os.PathLike | None = None) -> None:
        self.folder = os.fspath(folder)
        self.what = what
        self.log = log
        self.path = os.path.join(self.folder, lock_name)
        # What messages name: the folder, or the one output file an `output_lock` guards.
        self.shown = os.fspath(shown) if shown is not None else self.folder
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        for _ in range(100):
            try:
                os.makedirs(self.folder, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise UserError(f"{self.what} is not writable: {self.folder} ({exc.strerror or exc})") from None
            try:
                locked = _flock(fd)
                # The holder removes the file when it is done: if it did so between our open()
                # and flock(), we hold a lock on a deleted file. Start again on the new one.
                if not self._is_current(fd):
                    os.close(fd)
                    continue
                record = _read_record(fd)
                # The holder writes its record just after it locks: give it a moment, so the refusal can name it.
                for _ in range(RECORD_WAIT_TRIES if locked is False else 0):
                    if record is not None:
                        break
                    time.sleep(RECORD_WAIT_S)
                    record = _read_record(fd)
                if locked is False or (locked is None and _record_holds(record)):
                    holder = _describe(record) if record else "a run that has not written its record yet"
                    raise UserError(f"{self.what} {self.shown} is in use by another run ({holder}); wait for it "
                                    f"to finish or stop it, or choose another output (lock file {self.path})")
                if record and record.get("pid") != os.getpid() and self.log is not None:
                    self.log(f"{self.what} {self.shown}: taking over the lock left by a run that is no "
                             f"longer running ({_describe(record)})")
                _write_record(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            _HELD_FDS.add(fd)
            return self
        raise UserError(f"{self.what} {self.shown}: could not take the lock {self.path} (it keeps being replaced)")

    def _is_current(self, fd: int) -> bool:
        """Is `fd` the file now at the lock path (not one a finished holder has removed)?"""
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD_FDS.discard(fd)
        try:
            # Remove the file while still holding the lock (acquire() checks it locked the file
            # that is at the path), so that a finished run leaves nothing behind.
            if self._is_current(fd):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
        finally:
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def output_lock(path: str | os.PathLike, what: str = "output file",
                log: Callable[[str], Any] | None = print) -> FolderLock:
    """A lock on one output file rather than its whole folder (`.<name>.lock` beside it): two
    runs may write different files of one folder (eval_val.json and eval_test.json, appearance
    and motion features), but never the same file."""
    path = os.path.abspath(os.fspath(path))
    return FolderLock(os.path.dirname(path), what, log, lock_name=f".{os.path.basename(path)}.lock", shown=path)


@contextlib.contextmanager
def guard_outputs(inputs: Labelled, outputs: Labelled, what: str = "output folder", *,
                  file_what: str | None = None, hint: str = "", lock: bool = True,
                  log: Callable[[str], Any] | None = print) -> Iterator[None]:
    """Before a command writes anything, and until the block ends: `check_output_paths`; then,
    where `lock` (the writing process), prove each output folder writable (`what` names it), lock
    it (with `file_what`, each output file alone: `output_lock`) and delete stale temporaries."""
    check_output_paths(inputs, outputs, hint)
    paths = [os.path.abspath(path) for _, path in labelled_paths(outputs)]
    with contextlib.ExitStack() as held:
        if lock:
            for folder in sorted({os.path.dirname(path) for path in paths}):
                ensure_writable_dir(folder, what)
                if file_what is None:
                    held.enter_context(FolderLock(folder, what, log))
            for path in paths if file_what is not None else ():
                held.enter_context(output_lock(path, file_what, log))
            remove_stale_temporaries(paths, log)
        yield
