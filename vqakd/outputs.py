"""Checks every command runs on its output paths before any work starts.

- An output may not be one of the command's inputs (a checkpoint, config, vocabulary, question,
  feature or GloVe file) nor another output of the same run: paths are compared after resolving
  links and `..`, and existing files also by identity (a hard link is the same file).
- Output path templates take named fields (`{split}`, `{dataset}`) and, for the HCRN-style
  options, positional `{}`; a template that cannot be filled is a one-line error.
"""

from __future__ import annotations

import os
import string
from typing import Iterable, Mapping, Sequence, Tuple, Union

from vqakd.errors import UserError

PathLike = Union[str, os.PathLike]
Labelled = Union[Mapping[str, Union[PathLike, None]], Iterable[Tuple[str, Union[PathLike, None]]]]


def _pairs(paths: Labelled) -> list[tuple[str, str]]:
    items = paths.items() if isinstance(paths, Mapping) else paths
    return [(label, os.fspath(path)) for label, path in items if path is not None]


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:         # one of them does not exist yet: different files
        return False


def check_output_paths(inputs: Labelled, outputs: Labelled, hint: str = "") -> None:
    """Refuse an output that is the same file as an input, or as another output.

    `inputs` and `outputs` map a label the user recognises (the option, say `--checkpoint`,
    or `--output-pt (val split)`) to a path; None paths are skipped. `hint` is appended to the
    message for two outputs that collide (for instance how to make a template distinct).
    """
    ins, outs = _pairs(inputs), _pairs(outputs)
    for out_index, (out_label, out_path) in enumerate(outs):
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


def template_fields(template: str) -> list[str]:
    """The replacement fields of a `str.format` template (`''` for positional `{}`)."""
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError:
        return []


def expand_template(template: str, option: str, positional: Sequence[object] = (), **fields: object) -> str:
    """Fill an output path template; any problem is one line naming the option and the template.

    `fields` are the named fields (`{split}`, `{dataset}`); `positional` what `{}` / `{0}` get.
    """
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
