"""Clustering latents: planted duplicates, agreement with scikit-learn, cuts, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from integral_superposition import merge
from integral_superposition.merge.cluster import (
    build_tree,
    check_distance_matrix,
    tree_from_distance,
    tree_from_graph,
)
from integral_superposition.merge.similarity import LatentSimilarity
from integral_superposition.sae import SparseAutoencoder
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score


def planted_sae(n_groups=40, d=32, noise=0.03, seed=0):
    """An SAE whose decoder rows come in groups of 1-5 near-identical directions."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, n_groups)
    truth = np.repeat(np.arange(n_groups), sizes)
    centers = rng.standard_normal((n_groups, d))
    rows = centers[truth] + noise * rng.standard_normal((truth.size, d))
    perm = rng.permutation(truth.size)  # members of a group are not adjacent
    sae = SparseAutoencoder(d, truth.size)
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(rows[perm]).float())
    return sae, truth[perm]


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_planted_duplicates_are_recovered_dense(linkage):
    sae, truth = planted_sae()
    dist = merge.cluster.cosine_dist_from_decoder(sae.dec.weight.data.numpy())  # seed's [d, K]
    labels = merge.cluster.agglomerative_labels(dist, int(truth.max()) + 1, linkage=linkage)
    assert adjusted_rand_score(truth, labels) >= 0.95


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_planted_duplicates_are_recovered_knn(linkage):
    sae, truth = planted_sae(seed=1)
    sim = LatentSimilarity(sae, "decoder")
    tree = build_tree(sim, linkage, graph="knn", n_neighbors=6)
    assert tree.mode == "knn"
    assert adjusted_rand_score(truth, tree.cut(int(truth.max()) + 1)) >= 0.95


def test_decoder_orientations_agree():
    sae, _ = planted_sae(n_groups=10)
    seed_layout = merge.cluster.cosine_dist_from_decoder(sae.dec.weight.data.numpy())
    saelens_layout = merge.cluster.cosine_dist_from_decoder(sae.W_dec.detach(), latent_axis=0)
    from_model = merge.cluster.cosine_dist_from_decoder(sae)
    assert seed_layout.shape == (sae.d_sae, sae.d_sae)
    np.testing.assert_allclose(seed_layout, saelens_layout, atol=1e-12)
    np.testing.assert_allclose(seed_layout, from_model, atol=1e-6)
    w = sae.W_dec.detach().double().numpy()
    u = w / np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(seed_layout, np.clip(1 - u @ u.T, 0, None), atol=1e-6)
    assert np.all(np.diag(seed_layout) == 0)


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_dense_tree_cuts_equal_sklearn(linkage):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((120, 8))
    dist = merge.cluster.cosine_dist_from_decoder(x, latent_axis=0)
    tree = tree_from_distance(dist, linkage)
    for n in (100, 30, 7, 1):
        ref = AgglomerativeClustering(n_clusters=n, metric="precomputed", linkage=linkage)
        assert adjusted_rand_score(ref.fit(dist).labels_, tree.cut(n)) == 1.0
    t = float(np.median(tree.distances))
    ref = AgglomerativeClustering(
        n_clusters=None, distance_threshold=t, metric="precomputed", linkage=linkage
    ).fit(dist)
    labels = merge.cluster.agglomerative_labels(dist, distance_threshold=t, linkage=linkage)
    assert labels.max() + 1 == ref.n_clusters_
    assert adjusted_rand_score(ref.labels_, labels) == 1.0


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_knn_tree_follows_sklearn_structured_clustering(linkage):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 12))
    sim = LatentSimilarity(decoder=torch.from_numpy(x), dtype=torch.float64)
    edges = sim.knn_edges(7)
    tree = tree_from_graph(edges, linkage)
    conn = edges.to_sparse()
    for n in (150, 40, 5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = AgglomerativeClustering(
                n_clusters=n, connectivity=conn, metric="cosine", linkage=linkage
            ).fit(x)
        assert adjusted_rand_score(ref.labels_, tree.cut(n)) == 1.0


def test_knn_edges_equal_brute_force():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((90, 6))
    sim = LatentSimilarity(decoder=torch.from_numpy(x), dtype=torch.float64, block_rows=16)
    edges = sim.knn_edges(4)
    d = sim.distance_matrix()
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, axis=1)[:, :4]
    want = {(i, int(j)) for i in range(90) for j in nn[i]}
    want |= {(j, i) for i, j in want}
    got = set(zip(edges.rows.tolist(), edges.cols.tolist(), strict=True))
    assert got == want
    np.testing.assert_allclose(edges.dist, d[edges.rows, edges.cols], atol=1e-12)


def test_labels_are_numbered_by_first_member():
    dist = merge.cluster.cosine_dist_from_decoder(
        np.array([[1, 0], [0, 1], [1, 0.01], [0.01, 1]]), latent_axis=0
    )
    labels = merge.cluster.agglomerative_labels(dist, 2)
    assert labels.tolist() == [0, 1, 0, 1]


def test_disconnected_graph_cannot_be_cut_below_its_components():
    # two far-apart groups, 1 neighbour each: the graph has several components
    x = np.vstack([np.eye(3)[[0, 0, 0]] + 0.01 * np.arange(3)[:, None], np.eye(3)[[1, 1, 1]]])
    x[3:] += 0.01 * np.arange(3)[:, None]
    sim = LatentSimilarity(decoder=torch.from_numpy(x), dtype=torch.float64)
    tree = tree_from_graph(sim.knn_edges(1), "average")
    assert tree.min_clusters >= 2
    with pytest.raises(ValueError, match="n_neighbors"):
        tree.cut(1)


def test_bad_input():
    dist = merge.cluster.cosine_dist_from_decoder(np.random.default_rng(0).standard_normal((5, 10)))
    with pytest.raises(ValueError, match="n_clusters=0"):
        merge.cluster.agglomerative_labels(dist, 0)
    with pytest.raises(ValueError, match="n_clusters=11"):
        merge.cluster.agglomerative_labels(dist, 11)
    with pytest.raises(ValueError, match="exactly one"):
        merge.cluster.agglomerative_labels(dist)
    with pytest.raises(ValueError, match="square"):
        merge.cluster.agglomerative_labels(dist[:, :4], 2)
    asym = dist.copy()
    asym[0, 1] += 0.5
    with pytest.raises(ValueError, match="not symmetric"):
        merge.cluster.agglomerative_labels(asym, 2)
    nan = dist.copy()
    nan[2, 3] = nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        check_distance_matrix(nan)
    with pytest.raises(ValueError, match="latent_axis"):
        merge.cluster.cosine_dist_from_decoder(np.ones((3, 4)), latent_axis=2)
    with pytest.raises(ValueError, match="linkage"):
        tree_from_distance(dist, "ward")
    with pytest.raises(ValueError, match="graph"):
        build_tree(LatentSimilarity(decoder=torch.ones(4, 2)), graph="sparse")
