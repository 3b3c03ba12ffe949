"""The package's layout: imports point one way, without a cycle, and no file or
function outgrows what a reader can hold (DESIGN.md, "Inside medseg/")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

#: What each part of medseg may import besides itself and ``medseg.errors`` (a module
#: is in the part whose name is the longest prefix of its own). Parts not listed
#: (``describe``, ``demo``, ``export``, the public API in ``medseg``) may import any
#: part of medseg; ``medseg_cli`` may import medseg, and medseg never imports it.
MAY_IMPORT = {
    "medseg.io": set(),
    "medseg.preprocessing": {"medseg.io"},
    "medseg.datasets": {"medseg.io", "medseg.preprocessing"},
    "medseg.config": {"medseg.config_types"},
    "medseg.config_types": set(),
    "medseg.metrics": set(),
    "medseg.losses": set(),
    "medseg.layers": set(),
    "medseg.models": {"medseg.layers", "medseg.io"},
    "medseg.figures": {"medseg.io", "medseg.preprocessing"},
    "medseg.bundle": {
        "medseg.io",
        "medseg.preprocessing",
        "medseg.models",
        "medseg.version",
    },
    "medseg.evaluation": {
        "medseg.io",
        "medseg.preprocessing",
        "medseg.datasets",
        "medseg.metrics",
        "medseg.figures",
    },
    "medseg.inference": {
        "medseg.io",
        "medseg.preprocessing",
        "medseg.datasets",
        "medseg.models",
        "medseg.bundle",
        "medseg.metrics",
        "medseg.figures",
        "medseg.version",
    },
    "medseg.explain": {
        "medseg.io",
        "medseg.preprocessing",
        "medseg.models",
        "medseg.bundle",
        "medseg.inference",
    },
    "medseg.training": {
        "medseg.io",
        "medseg.preprocessing",
        "medseg.datasets",
        "medseg.config",
        "medseg.losses",
        "medseg.metrics",
        "medseg.layers",
        "medseg.models",
        "medseg.bundle",
        "medseg.inference",
        "medseg.evaluation",
    },
}
ALWAYS = {"medseg.errors"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[0] == "cli":
        parts = ("medseg_cli", *parts[1:])
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(tree: ast.AST, modules: set[str]) -> set[str]:
    """The project's modules ``tree`` imports anywhere, function bodies included,
    ``if TYPE_CHECKING:`` blocks not: ``from a.b import c`` is ``a.b.c`` where that
    is a module, else ``a.b``."""
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                whole = f"{node.module}.{alias.name}"
                found.add(whole if whole in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in modules}


def import_graph(roots=("medseg", "cli")) -> dict[str, set[str]]:
    files = [f for root in roots for f in sorted((REPO / root).rglob("*.py"))]
    modules = {module_name(f): f for f in files}
    return {
        name: imported_modules(ast.parse(path.read_text()), set(modules)) - {name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a loop, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name):
        state[name] = 1
        path.append(name)
        for other in sorted(graph.get(name, ())):
            if state.get(other) == 1:
                return path[path.index(other) :] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def part_of(module: str) -> str:
    candidates = [p for p in (*MAY_IMPORT, *ALWAYS) if f"{module}.".startswith(f"{p}.")]
    return max(candidates, key=len) if candidates else module


def forbidden_arrows(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for name, imports in sorted(graph.items()):
        for other in sorted(imports):
            if name.startswith("medseg") and not name.startswith("medseg_cli"):
                if other.startswith("medseg_cli"):
                    wrong.append(f"{name} -> {other}")
                    continue
            part = part_of(name)
            if part not in MAY_IMPORT:
                continue
            target = part_of(other)
            if target in (part, *ALWAYS) or target in MAY_IMPORT[part]:
                continue
            if other == "medseg" and target == "medseg":  # the package's version
                target = "medseg.version"
                if target in MAY_IMPORT[part]:
                    continue
            wrong.append(f"{name} -> {other}")
    return wrong


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


def test_no_import_points_against_the_layers():
    assert forbidden_arrows(import_graph()) == []


def test_the_checks_find_a_cycle_and_a_forbidden_arrow():
    graph = {
        "medseg.io.formats": {"medseg.io.dicom"},
        "medseg.io.dicom": {"medseg.inference.segmenter"},
        "medseg.inference.segmenter": {"medseg.io.formats"},
    }
    assert find_cycle(graph) == [
        "medseg.inference.segmenter",
        "medseg.io.formats",
        "medseg.io.dicom",
        "medseg.inference.segmenter",
    ]
    assert forbidden_arrows(graph) == ["medseg.io.dicom -> medseg.inference.segmenter"]
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from medseg.a import B\n"
        "def f():\n    from medseg import b\n"
    )
    assert imported_modules(tree, {"medseg.a", "medseg.b", "medseg"}) == {"medseg.b"}


LONGEST_FILE = 700
LONGEST_FUNCTION = 120


@pytest.mark.parametrize("root", ["medseg", "cli"])
def test_no_file_or_function_outgrows_a_reader(root):
    too_long = []
    for path in sorted((REPO / root).rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(REPO)
        if (lines := len(text.splitlines())) > LONGEST_FILE:
            too_long.append(f"{where}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST_FUNCTION:
                    too_long.append(f"{where}:{node.name}: {length} lines")
    assert too_long == []
