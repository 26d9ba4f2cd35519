"""Cluster medoids, merge matrices and the merge map.

Conventions: ``labels`` is ``int[K]`` with cluster ids ``0..K'-1``, every id used;
``medoids`` is ``int[K']``, the original latent that represents each cluster (the member with
the smallest summed distance to the other members; ties go to the lowest latent index).
The merge matrix ``M`` is ``[K, K']`` with ``M[i, c] = 1`` iff latent ``i`` is in cluster ``c``,
so merged codes are ``z @ M`` (sum aggregation) for original codes ``z`` ``[n, K]``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from integral_superposition.merge.cluster import _as_numpy, check_distance_matrix
from integral_superposition.merge.similarity import LatentSimilarity


def check_labels(labels, n_latents: int | None = None) -> np.ndarray:
    """Validate cluster labels: 1-D ints in ``0..K'-1`` with no empty cluster (length ``n_latents``)."""
    lab = _as_numpy(labels)
    if lab.ndim != 1 or lab.size == 0:
        raise ValueError(f"labels has shape {lab.shape}: expected a non-empty 1-D [K] array")
    if n_latents is not None and lab.size != n_latents:
        raise ValueError(f"labels has length {lab.size}: expected K={n_latents} (one per latent)")
    if not np.issubdtype(lab.dtype, np.integer) and not np.all(np.mod(lab, 1) == 0):
        raise ValueError(f"labels has dtype {lab.dtype} with non-integer values: expected ints")
    lab = lab.astype(np.int64)
    if lab.min() < 0:
        raise ValueError(f"labels has negative values (min {lab.min()}): expected 0..K'-1")
    counts = np.bincount(lab)
    if (counts == 0).any():
        raise ValueError(
            f"labels skips cluster ids {np.flatnonzero(counts == 0)[:8].tolist()}: expected every id in 0..{lab.max()} used"
        )
    return lab


def _medoid_from_within(within: np.ndarray, labels: np.ndarray) -> np.ndarray:
    order = np.lexsort((within, labels))  # by cluster, then summed distance, then index
    _, first = np.unique(labels[order], return_index=True)
    return order[first]


def medoids_from_labels(dist, labels) -> np.ndarray:
    """Medoid latent ``int64[K']`` of each cluster from a dense distance matrix ``dist`` ``[K, K]``."""
    d = check_distance_matrix(dist)
    lab = check_labels(labels, d.shape[0])
    k = lab.size
    onehot = sp.csr_array((np.ones(k), (np.arange(k), lab)), shape=(k, int(lab.max()) + 1))
    within = np.empty(k)
    for a in range(0, k, 2048):  # [block, K'] at a time
        b = min(k, a + 2048)
        s = np.asarray(onehot.T @ d[a:b].T).T
        within[a:b] = s[np.arange(b - a), lab[a:b]]
    return _medoid_from_within(within, lab)


def medoids_from_similarity(
    sim: LatentSimilarity, labels, block: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Medoids ``int64[K']`` and each latent's distance to its medoid ``float64[K]``.

    No ``[K, K]`` matrix: cosine-only similarities use ``sum_j d(i, j) = n_c - f_i . sum_j f_j``
    (exact); co-activation parts are summed over the within-cluster pairs, ``block``
    latents at a time.
    """
    lab = check_labels(labels, sim.n_latents)
    k, n_c = lab.size, int(lab.max()) + 1
    if sim.is_cosine_only:
        f = sim.cosine_features().double()
        sums = torch.zeros(n_c, f.shape[1], dtype=f.dtype).index_add_(0, torch.from_numpy(lab), f)
        sizes = np.bincount(lab, minlength=n_c).astype(np.float64)
        dots = (f * sums[torch.from_numpy(lab)]).sum(1).numpy()
        within = sizes[lab] - dots
    else:
        within = np.zeros(k)
        order = np.argsort(lab, kind="stable")
        bounds = np.searchsorted(lab[order], np.arange(n_c + 1))
        start = 0
        while start < n_c:  # groups of whole clusters with about `block` members
            stop = int(np.searchsorted(bounds, bounds[start] + block, side="right")) - 1
            stop = max(stop, start + 1)
            members = order[bounds[start] : bounds[stop]]
            mlab = lab[members]
            for a in range(0, members.size, block):
                rows = members[a : a + block]
                d = sim.distance_block(rows, members)
                within[rows] = np.where(mlab[a : a + block, None] == mlab[None, :], d, 0.0).sum(1)
            start = stop
    medoids = _medoid_from_within(within, lab)
    return medoids, pair_distances(sim, np.arange(k), medoids[lab])


def pair_distances(
    sim: LatentSimilarity, a: np.ndarray, b: np.ndarray, block: int = 4096
) -> np.ndarray:
    """Distances ``float64[P]`` between latent pairs ``(a[p], b[p])``."""
    out = np.empty(len(a))
    for s in range(0, len(a), block):
        ra, rb = a[s : s + block], b[s : s + block]
        # Diagonal of the small block: [P, P] is cheap for P <= block and reuses one code path.
        uniq, inv = np.unique(rb, return_inverse=True)
        d = sim.distance_block(ra, uniq)
        out[s : s + block] = d[np.arange(ra.size), inv]
    out[np.asarray(a) == np.asarray(b)] = 0.0
    return np.maximum(out, 0.0)


def distances_to_medoids(dist, labels, medoids) -> np.ndarray:
    """``float64[K]``: each latent's distance to its cluster's medoid in ``dist`` ``[K, K]``."""
    lab = check_labels(labels)
    return np.asarray(dist)[np.arange(lab.size), np.asarray(medoids)[lab]].astype(np.float64)


def check_medoids(medoids, labels: np.ndarray) -> np.ndarray:
    """Validate ``medoids`` ``int[K']``: one member of each cluster."""
    med = _as_numpy(medoids).astype(np.int64).ravel()
    n_c = int(labels.max()) + 1
    if med.size != n_c:
        raise ValueError(f"medoids has length {med.size}: expected one per cluster ({n_c})")
    if med.min() < 0 or med.max() >= labels.size:
        raise ValueError(f"medoids has values outside 0..{labels.size - 1}")
    bad = np.flatnonzero(labels[med] != np.arange(n_c))
    if bad.size:
        c = int(bad[0])
        raise ValueError(
            f"medoids[{c}]={int(med[c])} is in cluster {int(labels[med[c]])}, not in cluster {c}"
        )
    return med


def merge_matrix_from_labels(labels, medoids=None) -> torch.Tensor:
    """The merge matrix ``M`` ``float32[K, K']`` (one 1 per row). Column ``c`` is the cluster
    whose medoid is ``medoids[c]``; ``medoids`` is checked when given."""
    lab = check_labels(labels)
    if medoids is not None:
        check_medoids(medoids, lab)
    m = torch.zeros(lab.size, int(lab.max()) + 1)
    m[torch.arange(lab.size), torch.from_numpy(lab)] = 1.0
    return m


def labels_from_merge_matrix(M) -> np.ndarray:
    """Cluster labels ``int64[K]`` of a merge matrix ``M`` ``[K, K']`` (dense or scipy sparse).

    Every latent must be in exactly one cluster (one entry equal to 1 per row, zeros
    elsewhere) and every cluster must have a member.
    """
    if sp.issparse(M):
        m = sp.csr_array(M)
        m.eliminate_zeros()
        shape = m.shape
        per_row = np.diff(m.indptr)
        values_ok = np.allclose(m.data, 1.0)
        cols = np.full(shape[0], -1, dtype=np.int64)
        one = per_row == 1
        cols[one] = m.indices[m.indptr[:-1][one]]
    else:
        arr = _as_numpy(M)
        if arr.ndim != 2:
            raise ValueError(f"M has shape {arr.shape}: expected a 2-D [K, K'] merge matrix")
        shape = arr.shape
        nz = arr != 0
        per_row = nz.sum(1)
        values_ok = bool(np.all((arr == 0) | (arr == 1)))
        cols = np.argmax(nz, axis=1).astype(np.int64)
    if not values_ok:
        raise ValueError("M has entries other than 0 and 1: expected a 0/1 merge matrix")
    none, many = np.flatnonzero(per_row == 0), np.flatnonzero(per_row > 1)
    if none.size:
        raise ValueError(
            f"M: latents {none[:8].tolist()} are in no cluster (rows of M without a 1); every latent needs exactly one"
        )
    if many.size:
        raise ValueError(
            f"M: latents {many[:8].tolist()} are in more than one cluster; every latent needs exactly one"
        )
    empty = np.flatnonzero(np.bincount(cols, minlength=shape[1]) == 0)
    if empty.size:
        raise ValueError(f"M: clusters {empty[:8].tolist()} have no member (empty columns)")
    return cols


def merge_map_table(labels, medoids, distance_to_medoid, weights=None) -> pd.DataFrame:
    """The merge map: one row per original latent.

    Columns: ``latent``, ``cluster``, ``medoid`` (original latent id), ``distance_to_medoid``,
    ``cluster_size``, ``is_medoid``, ``weight`` (the latent's merge weight ``[K]``; 1 for
    unweighted aggregation).
    """
    lab = check_labels(labels)
    med = check_medoids(medoids, lab)
    dist = np.asarray(distance_to_medoid, dtype=np.float64)
    if dist.shape != lab.shape:
        raise ValueError(f"distance_to_medoid has shape {dist.shape}, expected {lab.shape}")
    w = np.ones(lab.size) if weights is None else np.asarray(torch.as_tensor(weights).double())
    if w.shape != lab.shape:
        raise ValueError(f"weights has shape {w.shape}, expected {lab.shape}")
    return pd.DataFrame(
        {
            "latent": np.arange(lab.size, dtype=np.int64),
            "cluster": lab,
            "medoid": med[lab],
            "distance_to_medoid": dist,
            "cluster_size": np.bincount(lab)[lab].astype(np.int64),
            "is_medoid": med[lab] == np.arange(lab.size),
            "weight": w,
        }
    )
