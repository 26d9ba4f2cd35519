"""Weighted merges: per-latent merge weights, projection weights, their statistics, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from integral_superposition.merge import MergeParams, evaluate
from integral_superposition.merge.refit import (
    accumulate_stats,
    build_merged_sae,
    projection_weights,
)
from integral_superposition.merge.similarity import LatentSimilarity
from integral_superposition.sae import SparseAutoencoder, load_sae, save_sae
from safetensors.torch import load_file, save_file


def make_sae(k=64, d=12, top_k=5, seed=0):
    sae = SparseAutoencoder(d, k, architecture="topk", top_k=top_k, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d, generator=g))
        sae.b_enc.copy_(0.3 * torch.randn(k, generator=g))
        sae.W_dec.mul_(torch.rand(k, 1, generator=g) * 2 + 0.2)  # rows of different norms
    return sae.eval()


def data(n=900, d=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 1.5 + 0.5


def weights_for(k, seed=2):
    w = np.random.default_rng(seed).uniform(0.1, 3.0, k).astype(np.float32)
    w[::7] = 0.0  # members that never count
    return w


@torch.no_grad()
def test_weighted_merged_statistics_equal_those_of_explicitly_merged_codes():
    sae = make_sae()
    labels = np.arange(64) % 10
    w = weights_for(64)
    x = data()
    merged = build_merged_sae(sae, labels, np.arange(10), weights=w)
    z = sae.encode(x).double().numpy()
    explicit = np.zeros((len(x), 10))
    np.add.at(explicit.T, labels, (z * w).T)
    np.testing.assert_allclose(merged.encode(x).double().numpy(), explicit, atol=1e-5)
    direct = accumulate_stats(merged, list(x.split(200)))
    from_original = accumulate_stats(sae, list(x.split(200))).merged(labels, w)
    for name in ("gram", "cross", "z_sum"):
        a, b = getattr(direct, name), getattr(from_original, name)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())
    gram = explicit.T @ explicit
    np.testing.assert_allclose(from_original.gram, gram, rtol=1e-5, atol=1e-6 * gram.max())


@torch.no_grad()
def test_save_load_round_trip_keeps_encode_exactly(tmp_path):
    sae = make_sae()
    labels = np.arange(64) % 10
    merged = build_merged_sae(sae, labels, np.arange(10), weights=weights_for(64))
    save_sae(merged, str(tmp_path / "m"))
    assert "merge_weight" in load_file(str(tmp_path / "m" / "sae_weights.safetensors"))
    back = load_sae(str(tmp_path / "m"))
    torch.testing.assert_close(back.merge_weight, merged.merge_weight, atol=0, rtol=0)
    x = data(200)
    torch.testing.assert_close(back.encode(x), merged.encode(x), atol=0, rtol=0)
    torch.testing.assert_close(back.reconstruct(x), merged.reconstruct(x), atol=0, rtol=0)


def test_projection_weights_are_the_top_eigenvector_of_the_cluster_reconstruction():
    sae = make_sae()
    labels = np.arange(64) % 6
    stats = accumulate_stats(sae, [data()])
    w, u = projection_weights(sae.W_dec, stats, labels)
    d = sae.W_dec.detach().double().numpy()
    for c in range(6):
        m = np.flatnonzero(labels == c)
        a = d[m].T @ stats.gram[np.ix_(m, m)] @ d[m]  # [d, d]
        top = np.linalg.eigh(a)[1][:, -1]
        assert abs(abs(top @ u[c]) - 1) < 1e-8 and np.linalg.norm(u[c]) == pytest.approx(1)
        np.testing.assert_allclose(w[m], d[m] @ u[c], atol=1e-10)
        assert w[m].sum() > 0


def planted(n=3000, seed=0):
    """Two latents with orthogonal-ish rows of norms 3 and 0.5 and a third on its own; the
    encoder reads each code exactly (codes >= 0)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.tensor(
        [[3.0, 0, 0, 0, 0, 0], [0.3, 0.4, 0, 0, 0, 0], [0, 0, 0, 1.0, 0, 0]], dtype=torch.float32
    )
    sae = SparseAutoencoder(6, 3, architecture="relu", seed=0)
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(torch.linalg.pinv(rows))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    z = torch.rand(n, 3, generator=g) * (torch.rand(n, 3, generator=g) < 0.4)
    x = z @ rows + 0.01 * torch.randn(n, 6, generator=g)
    return sae.eval(), x


@torch.no_grad()
def test_projection_weights_fit_better_than_the_sum_on_a_planted_store():
    sae, x = planted()
    labels = np.array([0, 0, 1])
    stats = accumulate_stats(sae, list(x.split(500)))
    sim = LatentSimilarity(sae, {"decoder": 1.0})
    fvu = {}
    for agg in ("sum", "projection"):
        params = MergeParams(aggregation=agg, similarity={"decoder": 1.0})
        merged, _, _, info = evaluate.merge_with_labels(sae, labels, sim, params, stats=stats)
        fvu[agg] = info["fit_fvu"]
        if agg == "projection":
            w = merged.merge_weight.double().numpy()
            assert w[0] > 5 * w[1] > 0 and w[2] == pytest.approx(1.0, rel=1e-6)
            xh = merged.reconstruct(x).double()
            xd = x.double()
            direct = float((xd - xh).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum())
            assert info["fit_fvu"] == pytest.approx(direct, rel=1e-4)
    assert fvu["projection"] < 0.5 * fvu["sum"]


def test_bad_weights_are_refused_with_the_argument_named(tmp_path):
    sae = make_sae()
    labels = np.arange(64) % 10
    index = torch.from_numpy(labels)
    for bad, what in (
        (np.ones(63), r"merge_weight has shape \(63,\)"),
        (np.full(64, np.nan), r"merge_weight\[0\]=nan"),
        (np.r_[np.ones(5), -1.0, np.ones(58)], r"merge_weight\[5\]=-1.0"),
    ):
        with pytest.raises(ValueError, match=what):
            SparseAutoencoder(12, 10, "topk", 5, merge_index=index, merge_weight=bad)
    with pytest.raises(ValueError, match="merge_weight without merge_index"):
        SparseAutoencoder(12, 64, "topk", 5, merge_weight=np.ones(64))
    with pytest.raises(ValueError, match=r"weights\[3\]=inf"):
        build_merged_sae(sae, labels, np.arange(10), weights=np.r_[np.ones(3), np.inf, np.ones(60)])
    # a folder whose weights were damaged or whose index is missing does not load
    merged = build_merged_sae(sae, labels, np.arange(10), weights=weights_for(64))
    for change, what in (
        (lambda t: t.update(merge_weight=torch.ones(10)), "merge_weight has shape"),
        (lambda t: t.pop("merge_index"), "merge_weight without merge_index"),
        (lambda t: t["merge_weight"].__setitem__(4, float("nan")), r"merge_weight\[4\]=nan"),
    ):
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        save_sae(merged, str(folder))
        tensors = load_file(str(folder / "sae_weights.safetensors"))
        change(tensors)
        save_file(tensors, str(folder / "sae_weights.safetensors"))
        (folder / "manifest.json").unlink()  # the hash check would stop it first
        with pytest.raises(ValueError, match=what) as err:
            load_sae(str(folder))
        assert str(folder) in str(err.value)


def test_projection_weights_of_a_cluster_with_zero_rows_or_no_firing():
    sae = make_sae(k=8)
    with torch.no_grad():
        sae.W_dec[6:] = 0.0  # latents 6 and 7: zero rows
        sae.b_enc[2:4] = -1e6  # latents 2 and 3 never fire
    stats = accumulate_stats(sae, [data(300)])
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    w, u = projection_weights(sae.W_dec, stats, labels)
    d = sae.W_dec.detach().double().numpy()
    assert (w[6:] == 0).all() and (u[3] == 0).all()
    s = d[2] + d[3]
    np.testing.assert_allclose(u[1], s / np.linalg.norm(s), atol=1e-12)
    assert np.isfinite(w).all() and np.isfinite(u).all()


def test_projection_above_the_dense_limit_falls_back_to_sum_and_says_so():
    from integral_superposition.merge.cluster import DENSE_MAX_LATENTS

    sae = SparseAutoencoder(4, DENSE_MAX_LATENTS + 1, architecture="topk", top_k=4)
    params = MergeParams(aggregation="projection", similarity={"decoder": 1.0})
    with pytest.raises(ValueError, match="aggregation='projection' needs the dense"):
        evaluate.check_params_for(sae, params)
    run, notes = evaluate.dense_fallback(sae, params)
    assert run.aggregation == "sum" and run.similarity == {"decoder": 1.0}
    assert notes == [
        f"aggregation='projection' -> 'sum' (K={DENSE_MAX_LATENTS + 1} > {DENSE_MAX_LATENTS} "
        "latents: the dense K x K Gram matrix of the codes does not fit)"
    ]
    evaluate.check_params_for(sae, run)
    # sum, max and SAEs at the limit are left as they are
    for agg in ("sum", "max"):
        p = MergeParams(aggregation=agg, similarity={"decoder": 1.0})
        assert evaluate.dense_fallback(sae, p) == (p, [])
    small = SparseAutoencoder(4, DENSE_MAX_LATENTS, architecture="topk", top_k=4)
    assert evaluate.dense_fallback(small, params) == (params, [])
