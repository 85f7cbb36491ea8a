"""A restricted unpickler for the question pickles of the HCRN/DualVGR family.

Those files are pickles (despite the `.pt` suffix) and a pickle can run arbitrary code. The
files hold only builtins and numpy arrays, so only the globals needed to rebuild those are
admitted; anything else is refused with an error that names the file and the global.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

from vqakd.errors import UserError

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


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UserError(
            f"{self._source}: refusing to unpickle {module}.{name} "
            "(question/GloVe pickles may only hold builtins and numpy arrays)"
        )


def safe_load(path: str | os.PathLike) -> Any:
    """Load a pickle holding only builtins and numpy data; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"pickle file not found: {path}")
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle, path).load()
    except UserError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise UserError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc}); "
                        "the file may be truncated or of another format") from None
