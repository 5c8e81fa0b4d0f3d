"""The package's modules import each other without a cycle.

Every module of `sae_lens` is parsed with `ast` (no import runs): each import at any depth, inside
functions too, except under `if TYPE_CHECKING:`, is an edge to the module it names. `from x import y`
points at `x.y` when `y` is a submodule, else at `x`; a package is its `__init__`. A package importing
its own submodules is therefore no cycle unless one of them imports the package back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "sae_lens"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """`{dotted module name: file}` for every .py file of the package (a package's name -> its __init__)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Import statements under `node`, at any depth, skipping the body of `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:  # the `else:` branch runs
                found += [sub] if isinstance(sub, (ast.Import, ast.ImportFrom)) else _import_nodes(sub)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found.append(child)
        found += _import_nodes(child)
    return found


def imported_modules(name: str, path: Path, modules: dict[str, Path], package: str = PACKAGE) -> set[str]:
    """The package's modules that module `name` (file `path`) imports."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        for candidate in candidates:
            # `import sae_lens.saes.sae` names that module; anything outside the package is ignored.
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate.split(".")[0] == package and candidate != name:
                targets.add(candidate)
    return targets


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(root, package)
    return {name: imported_modules(name, path, modules, package) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as `[a, b, ..., a]`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_sae_lens_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 20 and "sae_lens.saes.sae" in graph and "sae_lens.training.trainer" in graph
    cycle = find_cycle(graph)
    if cycle is not None:
        print("import cycle:", " -> ".join(cycle))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# -- the checker itself, on small packages written here -----------------------------------------------


def write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / "pkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # A package importing its submodules, which import each other one way: no cycle.
        (
            {"__init__.py": "from pkg.a import f\nfrom . import b\n", "a.py": "import pkg.b\n", "b.py": ""},
            None,
        ),
        # A submodule importing the package back closes a cycle.
        (
            {"__init__.py": "from pkg.a import f\n", "a.py": "from pkg import helper\n"},
            ["pkg", "pkg.a", "pkg"],
        ),
        # `from pkg import b` where b is a submodule is an edge to pkg.b, not to the package.
        ({"__init__.py": "from pkg.a import f\n", "a.py": "from pkg import b\n", "b.py": ""}, None),
        # A cycle through an import inside a function still counts ...
        (
            {"a.py": "def f():\n    from pkg.b import g\n", "b.py": "import pkg.a\n"},
            ["pkg.a", "pkg.b", "pkg.a"],
        ),
        # ... one under `if TYPE_CHECKING:` does not (its else branch does).
        (
            {
                "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import g\n",
                "b.py": "import pkg.a\n",
            },
            None,
        ),
        (
            {
                "a.py": "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    from .b import g\n",
                "b.py": "from . import a\n",
            },
            ["pkg.a", "pkg.b", "pkg.a"],
        ),
        # Relative imports from inside a subpackage.
        (
            {
                "sub/__init__.py": "from .x import y\n",
                "sub/x.py": "from .. import c\n",
                "c.py": "from .sub import x\n",
            },
            ["pkg.c", "pkg.sub.x", "pkg.c"],
        ),
    ],
)
def test_find_cycle_on_small_packages(
    tmp_path: Path, files: dict[str, str], expected: list[str] | None
) -> None:
    root = write_package(tmp_path, files)
    graph = import_graph(root, "pkg")
    assert find_cycle(graph) == expected
