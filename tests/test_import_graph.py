"""The library's import graph: no import circles; every module imports on its own."""

from __future__ import annotations

import importlib
from pathlib import Path

import integral_superposition
import networkx as nx
import pytest
from integral_superposition.module_graph import closure, import_graph, package_modules

LIB = Path(integral_superposition.__file__).resolve().parent


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    g = nx.DiGraph([(a, b) for a, deps in graph.items() for b in deps])
    g.add_nodes_from(graph)
    return sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)


def test_library_has_no_import_cycle():
    graph = import_graph({"integral_superposition": LIB})
    assert len(graph) > 40  # every module of the package is a node
    assert _cycles(graph) == []


@pytest.mark.parametrize("module", sorted(package_modules("integral_superposition", LIB)))
def test_every_library_module_imports(module):
    importlib.import_module(module)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_graph_counts_function_level_and_relative_imports_not_type_checking(tmp_path):
    root = _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "a.py": "def f():\n    from pkg.b import g\n    return g\n",
            "b.py": "from . import c\n",
            "c.py": (
                "from typing import TYPE_CHECKING\nimport numpy\n"
                "if TYPE_CHECKING:\n    from pkg import a\n"
            ),
            "sub/__init__.py": "from .d import x\n",
            "sub/d.py": "from ..c import y\nx = 1\n",
        },
    )
    graph = import_graph({"pkg": root})
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.c"}
    assert graph["pkg.c"] == set()  # a TYPE_CHECKING import never runs; numpy is not ours
    assert graph["pkg.sub"] == {"pkg.sub.d"}
    assert graph["pkg.sub.d"] == {"pkg.c"}
    assert _cycles(graph) == []
    assert closure(graph, ["pkg.a"]) == {"pkg.a", "pkg.b", "pkg.c"}


def test_cycle_through_a_deferred_import_is_found(tmp_path):
    root = _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "run.py": "import pkg.view\nclass Result: ...\n",
            "view.py": "def show():\n    from pkg.run import Result\n    return Result\n",
            "other.py": "from pkg import run\n",
        },
    )
    graph = import_graph({"pkg": root})
    assert graph["pkg.other"] == {"pkg.run"}
    assert _cycles(graph) == [["pkg.run", "pkg.view"]]


def test_closure_of_an_unknown_module_names_it():
    with pytest.raises(KeyError, match=r"pkg\.nope"):
        closure({"pkg.a": set()}, ["pkg.nope"])


@pytest.mark.parametrize("step", ["analysis", "merge", "steering", "viz"])
def test_step_libraries_never_import_the_pipelines(step):
    graph = import_graph({"integral_superposition": LIB})
    start = [
        m
        for m in graph
        if m == f"integral_superposition.{step}" or m.startswith(f"integral_superposition.{step}.")
    ]
    reached = closure(graph, start)
    assert start
    assert sorted(m for m in reached if m.startswith("integral_superposition.pipelines")) == []
