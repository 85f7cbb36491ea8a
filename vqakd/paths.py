"""How a path is shown in an error: a relative path says which folder it was resolved against.

Config paths (`data.vocab`, the question and feature files, `output_dir`) are relative to the
folder a command is run from, not to the config file: `data/msvd-qa/...` works from the
repository root and nowhere else. So "not found: data/x.h5" alone hides the likely cause.
"""

from __future__ import annotations

import os


def shown_path(path: str | os.PathLike) -> str:
    """`path`, and for a relative path the folder it was looked up in:
    `data/x.h5 (relative to /home/me/elsewhere)`."""
    text = os.fspath(path)
    if os.path.isabs(text):
        return text
    return f"{text} (relative to {os.getcwd()}, the current folder)"


def missing_file_message(path: str | os.PathLike, what: str, how_to_get: str = "") -> str:
    """The one-line message of a missing input file."""
    hint = f"; {how_to_get}" if how_to_get else ""
    return f"{what} not found: {shown_path(path)}{hint}"
