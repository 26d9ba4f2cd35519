"""Publishing a step's output folder and reading it back.

Every step output is a folder with data files and a ``manifest.json`` written last
(``storage.write_manifest``). :class:`OutputWriter` is the one way to write such a folder::

    with OutputWriter(out_uri, "analysis", storage_options) as out:   # unpublishes an old one
        out.parquet("tables/latents.parquet", table)
        out.figure("figures/l0_hist", fig)                             # .png and .svg
        out.json("summary.json", summary)
        manifest = out.publish(params, sae=..., activations=...)       # manifest last

A writer never replaces a file it did not write (a user's ``summary.json`` in the folder is
refused, naming the folder and the file); files of an earlier output of the same kind are its
own when that output's manifest lists them unchanged. An exception inside the block removes
the files written so far (no manifest was written, so no reader ever sees them). :class:`Output` reads a published folder back lazily, and
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
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
from pydantic_core import to_jsonable_python

from integral_superposition import storage

log = logging.getLogger(__name__)

__all__ = [
    "PENDING_NAME",
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


PENDING_NAME = ".manifest-pending.json"
"""A writer's list of the names it may have written while no manifest of it is published
(kept through a crash, so that a rerun knows those files are its own)."""


class OutputWriter:
    """Writes the files of one ``kind`` output under ``out_uri`` (each atomically), records
    their sizes and hashes, and publishes the manifest last with :meth:`publish`.

    Used as a context manager. A writer never replaces a file it did not write: a file is
    its own when the earlier ``kind`` manifest there lists it (unchanged: same size and
    SHA-256) or a crashed writer's :data:`PENDING_NAME` list names it. Any other existing
    file of the same name is refused with a :class:`FileExistsError` naming the folder and the
    file, before that file is written (``names``: the file names to check on entering,
    before anything is written). Other files in the folder are left as they are. Entering
    refuses a folder holding another kind of output and unpublishes an earlier output of this
    kind; leaving on an exception removes every file written so far; :meth:`publish` removes
    the files of the earlier output that were not rewritten.
    """

    def __init__(
        self,
        out_uri: str,
        kind: str,
        storage_options: Mapping[str, Any] | None = None,
        names: Iterable[str] = (),
    ):
        if isinstance(out_uri, os.PathLike):
            out_uri = os.fspath(out_uri)
        if not isinstance(out_uri, str) or not out_uri:
            raise TypeError(f"out_uri={out_uri!r}: expected a non-empty folder URI string")
        self.out, self.kind, self.opts = out_uri, kind, storage_options
        self.names = tuple(names)
        self.files: dict[str, dict[str, Any]] = {}
        self.manifest: dict[str, Any] | None = None
        self._owned: dict[str, dict[str, Any] | None] = {}  # name -> earlier entry (None: pending)
        self._claimed: set[str] = set()

    def check(self) -> OutputWriter:
        """Refuse the folder as :meth:`__enter__` would (a file, another kind of output, a
        file of one of ``names`` this project did not write), changing nothing: for a step
        to call before long work whose output goes there."""
        fs, path = storage.get_fs(self.out, self.opts)
        if fs.isfile(path):
            raise FileExistsError(f"out_uri={self.out!r} is a file: expected a folder")
        earlier = storage.own_manifest(self.out, self.kind, self.opts)
        self._owned = {n: dict(e) for n, e in ((earlier or {}).get("files") or {}).items()}
        for name in self._read_pending():
            self._owned.setdefault(name, None)
        for name in self.names:
            self._check_free(name)
        return self

    def __enter__(self) -> OutputWriter:
        self.check()
        if self._owned:  # remembered before the manifest that lists them goes
            self._write_pending()
        storage.unpublish(self.out, self.kind, self.opts)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.manifest is None:
            self.rollback()

    def uri(self, name: str) -> str:
        return storage.join(self.out, name)

    def _read_pending(self) -> list[str]:
        uri = self.uri(PENDING_NAME)
        if not storage.exists(uri, self.opts):
            return []
        try:
            found = storage.read_json(uri, self.opts)
        except ValueError:
            found = None
        if (
            not isinstance(found, dict)
            or found.get("kind") != self.kind
            or not isinstance(found.get("files"), list)
        ):
            raise FileExistsError(
                f"out_uri={self.out!r} holds a {PENDING_NAME} that is not an earlier "
                f"{self.kind!r} output's: choose another folder (nothing was changed)"
            )
        return [str(n) for n in found["files"]]

    def _write_pending(self) -> None:
        names = sorted(set(self._owned) | self._claimed)
        storage.write_json(self.uri(PENDING_NAME), {"kind": self.kind, "files": names}, self.opts)

    def _is_unchanged(self, name: str) -> bool:
        """True when ``name`` is a file of the earlier output as its manifest lists it."""
        entry = self._owned.get(name)
        if entry is None:
            return name in self._owned  # named by a crashed writer's pending list
        uri = self.uri(name)
        try:
            return storage.file_entry(uri, None, self.opts) == {
                "size": int(entry.get("size", -1)),
                "sha256": entry.get("sha256"),
            }
        except (FileNotFoundError, IsADirectoryError):
            return False

    def _check_free(self, name: str) -> None:
        """Refuse ``name`` when a file this project did not write is there."""
        if name in self.files or name in self._claimed:
            return
        if not storage.exists(self.uri(name), self.opts) or self._is_unchanged(name):
            return
        why = (
            "changed since this project wrote it"
            if name in self._owned
            else "not written by this project (no earlier manifest of ours lists it)"
        )
        raise FileExistsError(
            f"out_uri={self.out!r} holds the file {name!r}, {why}: refusing to replace it; "
            f"choose another folder or move that file away (it was not changed)"
        )

    def _claim(self, names: Iterable[str]) -> None:
        """Check ``names`` and list them as this writer's before any of them is written."""
        new = [n for n in names if n not in self.files and n not in self._claimed]
        for name in new:
            self._check_free(name)
        if new:
            self._claimed.update(new)
            self._write_pending()

    def write(self, name: str, data: bytes) -> str:
        """Write ``data`` to ``name`` (relative to the folder); returns its URI."""
        self._claim([name])
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
        prefix = name.rstrip("/")
        self._claim(f"{prefix}/{rel}" for rel in files)
        entries = publish_folder(
            self.uri(prefix), files, self.opts, allowed, self.owned_under(prefix)
        )
        self.add(prefix, entries)

    def owned_under(self, prefix: str) -> dict[str, dict[str, Any]]:
        """``{relative name: {size, sha256}}`` of the earlier output's files under ``prefix/``
        (to let :func:`publish_folder` replace a subfolder this project wrote)."""
        head = prefix.rstrip("/") + "/"
        return {
            n[len(head) :]: dict(e)
            for n, e in self._owned.items()
            if n.startswith(head) and e is not None
        }

    def add(self, prefix: str, entries: Mapping[str, Mapping[str, Any]]) -> None:
        """List files written by someone else (``{relative name: {size, sha256}}``) under
        ``prefix/`` in the manifest."""
        for rel, entry in entries.items():
            self.files[f"{prefix.rstrip('/')}/{rel}"] = dict(entry)

    def publish(self, config: Any, **extra: Any) -> dict[str, Any]:
        """Write ``manifest.json`` (``kind``, ``config``, the files, ``extra``); returns it.
        Then remove the earlier output's files that this one did not rewrite."""
        self.manifest = storage.write_manifest(
            self.out, self.kind, config, self.files, self.opts, **jsonable(extra)
        )
        stale = [n for n in self._owned if n not in self.files]
        self._remove_own(stale)
        storage.remove(self.uri(PENDING_NAME), self.opts)
        return self.manifest

    def _remove_own(self, names: Iterable[str]) -> None:
        """Remove the files of the earlier output among ``names`` that are still as this
        project wrote them (one changed since is someone else's now and stays)."""
        for name in names:
            if self._is_unchanged(name):
                self._remove(name)

    def _remove(self, name: str) -> None:
        try:
            storage.remove(self.uri(name), self.opts, recursive=False)
        except Exception as e:
            log.warning("could not remove %s of a %s output: %s", name, self.kind, e)

    def rollback(self) -> None:
        """Remove the files written so far (best effort; the manifest was never written).
        The earlier output's files that were not rewritten stay listed as this project's."""
        for name in self.files:
            self._remove(name)
        self._owned = {n: e for n, e in self._owned.items() if n not in self.files}
        self._claimed.clear()
        self.files = {}
        try:
            if self._owned:
                self._write_pending()
            else:
                storage.remove(self.uri(PENDING_NAME), self.opts)
        except Exception as e:
            log.warning("could not update %s after a failed %s: %s", PENDING_NAME, self.kind, e)


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


FOLDER_MARK = ".published-folder.json"
"""The list of files :func:`publish_folder` put in a folder (``{"files": {name: {size,
sha256}}}``): what makes that folder its own to replace later."""


def _check_replaceable(
    out_uri: str,
    fs,
    path: str,
    allowed: re.Pattern[str],
    owned: Mapping[str, Mapping[str, Any]] | None,
) -> None:
    """Refuse to replace a folder holding a file that ``allowed`` does not match or that
    neither the folder's :data:`FOLDER_MARK` nor ``owned`` lists with its size."""
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise FileExistsError(f"out_uri={out_uri!r} is a file: expected a folder")
    root = path.rstrip("/") + "/"
    found = {
        (p[len(root) :] if p.startswith(root) else p).replace(os.sep, "/"): int(
            info.get("size") or 0
        )
        for p, info in fs.find(path, detail=True).items()
    }
    listed: dict[str, Any] = dict(owned or {})
    if FOLDER_MARK in found:
        found.pop(FOLDER_MARK)
        try:
            mark = json.loads(fs.cat_file(root + FOLDER_MARK))
            listed.update(mark["files"])
        except (ValueError, KeyError, TypeError):
            raise FileExistsError(
                f"out_uri={out_uri!r} holds a {FOLDER_MARK} this project did not write; "
                "choose a new folder (nothing was changed)"
            ) from None
    foreign = sorted(
        n
        for n, size in found.items()
        if not allowed.match(n)
        or not isinstance(listed.get(n), Mapping)
        or int(listed[n].get("size", -1)) != size
    )
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
    owned: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write ``files`` (relative name -> bytes) into a local staging folder, then put it in
    place at ``out_uri`` in one step (local: rename; object stores: one recursive upload),
    replacing an earlier folder only when every file there matches ``allowed`` and was put
    there by this function (its :data:`FOLDER_MARK` lists it) or is listed in ``owned``
    (``{relative name: {size, sha256}}``, e.g. from the manifest of the output holding the
    folder). Returns ``{relative name: {size, sha256}}``."""
    entries = {name: storage.file_entry("", data) for name, data in files.items()}
    fs, path = storage.get_fs(out_uri, storage_options)
    _check_replaceable(out_uri, fs, path, allowed, owned)
    files = {**files, FOLDER_MARK: storage.canonical_json({"files": entries}, indent=2).encode()}
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
