"""The README's commands are the ones users copy: each must name a script that exists and flags
that script accepts, and its config (with any `--set`) must load.

Every `python ...`, `torchrun ...`, `make ...` and `bash ...` line of the README's code blocks is
checked here; the demo (`make demo`, tests/test_demo.py) and the end-to-end tests run the same
commands on generated data.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
LAUNCHERS = ("python", "torchrun", "make", "bash")


def readme_commands(section: str | None = None) -> list[str]:
    """Shell commands in the README's indented and fenced code blocks, continuation lines joined;
    with `section`, only those under the `## ` heading that starts with it."""
    commands, pending, in_fence, heading = [], "", False, ""
    with open(README, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.rstrip("\n")
            if line.startswith("## ") and not in_fence:
                heading = line[3:]
            if section is not None and not heading.startswith(section):
                continue
            if line.lstrip().startswith("```"):
                in_fence = not in_fence
                continue
            if not (in_fence or line.startswith("    ")) and not pending:
                continue
            text = line.strip()
            if pending:
                text = pending + " " + text
                pending = ""
            if text.endswith("\\"):
                pending = text[:-1].rstrip()
                continue
            text = re.sub(r"\s+#.*$", "", text)   # trailing comment
            if text.split(" ", 1)[0] in LAUNCHERS:
                commands.append(text)
    return commands


COMMANDS = readme_commands()


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


def _parse_only(monkeypatch, main, argv: list[str]) -> argparse.Namespace:
    """Run `main(argv)` up to its argument parsing and return what argparse made of argv."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    try:
        main(argv)
    except _Parsed as parsed:
        return parsed.namespace
    except SystemExit as exc:   # argparse rejected the flags
        pytest.fail(f"argparse rejected {argv}: exit {exc.code}")
    pytest.fail("the script never parsed its arguments")


def _load_script(path: str):
    name = "readme_" + re.sub(r"\W", "_", os.path.relpath(path, ROOT))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split_launch(command: str) -> tuple[str, list[str], list[str]]:
    """(launcher, launcher args, script argv) — argv[0] is the script path or `-m module`."""
    words = shlex.split(command)
    launcher = words[0]
    if launcher == "python":
        if words[1] == "-m":
            return launcher, [], words[1:]
        return launcher, [], words[1:]
    if launcher == "torchrun":
        for index, word in enumerate(words[1:], start=1):
            if word.endswith(".py"):
                return launcher, words[1:index], words[index:]
        pytest.fail(f"no script in: {command}")
    return launcher, [], words[1:]


def test_readme_has_the_commands_users_need():
    scripts = " ".join(COMMANDS)
    for needed in ("make demo", "make test", "txt2pickle.py", "preprocess/preprocess_questions.py",
                   "preprocess/preprocess_features.py", "train.py", "validate.py", "torchrun"):
        assert needed in scripts, f"README shows no command with {needed}"


def _makefile_targets() -> set[str]:
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as handle:
        return {match.group(1) for match in re.finditer(r"^([A-Za-z][\w-]*):", handle.read(), re.M)}


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_is_valid(command, monkeypatch):
    launcher, launcher_args, argv = _split_launch(command)
    monkeypatch.chdir(ROOT)
    if launcher == "make":
        assert set(argv) <= _makefile_targets(), f"Makefile lacks a target of: {command}"
        return
    if launcher == "bash":
        assert os.path.isfile(os.path.join(ROOT, argv[0])), f"no such script: {argv[0]}"
        return
    if launcher == "torchrun":
        from torch.distributed.run import get_args_parser

        get_args_parser().parse_args(launcher_args + argv)   # torchrun's own flags are valid
    if argv[0] == "-m":
        main = importlib.import_module(argv[1]).main
        argv = argv[2:]
    else:
        path = os.path.join(ROOT, argv[0])
        assert os.path.isfile(path), f"no such script: {argv[0]}"
        main = _load_script(path).main
        argv = argv[1:]
    namespace = _parse_only(monkeypatch, main, argv)
    if getattr(namespace, "cfg", None):
        from vqakd.core.config import load_config

        load_config(namespace.cfg, list(getattr(namespace, "overrides", None) or []))
