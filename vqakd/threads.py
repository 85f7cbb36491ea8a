"""CPU thread settings, applied by train.py and validate.py before torch is imported.

On a CPU shared with other busy processes, OpenMP worker threads that wait at the end of every
parallel region by spinning steal the cores the other threads of the same region need, and an
epoch gets many times slower (bench/contention.py measures it). So, unless the user has set them:
- OMP_WAIT_POLICY=PASSIVE: a waiting OpenMP thread sleeps instead of spinning (GNU OpenMP, which
  the PyTorch wheels use);
- KMP_BLOCKTIME=0: the same for Intel OpenMP builds;
- VQAKD_THREADS=N sets OMP_NUM_THREADS and MKL_NUM_THREADS, the torch CPU threads, when those
  are not set (the thread count itself stays torch's default, one per core: with the passive
  wait, that is also the fastest choice beside another busy process).
Settings the user exported always win: nothing already in the environment is changed. The
variables only take effect if they are set before the OpenMP runtime starts, hence "before torch
is imported".
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping, Optional

THREADS_VARIABLE = "VQAKD_THREADS"
WAIT_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
COUNT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def apply_thread_defaults(environ: Optional[MutableMapping[str, str]] = None,
                          threads: Optional[str] = None) -> dict[str, str]:
    """Set the thread defaults in `environ` (default os.environ) where unset; return what was set.

    `threads` (e.g. a command-line value) takes precedence over VQAKD_THREADS; either only sets the
    thread-count variables the user has not set."""
    environ = os.environ if environ is None else environ
    applied = {}
    for name, value in WAIT_DEFAULTS.items():
        if name not in environ:
            environ[name] = applied[name] = value
    count = threads if threads is not None else environ.get(THREADS_VARIABLE)
    if count is not None and str(count).strip():
        count = str(count).strip()
        if not count.isdigit() or int(count) < 1:
            from vqakd.errors import UserError

            source = "--threads" if threads is not None else THREADS_VARIABLE
            raise UserError(f"{source}: expected a positive whole number of threads, found {count!r}")
        for name in COUNT_VARIABLES:
            if name not in environ:
                environ[name] = applied[name] = count
    return applied


def apply_for_script() -> None:
    """`apply_thread_defaults` for an entry script: a bad VQAKD_THREADS ends it with one line."""
    from vqakd.errors import UserError

    try:
        apply_thread_defaults()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
