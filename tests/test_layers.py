"""The package's layers import one way only, and no module imports itself back through another.

docs/architecture.md draws the layers; this test is what keeps that picture true. Every import
counts, also one inside a function (a lazy import is still a dependency).
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first: a module may import its own layer and those below it, never one above.
LAYERS = (
    ("model",),
    ("vqakd.core",),
    ("vqakd.data",),
    ("vqakd.extraction",),
    ("vqakd.training",),
    ("vqakd.predict", "vqakd.predict_batch", "vqakd.study"),
    ("vqakd.demo",),
)


def layer_of(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def library_modules() -> dict[str, str]:
    found = {}
    for top in ("vqakd", "model"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    found[module_name(path)] = path
    return found


def imports_of(path: str, own: str, known: set[str]) -> set[str]:
    """The library modules `path` imports (a `from package import module` names the module)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = own if path.endswith("__init__.py") else own.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known and name != own}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {name: imports_of(path, name, set(modules)) for name, path in modules.items()}


def test_every_library_module_has_a_layer(graph):
    assert [m for m in graph if m != "vqakd" and layer_of(m) is None] == []


def test_no_layer_imports_a_layer_above_it(graph):
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {i} ({LAYERS[layer_of(i)][0]})"
              for m, targets in sorted(graph.items()) if layer_of(m) is not None
              for i in sorted(targets) if layer_of(i) is not None and layer_of(i) > layer_of(m)]
    assert upward == []


def test_no_import_circle(graph):
    # A package's __init__ that re-exports its own modules is no circle: drop package -> own child.
    edges = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in graph.items()}
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [node, target])
                               if target in stack else f"{node} -> {target}")
            elif target not in state:
                visit(target, stack + [node])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert circles == []


def test_the_test_sees_a_violation(tmp_path):
    # The checker itself: an upward import and a circle are found.
    lower = tmp_path / "a.py"
    lower.write_text("from vqakd.demo import data\n")
    assert imports_of(str(lower), "vqakd.core.a", {"vqakd.demo", "vqakd.demo.data"}) == {"vqakd.demo", "vqakd.demo.data"}
    assert layer_of("vqakd.demo.data") > layer_of("vqakd.core.a")
