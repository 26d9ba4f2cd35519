"""Rank statistics of latent activations per label: the AUROC of a latent's activation as a
score for each label (from the scan's log10 histogram at the token level, from exact ranks at
the document level) and the label counts of each latent's top set (its strongest members),
from which ``top_purity`` is read."""

from __future__ import annotations

import numpy as np

__all__ = ["auroc_from_hist", "max_auroc", "top_set_counts"]


def auroc_from_hist(
    label_hist: np.ndarray, label_counts: np.ndarray, block: int = 2048
) -> np.ndarray:
    """AUROC of each latent's activation as a score for each label, ``float64 [K, C]``.

    ``label_hist``: ``[K, C, n_bins]`` counts of firing activations on increasing bins;
    ``label_counts``: ``[C]`` tokens per label. Non-firing tokens form a bin below all others.
    """
    K, C, _ = label_hist.shape
    N = float(label_counts.sum())
    out = np.full((K, C), np.nan)
    for a in range(0, K, block):
        h = label_hist[a : a + block].astype(np.float64)
        zeros = label_counts[None, :] - h.sum(2)
        pos = np.concatenate([zeros[..., None], h], 2)  # [k, C, nb+1]
        neg = pos.sum(1, keepdims=True) - pos
        below = np.cumsum(neg, 2) - neg
        u = (pos * (below + 0.5 * neg)).sum(2)
        denom = label_counts * (N - label_counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[a : a + block] = np.where(denom > 0, u / denom, np.nan)
    return out


def top_set_counts(
    latents: np.ndarray,
    labels: np.ndarray,
    values: np.ndarray,
    n_latents: int,
    n_labels: int,
    n: int,
    tiebreak: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Label counts ``int64 [K, C]`` and sizes ``[K]`` of each latent's top set: its ``n``
    members with the largest ``values``. ``latents``, ``labels``, ``values``, ``tiebreak``
    (smaller first among equal values, e.g. doc ids): ``[P]``, one entry per member."""
    lat = np.asarray(latents, dtype=np.int64)
    lab = np.asarray(labels, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    tie = np.zeros(lat.size, np.int64) if tiebreak is None else np.asarray(tiebreak, np.int64)
    order = np.lexsort((tie, -v, lat))
    lat, lab = lat[order], lab[order]
    start = np.searchsorted(lat, lat, side="left")
    keep = (np.arange(lat.size) - start) < n
    counts = np.bincount(lat[keep] * n_labels + lab[keep], minlength=n_latents * n_labels).reshape(
        n_latents, n_labels
    )
    return counts, counts.sum(1)


def max_auroc(
    latents: np.ndarray,
    labels: np.ndarray,
    values: np.ndarray,
    label_counts: np.ndarray,
    n_latents: int,
) -> np.ndarray:
    """AUROC ``float64 [K, C]`` of each latent's per-document score for each label, from the
    documents where it is non-zero: ``latents``, ``labels``, ``values`` ``[P]`` (distinct
    (document, latent) pairs); every other document scores 0 (ties counted half).

    Mann-Whitney through ranks: the zeros of latent ``j`` share the average rank of the
    ``N - n_j`` lowest places, its ``n_j`` non-zero documents rank above them.
    """
    counts = np.asarray(label_counts, dtype=np.int64)
    C, N = counts.size, int(counts.sum())
    lat = np.asarray(latents, dtype=np.int64)
    lab = np.asarray(labels, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    order = np.lexsort((v, lat))
    lat, lab, v = lat[order], lab[order], v[order]
    n_j = np.bincount(lat, minlength=n_latents)
    start = np.concatenate([[0], np.cumsum(n_j)[:-1]])
    # average rank (1-based) of each pair among its latent's non-zero documents, ties averaged
    new = np.ones(lat.size, dtype=bool)
    new[1:] = (lat[1:] != lat[:-1]) | (v[1:] != v[:-1])
    grp = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    last = np.append(first[1:], lat.size) - 1
    avg = 0.5 * (first[grp] + last[grp]) - start[lat] + 1
    rank = (N - n_j[lat]) + avg
    rank_sum = np.bincount(lat * C + lab, weights=rank, minlength=n_latents * C).astype(float)
    rank_sum = rank_sum.reshape(-1, C)
    fired = np.bincount(lat * C + lab, minlength=n_latents * C).reshape(-1, C)
    zeros = counts[None, :] - fired  # documents of label c where latent j is 0
    rank_sum += zeros * (0.5 * (N - n_j + 1))[:, None]
    u = rank_sum - counts * (counts + 1) / 2
    denom = counts * (N - counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, u / denom, np.nan)
