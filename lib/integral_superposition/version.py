"""Package version and code versions: the version plus a hash of the library's source, whole
or of the modules one step runs."""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from integral_superposition.module_graph import closure, import_graph, package_modules

try:
    __version__ = metadata.version("integral-superposition")
except metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"

LIBRARY = "integral_superposition"
LIBRARY_ROOT = Path(__file__).resolve().parent

read_source: Callable[[Path], bytes] = Path.read_bytes
"""How the hashes read a module's source (one place, so a test can show an edit)."""


MODULE_DATA = {
    f"{LIBRARY}.viz.templates": "viz/templates",
    f"{LIBRARY}.data.demo_corpus": "data/demo_corpus.yaml",
}
"""Package data that counts as a module's source: the file or folder (relative to the
library) a module reads, such as the templates it renders or the vocabulary it generates a
corpus from, so an edited data file changes the code version of every step that reads it."""


def _data_files(module: str) -> list[Path]:
    where = MODULE_DATA.get(module)
    if where is None:
        return []
    path = LIBRARY_ROOT / where
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


@functools.cache
def library_source_hash() -> str:
    """SHA-256 over the library's ``.py`` files and templates (path and content), in sorted
    order."""
    h = hashlib.sha256()
    data = [p for m in sorted(MODULE_DATA) for p in _data_files(m)]
    for path in sorted([*LIBRARY_ROOT.rglob("*.py"), *data]):
        h.update(path.relative_to(LIBRARY_ROOT).as_posix().encode())
        h.update(b"\0")
        h.update(read_source(path))
        h.update(b"\0")
    return h.hexdigest()


@functools.cache
def library_files() -> dict[str, Path]:
    """``{module name: file}`` of every library module."""
    return package_modules(LIBRARY, LIBRARY_ROOT)


def check_entry_points(*entry_points: str) -> None:
    """Raise ValueError for a name that is not a library module (no source is parsed)."""
    unknown = [m for m in entry_points if m not in library_files()]
    if unknown:
        raise ValueError(
            f"entry_points={unknown!r}: not modules of {LIBRARY}; expected names such as "
            f"'{LIBRARY}.dump' or '{LIBRARY}.sae.train'"
        )


_GRAPH_LOCK = threading.Lock()
"""Held while the import graph is read: one thread parses, the others wait for its result.
CPython 3.11's ``ast`` keeps its recursion depth per interpreter, not per thread, so two
threads building ASTs at once (two tasks of one flow run asking for their code version) can
fail with ``SystemError: AST constructor recursion depth mismatch``."""


@functools.cache
def _library_graph() -> dict[str, set[str]]:
    return import_graph({LIBRARY: LIBRARY_ROOT})


def library_graph() -> dict[str, set[str]]:
    """The library's import graph (see :mod:`integral_superposition.module_graph`), read once
    per process by one thread at a time."""
    with _GRAPH_LOCK:
        return _library_graph()


def step_modules(*entry_points: str) -> set[str]:
    """The library modules that ``entry_points`` (module names) import, transitively,
    themselves included. Raises ValueError for a name that is not a library module."""
    check_entry_points(*entry_points)
    return closure(library_graph(), entry_points)


@functools.cache
def _modules_hash(modules: frozenset[str]) -> str:
    files = library_files()
    h = hashlib.sha256()
    for module in sorted(modules):
        h.update(module.encode())
        h.update(b"\0")
        for path in [files[module], *_data_files(module)]:
            h.update(read_source(path))
            h.update(b"\0")
    return h.hexdigest()


def code_version(*entry_points: str) -> str:
    """``"<version>+<12 hex>"``. Without arguments the hash covers every file of ``lib/``;
    with ``entry_points`` (library module names) it covers only the modules they import,
    transitively (:func:`step_modules`), so an edit elsewhere leaves it unchanged."""
    if not entry_points:
        return f"{__version__}+{library_source_hash()[:12]}"
    return f"{__version__}+{_modules_hash(frozenset(step_modules(*entry_points)))[:12]}"


def clear_caches() -> None:
    """Forget the hashes and the graph read so far (after the source changed in-process)."""
    library_source_hash.cache_clear()
    library_files.cache_clear()
    with _GRAPH_LOCK:
        _library_graph.cache_clear()
    _modules_hash.cache_clear()
