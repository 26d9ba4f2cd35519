"""Loading labelled text datasets from CSV, Parquet, JSONL, HF datasets or Kaggle.

Every loader returns a ``pandas.DataFrame`` with (at least) the text and label columns,
validated by :func:`validate_frame`. Labels stay as strings (multi-class); the
string-to-id mapping is :func:`label_mapping` and is recorded in every dump manifest.
"""

from __future__ import annotations

import hashlib
import os
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from integral_superposition.data.tables import TABLE_SUFFIXES, read_table

TextSpec = str | Sequence[str]
"""A text template over columns (``"{title}. {description}"``) or a list of columns joined."""

TEXT_JOIN = " "
"""Separator of the columns of a list ``text`` spec."""


def text_columns(text: TextSpec) -> list[str]:
    """The columns a ``text`` spec reads: the fields of a template or the listed columns.

    Raises ``ValueError``/``TypeError`` naming the spec for an unusable one (no fields,
    positional or malformed fields, an empty list, non-string entries).
    """
    if isinstance(text, str):
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
        except ValueError as e:
            raise ValueError(f"text={text!r}: not a valid template ({e})") from None
        bad = [f for f in fields if not f or f.isdigit() or any(c in f for c in ".[!:")]
        if bad:
            raise ValueError(
                f"text={text!r}: field {{{bad[0]}}} is not a column name; expected named "
                "fields such as '{title}. {description}' (no positions, conversions or formats)"
            )
        if not fields:
            raise ValueError(
                f"text={text!r}: the template names no column; expected e.g. '{{title}}. {{description}}'"
            )
        return list(dict.fromkeys(fields))
    if isinstance(text, Sequence) and not isinstance(text, bytes):
        cols = list(text)
        if not cols:
            raise ValueError("text=[]: expected a template string or a non-empty list of columns")
        if not all(isinstance(c, str) and c for c in cols):
            raise TypeError(f"text={cols!r}: expected column names (non-empty strings)")
        return list(dict.fromkeys(cols))
    raise TypeError(
        f"text={text!r}: expected a template string such as '{{title}}. {{description}}' "
        "or a list of column names"
    )


def compose_text(df: pd.DataFrame, text: TextSpec, text_col: str) -> pd.DataFrame:
    """A copy of ``df`` whose ``text_col`` (created or replaced) is built from other columns.

    ``text``: a template over columns (``"{title}. {description}"``; a missing cell counts as
    empty) or a list of columns joined with a space (missing or empty cells skipped). A
    referenced column that does not exist raises ``ValueError`` naming it and the available
    columns. Rows whose composed text is empty are left for :func:`validate_frame` to report.
    """
    cols = text_columns(text)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(
            f"text={text!r}: no column {missing[0]!r}; available columns: {list(map(str, df.columns))}"
        )
    parts = {
        c: df[c].map(lambda v: "" if v is None or (np.isscalar(v) and pd.isna(v)) else str(v))
        for c in cols
    }
    if isinstance(text, str):
        rows = [dict(zip(cols, vals, strict=True)) for vals in zip(*parts.values(), strict=True)]
        composed = [text.format_map(r) for r in rows]
    else:
        composed = [
            TEXT_JOIN.join(v.strip() for v in vals if v.strip())
            for vals in zip(*(parts[c] for c in cols), strict=True)
        ]
    out = df.copy()
    out[text_col] = pd.Series(composed, index=df.index, dtype=object)
    return out


def validate_frame(df: Any, text_col: str, label_col: str | None) -> pd.DataFrame:
    """Check that ``df`` has usable text and label columns; return it unchanged.

    Raises ``TypeError``/``ValueError`` naming the problem: not a frame, missing column, empty
    dataset, empty or non-string texts, or missing (NaN) labels.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df: expected a pandas DataFrame, got {type(df).__name__}")
    for arg, col in (("text_col", text_col), ("label_col", label_col)):
        if col is not None and col not in df.columns:
            raise ValueError(
                f"{arg}={col!r}: no such column; the dataset has columns {list(df.columns)}"
            )
    if len(df) == 0:
        raise ValueError("the dataset is empty: expected at least one row")
    texts = df[text_col]
    missing = texts.isna().to_numpy(dtype=bool)
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise ValueError(
            f"text_col={text_col!r} row {i}: missing text ({texts.iloc[i]!r}); {int(missing.sum())} row(s) have no text"
        )
    not_str = ~texts.map(lambda t: isinstance(t, str)).to_numpy(dtype=bool)
    if not_str.any():
        i = int(np.flatnonzero(not_str)[0])
        raise ValueError(
            f"text_col={text_col!r} row {i}: expected a string, got {texts.iloc[i]!r} "
            f"({type(texts.iloc[i]).__name__}); {int(not_str.sum())} row(s) are not strings"
        )
    empty = (texts.str.strip().str.len() == 0).to_numpy(dtype=bool)
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise ValueError(
            f"text_col={text_col!r} row {i}: empty text; {int(empty.sum())} row(s) are empty or whitespace"
        )
    if label_col is not None:
        na = df[label_col].isna().to_numpy(dtype=bool)
        if na.any():
            i = int(np.flatnonzero(na)[0])
            raise ValueError(
                f"label_col={label_col!r} row {i}: missing (NaN) label; {int(na.sum())} row(s) have no label"
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
    texts = df[text_col].tolist()
    labels_l = labels.tolist()
    step = 16384  # hash in chunks: one join per chunk instead of one update per row
    for a in range(0, len(texts), step):
        rows = (
            f"{t}\x1f{lab}\x1e"
            for t, lab in zip(texts[a : a + step], labels_l[a : a + step], strict=True)
        )
        h.update("".join(rows).encode("utf-8"))
    return h.hexdigest()


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
    text: TextSpec | None = None,
) -> pd.DataFrame:
    if text is not None:
        df = compose_text(df, text, text_col)
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
    text: TextSpec | None = None,
) -> pd.DataFrame:
    """Load a labelled table (CSV/TSV with sniffed separator, Parquet or JSONL) from any URI.

    Rows keep their order; labels stay multi-class strings. ``balance=True`` down-samples
    every label to the rarest one's count. ``text`` (optional) builds the ``text_col`` column
    from others: a template such as ``"{title}. {description}"`` or a list of columns joined
    with a space (:func:`compose_text`). Returns a validated DataFrame.
    """
    sources = [text_col] if text is None else text_columns(text)
    df = read_table(
        path, storage_options, sep=sep, columns=[*sources, label_col], text_columns=sources
    )
    return _finish(df, text_col, label_col, balance, seed, max_rows, text)


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
    text: TextSpec | None = None,
) -> pd.DataFrame:
    """Load a HuggingFace dataset by name (needs the ``hf`` extra and a reachable hub or cache).

    Integer class labels are mapped to their names when the dataset declares them. ``text``
    builds ``text_col`` from other columns, as in :func:`load_titles_csv`.
    """
    if text is not None:
        text_columns(text)
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
            f"name={name!r}: cannot load the HuggingFace dataset from the hub or the local cache ({type(e).__name__}: {e})"
        ) from e
    df = ds.to_pandas()
    feature = ds.features.get(label_col) if label_col else None
    if feature is not None and hasattr(feature, "names"):
        df[label_col] = np.asarray(feature.names, dtype=object)[df[label_col].to_numpy()]
    return _finish(df, text_col, label_col, balance, seed, max_rows, text)


def _pick_table(root: str, dataset_id: str) -> str:
    """The one table file of a downloaded dataset folder."""
    found = sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, _, files in os.walk(root)
        for f in files
        if os.path.splitext(f.lower().removesuffix(".gz"))[1] in TABLE_SUFFIXES
    )
    if len(found) != 1:
        raise ValueError(
            f"dataset_id={dataset_id!r} holds {len(found)} table files {found[:10]}: pass filename= to pick one"
        )
    return found[0]


def load_kaggle_dataset(
    dataset_id: str,
    filename: str | None = None,
    text_col: str = "title",
    label_col: str | None = "topic",
    *,
    balance: bool = False,
    seed: int = 0,
    max_rows: int | None = None,
    text: TextSpec | None = None,
) -> pd.DataFrame:
    """Download a Kaggle dataset with kagglehub (``kaggle`` extra) and load ``filename`` from it
    (default: its only table file). Needs network access and Kaggle credentials. ``text``
    builds ``text_col`` from other columns, as in :func:`load_titles_csv`."""
    if text is not None:
        text_columns(text)
    if not isinstance(dataset_id, str) or dataset_id.count("/") != 1:
        raise ValueError(f"dataset_id={dataset_id!r}: expected 'owner/dataset-name'")
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
    if filename is None:
        filename = _pick_table(root, dataset_id)
    return load_titles_csv(
        os.path.join(root, filename),
        text_col,
        label_col,
        balance=balance,
        seed=seed,
        max_rows=max_rows,
        text=text,
    )


def _looks_like_file(source: str) -> bool:
    lower = source.lower()
    for suffix in (".gz", ".bz2", ".xz"):
        lower = lower.removesuffix(suffix)
    return (
        "://" in source
        or os.path.exists(source)
        or source.startswith((".", "/", "~"))
        or os.path.splitext(lower)[1] in TABLE_SUFFIXES
    )


def load_dataset_auto(
    source: str,
    text_col: str = "title",
    label_col: str | None = "topic",
    *,
    filename: str | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Load a labelled text dataset from wherever ``source`` points:

    - ``"demo"`` or ``"demo:N"``: the built-in synthetic corpus (N headlines, default 4000);
    - a path or fsspec URI of a CSV/TSV/Parquet/JSONL file;
    - ``"kaggle:owner/name"``, or ``"owner/name"`` with ``filename``: a Kaggle dataset;
    - ``"hf:name"``: a HuggingFace dataset;
    - a bare ``"owner/name"``: Kaggle (as the original notebook), then the HF hub.

    ``kwargs`` go to the loader (``balance``, ``seed``, ``max_rows``, ``text``, ``split`` for
    HF, ...).
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source={source!r}: expected 'demo', a file path/URI or a dataset id")
    if source == "demo" or source.startswith("demo:"):
        from integral_superposition.data.demo_corpus import demo_corpus

        arg = source.split(":", 1)[1] if ":" in source else "4000"
        if not arg.isdigit():
            raise ValueError(f"source={source!r}: expected 'demo' or 'demo:N' with N a number")
        try:
            df = demo_corpus(int(arg), seed=kwargs.get("seed", 0))
        except ValueError as e:
            raise ValueError(f"source={source!r}: {e}") from None
        text = kwargs.get("text")
        renames = {} if text is not None else {"title": text_col}
        if label_col is not None:
            renames["topic"] = label_col
        return _finish(
            df.rename(columns=renames),
            text_col,
            label_col,
            kwargs.get("balance", False),
            kwargs.get("seed", 0),
            kwargs.get("max_rows"),
            text,
        )
    if source.startswith("kaggle:"):
        return load_kaggle_dataset(source[7:], filename, text_col, label_col, **kwargs)
    if source.startswith("hf:"):
        return load_hf_dataset(source[3:], text_col=text_col, label_col=label_col, **kwargs)
    if _looks_like_file(source):
        return load_titles_csv(source, text_col, label_col, **kwargs)
    if filename is not None:
        return load_kaggle_dataset(source, filename, text_col, label_col, **kwargs)
    errors = []
    if source.count("/") == 1:
        try:
            return load_kaggle_dataset(source, None, text_col, label_col, **kwargs)
        except (ImportError, OSError) as e:
            errors.append(f"Kaggle: {e}")
    try:
        return load_hf_dataset(source, text_col=text_col, label_col=label_col, **kwargs)
    except (ImportError, OSError) as e:
        errors.append(f"HuggingFace: {e}")
    raise OSError(
        f"source={source!r}: not a local file, and no reachable dataset of that name ("
        + "; ".join(errors)
        + ")"
    )


def split_df(
    df: pd.DataFrame, train: float = 0.8, seed: int = 42, stratify_col: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Shuffle-split into ``(train_df, test_df)``; stratified on ``stratify_col`` when given."""
    if not 0 < train < 1:
        raise ValueError(f"train={train}: expected a fraction strictly between 0 and 1")
    if len(df) < 2:
        raise ValueError(f"df has {len(df)} row(s): need at least 2 to split")
    from sklearn.model_selection import train_test_split

    if stratify_col is not None and stratify_col not in df.columns:
        raise ValueError(
            f"stratify_col={stratify_col!r}: no such column; the dataset has columns {list(df.columns)}"
        )
    strat = df[stratify_col] if stratify_col else None
    tr, te = train_test_split(df, train_size=train, random_state=seed, stratify=strat)
    return tr, te
