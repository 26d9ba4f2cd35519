"""Labels of tokens and documents for the enrichment tests: names or ids to ``int64`` ids, the
two-class check, and documents' labels aligned with the ``(doc_id, latent)`` pairs of a scan."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["align_documents", "check_two_classes", "encode_label_array"]


def encode_label_array(
    labels: Any, label_names: Sequence[str] | None = None, name: str = "labels_global"
) -> tuple[np.ndarray, list[str]]:
    """Labels (ids or names; array, list or Series) -> ``(int64 ids [N], names [C])``."""
    arr = labels.to_numpy() if isinstance(labels, pd.Series | pd.Index) else np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} has shape {arr.shape}: expected a 1-D array of labels")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: expected one label per token")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        # a missing label would otherwise become a class of its own named "nan" or "None"
        missing = pd.isna(arr) | (pd.Series(arr).astype(str).str.strip() == "").to_numpy()
        if missing.any():
            raise ValueError(
                f"{name}: {int(missing.sum())} of {arr.size} labels are missing (NaN, None or "
                f"empty), first at position {int(np.flatnonzero(missing)[0])}: expected a label "
                "for every entry (drop those rows or fill them in)"
            )
    if np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_):
        ids = arr.astype(np.int64)
        if ids.min() < 0:
            raise ValueError(f"{name}: label ids must be non-negative, found {int(ids.min())}")
        n = int(ids.max()) + 1
        names = list(label_names) if label_names is not None else [str(i) for i in range(n)]
        if len(names) < n:
            raise ValueError(
                f"label_names has {len(names)} names, but {name} uses ids up to {n - 1}"
            )
        return ids, [str(x) for x in names]
    if label_names is not None:
        names = [str(x) for x in label_names]
        index = {n: i for i, n in enumerate(names)}
        ids = np.array([index.get(str(v), -1) for v in arr], dtype=np.int64)
        if (ids < 0).any():
            bad = sorted({str(v) for v in arr[ids < 0]})[:5]
            raise ValueError(f"{name} has labels {bad} not in label_names={names}")
        return ids, names
    codes, uniques = pd.factorize(pd.Series(arr).astype(str), sort=True)
    return codes.astype(np.int64), [str(u) for u in uniques]


def check_two_classes(counts: np.ndarray, names: Sequence[str], name: str) -> None:
    """Raise unless at least two labels occur (``counts [C]``: members per label)."""
    present = np.flatnonzero(counts > 0)
    if present.size < 2:
        only = names[int(present[0])] if present.size else None
        raise ValueError(
            f"{name} has a single class ({only!r}): enrichment needs at least two labels "
            "that occur among the tokens"
        )


def align_documents(
    doc_pairs: np.ndarray,
    doc_labels: Any,
    n_latents: int,
    label_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Check and align document pairs with document labels.

    Returns ``(pairs int64 [P, 2], index of each pair's document in doc_labels [P],
    label ids of the documents [D], label names [C])``; see :func:`~integral_superposition.analysis.enrichment.document_enrichment`.
    """
    if isinstance(doc_labels, pd.DataFrame):
        if "doc_id" not in doc_labels:
            raise ValueError("doc_labels: expected a 'doc_id' column")
        col = "label_name" if "label_name" in doc_labels else "label"
        if col not in doc_labels:
            raise ValueError("doc_labels: expected a 'label' or 'label_name' column")
        doc_index = doc_labels["doc_id"].to_numpy(dtype=np.int64)
        values = doc_labels[col]
    elif isinstance(doc_labels, pd.Series):
        doc_index = doc_labels.index.to_numpy(dtype=np.int64)
        values = doc_labels
    else:
        raise TypeError(
            f"doc_labels={type(doc_labels).__name__}: expected a DataFrame (doc_id, label) or a "
            "Series indexed by doc_id"
        )
    if np.unique(doc_index).size != doc_index.size:
        raise ValueError("doc_labels: doc_id values must be unique (one label per document)")
    ids, names = encode_label_array(values, label_names, name="doc_labels")
    pairs = np.asarray(doc_pairs, dtype=np.int64).reshape(-1, 2)
    order = np.argsort(doc_index)
    sorted_docs = doc_index[order]
    pos = np.searchsorted(sorted_docs, pairs[:, 0])
    found = (pos < sorted_docs.size) & (
        sorted_docs[np.minimum(pos, sorted_docs.size - 1)] == pairs[:, 0]
    )
    if not found.all():
        missing = np.unique(pairs[~found, 0])
        raise ValueError(
            f"doc_labels has no label for {missing.size} document ids that the activations "
            f"contain (e.g. {missing[:5].tolist()}): labels and activations are not aligned"
        )
    if pairs.size and (pairs[:, 1].min() < 0 or pairs[:, 1].max() >= n_latents):
        raise ValueError(f"doc_pairs: latent ids must lie in [0, {n_latents})")
    return pairs, order[pos], ids, names
