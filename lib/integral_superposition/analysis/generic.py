"""Generic latents: latents whose top contexts are dominated by one token that is frequent in
every label (a formatting or dataset artefact such as a news agency tag), so their label
enrichment says nothing about the labels' topics."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["generic_latents", "token_label_doc_fraction"]


def token_label_doc_fraction(
    tokens: np.ndarray,
    token_ids: np.ndarray,
    doc_ids: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
) -> np.ndarray:
    """Fraction of each label's documents that contain each of ``tokens``: ``[len(tokens), C]``.

    ``token_ids``, ``doc_ids``, ``labels``: aligned per-row arrays ``[N]`` (a document whose
    rows carry several labels counts once for each).
    """
    tokens = np.unique(np.asarray(tokens, dtype=np.int64))
    token_ids = np.asarray(token_ids, dtype=np.int64)
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    docs_per_label = np.zeros(n_labels, dtype=np.int64)
    dl = np.unique(np.stack([doc_ids, labels], 1), axis=0)
    np.add.at(docs_per_label, dl[:, 1], 1)
    out = np.zeros((tokens.size, n_labels), dtype=np.float64)
    sel = np.isin(token_ids, tokens)
    if sel.any():
        tdl = np.unique(np.stack([token_ids[sel], doc_ids[sel], labels[sel]], 1), axis=0)
        np.add.at(out, (np.searchsorted(tokens, tdl[:, 0]), tdl[:, 2]), 1.0)
    return out / np.maximum(docs_per_label, 1)[None, :]


def generic_latents(
    top_token_ids: np.ndarray,
    token_ids: np.ndarray,
    doc_ids: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    *,
    token_share: float = 0.5,
    label_doc_fraction: float = 0.1,
) -> pd.DataFrame:
    """Flag latents whose top contexts are dominated by a token spread across all labels.

    ``top_token_ids``: ``int [K, n]`` token at each latent's top activations (-1: empty slot,
    as ``TopKSets.token_ids``). ``token_ids``, ``doc_ids``, ``labels``: the analysed rows
    ``[N]``. A latent is generic when one token makes up at least ``token_share`` of its top
    contexts and that token occurs in at least ``label_doc_fraction`` of the documents of
    every label.

    Returns one row per latent: ``latent, generic, generic_token_id`` (the dominant token, -1
    when none), ``generic_token_share`` (its share of the top contexts) and
    ``generic_min_label_fraction`` (its smallest per-label document fraction; NaN below ``token_share``).
    """
    if not 0 < token_share <= 1:
        raise ValueError(f"token_share={token_share!r}: expected a fraction in (0, 1]")
    if not 0 <= label_doc_fraction <= 1:
        raise ValueError(
            f"label_doc_fraction={label_doc_fraction!r}: expected a fraction in [0, 1]"
        )
    top = np.asarray(top_token_ids, dtype=np.int64)
    if top.ndim != 2:
        raise ValueError(f"top_token_ids has shape {top.shape}: expected [n_latents, n_top]")
    K = top.shape[0]
    dominant = np.full(K, -1, dtype=np.int64)
    share = np.zeros(K, dtype=np.float64)
    for j in range(K):
        row = top[j][top[j] >= 0]
        if row.size:
            vals, counts = np.unique(row, return_counts=True)
            i = int(np.argmax(counts))
            dominant[j], share[j] = vals[i], counts[i] / row.size
    cand = (dominant >= 0) & (share >= token_share)
    min_frac = np.full(K, np.nan)  # only computed for candidates
    if cand.any():
        tokens = np.unique(dominant[cand])
        frac = token_label_doc_fraction(tokens, token_ids, doc_ids, labels, n_labels)
        min_frac[cand] = frac[np.searchsorted(tokens, dominant[cand])].min(axis=1)
    generic = cand & (np.nan_to_num(min_frac, nan=-1.0) >= label_doc_fraction)
    return pd.DataFrame(
        {
            "latent": np.arange(K),
            "generic": generic,
            "generic_token_id": dominant,
            "generic_token_share": share,
            "generic_min_label_fraction": min_frac,
        }
    )
