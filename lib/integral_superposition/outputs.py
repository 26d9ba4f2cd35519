"""Publishing a step's output folder and reading it back.

Every step output is a folder with data files and a ``manifest.json`` written last
(``storage.write_manifest``). :class:`OutputWriter` is the one way to write such a folder::

    with OutputWriter(out_uri, "analysis", storage_options) as out:   # unpublishes an old one
        out.parquet("tables/latents.parquet", table)
        out.figure("figures/l0_hist", fig)                             # .png and .svg
        out.json("summary.json", summary)
        manifest = out.publish(params, sae=..., activations=...)       # manifest last

An exception inside the block removes the files written so far (no manifest was written, so
no reader ever sees them). :class:`Output` reads a published folder back lazily, and
:func:`publish_folder` puts a whole folder of pages in place in one step.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import pandas as pd
from pydantic_core import to_jsonable_python

from integral_superposition import storage

log = logging.getLogger(__name__)

__all__ = [
    "Output",
    "OutputWriter",
    "figure_bytes",
    "jsonable",
    "parquet_bytes",
    "publish_folder",
    "read_output",
]


def _fallback(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy scalars and arrays, torch tensors
        return o.tolist()
    return str(o)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: numpy scalars and arrays as numbers and lists, dict keys
    as strings, NaN and inf as ``None`` (JSON has no such numbers)."""
    return to_jsonable_python(obj, fallback=_fallback, inf_nan_mode="null")


def parquet_bytes(df: pd.DataFrame) -> bytes:
    """``df`` as Parquet bytes (no index)."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def figure_bytes(fig: Any, fmt: str = "png", dpi: int | None = None) -> bytes:
    """A matplotlib figure as ``png`` or ``svg`` bytes (reproducible: no timestamps)."""
    from integral_superposition.viz.figures import figure_bytes as render

    return render(fig, fmt, dpi)


class OutputWriter:
    """Writes the files of one ``kind`` output under ``out_uri`` (each atomically), records
    their sizes and hashes, and publishes the manifest last with :meth:`publish`.

    Used as a context manager: entering removes the manifest of an earlier output of the
    same kind there (a folder holding another kind is refused, nothing changed); leaving on
    an exception removes every file written so far.
    """

    def __init__(self, out_uri: str, kind: str, storage_options: Mapping[str, Any] | None = None):
        if isinstance(out_uri, os.PathLike):
            out_uri = os.fspath(out_uri)
        if not isinstance(out_uri, str) or not out_uri:
            raise TypeError(f"out_uri={out_uri!r}: expected a non-empty folder URI string")
        self.out, self.kind, self.opts = out_uri, kind, storage_options
        self.files: dict[str, dict[str, Any]] = {}
        self.manifest: dict[str, Any] | None = None

    def __enter__(self) -> OutputWriter:
        storage.unpublish(self.out, self.kind, self.opts)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.manifest is None:
            self.rollback()

    def uri(self, name: str) -> str:
        return storage.join(self.out, name)

    def write(self, name: str, data: bytes) -> str:
        """Write ``data`` to ``name`` (relative to the folder); returns its URI."""
        uri = self.uri(name)
        storage.write_bytes(uri, data, self.opts)
        self.files[name] = storage.file_entry(uri, data)
        return uri

    def parquet(self, name: str, df: pd.DataFrame) -> str:
        return self.write(name, parquet_bytes(df))

    def json(self, name: str, obj: Any) -> str:
        return self.write(name, storage.canonical_json(jsonable(obj), indent=2).encode())

    def figure(self, name: str, fig: Any, formats: tuple[str, ...] = ("png", "svg")) -> None:
        """``name.png`` and ``name.svg`` of a matplotlib figure, which is closed afterwards."""
        from integral_superposition.viz.figures import close_figure

        try:
            for fmt in formats:
                self.write(f"{name}.{fmt}", figure_bytes(fig, fmt))
        finally:
            close_figure(fig)

    def folder(self, name: str, files: Mapping[str, bytes], allowed: re.Pattern[str]) -> None:
        """Put ``files`` (relative name -> bytes) in place as the subfolder ``name`` in one
        step (see :func:`publish_folder`) and list them in the manifest."""
        entries = publish_folder(self.uri(name), files, self.opts, allowed)
        self.add(name, entries)

    def add(self, prefix: str, entries: Mapping[str, Mapping[str, Any]]) -> None:
        """List files written by someone else (``{relative name: {size, sha256}}``) under
        ``prefix/`` in the manifest."""
        for rel, entry in entries.items():
            self.files[f"{prefix.rstrip('/')}/{rel}"] = dict(entry)

    def publish(self, config: Any, **extra: Any) -> dict[str, Any]:
        """Write ``manifest.json`` (``kind``, ``config``, the files, ``extra``); returns it."""
        self.manifest = storage.write_manifest(
            self.out, self.kind, config, self.files, self.opts, **jsonable(extra)
        )
        return self.manifest

    def rollback(self) -> None:
        """Remove the files written so far (best effort; the manifest was never written)."""
        for name in self.files:
            try:
                storage.remove(self.uri(name), self.opts, recursive=False)
            except Exception as e:
                log.warning("could not remove %s after a failed %s: %s", name, self.kind, e)


class Output:
    """A published output folder, read lazily: ``manifest``, ``files``, ``read(name)``,
    ``table(name)`` (Parquet as a DataFrame), ``json(name)``; results are cached."""

    kind: str | None = None
    """The manifest kind this reader accepts (None: any)."""

    def __init__(
        self, uri: str, storage_options: Mapping[str, Any] | None = None, kind: str | None = None
    ):
        self.uri = uri
        self.storage_options = storage_options
        self.kind = kind or type(self).kind
        self.manifest = storage.read_manifest(uri, storage_options, kind=self.kind)
        self._cache: dict[str, Any] = {}

    @property
    def files(self) -> dict[str, Any]:
        return self.manifest.get("files", {})

    def has(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> bytes:
        if not self.has(name):
            raise FileNotFoundError(f"{self.uri!r} has no {name!r}")
        return storage.read_bytes(storage.join(self.uri, name), self.storage_options)

    def parquet(self, name: str) -> pd.DataFrame | None:
        """The Parquet file ``name`` as a DataFrame (None when the output has none)."""
        if name not in self._cache:
            self._cache[name] = (
                pd.read_parquet(io.BytesIO(self.read(name))) if self.has(name) else None
            )
        return self._cache[name]

    def json(self, name: str) -> Any:
        if name not in self._cache:
            self._cache[name] = json.loads(self.read(name))
        return self._cache[name]


def read_output(
    uri: str, storage_options: Mapping[str, Any] | None = None, kind: str | None = None
) -> Output:
    """Open the published output at ``uri`` (of ``kind`` when given)."""
    return Output(uri, storage_options, kind)


def _check_replaceable(out_uri: str, fs, path: str, allowed: re.Pattern[str]) -> None:
    """Refuse to replace a folder that holds anything ``allowed`` does not match."""
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise FileExistsError(f"out_uri={out_uri!r} is a file: expected a folder")
    root = path.rstrip("/") + "/"
    names = [p[len(root) :] if p.startswith(root) else p for p in fs.find(path)]
    foreign = sorted(n for n in names if not allowed.match(n.replace(os.sep, "/")))
    if foreign:
        raise FileExistsError(
            f"out_uri={out_uri!r} holds files that are not ours to replace "
            f"({', '.join(foreign[:3])}); choose a new folder (nothing was changed)"
        )


def publish_folder(
    out_uri: str,
    files: Mapping[str, bytes],
    storage_options: Mapping[str, Any] | None,
    allowed: re.Pattern[str],
) -> dict[str, dict[str, Any]]:
    """Write ``files`` (relative name -> bytes) into a local staging folder, then put it in
    place at ``out_uri`` in one step (local: rename; object stores: one recursive upload),
    replacing an earlier folder whose every file matches ``allowed``. Returns
    ``{relative name: {size, sha256}}``."""
    entries = {name: storage.file_entry("", data) for name, data in files.items()}
    fs, path = storage.get_fs(out_uri, storage_options)
    _check_replaceable(out_uri, fs, path, allowed)
    local = storage.is_local(out_uri)
    parent = os.path.dirname(os.path.abspath(path)) if local else None
    if local:
        os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-publish-", dir=parent)
    os.chmod(staging, storage.dir_mode())  # mkdtemp makes 0700; the folder follows the umask
    try:
        for name, data in files.items():
            target = os.path.join(staging, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
        if local:
            old = None
            if os.path.exists(path):
                old = tempfile.mkdtemp(prefix=".old-publish-", dir=parent)
                os.replace(path, os.path.join(old, "d"))
            os.replace(staging, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            if fs.exists(path):
                fs.rm(path, recursive=True)
            fs.put(staging.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entries
