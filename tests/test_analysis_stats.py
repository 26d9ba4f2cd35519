"""Latent statistics, decoder geometry, 2-D reducers and the logit lens."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from integral_superposition.analysis import reducer
from integral_superposition.analysis.logit_lens import logit_lens, logit_lens_for_backend
from integral_superposition.analysis.scan import scan_latents
from integral_superposition.analysis.stats import (
    decoder_geometry,
    l0_distribution,
    latent_table,
    log10_density_hist,
    mean_pool_by_title,
    stats_from_scan,
)
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.sae.metrics import latent_stats


def _sae(d=16, k=30, seed=0):
    sae = SparseAutoencoder(d, k, seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(-0.7)
        sae.b_enc[4] = -1e4  # dead
    return sae


def test_latent_table_from_scan_matches_brute_force_and_metrics():
    torch.manual_seed(0)
    x = torch.randn(1500, 16)
    sae = _sae()
    scan = scan_latents(sae, x, n_top=3, metrics=True, chunk_tokens=256)
    z = sae.encode(x).detach().numpy()
    t = latent_table(scan, sae.W_dec)
    np.testing.assert_allclose(t["density"], (z > 0).mean(0))
    np.testing.assert_allclose(t["max_act"], z.max(0), rtol=1e-6)
    np.testing.assert_allclose(t["mean_act"], z.mean(0), rtol=1e-5, atol=1e-7)
    fire = (z > 0).sum(0)
    np.testing.assert_allclose(
        t["mean_when_active"], np.where(fire > 0, z.sum(0) / np.maximum(fire, 1), 0), rtol=1e-5
    )
    assert bool(t.loc[4, "dead"]) and t["dead"].sum() == 1
    assert len(t) == sae.d_sae
    # the same counts as sae.metrics.latent_stats, the SAE's own one-pass metrics
    from integral_superposition.activations import ArraySource

    ref = latent_stats(sae, ArraySource([x]))
    np.testing.assert_array_equal(stats_from_scan(scan).fire_count, ref.fire_count)
    assert stats_from_scan(scan).summary()["explained_variance"] == pytest.approx(
        ref.explained_variance, rel=1e-9
    )
    no_metrics = stats_from_scan(scan_latents(sae, x, n_top=3))
    assert np.isnan(no_metrics.explained_variance) and no_metrics.l0 == pytest.approx(ref.l0)


def test_decoder_geometry_and_distributions():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(50, 8))
    W[7] = 3 * W[3]  # parallel pair
    norms, max_cos, partner = decoder_geometry(torch.tensor(W, dtype=torch.float32), block=7)
    np.testing.assert_allclose(norms, np.linalg.norm(W, axis=1), rtol=1e-5)
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    C = U @ U.T
    np.fill_diagonal(C, -np.inf)
    np.testing.assert_allclose(max_cos, C.max(1), atol=1e-5)
    assert partner[3] == 7 and partner[7] == 3
    counts, edges = log10_density_hist(np.array([0.0, 1e-3, 0.5, 1.0]), bins=10)
    assert counts.sum() == 4 and counts[0] == 1 and counts[-1] == 2 and edges[0] == -10
    d = l0_distribution(np.array([2, 0, 5, 3]))
    assert d["mean"] == pytest.approx((5 * 2 + 3 * 3) / 10) and d["median"] == 2 and d["max"] == 3
    z = rng.random((10, 3))
    pooled = mean_pool_by_title(z, np.array([4, 4, 1, 1, 1, 9, 9, 9, 9, 4]))
    np.testing.assert_allclose(pooled[1], z[[0, 1, 9]].mean(0), rtol=1e-6)


def test_document_codes_pool_each_document():
    from integral_superposition.activations import ArraySource
    from integral_superposition.analysis.stats import document_codes

    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 16)).astype(np.float32)
    doc = np.repeat([5, 2, 9], 30)
    src = ArraySource([x], doc_ids=doc)
    sae = _sae()
    z = sae.encode(torch.from_numpy(x)).detach().numpy()
    docs, mean = document_codes(sae, src, chunk_tokens=17)
    assert docs.tolist() == [2, 5, 9]
    np.testing.assert_allclose(mean[1], z[:30].mean(0), rtol=1e-5, atol=1e-7)
    _, mx = document_codes(sae, src, reduce="max")
    np.testing.assert_allclose(mx[2], z[60:].max(0), rtol=1e-6)
    keep = doc != 2
    docs, m2 = document_codes(sae, src, mask=keep)
    assert docs.tolist() == [5, 9]
    np.testing.assert_allclose(m2[0], z[:30].mean(0), rtol=1e-5, atol=1e-7)


def test_reducers_are_deterministic_and_fall_back(monkeypatch, caplog):
    X = np.random.default_rng(0).normal(size=(60, 10))
    a, used = reducer.reduce_2d(X, "pca", random_state=3)
    b, _ = reducer.reduce_2d(X, "pca", random_state=3)
    assert used == "pca" and a.shape == (60, 2)
    np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(reducer, "HAS_UMAP", False)
    with caplog.at_level(logging.INFO):
        _, used = reducer.reduce_2d(X, "auto")
    assert used == "pca" and "umap-learn is not installed" in caplog.text
    with pytest.raises(ImportError, match=r"integral-superposition\[viz\]"):
        reducer.create_reducer("umap")
    with pytest.raises(ValueError, match="method="):
        reducer.create_reducer("tsne")
    with pytest.raises(ValueError, match="NaN"):
        reducer.reduce_2d(np.full((5, 3), np.nan), "pca")


@pytest.mark.skipif(not reducer.HAS_UMAP, reason="umap-learn (the viz extra) is not installed")
def test_umap_is_deterministic_with_a_seed():
    X = np.random.default_rng(1).normal(size=(80, 6))
    a, used = reducer.reduce_2d(X, "umap", random_state=7)
    b, _ = reducer.reduce_2d(X, "umap", random_state=7)
    assert used == "umap"
    np.testing.assert_allclose(a, b)
    c, used = reducer.reduce_2d(X, "auto", random_state=7)  # auto: UMAP when installed
    assert used == "umap"
    np.testing.assert_allclose(c, a)


def test_logit_lens_matches_brute_force_with_final_norm(tiny_backend):
    sae = SparseAutoencoder(tiny_backend.d_model, 12, seed=2)
    lens = logit_lens_for_backend(sae, tiny_backend, top=5)
    norm = tiny_backend.final_norm()
    W_U = tiny_backend.output_embedding().detach()
    with torch.no_grad():
        dirs = norm(sae.W_dec.detach()) - norm(torch.zeros(1, tiny_backend.d_model))
        logits = (dirs @ W_U.T).numpy()
    for j in range(12):
        exp = np.sort(logits[j])[::-1][:5]
        np.testing.assert_allclose(lens.promoted_logits[j], exp, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            lens.suppressed_logits[j], np.sort(logits[j])[:5], rtol=1e-5, atol=1e-6
        )
        assert set(lens.promoted_ids[j]) == set(np.argsort(-logits[j])[:5])
    # the norm's gain changes the ranking; without a norm it is the plain product
    plain = logit_lens(sae.W_dec, W_U, None, top=3, latents=[0, 1], batch=1)
    np.testing.assert_allclose(
        plain.promoted_logits[0],
        np.sort((sae.W_dec[0] @ W_U.T).detach().numpy())[::-1][:3],
        rtol=1e-5,
    )
    frame = lens.to_frame({int(i): f"t{i}" for i in np.unique(lens.promoted_ids)})
    assert set(frame["direction"]) == {"promoted", "suppressed"} and len(frame) == 12 * 5 * 2
    with pytest.raises(ValueError, match="does not match"):
        logit_lens_for_backend(SparseAutoencoder(7, 4), tiny_backend)
