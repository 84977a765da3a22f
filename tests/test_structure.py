"""The package's structure: no import cycles, every kernel module implements the protocol, and
``import anybn`` leaves the testing tools out.

The import graph is read from the source (``ast``), so lazy imports inside
functions count as much as module-level ones: a cycle that a lazy import hides
still ties the modules together. Imports under ``if TYPE_CHECKING:`` are not
imports at run time and are left out.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import anybn
from anybn import _kernels

ROOT = Path(anybn.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(name: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The anybn modules one import statement in module ``name`` loads by name."""
    is_package = MODULES[name].name == "__init__.py"
    if isinstance(node, ast.Import):
        bases = [alias.name for alias in node.names]
        return {b for b in bases if b in MODULES}
    if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in MODULES:
            out.add(sub)  # ``from pkg import submodule``
        elif base in MODULES:
            out.add(base)
    return out


def import_graph() -> dict[str, set[str]]:
    """anybn module -> the anybn modules it imports (run-time imports, lazy ones included)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in _runtime_imports(tree):
            edges |= _targets(name, node)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_graph_reader_sees_lazy_imports_and_skips_type_checking() -> None:
    """The reader itself: a lazy import is an edge, a TYPE_CHECKING import is not."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from . import _call\n"
        "def f():\n    from . import _api\n"
    )
    edges = set().union(*(_targets("anybn._kernels.generic", n) for n in _runtime_imports(tree)))
    # ``.`` of anybn._kernels.generic is the package anybn._kernels, which has no _call or _api
    # submodule: ``from . import _api`` loads the package itself
    assert edges == {"anybn._kernels"}
    edges = set().union(*(_targets("anybn.convert", n) for n in _runtime_imports(tree)))
    assert edges == {"anybn._api"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    """No two anybn modules import each other, directly or through others, lazily or not."""
    graph = import_graph()
    assert len(graph) > 20 and any(graph.values())  # the reader found the package
    found = cycles(graph)
    assert not found, "import cycles (lazy imports included):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


@pytest.mark.parametrize("name", [name for name, _, _ in _kernels.KERNELS])
def test_kernel_module_implements_the_protocol(name: str) -> None:
    """Every module in the dispatcher's list defines the protocol's names, with its signatures."""
    try:
        module = importlib.import_module(f"anybn._kernels.{name}")
    except ImportError as exc:  # an optional library (torch, Dask, JAX) is absent
        pytest.skip(f"{name}: {exc}")
    assert module.NAME == name
    assert isinstance(module.FAST, bool)
    for function in ("accepts", "run_forward", "run_backward"):
        assert callable(getattr(module, function, None)), f"{name} lacks {function}"
        expected = inspect.signature(getattr(_kernels.Kernel, function))
        got = inspect.signature(getattr(module, function))
        assert list(got.parameters) == list(expected.parameters)[1:], (name, function)
    assert _kernels.KERNELS[-1][0] == "generic"
    assert not importlib.import_module("anybn._kernels.generic").FAST


def test_generic_kernel_is_last_and_claims_every_array() -> None:
    """The dispatcher always ends on the generic kernel, whatever the array."""
    name, claims, _ = _kernels.KERNELS[-1]
    assert name == "generic"
    assert claims(object())
    assert _kernels.kernels_for([1.0])[-1].NAME == "generic"


def test_import_anybn_leaves_the_testing_tools_out() -> None:
    """``import anybn`` (and ``anybn.torch``, where torch is installed) loads no module of
    ``anybn._testing``: the registry, the reference and the reports are for tests and tools."""
    code = (
        "import importlib.util, sys, anybn\n"
        "if importlib.util.find_spec('torch'): import anybn.torch\n"
        "print(sorted(m for m in sys.modules if m.startswith('anybn._testing')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "[]"
