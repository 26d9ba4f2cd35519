"""Co-activation Jaccard similarity between latents from a sparse firing matrix.

``J[i, j] = |S_i ∩ S_j| / |S_i ∪ S_j|`` where ``S_i`` is the set of tokens (rows) where
latent ``i`` fires. With ``F`` the boolean ``[N, K]`` firing matrix, ``|S_i ∩ S_j| = (F^T F)_ij``
and ``|S_i ∪ S_j| = |S_i| + |S_j| - |S_i ∩ S_j|``.

:func:`jaccard_neighbours` computes ``F^T F`` one block of latent columns at a time and keeps
only the top neighbours of each latent, so memory is O(K x block) rather than O(K^2): with
16,384 latents and the default 256 MiB budget a block holds 512 columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse import coo_matrix, csr_matrix

__all__ = [
    "Neighbours",
    "combine_similarity",
    "firing_matrix",
    "jaccard_dense",
    "jaccard_from_sets",
    "jaccard_neighbours",
]


def firing_matrix(
    rows: np.ndarray, latents: np.ndarray, n_latents: int, n_rows: int | None = None
) -> csr_matrix:
    """Boolean CSR ``[n_rows, n_latents]`` from ``(row, latent)`` firing pairs.

    Rows are renumbered densely (only rows that appear matter for Jaccard) unless ``n_rows``
    is given.
    """
    rows = np.asarray(rows, dtype=np.int64)
    latents = np.asarray(latents, dtype=np.int64)
    if rows.shape != latents.shape:
        raise ValueError(f"rows {rows.shape} and latents {latents.shape}: expected equal shapes")
    if latents.size and (latents.min() < 0 or latents.max() >= n_latents):
        raise ValueError(f"latents: ids must lie in [0, {n_latents})")
    if n_rows is None:
        uniq, rows = np.unique(rows, return_inverse=True)
        n_rows = uniq.size
    m = coo_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, latents)), shape=(n_rows, n_latents)
    ).tocsr()
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def _as_firing(F) -> csr_matrix:
    if not sparse.issparse(F):
        F = csr_matrix(np.asarray(F) != 0)
    F = csr_matrix(F, dtype=np.float32)
    F.eliminate_zeros()
    F.data[:] = 1.0
    return F


def jaccard_dense(F) -> np.ndarray:
    """The full Jaccard matrix ``[K, K]`` (float64, diagonal 1 for latents that fire, else 0).

    Only for small ``K`` (heatmaps of selected latents, tests).
    """
    F = _as_firing(F)
    inter = (F.T @ F).toarray().astype(np.float64)
    deg = np.diag(inter).copy()
    union = deg[:, None] + deg[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


@dataclass
class Neighbours:
    """Top co-activation neighbours of each latent.

    ``index``/``jaccard``/``intersection`` are ``[K, n]``, sorted by decreasing Jaccard;
    empty slots have index -1 and Jaccard 0. ``counts`` is ``|S_i|`` ``[K]``.
    """

    index: np.ndarray
    jaccard: np.ndarray
    intersection: np.ndarray
    counts: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: ``latent, rank, neighbour, jaccard, intersection``."""
        K, n = self.index.shape
        ok = self.index.ravel() >= 0
        return pd.DataFrame(
            {
                "latent": np.repeat(np.arange(K), n)[ok],
                "rank": np.tile(np.arange(n), K)[ok],
                "neighbour": self.index.ravel()[ok],
                "jaccard": self.jaccard.ravel()[ok],
                "intersection": self.intersection.ravel()[ok],
            }
        )


def jaccard_neighbours(F, n_neighbours: int = 10, max_block_bytes: int = 256 << 20) -> Neighbours:
    """Top ``n_neighbours`` latents by co-activation Jaccard for every latent of ``F [N, K]``.

    ``F`` is a scipy sparse (or dense) firing matrix; only its non-zero pattern is used.
    Latents are processed in column blocks so that a dense ``[K, block]`` intersection block
    (and its temporaries) stays under ``max_block_bytes``. Neighbours with zero overlap are left out.
    """
    if n_neighbours < 1:
        raise ValueError(f"n_neighbours={n_neighbours}: expected a positive number")
    F = _as_firing(F)
    K = F.shape[1]
    n = min(n_neighbours, max(K - 1, 0))
    Fc = F.tocsc()
    FT = F.T.tocsr()
    deg = np.asarray(Fc.sum(0)).ravel().astype(np.float64)
    # about four float64 [K, block] temporaries live at once
    block = int(max(1, min(K, max_block_bytes // max(1, 32 * K))))
    index = np.full((K, max(n, 0)), -1, dtype=np.int64)
    jac = np.zeros((K, max(n, 0)), dtype=np.float32)
    inter_out = np.zeros((K, max(n, 0)), dtype=np.int64)
    if n == 0:
        return Neighbours(index, jac, inter_out, deg.astype(np.int64))
    for a in range(0, K, block):
        b = min(K, a + block)
        inter = (FT @ Fc[:, a:b]).toarray().astype(np.float64)  # [K, b - a]
        union = deg[:, None] + deg[None, a:b] - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            J = np.where(union > 0, inter / union, 0.0)
        J[np.arange(a, b), np.arange(b - a)] = -1.0  # not its own neighbour
        J = J.T  # [b - a, K]
        part = np.argpartition(-J, n - 1, axis=1)[:, :n]
        pj = np.take_along_axis(J, part, 1)
        order = np.argsort(-pj, axis=1, kind="stable")
        part = np.take_along_axis(part, order, 1)
        pj = np.take_along_axis(pj, order, 1)
        pi = np.take_along_axis(inter.T, part, 1)
        ok = pi > 0
        index[a:b] = np.where(ok, part, -1)
        jac[a:b] = np.where(ok, pj, 0.0)
        inter_out[a:b] = np.where(ok, pi, 0)
    return Neighbours(index, jac, inter_out, deg.astype(np.int64))


def jaccard_from_sets(top_idx: Sequence[set[int]] | object, K: int | None = None) -> csr_matrix:
    """Sparse Jaccard matrix ``[K, K]`` of the latents' top sets (the seed's function).

    ``top_idx``: a :class:`~integral_superposition.analysis.scan.TopKSets` or a list of row-id
    sets. The diagonal is 1.
    """
    from integral_superposition.analysis.enrichment import _top_rows_and_latents

    lat, rows, n_lat = _top_rows_and_latents(top_idx)
    K = n_lat if K is None else int(K)
    F = firing_matrix(rows, lat, K)
    inter = (F.T @ F).tocoo()
    deg = np.asarray(F.sum(0)).ravel()
    union = deg[inter.row] + deg[inter.col] - inter.data
    J = coo_matrix(
        (inter.data / np.maximum(union, 1.0), (inter.row, inter.col)), shape=(K, K)
    ).tocsr()
    J.setdiag(1.0)
    return J


def combine_similarity(
    cosW: np.ndarray,
    corr: np.ndarray,
    J: csr_matrix,
    alpha: float = 0.5,
    beta: float = 0.4,
    gamma: float = 0.1,
) -> csr_matrix:
    """``alpha * cosW + beta * corr + gamma * J`` with unit diagonal (the seed's function), ``[K, K]``."""
    S = alpha * csr_matrix(cosW) + beta * csr_matrix(corr) + gamma * csr_matrix(J)
    S = S.tolil()
    S.setdiag(1.0)
    return S.tocsr()
