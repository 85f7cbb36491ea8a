"""One line instead of a ModuleNotFoundError traceback when a requirement is not installed.

Entry scripts call `check_requirements()` before their heavy imports. It only looks the modules
up (`importlib.util.find_spec`, no import, milliseconds), so a Python without torch, say the
system one instead of the project's virtual environment, gets

    error: torch is not installed for /usr/bin/python3; run `make venv` and use .venv/bin/python

and exit status 2, before anything slow runs. This module imports only the standard library.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Iterable

# requirements.txt's packages by the module name they are imported as.
CORE_MODULES = ("torch", "numpy", "h5py", "yaml", "tqdm")
MODULE_PACKAGE = {"yaml": "pyyaml", "sklearn": "scikit-learn", "PIL": "pillow", "av": "av (PyAV)"}
HINT = "run `make venv` and use .venv/bin/python"


def missing_modules(modules: Iterable[str]) -> list[str]:
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def missing_message(missing: list[str]) -> str:
    names = ", ".join(MODULE_PACKAGE.get(name, name) for name in missing)
    verb = "is" if len(missing) == 1 else "are"
    if sys.prefix != sys.base_prefix and os.path.basename(sys.prefix) == ".venv":
        # Already the project's environment: it is incomplete, not the wrong Python.
        return f"{names} {verb} not installed for {sys.executable}; run `make venv` to install requirements.txt"
    return f"{names} {verb} not installed for {sys.executable}; {HINT}"


def check_requirements(*extra: str, modules: Iterable[str] = CORE_MODULES) -> None:
    """Exit with one `error:` line (status 2) when a required module is not importable."""
    missing = missing_modules(list(modules) + list(extra))
    if missing:
        print(f"error: {missing_message(missing)}", file=sys.stderr)
        sys.exit(2)
