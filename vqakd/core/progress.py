"""The one way this toolkit draws a progress bar: tqdm, redrawn at most every
NOT_A_TERMINAL_INTERVAL_S seconds when its stream is not a terminal (a log file would otherwise
keep every redraw). VQAKD_PROGRESS=0 hides every bar, =1 draws them as on a terminal.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Optional

NOT_A_TERMINAL_INTERVAL_S = 60.0
ENV_SWITCH = "VQAKD_PROGRESS"


def progress_bar(iterable: Optional[Iterable] = None, *, enabled: bool = True, file: Any = None, **kwargs: Any):
    """`tqdm(iterable, **kwargs)` drawn only when `enabled`, throttled when not on a terminal. The caller's
    other settings (desc, unit, total, leave, ...) pass through; the throttle wins."""
    from tqdm import tqdm       # here, not at the top: scripts import this before their slow imports

    file = sys.stderr if file is None else file
    switch = os.environ.get(ENV_SWITCH, "").strip()
    try:
        terminal = bool(file.isatty())
    except (AttributeError, ValueError):        # no isatty, or a closed stream
        terminal = False
    if switch != "1" and not terminal:
        kwargs.update(mininterval=NOT_A_TERMINAL_INTERVAL_S, maxinterval=NOT_A_TERMINAL_INTERVAL_S)
    return tqdm(iterable, file=file, disable=not enabled or switch == "0", **kwargs)
