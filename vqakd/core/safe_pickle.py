"""A restricted unpickler for the question pickles of the HCRN/DualVGR family (`.pt` files that
are pickles) and GloVe pickles: only the globals that rebuild builtins and numpy arrays are
admitted, and sizes a file cannot hold are refused; errors name the file.
"""

from __future__ import annotations

import math
import os
import pickle
from typing import Any, Callable

from vqakd.core.errors import UserError, require_file

# (module, name) pairs that numpy arrays, scalars and builtin containers need.
_BUILTINS = ("list", "dict", "tuple", "set", "frozenset", "int", "float", "str", "bytes", "bytearray", "bool",
             "complex", "slice", "range")
_NUMPY = ("ndarray", "dtype", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "bool_", "str_", "bytes_")
_NUMPY_CORE = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}
_ALLOWED = ({("builtins", name) for name in _BUILTINS} | {("numpy", name) for name in _NUMPY}
            | {(f"numpy.{core}.{module}", name) for core in ("core", "_core") for module, name in _NUMPY_CORE}
            | {("collections", "OrderedDict")})


# Every buffer a question/GloVe pickle holds is written out in the file, so a pickle never needs
# more memory than about its own size; a size argument above this (or the file size, if larger)
# is a forged or corrupt file, refused before anything is allocated.
MIN_SIZE_LIMIT = 1 << 20


def _count(value: object) -> int | None:
    """The number of items/bytes `value` would make a constructor allocate, if it says so itself."""
    if isinstance(value, range):        # its exact length (len() overflows beyond sys.maxsize)
        return max(0, -((value.start - value.stop) // value.step))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _elements(shape: Any) -> int:
    """The element count of an array `shape` (an int or a tuple; entries that are not ints count 1)."""
    dims = shape if isinstance(shape, tuple) else (shape,)
    return math.prod(int(dim) for dim in dims if isinstance(dim, int) and not isinstance(dim, bool))


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str, size_limit: int = MIN_SIZE_LIMIT) -> None:
        super().__init__(file)
        self._source = source
        self._file_size = size_limit
        self._limit = max(size_limit, MIN_SIZE_LIMIT)

    def _guarded(self, what: str, constructor: Any, count: Callable[..., int | None]) -> Any:
        """`constructor`, refusing before it runs a call whose arguments ask for more than the limit."""
        def build(*args: Any) -> Any:
            size = count(*args)
            if size is not None and size > self._limit:
                raise UserError(f"{self._source}: corrupt or forged pickle: it asks {what} to allocate {size:,} "
                                f"items, more than a {self._file_size:,}-byte file can hold; nothing was allocated")
            return constructor(*args)
        return build

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UserError(
                f"{self._source}: refusing to unpickle {module}.{name} "
                "(question/GloVe pickles may only hold builtins and numpy arrays)"
            )
        found = super().find_class(module, name)
        if module == "builtins" and name in ("bytearray", "bytes", "list", "tuple", "set", "frozenset"):
            return self._guarded(f"builtins.{name}", found, lambda *args: _count(args[0]) if args else None)
        if (module, name) == ("numpy", "ndarray"):
            return self._guarded("numpy.ndarray", found, lambda shape=(0,), *args: _elements(shape))
        if name == "_reconstruct":
            # Its subtype is the guarded numpy.ndarray above, a function: the real class stands in.
            def reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
                import numpy as np

                return found(subtype if isinstance(subtype, type) else np.ndarray, shape, dtype)
            return self._guarded("an array", reconstruct, lambda subtype, shape, dtype: _elements(shape))
        return found


def safe_load(path: str | os.PathLike) -> Any:
    """Load a pickle holding only builtins and numpy data; errors name the file."""
    path = require_file(path, "pickle file")
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle, path, os.fstat(handle.fileno()).st_size).load()
    except MemoryError:
        raise UserError(f"{path}: the pickle asks for more memory than there is; the file is corrupt, "
                        "forged, or too large for this machine") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise UserError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc}); "
                        "the file may be truncated or of another format") from None
