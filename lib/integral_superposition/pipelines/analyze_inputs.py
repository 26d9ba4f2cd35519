"""What an analysis reads: the SAE and its activation store, the labels it tests against,
and the firing counts that decide which latents are dead."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from integral_superposition.analysis import enrichment as enr
from integral_superposition.analysis.scan import scan_latents

log = logging.getLogger(__name__)

__all__ = ["dead_count", "resolve_labels"]


# -- dead latents ------------------------------------------------------------------------------
def dead_count(
    sae,
    store,
    mask: np.ndarray | None,
    fire_count: np.ndarray,
    min_tokens: int,
    **scan_kw: Any,
) -> tuple[np.ndarray, int]:
    """Firing counts ``int64[K]`` over at least ``min_tokens`` tokens (all of the store's
    when it has fewer), and how many tokens they cover.

    ``fire_count`` comes from a scan of the ``mask`` rows (None: the whole store). When those
    are fewer than the target, rows outside the mask, evenly spaced over the store, are
    scanned too (``scan_kw`` go to ``scan_latents``)."""
    from integral_superposition.sae.metrics import dead_count_rows

    n_scanned = store.n_tokens if mask is None else int(mask.sum())
    fires = np.asarray(fire_count, dtype=np.int64)
    extra = None if mask is None else dead_count_rows(mask, min_tokens)
    if extra is None:
        return fires, n_scanned
    more = scan_latents(sae, store, n_top=1, stats=False, mask=extra, **scan_kw)
    return fires + np.asarray(more.top.fire_count, dtype=np.int64), n_scanned + int(extra.sum())


# -- labels ------------------------------------------------------------------------------------
def resolve_labels(store, labels: Any = None) -> tuple[np.ndarray, pd.DataFrame | None, list[str]]:
    """Token label ids ``[N]``, document labels (``doc_id, label`` or None) and label names.

    ``labels``: None (the store's), one label per stored token (array/Series/list), or a
    DataFrame of document labels with ``doc_id`` and ``label`` columns. Raises when they do
    not align with the store (length or document ids).
    """
    doc_ids = np.asarray(store.doc_ids)
    if labels is None:
        docs = store.docs
        return (
            np.asarray(store.labels, dtype=np.int64),
            pd.DataFrame({"doc_id": docs["doc_id"].to_numpy(), "label": docs["label"].to_numpy()}),
            list(store.label_names),
        )
    if isinstance(labels, pd.DataFrame):
        if "doc_id" not in labels or "label" not in labels:
            raise ValueError(
                f"labels: a DataFrame needs 'doc_id' and 'label' columns, got {list(labels.columns)}"
            )
        ids, names = enr.encode_label_array(labels["label"], name="labels")
        d = labels["doc_id"].to_numpy(dtype=np.int64)
        if np.unique(d).size != d.size:
            raise ValueError("labels: doc_id values must be unique (one label per document)")
        order = np.argsort(d)
        pos = np.searchsorted(d[order], doc_ids)
        pos = np.minimum(pos, d.size - 1)
        ok = d[order][pos] == doc_ids
        if not ok.all():
            missing = np.unique(doc_ids[~ok])
            raise ValueError(
                f"labels has no row for {missing.size} document ids of the store "
                f"(e.g. {missing[:5].tolist()}): labels and activations are not aligned by doc_id"
            )
        token = ids[order][pos]
        return token, pd.DataFrame({"doc_id": d, "label": ids}), names
    ids, names = enr.encode_label_array(labels, name="labels")
    if ids.size != store.n_tokens:
        raise ValueError(
            f"labels has {ids.size} entries, but the store has {store.n_tokens} tokens: expected "
            "one label per stored token (or a DataFrame of doc_id, label)"
        )
    first = np.unique(doc_ids, return_index=True)
    per_doc = pd.Series(ids).groupby(doc_ids).nunique()
    docs = None
    if (per_doc.to_numpy() == 1).all():
        docs = pd.DataFrame({"doc_id": first[0], "label": ids[first[1]]})
    else:
        log.info("labels vary inside documents: skipping the document-level enrichment")
    return ids, docs, names
