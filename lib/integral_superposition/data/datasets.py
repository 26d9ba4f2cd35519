"""Loading labelled text datasets from CSV, Parquet, JSONL, HF datasets or Kaggle.

Every loader returns a ``pandas.DataFrame`` with (at least) the text and label columns,
validated by :func:`validate_frame`. Labels stay as strings (multi-class); the
string-to-id mapping is :func:`label_mapping` and is recorded in every dump manifest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from integral_superposition import storage

_TEXT_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}


def validate_frame(df: Any, text_col: str, label_col: str | None) -> pd.DataFrame:
    """Check that ``df`` has usable text and label columns; return it unchanged.

    Raises ``ValueError`` naming the problem: not a frame, missing column, empty dataset,
    empty or non-string texts, or missing labels.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in (text_col, label_col) if c is not None and c not in df.columns]
    if missing:
        raise ValueError(
            f"column(s) {missing} not found: the dataset has columns {list(df.columns)}"
        )
    if len(df) == 0:
        raise ValueError("the dataset is empty: expected at least one row")
    texts = df[text_col]
    not_str = ~texts.map(lambda t: isinstance(t, str))
    if not_str.any():
        i = int(np.flatnonzero(not_str.to_numpy())[0])
        raise ValueError(
            f"{text_col!r} row {i}: expected a string, got {texts.iloc[i]!r} ({type(texts.iloc[i]).__name__}); {int(not_str.sum())} row(s) are not strings"
        )
    empty = texts.str.strip().str.len() == 0
    if empty.any():
        i = int(np.flatnonzero(empty.to_numpy())[0])
        raise ValueError(
            f"{text_col!r} row {i}: empty text; {int(empty.sum())} row(s) are empty or whitespace"
        )
    if label_col is not None:
        na = df[label_col].isna()
        if na.any():
            i = int(np.flatnonzero(na.to_numpy())[0])
            raise ValueError(
                f"{label_col!r} row {i}: missing (NaN) label; {int(na.sum())} row(s) have no label"
            )
    return df


def label_mapping(labels: Sequence[Any] | pd.Series) -> list[str]:
    """Sorted distinct label names; a label's id is its index in this list."""
    values = pd.Series(labels).dropna().unique()
    try:
        ordered = sorted(
            values, key=lambda v: (float(v), str(v))
        )  # numeric labels in numeric order
    except (TypeError, ValueError):
        ordered = sorted(values, key=str)
    return [str(v) for v in ordered]


def encode_labels(labels: pd.Series, names: Sequence[str]) -> np.ndarray:
    """Map label values to ids by their position in ``names``; ``int32[n]``."""
    index = {n: i for i, n in enumerate(names)}
    as_str = labels.astype(str)
    unknown = sorted(set(as_str) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not in the label mapping {list(names)}")
    return as_str.map(index).to_numpy(dtype=np.int32)


def dataset_fingerprint(df: pd.DataFrame, text_col: str, label_col: str | None) -> str:
    """SHA-256 over the (text, label) rows in order: identifies a dataset's content."""
    h = hashlib.sha256()
    labels = df[label_col].astype(str) if label_col is not None else pd.Series([""] * len(df))
    for text, label in zip(df[text_col].tolist(), labels.tolist(), strict=True):
        h.update(text.encode("utf-8"))
        h.update(b"\x1f")
        h.update(label.encode("utf-8"))
        h.update(b"\x1e")
    return h.hexdigest()


def _format_of(uri: str) -> str:
    lower = uri.lower()
    for suffix in (".gz", ".bz2", ".xz"):
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
    ext = os.path.splitext(lower)[1]
    if ext not in _TEXT_SUFFIXES:
        raise ValueError(
            f"path={uri!r}: unknown file type {ext!r}; expected one of {sorted(_TEXT_SUFFIXES)}"
        )
    return _TEXT_SUFFIXES[ext]


def read_table(
    uri: str, storage_options: Mapping[str, Any] | None = None, sep: str | None = None
) -> pd.DataFrame:
    """Read CSV (separator sniffed unless ``sep``), Parquet or JSONL from any fsspec URI."""
    fmt = _format_of(str(uri))
    try:
        raw = storage.read_bytes(str(uri), storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"path={uri!r}: file not found") from None
    except (OSError, PermissionError) as e:
        raise OSError(f"path={uri!r}: cannot read the file ({e})") from e
    compression = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}.get(
        os.path.splitext(str(uri).lower())[1]
    )
    try:
        if fmt == "parquet":
            return pd.read_parquet(io.BytesIO(raw))
        if fmt == "jsonl":
            return pd.read_json(io.BytesIO(raw), lines=True, compression=compression)
        if compression:
            from fsspec.compression import compr

            raw = compr[compression](io.BytesIO(raw)).read()
        text = raw.decode("utf-8-sig")
        if sep is None:
            try:
                sep = csv.Sniffer().sniff(text[:65536], delimiters=",;\t|").delimiter
            except csv.Error:
                sep = ","
        return pd.read_csv(io.StringIO(text), sep=sep)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise ValueError(f"path={uri!r}: cannot parse as {fmt} ({e})") from e


def balance_labels(df: pd.DataFrame, label_col: str, seed: int = 0) -> pd.DataFrame:
    """Down-sample every label to the size of the rarest one (deterministic for ``seed``)."""
    n = int(df[label_col].value_counts().min())
    parts = [g.sample(n=n, random_state=seed) for _, g in df.groupby(label_col, sort=True)]
    return pd.concat(parts).sort_index()


def _finish(
    df: pd.DataFrame,
    text_col: str,
    label_col: str | None,
    balance: bool,
    seed: int,
    max_rows: int | None,
) -> pd.DataFrame:
    validate_frame(df, text_col, label_col)
    if balance:
        if label_col is None:
            raise ValueError("balance=True needs a label_col")
        df = balance_labels(df, label_col, seed)
    if max_rows is not None:
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows}: expected a positive number of rows or None")
        df = df.iloc[:max_rows]
    return df.reset_index(drop=True)


def load_titles_csv(
    path: str,
    text_col: str = "title",
    label_col: str | None = "topic",
    *,
    sep: str | None = None,
    balance: bool = False,
    seed: int = 0,
    max_rows: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Load a labelled table (CSV/TSV with sniffed separator, Parquet or JSONL) from any URI.

    Rows keep their order; labels stay multi-class strings. ``balance=True`` down-samples
    every label to the rarest one's count. Returns a validated DataFrame.
    """
    df = read_table(path, storage_options, sep=sep)
    return _finish(df, text_col, label_col, balance, seed, max_rows)


def load_hf_dataset(
    name: str,
    split: str = "train",
    text_col: str = "text",
    label_col: str | None = "label",
    *,
    config_name: str | None = None,
    balance: bool = False,
    seed: int = 0,
    max_rows: int | None = None,
) -> pd.DataFrame:
    """Load a HuggingFace dataset by name (needs the ``hf`` extra and a reachable hub or cache).

    Integer class labels are mapped to their names when the dataset declares them.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "load_hf_dataset needs the `datasets` package: pip install 'integral-superposition[hf]'"
        ) from e
    try:
        ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as e:
        raise OSError(
            f"dataset={name!r}: cannot load from the HuggingFace hub or cache ({type(e).__name__}: {e})"
        ) from e
    df = ds.to_pandas()
    feature = ds.features.get(label_col) if label_col else None
    if feature is not None and hasattr(feature, "names"):
        df[label_col] = [feature.names[i] for i in df[label_col]]
    return _finish(df, text_col, label_col, balance, seed, max_rows)


def load_kaggle_dataset(
    dataset_id: str,
    filename: str,
    text_col: str = "title",
    label_col: str | None = "topic",
    *,
    balance: bool = False,
    seed: int = 0,
    max_rows: int | None = None,
) -> pd.DataFrame:
    """Download ``filename`` of a Kaggle dataset with kagglehub and load it (``kaggle`` extra)."""
    try:
        import kagglehub
    except ImportError as e:
        raise ImportError(
            "load_kaggle_dataset needs kagglehub: pip install 'integral-superposition[kaggle]'"
        ) from e
    try:
        root = kagglehub.dataset_download(dataset_id)
    except Exception as e:
        raise OSError(
            f"dataset_id={dataset_id!r}: cannot download from Kaggle ({type(e).__name__}: {e})"
        ) from e
    return load_titles_csv(
        os.path.join(root, filename),
        text_col,
        label_col,
        balance=balance,
        seed=seed,
        max_rows=max_rows,
    )


def load_dataset_auto(
    source: str,
    text_col: str = "title",
    label_col: str | None = "topic",
    *,
    filename: str | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Load from a local/remote file, the built-in ``demo`` corpus, Kaggle (``owner/name`` +
    ``filename``) or the HF hub (``owner/name`` or ``name``), in that order of precedence."""
    if source == "demo" or source.startswith("demo:"):
        from integral_superposition.data.demo_corpus import demo_corpus

        n = int(source.split(":", 1)[1]) if ":" in source else 4000
        df = demo_corpus(n)
        return _finish(
            df.rename(columns={"title": text_col, "topic": label_col or "topic"}),
            text_col,
            label_col,
            kwargs.get("balance", False),
            kwargs.get("seed", 0),
            kwargs.get("max_rows"),
        )
    if (
        "://" in source
        or os.path.exists(source)
        or os.path.splitext(source)[1].lower() in _TEXT_SUFFIXES
    ):
        return load_titles_csv(source, text_col, label_col, **kwargs)
    if filename is not None:
        return load_kaggle_dataset(source, filename, text_col, label_col, **kwargs)
    return load_hf_dataset(source, text_col=text_col, label_col=label_col, **kwargs)


def split_df(
    df: pd.DataFrame, train: float = 0.8, seed: int = 42, stratify_col: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Shuffle-split into ``(train_df, test_df)``; stratified on ``stratify_col`` when given."""
    if not 0 < train < 1:
        raise ValueError(f"train={train}: expected a fraction strictly between 0 and 1")
    if len(df) < 2:
        raise ValueError(f"df has {len(df)} row(s): need at least 2 to split")
    from sklearn.model_selection import train_test_split

    strat = df[stratify_col] if stratify_col else None
    tr, te = train_test_split(df, train_size=train, random_state=seed, stratify=strat)
    return tr, te
