"""Agglomerative clustering of SAE latents.

Two modes build the same kind of merge tree (a :class:`MergeTree`, scikit-learn's
``children_``/``distances_`` layout), which is then cut into ``n_clusters`` clusters or at a
distance threshold:

- **dense**: scikit-learn's ``AgglomerativeClustering(metric="precomputed")`` on the full
  ``[K, K]`` distance matrix (exact average / complete / single linkage);
- **knn**: a sparse k-nearest-neighbour connectivity graph (``O(K n_neighbors)`` memory, no
  ``K x K`` matrix). Linkage distances exist only along graph edges and merges follow
  scikit-learn's *structured* agglomerative clustering (``connectivity=``) rule by rule;
  it is implemented here over an edge list because scikit-learn's own structured path
  materialises two ``[n_edges, d]`` feature arrays (several GB at K = 65,536).

Orientation of decoder weights: :func:`cosine_dist_from_decoder` takes the seed's
``model.dec.weight`` layout ``[d_model, K]`` (latents are columns, ``latent_axis=1``) by
default; pass ``latent_axis=0`` for SAELens's ``W_dec`` ``[K, d_model]``, or pass the
``SparseAutoencoder`` itself.
"""

from __future__ import annotations

import heapq
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering

from integral_superposition.merge.similarity import KnnEdges, LatentSimilarity
from integral_superposition.sae.model import SparseAutoencoder

LINKAGES = ("average", "complete", "single")
GRAPH_MODES = ("auto", "dense", "knn")
DENSE_MAX_LATENTS = 16384
"""``graph="auto"`` uses the dense mode up to this many latents (a float64 ``[K, K]`` matrix
is 2 GiB at 16,384), the k-NN graph above."""


def _as_numpy(w) -> np.ndarray:
    if isinstance(w, torch.Tensor):
        return w.detach().cpu().numpy()
    return np.asarray(w)


def cosine_dist_from_decoder(
    W: np.ndarray | torch.Tensor | SparseAutoencoder, latent_axis: int = 1
) -> np.ndarray:
    """Cosine distance ``1 - cos`` between decoder directions: ``[K, K]`` float64.

    ``W``: the seed's ``model.dec.weight`` ``[d_model, K]`` (latents are columns; the
    default ``latent_axis=1``), or ``W_dec`` ``[K, d_model]`` with ``latent_axis=0``, or a
    ``SparseAutoencoder`` (its ``W_dec`` rows; ``latent_axis`` is ignored).
    """
    if isinstance(W, SparseAutoencoder):
        rows = W.W_dec.detach().double()
    else:
        if latent_axis not in (0, 1):
            raise ValueError(f"latent_axis={latent_axis!r}: expected 0 ([K, d]) or 1 ([d, K])")
        arr = _as_numpy(W)
        if arr.ndim != 2 or min(arr.shape) < 1:
            raise ValueError(f"W has shape {arr.shape}: expected a 2-D decoder matrix")
        rows = torch.from_numpy(np.ascontiguousarray(arr if latent_axis == 0 else arr.T)).double()
    if not torch.isfinite(rows).all():
        raise ValueError("W has NaN or inf values")
    return LatentSimilarity(decoder=rows, dtype=torch.float64).distance_matrix()


def check_distance_matrix(dist, atol: float = 1e-6) -> np.ndarray:
    """Validate a dense distance matrix: square, finite, symmetric; returns it as float64."""
    d = _as_numpy(dist).astype(np.float64, copy=False)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"dist has shape {d.shape}: expected a square [K, K] distance matrix")
    if d.shape[0] < 1:
        raise ValueError("dist is empty: expected at least one latent")
    if not np.isfinite(d).all():
        raise ValueError("dist has NaN or inf values")
    asym = float(np.abs(d - d.T).max())
    if asym > atol * max(1.0, float(np.abs(d).max())):
        raise ValueError(
            f"dist is not symmetric (max |d[i, j] - d[j, i]| = {asym:.3g}): expected a symmetric distance matrix"
        )
    return d


def check_n_clusters(n_clusters, n_latents: int) -> int:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int | np.integer):
        raise TypeError(f"n_clusters={n_clusters!r}: expected an int")
    if not 1 <= int(n_clusters) <= n_latents:
        raise ValueError(f"n_clusters={n_clusters}: expected 1 <= n_clusters <= K={n_latents}")
    return int(n_clusters)


@dataclass
class MergeTree:
    """A (possibly partial) agglomerative merge tree over ``n_leaves`` latents.

    ``children`` ``[m, 2]``: merge ``i`` joins nodes ``children[i]`` into node ``n_leaves + i``
    (leaves are ``0..n_leaves-1``). ``distances`` ``[m]``: the linkage distance of each merge.
    A partial tree (k-NN mode stopped early, or a disconnected graph) has fewer than
    ``n_leaves - 1`` merges and cannot be cut below ``n_leaves - m`` clusters.
    """

    n_leaves: int
    children: np.ndarray
    distances: np.ndarray
    linkage: str
    mode: str

    @property
    def min_clusters(self) -> int:
        return self.n_leaves - len(self.children)

    def cut(self, n_clusters: int) -> np.ndarray:
        """Cluster labels ``int64[n_leaves]`` in ``0..n_clusters-1`` after the first ``K - n_clusters`` merges."""
        n_clusters = check_n_clusters(n_clusters, self.n_leaves)
        if n_clusters < self.min_clusters:
            raise ValueError(
                f"n_clusters={n_clusters}: this {self.mode} merge tree stops at {self.min_clusters} clusters "
                "(a k-NN graph with several connected components, or a tree built for fewer merges); "
                "raise n_neighbors or build the tree down to this size"
            )
        return _labels_after(self.children, self.n_leaves, self.n_leaves - n_clusters)

    def cut_at(self, distance_threshold: float) -> np.ndarray:
        """Labels after every merge below ``distance_threshold`` (scikit-learn's rule:
        ``n_clusters = #(distances >= threshold) + 1`` over the merge order)."""
        t = float(distance_threshold)
        if not np.isfinite(t) or t < 0:
            raise ValueError(
                f"distance_threshold={distance_threshold!r}: expected a finite number >= 0"
            )
        n = int(np.count_nonzero(self.distances >= t)) + self.min_clusters
        return self.cut(max(1, min(n, self.n_leaves)))


def _labels_after(children: np.ndarray, n_leaves: int, n_merges: int) -> np.ndarray:
    """Leaf labels after the first ``n_merges`` merges, numbered by first leaf occurrence."""
    parent = np.arange(n_leaves + n_merges, dtype=np.int64)
    if n_merges:
        ch = np.asarray(children[:n_merges], dtype=np.int64)
        parent[ch[:, 0]] = np.arange(n_leaves, n_leaves + n_merges)
        parent[ch[:, 1]] = np.arange(n_leaves, n_leaves + n_merges)
    while True:  # pointer doubling: O(log depth) vectorised passes
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            break
        parent = nxt
    _, first, inv = np.unique(parent[:n_leaves], return_index=True, return_inverse=True)
    # Renumber so cluster ids follow the order of each cluster's first latent.
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inv]


def tree_from_distance(dist, linkage: str = "average") -> MergeTree:
    """Full merge tree from a dense ``[K, K]`` distance matrix with scikit-learn."""
    if linkage not in LINKAGES:
        raise ValueError(f"linkage={linkage!r}: expected one of {LINKAGES}")
    d = check_distance_matrix(dist)
    k = d.shape[0]
    if k == 1:
        return MergeTree(1, np.zeros((0, 2), np.int64), np.zeros(0), linkage, "dense")
    model = AgglomerativeClustering(
        n_clusters=None,
        metric="precomputed",
        linkage=linkage,
        distance_threshold=0.0,
        compute_full_tree=True,
    ).fit(d)
    return MergeTree(
        k, np.asarray(model.children_, np.int64), np.asarray(model.distances_), linkage, "dense"
    )


def tree_from_graph(
    edges: KnnEdges,
    linkage: str = "average",
    n_clusters_min: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> MergeTree:
    """Structured agglomeration over a sparse distance graph, down to ``n_clusters_min`` clusters.

    Follows scikit-learn's ``linkage_tree(connectivity=...)``: distances exist only between
    connected clusters; ``average`` combines the two merged clusters' distances to a
    neighbour weighted by their sizes (or keeps the one that exists), ``complete`` takes the
    max, ``single`` the min. Memory ``O(edges)``.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage={linkage!r}: expected one of {LINKAGES}")
    n = edges.n
    n_clusters_min = check_n_clusters(n_clusters_min, n)
    n_nodes = 2 * n - n_clusters_min
    keep = edges.rows != edges.cols
    rows, cols, dist = edges.rows[keep], edges.cols[keep], edges.dist[keep]
    order = np.lexsort((cols, rows))
    rows, cols, dist = rows[order], cols[order], dist[order]
    ptr = np.searchsorted(rows, np.arange(n + 1))
    cl, dl = cols.tolist(), dist.tolist()
    nbrs: list[dict[int, float] | None] = [None] * n_nodes
    for i in range(n):
        nbrs[i] = dict(zip(cl[ptr[i] : ptr[i + 1]], dl[ptr[i] : ptr[i + 1]], strict=True))
    upper = rows > cols
    heap = list(zip(dist[upper].tolist(), rows[upper].tolist(), cols[upper].tolist(), strict=True))
    heapq.heapify(heap)
    used = bytearray(n_nodes)
    used[:n] = b"\x01" * n
    size = [1] * n + [0] * (n_nodes - n)
    children: list[tuple[int, int]] = []
    distances: list[float] = []
    average, complete = linkage == "average", linkage == "complete"
    pop, push = heapq.heappop, heapq.heappush
    for node in range(n, n_nodes):
        while heap:
            d, a, b = pop(heap)
            if used[a] and used[b]:
                break
        else:
            break  # the graph has no edge left between clusters
        children.append((a, b))
        distances.append(d)
        na, nb = size[a], size[b]
        size[node] = na + nb
        used[a] = used[b] = 0
        used[node] = 1
        da, db = nbrs[a], nbrs[b]
        nbrs[a] = nbrs[b] = None
        merged = {c: v for c, v in da.items() if used[c]}
        for c, v in db.items():
            if not used[c]:
                continue
            old = merged.get(c)
            if old is None:
                merged[c] = v
            elif average:
                merged[c] = (na * old + nb * v) / (na + nb)
            elif complete:
                merged[c] = old if old > v else v
            else:
                merged[c] = old if old < v else v
        for c, v in merged.items():
            nc = nbrs[c]
            nc.pop(a, None)
            nc.pop(b, None)
            nc[node] = v
            push(heap, (v, node, c))
        nbrs[node] = merged
        if on_progress is not None and (node - n) % 4096 == 0:
            on_progress(node - n, n_nodes - n)
    ch = np.asarray(children, dtype=np.int64).reshape(-1, 2)
    return MergeTree(n, ch, np.asarray(distances, dtype=np.float64), linkage, "knn")


def build_tree(
    similarity: LatentSimilarity,
    linkage: str = "average",
    graph: str = "auto",
    n_neighbors: int = 16,
    n_clusters_min: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> MergeTree:
    """Merge tree of ``similarity``'s latents: dense scikit-learn tree or k-NN graph tree.

    ``graph="auto"`` picks dense up to :data:`DENSE_MAX_LATENTS` latents. ``n_clusters_min``
    lets the k-NN mode stop early (the dense tree is always complete).
    """
    if graph not in GRAPH_MODES:
        raise ValueError(f"graph={graph!r}: expected one of {GRAPH_MODES}")
    if linkage not in LINKAGES:
        raise ValueError(f"linkage={linkage!r}: expected one of {LINKAGES}")
    k = similarity.n_latents
    if graph == "dense" or (graph == "auto" and k <= DENSE_MAX_LATENTS):
        return tree_from_distance(similarity.distance_matrix(), linkage)
    edges = similarity.knn_edges(min(n_neighbors, k - 1))
    return tree_from_graph(edges, linkage, n_clusters_min, on_progress)


def agglomerative_labels(
    dist,
    n_clusters: int | None = None,
    *,
    linkage: str = "average",
    distance_threshold: float | None = None,
) -> np.ndarray:
    """Cluster labels ``int64[K]`` from a dense distance matrix ``dist`` ``[K, K]``.

    Give ``n_clusters`` (1..K) or ``distance_threshold`` (merges at distances below it),
    not both. Labels are numbered by each cluster's first latent.
    """
    d = check_distance_matrix(dist)
    if (n_clusters is None) == (distance_threshold is None):
        raise ValueError(
            f"n_clusters={n_clusters!r}, distance_threshold={distance_threshold!r}: give exactly one of them"
        )
    if n_clusters is not None:
        check_n_clusters(n_clusters, d.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tree = tree_from_distance(d, linkage)
    return tree.cut(n_clusters) if n_clusters is not None else tree.cut_at(distance_threshold)
