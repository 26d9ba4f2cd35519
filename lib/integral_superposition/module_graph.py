"""The import graph of the project's modules, read from their source (AST), never imported.

An edge ``a -> b`` means module ``a`` imports module ``b`` anywhere in its code: at module
level or inside a function or method (a deferred import still runs when the function does).
Imports under ``if TYPE_CHECKING:`` are not counted: they never run. ``from pkg import x``
counts as an import of ``pkg.x`` when that is a module of the graph, else of ``pkg``; an
import of ``pkg.mod`` counts only ``pkg.mod``, not the ``__init__`` of ``pkg`` that Python
also runs (a package's ``__init__`` re-exports; it is not what a step runs). Only modules of
the given roots are nodes; third-party imports are dropped.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ImportGraph = dict[str, set[str]]


def package_modules(package: str, root: Path) -> dict[str, Path]:
    """``{module name: file}`` for every ``.py`` file under ``root``, named from ``package``."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"root={str(root)!r}: expected the directory of {package!r}")
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(
    tree: ast.Module, module: str, is_package: bool
) -> Iterable[tuple[str, str | None]]:
    """``(name, fallback)`` for every import in ``tree``: ``from a import b`` gives
    ``("a.b", "a")``, ``import a.b`` gives ``("a.b", None)``; relative names are resolved
    against ``module``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                drop = node.level - 1 if is_package else node.level
                anchor = anchor[: len(anchor) - drop] if drop else anchor
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield f"{base}.{alias.name}", base
        stack.extend(ast.iter_child_nodes(node))


def import_graph(roots: Mapping[str, Path]) -> ImportGraph:
    """``{module: modules it imports}`` over the packages ``{package name: directory}``.

    ``from a import b`` adds ``a.b`` when it is a module of the graph, otherwise ``a``."""
    files: dict[str, Path] = {}
    for package, root in roots.items():
        files.update(package_modules(package, root))
    graph: ImportGraph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_bytes(), filename=str(path))
        is_package = path.name == "__init__.py"
        deps = {
            name if name in files or fallback is None else fallback
            for name, fallback in _imported_names(tree, module, is_package)
        }
        graph[module] = {d for d in deps if d in files and d != module}
    return graph


def closure(graph: Mapping[str, set[str]], start: Iterable[str]) -> set[str]:
    """The modules ``start`` reaches in ``graph`` (``start`` included)."""
    seen: set[str] = set()
    todo = list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        if module not in graph:
            raise KeyError(f"module={module!r}: not a module of the import graph")
        seen.add(module)
        todo.extend(graph[module] - seen)
    return seen
