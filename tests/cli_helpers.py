"""Running an entry point in-process exactly as its command line would, for tests."""

from __future__ import annotations

import contextlib
import io

import pytest

from vqakd.core.errors import run_cli

# The metrics.csv columns that measure time, not training: they differ between two identical runs.
TIMING_COLUMNS = ("time_s", "train_questions_per_s", "train_steps_per_s", "val_questions_per_s")


def run_main(main, argv, quiet: bool = False) -> tuple[int, str]:
    """`run_cli(main(argv))` in this process: (exit code, stderr text); `quiet` also swallows stdout."""
    stderr = io.StringIO()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stderr(stderr))
        if quiet:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        exited = stack.enter_context(pytest.raises(SystemExit))
        run_cli(lambda: main(argv))
    return exited.value.code, stderr.getvalue()
