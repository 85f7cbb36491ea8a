"""The start of every entry script (`prepare_script`), the `main` of train.py and validate.py
(`distributed_main`), and train.py's command-line vocabulary that the config shares; standard
library only at import, so it runs before torch is imported.

Threads: OpenMP threads that spin while waiting steal the cores of a CPU shared with other busy
processes (bench/contention.py), so unless the user set them, OMP_WAIT_POLICY=PASSIVE and
KMP_BLOCKTIME=0 (GNU / Intel OpenMP), and VQAKD_THREADS=N sets OMP_NUM_THREADS and MKL_NUM_THREADS.
They only take effect before the OpenMP runtime starts, hence before torch is imported.
Requirements: a Python without the project's packages gets one `error:` line (exit status 2)
instead of a ModuleNotFoundError traceback; modules are only looked up, not imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Callable, Iterable, MutableMapping, Optional

from vqakd.core.errors import UserError

THREADS_VARIABLE = "VQAKD_THREADS"
WAIT_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
COUNT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

# requirements.txt's packages by the module name they are imported as.
CORE_MODULES = ("torch", "numpy", "h5py", "yaml", "tqdm")
MODULE_PACKAGE = {"yaml": "pyyaml", "sklearn": "scikit-learn", "PIL": "pillow", "av": "av (PyAV)"}

STAGES = ("teacher", "student")
# The original DualVGR / VQAKD command-line flags and the config keys they set.
ORIGINAL_FLAGS = {
    "alpha": "loss.alpha",
    "beta": "loss.beta",
    "unit_layers": "model.unit_layers",
    "t_app": "loss.tau_app",
    "t_mo": "loss.tau_mo",
    "kd_alpha": "loss.kappa_app",
    "kd_beta": "loss.kappa_mo",
}


def prepare_script(parser=None, *requirements: str, modules: Iterable[str] = CORE_MODULES) -> None:
    """The start of every entry script, before its slow imports: thread defaults, `--help` and flag
    errors answered at once, and one `error:` line for a missing requirement (`modules` and the
    extra `requirements`) or a bad VQAKD_THREADS."""
    try:
        apply_thread_defaults()
    except UserError as exc:
        exit_with(str(exc))
    if parser is not None:
        parser.parse_args()
    check_requirements(*requirements, modules=modules)


def distributed_main(build_parser: Callable[[], Any], run: Callable[[Any], int]) -> Callable[..., int]:
    """The `main(argv=None)` of a script that may run under torchrun: parse the flags, then `run(args)`;
    an error every rank hits is printed once, by rank 0 (`quiet_unless_main`)."""
    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)
        from vqakd.core.distributed import quiet_unless_main      # torch: only once the flags are parsed

        return quiet_unless_main(lambda: run(args))
    return main


def exit_with(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def apply_thread_defaults(environ: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
    """Set the thread defaults in `environ` (default os.environ) where unset; return what was set.
    A VQAKD_THREADS that is not a positive whole number is a UserError."""
    environ = os.environ if environ is None else environ
    count = environ.get(THREADS_VARIABLE, "").strip()
    if count and (not count.isdigit() or int(count) < 1):
        raise UserError(f"{THREADS_VARIABLE}: expected a positive whole number of threads, found {count!r}")
    defaults = dict(WAIT_DEFAULTS)
    if count:
        defaults.update(dict.fromkeys(COUNT_VARIABLES, count))
    applied = {name: value for name, value in defaults.items() if name not in environ}
    environ.update(applied)
    return applied


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_requirements(*extra: str, modules: Iterable[str] = CORE_MODULES) -> None:
    """Exit with one `error:` line (status 2) when a required module is not importable."""
    missing = [name for name in [*modules, *extra] if not _installed(name)]
    if not missing:
        return
    names = ", ".join(MODULE_PACKAGE.get(name, name) for name in missing)
    verb = "is" if len(missing) == 1 else "are"
    exit_with(f"{names} {verb} not installed for {sys.executable}; run `make venv` (it installs requirements.txt) "
              "and use .venv/bin/python")
