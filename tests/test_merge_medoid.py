"""Similarities, medoids, merge matrices and the merge map."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from integral_superposition import merge
from integral_superposition.analysis.jaccard_sparse import jaccard_dense
from integral_superposition.merge.medoid import (
    check_labels,
    labels_from_merge_matrix,
    medoids_from_similarity,
    merge_map_table,
)
from integral_superposition.merge.similarity import LatentSimilarity, check_similarity_weights
from integral_superposition.sae import SparseAutoencoder


def random_setup(k=40, d=10, n=300, seed=0):
    rng = np.random.default_rng(seed)
    sae = SparseAutoencoder(d, k, seed=seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.from_numpy(rng.standard_normal((d, k))).float())
    fire = sp.csr_array(rng.random((n, k)) < rng.uniform(0.01, 0.3, k))
    return sae, fire


def unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_distances_equal_brute_force():
    sae, fire = random_setup()
    dec = unit(sae.W_dec.detach().double().numpy())
    enc = unit(sae.W_enc.detach().double().numpy().T)
    f = fire.toarray().astype(float)
    jac = jaccard_dense(fire)
    corr = np.nan_to_num(np.corrcoef(f.T))
    weights = {"decoder": 2.0, "encoder": 1.0, "coactivation": 1.0}
    for kind, co in (("jaccard", jac), ("correlation", corr)):
        sim = LatentSimilarity(
            sae, weights, firing=fire, coactivation=kind, dtype=torch.float64, block_rows=7
        )
        want = (2 * (1 - dec @ dec.T) + (1 - enc @ enc.T) + (1 - co)) / 4
        np.fill_diagonal(want, 0)
        np.testing.assert_allclose(sim.distance_matrix(), want, atol=1e-10)
        rows, cols = np.array([3, 0, 17]), np.array([5, 5, 39, 2])
        np.testing.assert_allclose(
            sim.distance_block(rows, cols), want[np.ix_(rows, cols)], atol=1e-10
        )


def test_reconstruction_distance_is_the_cost_of_merging_a_pair():
    from integral_superposition.merge.refit import accumulate_stats

    sae = SparseAutoencoder(6, 12, architecture="topk", top_k=4, seed=2)
    with torch.no_grad():
        sae.b_enc[3] = -1e3  # latent 3 never fires
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = sae.encode(x).double().numpy()
    stats = accumulate_stats(sae, [x])
    sim = LatentSimilarity(sae, "reconstruction", stats=stats, dtype=torch.float64)
    w = sae.W_dec.detach().double().numpy()
    xd = x.double().numpy()
    sst = ((xd - xd.mean(0)) ** 2).sum()
    got = sim.distance_matrix()
    for a, b in [(0, 1), (2, 7), (5, 11)]:
        part = np.outer(z[:, a], w[a]) + np.outer(z[:, b], w[b])
        s = z[:, a] + z[:, b]
        best = np.linalg.lstsq(s[:, None], part, rcond=None)[0]  # the best shared row [1, d]
        loss = ((part - s[:, None] * best) ** 2).sum()
        assert got[a, b] == pytest.approx(loss * 12 / sst, rel=1e-6, abs=1e-12)
    assert z[:, 3].max() == 0
    np.testing.assert_allclose(got[3], 0.0, atol=1e-12)  # merging a silent latent costs nothing
    assert got[0, 1] > 0


def test_latent_firing_streams_the_sae():
    from integral_superposition.activations import ArraySource

    sae, _ = random_setup()
    x = torch.randn(500, 10)
    f = merge.similarity.latent_firing(sae, ArraySource([x]), chunk_tokens=64)
    assert f.shape == (500, 40)
    with torch.no_grad():
        np.testing.assert_array_equal(f.toarray() > 0, (sae.encode(x) > 0).numpy())
    mask = np.zeros(500, bool)
    mask[::3] = True
    f = merge.similarity.latent_firing(sae, ArraySource([x]), mask=mask, chunk_tokens=64)
    with torch.no_grad():
        np.testing.assert_array_equal(f.toarray() > 0, (sae.encode(x[mask]) > 0).numpy())


def test_document_level_firing():
    class Docs:  # a store-like source whose rows belong to 5 documents
        def __init__(self, x):
            self.x, self.n_tokens, self.d_model = x, x.shape[0], x.shape[1]
            self.doc_ids = np.repeat(np.arange(5), x.shape[0] // 5)

        def iter_chunks(self, chunk, mask=None):
            for a in range(0, self.n_tokens, chunk):
                rows = np.arange(a, min(a + chunk, self.n_tokens))
                if mask is not None:
                    rows = rows[mask[rows]]
                yield rows, self.x[rows]

    sae, _ = random_setup()
    x = torch.randn(100, 10)
    f = merge.similarity.latent_firing(sae, Docs(x), chunk_tokens=7, level="document")
    with torch.no_grad():
        fires = (sae.encode(x) > 0).numpy().reshape(5, 20, 40).any(1)
    np.testing.assert_array_equal(f.toarray() > 0, fires)


def test_medoids_dense_equal_brute_force():
    sae, _ = random_setup(k=30)
    dist = merge.cluster.cosine_dist_from_decoder(sae.dec.weight.data.numpy())
    labels = np.random.default_rng(1).integers(0, 6, 30)
    labels = check_labels(np.unique(labels, return_inverse=True)[1])
    med = merge.medoid.medoids_from_labels(dist, labels)
    for c in range(labels.max() + 1):
        members = np.flatnonzero(labels == c)
        sums = dist[np.ix_(members, members)].sum(1)
        assert med[c] == members[np.argmin(sums)]


@pytest.mark.parametrize(
    "weights", ["decoder", {"decoder": 1, "encoder": 1}, {"decoder": 1, "coactivation": 1}]
)
def test_medoids_without_a_dense_matrix_match_the_dense_ones(weights):
    sae, fire = random_setup(k=50)
    sim = LatentSimilarity(sae, weights, firing=fire, dtype=torch.float64)
    labels = np.arange(50) % 7
    med, dist = medoids_from_similarity(sim, labels, block=9)
    full = sim.distance_matrix()
    np.testing.assert_array_equal(med, merge.medoid.medoids_from_labels(full, labels))
    np.testing.assert_allclose(dist, full[np.arange(50), med[labels]], atol=1e-9)


def test_merge_matrix_round_trip_and_seed_call():
    labels = np.array([0, 1, 0, 2, 1, 2, 2])
    medoids = np.array([2, 1, 5])
    m = merge.medoid.merge_matrix_from_labels(labels, medoids)
    assert m.shape == (7, 3) and torch.equal(m.sum(1), torch.ones(7))
    np.testing.assert_array_equal(labels_from_merge_matrix(m), labels)
    np.testing.assert_array_equal(labels_from_merge_matrix(sp.csr_array(m.numpy())), labels)


def test_merge_map_table():
    labels = np.array([0, 1, 0, 1, 1])
    table = merge_map_table(labels, np.array([2, 3]), np.array([0.1, 0.2, 0.0, 0.0, 0.3]))
    assert table.columns.tolist() == [
        "latent",
        "cluster",
        "medoid",
        "distance_to_medoid",
        "cluster_size",
        "is_medoid",
        "weight",
    ]
    assert table["weight"].tolist() == [1.0] * 5
    weighted = merge_map_table(
        labels, np.array([2, 3]), np.zeros(5), weights=np.array([0.5, 1, 2, 0, 3])
    )
    assert weighted["weight"].tolist() == [0.5, 1, 2, 0, 3]
    with pytest.raises(ValueError, match="weights has shape"):
        merge_map_table(labels, np.array([2, 3]), np.zeros(5), weights=np.ones(4))
    assert table["medoid"].tolist() == [2, 3, 2, 3, 3]
    assert table["cluster_size"].tolist() == [2, 3, 2, 3, 3]
    assert table["is_medoid"].tolist() == [False, False, True, True, False]


def test_bad_input():
    with pytest.raises(ValueError, match="no cluster"):
        labels_from_merge_matrix(np.array([[1, 0], [0, 0], [0, 1]]))
    with pytest.raises(ValueError, match="more than one cluster"):
        labels_from_merge_matrix(np.array([[1, 0], [1, 1], [0, 1]]))
    with pytest.raises(ValueError, match="more than one cluster"):
        labels_from_merge_matrix(sp.csr_array(np.array([[1, 1], [0, 1]])))
    with pytest.raises(ValueError, match="0 and 1"):
        labels_from_merge_matrix(np.array([[0.5, 0], [0, 1]]))
    with pytest.raises(ValueError, match="no member"):
        labels_from_merge_matrix(np.array([[1, 0, 0], [0, 1, 0]]))
    dist = merge.cluster.cosine_dist_from_decoder(np.eye(4), latent_axis=0)
    with pytest.raises(ValueError, match="length 3: expected K=4"):
        merge.medoid.medoids_from_labels(dist, [0, 1, 1])
    with pytest.raises(ValueError, match="skips cluster ids"):
        check_labels([0, 2, 2])
    with pytest.raises(ValueError, match=r"medoids\[1\]=0 is in cluster 0"):
        merge.medoid.merge_matrix_from_labels([0, 1, 1], [0, 0])
    with pytest.raises(ValueError, match="unknown name"):
        check_similarity_weights({"decoder": 1, "cosine": 1})
    with pytest.raises(ValueError, match="firing="):
        LatentSimilarity(SparseAutoencoder(4, 8), "coactivation")
