"""Reading one table file (CSV/TSV, Parquet, JSON lines; compressed or not) from any fsspec
URI into a DataFrame: the format from the name, the compression from the magic bytes, the
CSV separator sniffed from the header."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from integral_superposition import storage

TABLE_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}
"""File suffixes ``read_table`` reads, and the format of each (before ``.gz``/``.bz2``/``.xz``)."""


def _format_of(uri: str) -> str:
    lower = uri.lower()
    for suffix in (".gz", ".bz2", ".xz"):
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
    ext = os.path.splitext(lower)[1]
    if ext not in TABLE_SUFFIXES:
        raise ValueError(
            f"path={uri!r}: unknown file type {ext!r}; expected one of {sorted(TABLE_SUFFIXES)}"
        )
    return TABLE_SUFFIXES[ext]


def _compression_of(raw: bytes) -> str | None:
    """The compression of a file from its magic bytes (not its name): ``gzip``, ``bz2``,
    ``xz``, ``zstd`` or ``None``."""
    if raw[:2] == b"\x1f\x8b":
        return "gzip"
    if raw[:3] == b"BZh" and raw[3:4].isdigit() and raw[4:10] == b"1AY&SY":
        return "bz2"
    if raw[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if raw[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return None


def _decompress(raw: bytes, uri: str) -> bytes:
    """``raw`` decompressed when its magic bytes say it is compressed, whatever its name."""
    kind = _compression_of(raw)
    if kind is None:
        return raw
    try:
        if kind == "gzip":
            return gzip.decompress(raw)
        if kind == "bz2":
            return bz2.decompress(raw)
        if kind == "xz":
            return lzma.decompress(raw)
        try:
            import zstandard
        except ImportError:
            raise ValueError(
                f"path={uri!r}: the file is zstd-compressed; install zstandard "
                "(pip install zstandard) or decompress it (zstd -d)"
            ) from None
        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise ValueError(
            f"path={uri!r}: the file is {kind}-compressed but cannot be decompressed "
            f"({type(e).__name__}: {e}); the file is damaged or truncated"
        ) from e


_SEPARATORS = (",", ";", "\t", "|")


def _sniff_separator(text: str, required: Sequence[str]) -> str:
    """The CSV separator of ``text``: the sniffed one, unless another separator is the only
    one whose header holds every ``required`` column."""
    sample = text[:65536]
    header = sample.splitlines()[0] if sample else ""
    try:
        sniffed: str | None = csv.Sniffer().sniff(sample, delimiters="".join(_SEPARATORS)).delimiter
    except csv.Error:
        sniffed = None
    order = ([sniffed] if sniffed else []) + [c for c in _SEPARATORS if c != sniffed]
    if required:
        for sep in order:
            cols = next(csv.reader([header], delimiter=sep), [])
            if all(r in cols for r in required):
                return sep
    return sniffed or max(_SEPARATORS, key=header.count)


def read_table(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    sep: str | None = None,
    columns: Sequence[str | None] = (),
    text_columns: Sequence[str | None] = (),
) -> pd.DataFrame:
    """Read CSV/TSV (separator sniffed unless ``sep``), Parquet or JSONL from any fsspec URI.

    gzip, bz2, xz and zstd (with ``zstandard`` installed) files are decompressed, recognised
    by their magic bytes whatever their name (``titles.csv`` may be gzip).

    ``columns`` are the columns the caller needs; they guide the separator choice. CSV cells
    of ``text_columns`` are read literally as strings (a headline such as ``"None"`` or
    ``"2024"`` stays text; only empty cells are missing).
    """
    if not isinstance(uri, str | os.PathLike) or not str(uri):
        raise TypeError(f"path={uri!r}: expected a file path or fsspec URI string")
    uri = os.fspath(uri)
    fmt = _format_of(uri)
    try:
        raw = storage.read_bytes(uri, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"path={uri!r}: file not found") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"path={uri!r}: is a directory, expected a file") from None
    except OSError as e:
        raise OSError(f"path={uri!r}: cannot read the file ({e})") from e
    try:
        raw = _decompress(raw, uri)
        if fmt == "parquet":
            return pd.read_parquet(io.BytesIO(raw))
        if fmt == "jsonl":
            lines = raw.lstrip()[:1] != b"["  # a JSON array file is read as records
            return pd.read_json(io.BytesIO(raw), lines=lines, dtype=False)
        text = raw.decode("utf-8-sig")
        if sep is None:
            sep = _sniff_separator(text, [c for c in columns if c])
        str_cols = [c for c in text_columns if c]
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=dict.fromkeys(str_cols, str))
        # pandas reads "None", "NA", "null" ... as missing; in a text column they are words
        literal = [c for c in str_cols if c in df.columns and df[c].isna().any()]
        if literal:
            cells = pd.read_csv(
                io.StringIO(text),
                sep=sep,
                usecols=literal,
                keep_default_na=False,
                na_values=[""],
                dtype=str,
            )
            for c in literal:
                df[c] = cells[c]
        return df
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError, EOFError) as e:
        raise ValueError(f"path={uri!r}: cannot parse as {fmt} ({type(e).__name__}: {e})") from e
