"""A restricted unpickler for the question pickles of the HCRN/DualVGR family.

Those files are pickles (despite the `.pt` suffix) and a pickle can run arbitrary code. The
files hold only builtins and numpy arrays, so only the globals needed to rebuild those are
admitted; anything else is refused with an error that names the file and the global.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

from vqakd.core.errors import UserError

# (module, name) pairs that numpy arrays, scalars and builtin containers need.
_ALLOWED = {
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"),
    ("builtins", "bytes"), ("builtins", "bytearray"), ("builtins", "bool"), ("builtins", "complex"),
    ("builtins", "slice"), ("builtins", "range"),
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "int8"), ("numpy", "int16"), ("numpy", "int32"), ("numpy", "int64"),
    ("numpy", "uint8"), ("numpy", "uint16"), ("numpy", "uint32"), ("numpy", "uint64"),
    ("numpy", "float16"), ("numpy", "float32"), ("numpy", "float64"), ("numpy", "bool_"),
    ("numpy", "str_"), ("numpy", "bytes_"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


# Every buffer a question/GloVe pickle holds is written out in the file, so a pickle never needs
# more memory than about its own size; a size argument above this (or the file size, if larger)
# is a forged or corrupt file, refused before anything is allocated.
MIN_SIZE_LIMIT = 1 << 20


def _count(value: object) -> int | None:
    """The number of items/bytes `value` would make a constructor allocate, if it says so itself."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, range):
        # len() overflows for ranges beyond sys.maxsize; work it out exactly instead.
        span = value.stop - value.start
        return max(0, (span + value.step - (1 if value.step > 0 else -1)) // value.step)
    return None


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str, size_limit: int = MIN_SIZE_LIMIT) -> None:
        super().__init__(file)
        self._source = source
        self._file_size = size_limit
        self._limit = max(size_limit, MIN_SIZE_LIMIT)
        self._ndarray = None

    def _check_size(self, what: str, count: int | None) -> None:
        if count is not None and count > self._limit:
            raise UserError(f"{self._source}: corrupt or forged pickle: it asks {what} to allocate {count:,} "
                            f"items, more than a {self._file_size:,}-byte file can hold; nothing was allocated")

    def _guarded_builtin(self, name: str, constructor: Any) -> Any:
        def build(*args: Any) -> Any:
            if args:
                self._check_size(f"builtins.{name}", _count(args[0]))
            return constructor(*args)
        return build

    def _guarded_reconstruct(self, reconstruct: Any) -> Any:
        import numpy as np

        def build(subtype: Any, shape: Any, dtype: Any) -> Any:
            dims = shape if isinstance(shape, tuple) else (shape,)
            count = 1
            for dim in dims:
                count *= int(dim) if isinstance(dim, int) and not isinstance(dim, bool) else 1
            self._check_size("an array", count)
            if subtype is self._ndarray:
                subtype = np.ndarray
            return reconstruct(subtype, shape, dtype)
        return build

    def _guarded_ndarray(self) -> Any:
        import numpy as np

        if self._ndarray is None:
            unpickler = self

            class _CheckedNdarray(np.ndarray):
                """Stands for numpy.ndarray while loading: calling it checks the size first."""

                def __new__(cls, shape: Any = (0,), *args: Any, **kwargs: Any) -> Any:
                    dims = shape if isinstance(shape, tuple) else (shape,)
                    count = 1
                    for dim in dims:
                        count *= int(dim) if isinstance(dim, int) and not isinstance(dim, bool) else 1
                    unpickler._check_size("numpy.ndarray", count)
                    return np.ndarray(shape, *args, **kwargs)

            self._ndarray = _CheckedNdarray
        return self._ndarray

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UserError(
                f"{self._source}: refusing to unpickle {module}.{name} "
                "(question/GloVe pickles may only hold builtins and numpy arrays)"
            )
        found = super().find_class(module, name)
        if module == "builtins" and name in ("bytearray", "bytes", "list", "tuple", "set", "frozenset"):
            return self._guarded_builtin(name, found)
        if name == "_reconstruct":
            return self._guarded_reconstruct(found)
        if (module, name) == ("numpy", "ndarray"):
            return self._guarded_ndarray()
        return found


def safe_load(path: str | os.PathLike) -> Any:
    """Load a pickle holding only builtins and numpy data; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"pickle file not found: {path}")
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle, path, os.fstat(handle.fileno()).st_size).load()
    except UserError:
        raise
    except MemoryError:
        raise UserError(f"{path}: the pickle asks for more memory than there is; the file is corrupt, "
                        "forged, or too large for this machine") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise UserError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc}); "
                        "the file may be truncated or of another format") from None
