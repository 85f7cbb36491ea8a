"""Files in and out: atomic writes (a temporary file in the same folder, then a rename, so no
reader or resumed job sees a half-written file; a full disk is one line naming the file), JSON and
pickle I/O, sha256, and the output-path checks `vqakd.core.locks.guard_outputs` runs: an output may
not be an input nor another output, and output path templates that cannot be filled are one line.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import pickle
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Tuple, Union

from vqakd.core.errors import UserError

# The toolkit's checkout: configs/, docs/ and the entry scripts are found from here.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What `atomic_path` names its temporary files: `.<final name>.<mkstemp's random part>.tmp`.
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"


class DiskFullError(UserError, OSError):
    """The disk (or the quota) filled up while writing; still an OSError for callers that catch those."""


def _disk_full(exc: BaseException, path: str) -> DiskFullError | None:
    """The one-line error of a write that failed for want of space, else None (h5py puts the errno
    only into its message)."""
    if not isinstance(exc, OSError) or isinstance(exc, DiskFullError):
        return None
    quota = exc.errno == errno.EDQUOT or "Disk quota exceeded" in str(exc)
    if not (quota or exc.errno == errno.ENOSPC or "No space left on device" in str(exc)):
        return None
    what = "disk quota exceeded" if quota else "no space left on device"
    error = DiskFullError(f"{what} while writing {path}; nothing was written there and earlier files "
                          "are intact: free some space and run again")
    error.errno = exc.errno
    return error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success rename it over `path`, else delete it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.path.basename(path)}.", suffix=TEMP_SUFFIX,
                                   dir=folder)
        os.close(fd)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        full = _disk_full(exc, path)
        if full is not None:
            raise full from None
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[Any]:
    """`open()` for writing whose result only appears at `path` once the block succeeds."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def read_text(path: str | os.PathLike, newline: str | None = None) -> str:
    """A UTF-8 text file's contents, newlines as "\n" (`newline=""`: as written, which csv needs);
    other bytes are a UserError naming the file. A byte-order mark (editors on Windows and Excel's
    "CSV UTF-8" add one) is not part of the text."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise UserError(f"{os.fspath(path)}: not UTF-8 text ({exc.reason})") from None


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; invalid JSON or non-UTF-8 text is a UserError naming the file and place."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{os.fspath(path)}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write((json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def write_pickle(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> str:
    """Create `path` if needed and prove it is writable now, before hours of work start."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UserError(f"{what} is not writable: {path} ({exc.strerror or exc})") from None
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's contents, read in 1 MiB blocks (weights files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stale_temporaries(output_paths: Iterable[str | os.PathLike]) -> list[str]:
    """Leftover temporary files of `atomic_path` for these outputs (a run killed mid-write)."""
    found: set[str] = set()
    for path in output_paths:
        path = os.path.abspath(os.fspath(path))
        pattern = glob.escape(os.path.join(os.path.dirname(path), f"{TEMP_PREFIX}{os.path.basename(path)}."))
        found.update(candidate for candidate in glob.glob(pattern + "*" + TEMP_SUFFIX) if os.path.isfile(candidate))
    return sorted(found)


def remove_stale_temporaries(output_paths: Iterable[str | os.PathLike],
                             log: Callable[[str], Any] | None = print) -> list[str]:
    """Delete the leftover temporaries of `output_paths`; `log` gets one line naming them. Only call
    it while holding the output's lock (vqakd.core.locks): another live run may be writing them."""
    removed = []
    for path in stale_temporaries(output_paths):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
            removed.append(path)
    if removed and log is not None:
        log(f"removed {len(removed)} temporary file(s) left by an interrupted run: {', '.join(removed)}")
    return removed


PathLike = Union[str, os.PathLike]
Labelled = Union[Mapping[str, Union[PathLike, None]], Iterable[Tuple[str, Union[PathLike, None]]]]


def labelled_paths(paths: Labelled) -> list[tuple[str, str]]:
    items = paths.items() if isinstance(paths, Mapping) else paths
    return [(label, os.fspath(path)) for label, path in items if path is not None]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:         # one of them does not exist yet: the same file only by name
        return os.path.realpath(a) == os.path.realpath(b)


def check_output_paths(inputs: Labelled, outputs: Labelled, hint: str = "") -> None:
    """Refuse an output that is the same file as an input, or as another output (compared after
    resolving links, and by identity for existing files). `inputs` and `outputs` map a label the
    user recognises (`--checkpoint`) to a path (None: skipped); `hint` is added when two outputs collide."""
    ins, outs = labelled_paths(inputs), labelled_paths(outputs)
    for out_index, (out_label, out_path) in enumerate(outs):
        if os.path.isdir(out_path):
            raise UserError(f"{out_label} {out_path} is a folder; name a file (it would fail only after all the work)")
        for in_label, in_path in ins:
            if _same_file(out_path, in_path):
                shown = out_path if out_path == in_path else f"{out_path} (= {in_path})"
                raise UserError(f"{out_label} {shown} would overwrite {in_label}, an input of this run; "
                                "choose another output path")
        for other_label, other_path in outs[:out_index]:
            if _same_file(out_path, other_path):
                extra = f"; {hint}" if hint else ""
                raise UserError(f"{other_label} and {out_label} are the same file {out_path}: one would "
                                f"overwrite the other{extra}")


def expand_template(template: str, option: str, positional: Sequence[object] = (), **fields: object) -> str:
    """Fill an output path template (`fields`: `{split}`, ...; `positional`: what `{}` / `{0}` get);
    any problem is one line naming the option and the template."""
    allowed = ", ".join("{" + name + "}" for name in fields)
    if positional:
        allowed += f" (or '{{}}' for {', '.join(map(str, positional))} in that order)"
    try:
        return template.format(*positional, **fields)
    except KeyError as exc:
        raise UserError(f"{option} {template!r}: unknown field {{{exc.args[0]}}}; the fields are {allowed}") from None
    except IndexError:
        raise UserError(f"{option} {template!r}: more '{{}}' placeholders than the {len(positional)} values "
                        f"they take; the fields are {allowed}") from None
    except (ValueError, AttributeError, TypeError) as exc:
        raise UserError(f"{option} {template!r}: not a usable path template ({exc}); the fields are "
                        f"{allowed}, and a literal brace is written '{{{{' or '}}}}'") from None
