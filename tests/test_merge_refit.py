"""The merged SAE and the streaming ridge refit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from integral_superposition import merge
from integral_superposition.merge.refit import (
    RidgeStats,
    accumulate_stats,
    build_merged_sae,
    refit_decoder,
)
from integral_superposition.sae import SparseAutoencoder


@pytest.fixture(autouse=True)
def _no_grad():
    """These tests edit parameters in place; grad mode is restored afterwards."""
    with torch.no_grad():
        yield


def make_sae(arch="topk", k=128, d=16, top_k=4, seed=0):
    sae = SparseAutoencoder(d, k, architecture=arch, top_k=top_k, seed=seed)
    g = torch.Generator().manual_seed(seed)
    sae.b_dec.copy_(torch.randn(d, generator=g))
    sae.b_enc.copy_(0.3 * torch.randn(k, generator=g))
    if arch in ("batchtopk", "jumprelu"):
        sae.threshold.fill_(0.4)
    return sae


def data(n=1200, d=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 1.5 + 0.5


def closed_form(z, x, lam_rel, w0, fit_bias=True, b=None):
    """Dense ridge with an unpenalised intercept, solved in one float64 system."""
    z, x = z.double().numpy(), x.double().numpy()
    m = z.shape[1]
    if fit_bias:
        zc = z - z.mean(0)
        lam = lam_rel * np.mean(np.sum(zc * zc, 0))
        a = np.hstack([z, np.ones((len(z), 1))])
        pen = np.diag([lam] * m + [0.0])
        rhs = a.T @ x + pen @ np.vstack([w0, np.zeros((1, x.shape[1]))])
        sol = np.linalg.solve(a.T @ a + pen, rhs)
        return sol[:m], sol[m]
    lam = lam_rel * np.mean(np.sum(z * z, 0))
    w = np.linalg.solve(z.T @ z + lam * np.eye(m), z.T @ (x - b) + lam * w0)
    return w, b


@pytest.mark.parametrize(
    ("arch", "k", "fit_bias"),
    [("topk", 128, True), ("topk", 128, False), ("relu", 24, True), ("jumprelu", 64, True)],
)
def test_streaming_refit_equals_closed_form(arch, k, fit_bias):
    # topk K=128, top_k=4 streams through the sparse path; relu codes through the dense one
    sae = make_sae(arch, k=k)
    labels = np.arange(k) % (k // 4)
    dist = merge.cluster.cosine_dist_from_decoder(sae)
    merged = build_merged_sae(sae, labels, merge.medoid.medoids_from_labels(dist, labels))
    x = data()
    z = merged.encode(x)
    w0 = merged.W_dec.double().numpy().copy()
    b0 = merged.b_dec.double().numpy().copy()
    res = refit_decoder(merged, list(x.split(100)), ridge_lambda=1e-3, fit_bias=fit_bias)
    w, b = closed_form(z, x, 1e-3, w0, fit_bias, b0)
    assert np.abs(res.W_dec - w).max() <= 1e-5 * max(1.0, np.abs(w).max())
    assert np.abs(res.b_dec - b).max() <= 1e-5 * max(1.0, np.abs(b).max())
    # the model holds the solution, its codes did not change, and fit_fvu is its FVU
    np.testing.assert_allclose(merged.W_dec.double().numpy(), w, atol=1e-5)
    torch.testing.assert_close(merged.encode(x), z, atol=1e-4, rtol=1e-4)
    xh = merged.decode(merged.encode(x)).double()
    fvu = float((x.double() - xh).pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())
    assert res.fit_fvu == pytest.approx(fvu, rel=1e-4)


def test_merged_statistics_equal_direct_accumulation():
    sae = make_sae("topk")
    labels = np.arange(128) % 20
    x = data()
    direct = accumulate_stats(build_merged_sae(sae, labels, np.arange(20)), list(x.split(200)))
    projected = accumulate_stats(sae, list(x.split(200))).merged(labels)
    for name in ("gram", "cross", "z_sum"):
        a, b = getattr(direct, name), getattr(projected, name)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(a).max())
    assert direct.n == projected.n == 1200


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
@pytest.mark.parametrize("mode", ["sum", "max"])
def test_identity_merge_reproduces_the_original(arch, mode):
    sae = make_sae(arch, k=48)
    merged = build_merged_sae(sae, np.arange(48), np.arange(48), mode=mode)
    x = data(300)
    torch.testing.assert_close(merged.encode(x), sae.encode(x), atol=0, rtol=0)
    torch.testing.assert_close(merged.reconstruct(x), sae.reconstruct(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_merged_codes_are_the_sum_or_max_of_members(arch):
    sae = make_sae(arch, k=40)
    labels = np.random.default_rng(0).permutation(np.arange(40) % 9)
    medoids = np.array([np.flatnonzero(labels == c)[0] for c in range(9)])
    x = data(200)
    z = sae.encode(x).numpy()
    for mode, reduce in (("sum", np.add), ("max", np.maximum)):
        want = np.zeros((200, 9), dtype=np.float32)
        reduce.at(want.T, labels, z.T)
        got = build_merged_sae(sae, labels, medoids, mode=mode).encode(x).numpy()
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_identity_refit_never_hurts_on_the_fit_tokens():
    sae = make_sae("topk")
    x = data()
    merged = build_merged_sae(sae, np.arange(128), np.arange(128))
    res = refit_decoder(merged, [x], ridge_lambda=1e-6)
    xd = x.double()
    orig = float((xd - sae.reconstruct(x).double()).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum())
    assert res.fit_fvu <= orig + 1e-6


def test_seed_merge_and_refit_decoder():
    sae = make_sae("topk")
    labels = np.arange(128) % 32
    m = merge.medoid.merge_matrix_from_labels(labels, np.arange(32))
    x = data()
    w_new = merge.refit.merge_and_refit_decoder(x.split(256), sae, m)
    assert w_new.shape == (16, 32)  # the seed's dec.weight layout [d_model, K']
    z = sae.encode(x) @ m
    w, _ = closed_form(z, x, 1e-4, np.zeros((32, 16)), fit_bias=False, b=sae.b_dec.double().numpy())
    np.testing.assert_allclose(w_new.numpy().T, w, atol=1e-5 * max(1, np.abs(w).max()))


def test_singular_ridge_system_suggests_a_lambda():
    sae = make_sae("topk", k=64)
    labels = np.arange(64) % 8
    merged = build_merged_sae(sae, labels, np.arange(8))
    x = data(400)
    dead = int(labels[(sae.encode(x) > 0).sum(0).argmin()])
    stats = accumulate_stats(merged, [x])
    stats.gram[dead, :] = stats.gram[:, dead] = 0  # as if that cluster never fired
    stats.cross[dead] = stats.z_sum[dead] = 0
    before, b_before = merged.W_dec.clone(), merged.b_enc.clone()
    with pytest.raises(ValueError, match=r"singular.*ridge_lambda=1e-4"):
        refit_decoder(merged, stats=stats, ridge_lambda=0.0)
    assert torch.equal(merged.W_dec, before) and torch.equal(merged.b_enc, b_before)
    res = refit_decoder(merged, stats=stats, ridge_lambda=1e-4)
    # the dead cluster keeps its medoid row (the ridge prior)
    torch.testing.assert_close(merged.W_dec[dead], before[dead])
    assert np.isfinite(res.W_dec).all()


def test_bad_input():
    sae = make_sae("topk", k=16)
    with pytest.raises(ValueError, match="length 15: expected K=16"):
        build_merged_sae(sae, np.arange(15), np.arange(15))
    with pytest.raises(ValueError, match="mode"):
        build_merged_sae(sae, np.arange(16), np.arange(16), mode="mean")
    with pytest.raises(ValueError, match="in no cluster"):
        merge.refit.merge_and_refit_decoder(
            [data(50)], sae, np.eye(16)[:, :15] * (np.arange(16)[:, None] < 15)
        )
    with pytest.raises(ValueError, match="ridge_lambda"):
        RidgeStats.empty(2, 2).solve(-1.0)
    with pytest.raises(ValueError, match="empty"):
        RidgeStats.empty(2, 2).solve(1.0)
    merged = build_merged_sae(sae, np.arange(16) % 4, np.arange(4))
    with pytest.raises(ValueError, match="already merged"):
        build_merged_sae(merged, np.arange(4), np.arange(4))
    with pytest.raises(ValueError, match=r"expected \[n, 16\]"):
        accumulate_stats(merged, [torch.zeros(3, 5)])
