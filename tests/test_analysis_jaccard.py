"""Co-activation Jaccard against a dense computation."""

from __future__ import annotations

import numpy as np
import pytest
from integral_superposition.analysis.jaccard_sparse import (
    combine_similarity,
    firing_matrix,
    jaccard_dense,
    jaccard_from_sets,
    jaccard_neighbours,
)
from scipy import sparse


def _dense_jaccard(F: np.ndarray) -> np.ndarray:
    F = F.astype(bool)
    K = F.shape[1]
    J = np.zeros((K, K))
    for i in range(K):
        for j in range(K):
            u = (F[:, i] | F[:, j]).sum()
            J[i, j] = (F[:, i] & F[:, j]).sum() / u if u else 0.0
    return J


@pytest.mark.parametrize("block_bytes", [1, 2000, 1 << 20])
def test_neighbours_match_dense(block_bytes):
    rng = np.random.default_rng(0)
    F = rng.random((400, 37)) < rng.uniform(0.01, 0.3, 37)
    F[:, 5] = False  # never fires
    J = _dense_jaccard(F)
    nb = jaccard_neighbours(sparse.csr_matrix(F), n_neighbours=6, max_block_bytes=block_bytes)
    np.testing.assert_allclose(jaccard_dense(sparse.csr_matrix(F)), J, atol=1e-12)
    for i in range(37):
        ok = nb.index[i] >= 0
        np.testing.assert_allclose(nb.jaccard[i][ok], J[i, nb.index[i][ok]], rtol=1e-6)
        others = np.delete(J[i], i)
        expected = np.sort(others[others > 0])[::-1][:6]
        np.testing.assert_allclose(np.sort(nb.jaccard[i][ok])[::-1], expected, rtol=1e-6)
        assert i not in nb.index[i]
        assert (np.diff(nb.jaccard[i][ok]) <= 1e-7).all()
    assert (nb.index[5] == -1).all() and nb.counts[5] == 0
    frame = nb.to_frame()
    assert set(frame.columns) == {"latent", "rank", "neighbour", "jaccard", "intersection"}


def test_firing_matrix_from_pairs_and_sets():
    rows = np.array([0, 0, 1, 5, 5, 5, 0])
    lat = np.array([1, 2, 2, 0, 1, 2, 1])  # one duplicate pair
    F = firing_matrix(rows, lat, 3)
    assert F.shape == (3, 3) and F.nnz == 6
    J = jaccard_from_sets([{5}, {0, 5}, {0, 1, 5}], 3).toarray()
    np.testing.assert_allclose(J, [[1, 0.5, 1 / 3], [0.5, 1, 2 / 3], [1 / 3, 2 / 3, 1]])
    S = combine_similarity(np.eye(3), np.eye(3), J)
    np.testing.assert_allclose(S.diagonal(), 1.0)
    with pytest.raises(ValueError, match="latents"):
        firing_matrix(np.array([0]), np.array([3]), 3)


def test_memory_is_bounded_for_16k_latents():
    rng = np.random.default_rng(0)
    K, N = 16384, 3000
    rows = rng.integers(0, N, 60000)
    lat = rng.integers(0, K, 60000)
    F = firing_matrix(rows, lat, K, n_rows=N)
    import tracemalloc

    tracemalloc.start()
    nb = jaccard_neighbours(F, n_neighbours=5, max_block_bytes=64 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert nb.index.shape == (K, 5)
    assert peak < 200 << 20  # a dense K x K float64 matrix would be 2 GiB
