"""Top-k extraction, quantile samples and context windows against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from integral_superposition.activations import ArraySource
from integral_superposition.analysis.scan import scan_latents
from integral_superposition.analysis.top_tokens import (
    collect_examples,
    context_windows,
    decode_tokens,
    tokenizer_for,
    top1_tokens_for_latents,
    topk_sets_per_latent,
    window_activations,
)
from integral_superposition.sae import SparseAutoencoder


def _sae(d=16, k=40, arch="relu", bias=-0.8, seed=1):
    sae = SparseAutoencoder(d, k, architecture=arch, top_k=6, seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(bias)
        if arch == "jumprelu":
            sae.threshold.fill_(0.3)
    return sae


def _brute_topk(z: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-n values per column with ties broken by the lower row, zeros as empty slots."""
    order = np.argsort(-z, axis=0, kind="stable")[:n].T
    vals = np.take_along_axis(z.T, order, 1)
    return np.where(vals > 0, vals, 0.0), np.where(vals > 0, order, -1)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("chunk", [97, 1000, 5000])
def test_topk_matches_brute_force(arch, chunk):
    torch.manual_seed(0)
    x = torch.randn(2500, 16)
    sae = _sae(arch=arch)
    z = sae.encode(x).detach().numpy()
    top = topk_sets_per_latent(sae, x, "cpu", k=9, batch=chunk)
    exp_v, _ = _brute_topk(z, 9)
    np.testing.assert_allclose(top.values, exp_v, rtol=1e-6, atol=0)
    # rows may differ only between exactly tied values
    got = np.where(top.rows >= 0, z[np.maximum(top.rows, 0), np.arange(z.shape[1])[:, None]], 0.0)
    np.testing.assert_allclose(got, exp_v, rtol=1e-6)
    assert top.fire_count.tolist() == (z > 0).sum(0).tolist()
    assert ((top.rows >= 0).sum(1) == np.minimum(9, (z > 0).sum(0))).all()


def test_seed_call_shapes_and_sets():
    x = torch.randn(600, 16)
    sae = _sae()
    top = topk_sets_per_latent(sae=sae, act_files=x, device=torch.device("cpu"), k=5)
    assert len(top) == sae.k
    z = sae.encode(x).detach().numpy()
    j = int(np.argmax((z > 0).sum(0)))
    assert top[j] == set(np.argsort(-z[:, j], kind="stable")[:5].tolist())
    as_dict = {j: np.array(list(s)) for j, s in enumerate(top)}
    assert sorted(as_dict[j].tolist()) == sorted(top.as_dict()[j].tolist())


def test_never_firing_latent_is_reported_empty():
    x = torch.randn(300, 16)
    sae = _sae()
    with torch.no_grad():
        sae.b_enc[3] = -1e6
    top = topk_sets_per_latent(sae, x, k=4)
    assert top.fire_count[3] == 0 and (top.rows[3] == -1).all() and top[3] == set()
    assert top.n_latents == sae.d_sae


def test_npy_shards_and_mask(tmp_path):
    x = np.random.default_rng(0).normal(size=(900, 16)).astype(np.float32)
    paths = []
    for i, part in enumerate(np.split(x, [300, 650])):
        p = tmp_path / f"acts_{i}.npy"
        np.save(p, part)
        paths.append(str(p))
    sae = _sae()
    a = topk_sets_per_latent(sae, paths, k=6, batch=128)
    b = topk_sets_per_latent(sae, x, k=6)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6)
    mask = np.zeros(900, bool)
    mask[::3] = True
    m = topk_sets_per_latent(sae, x, k=6, mask=mask)
    assert set(m.rows[m.rows >= 0].tolist()) <= set(np.flatnonzero(mask).tolist())
    assert m.n_tokens == 300 and m.row_index is not None and m.row_index.size == 300


def test_bad_inputs():
    x = torch.randn(50, 16)
    with pytest.raises(ValueError, match="n_top=51"):
        topk_sets_per_latent(_sae(), x, k=51)
    with pytest.raises(ValueError, match=r"sae.d_in=8 does not match .* d_model=16"):
        topk_sets_per_latent(_sae(d=8), x, k=3)
    with pytest.raises(TypeError, match="act_files"):
        topk_sets_per_latent(_sae(), 42, k=3)
    with pytest.raises(ValueError, match="labels has shape"):
        scan_latents(_sae(), x, n_top=2, labels=np.zeros(49, int), hist_bins=8)


def test_quantile_samples_lie_in_their_bands():
    torch.manual_seed(0)
    x = torch.randn(4000, 16)
    sae = _sae()
    top = topk_sets_per_latent(sae, x, k=5, n_bands=4, per_band=3, batch=512)
    z = sae.encode(x).detach().numpy()
    qv, qr, qe = top.quantile_values, top.quantile_rows, top.quantile_edges
    assert qv.shape == (sae.d_sae, 4, 3) and qe.shape == (sae.d_sae, 5)
    ok = qr >= 0
    lat = np.broadcast_to(np.arange(sae.d_sae)[:, None, None], qr.shape)
    np.testing.assert_allclose(qv[ok], z[qr[ok], lat[ok]], rtol=1e-6)
    assert (qv[ok] > 0).all()
    band = np.broadcast_to(np.arange(4)[None, :, None], qr.shape)
    lo = np.take_along_axis(qe, band.reshape(sae.d_sae, -1), 1).reshape(qr.shape)
    hi = np.take_along_axis(qe, band.reshape(sae.d_sae, -1) + 1, 1).reshape(qr.shape)
    assert (qv[ok] >= lo[ok] - 1e-6).all() and (qv[ok] <= hi[ok] + 1e-6).all()
    assert (qe[:, :-1] <= qe[:, 1:] + 1e-6).all()
    # bands below the top: the lowest band's samples sit well below the maximum
    firing = (z > 0).sum(0) > 50
    assert (qv[firing, 0, :].max(1) < top.values[firing, 0]).all()


def test_context_windows_stop_at_documents():
    doc = np.repeat(np.arange(10), 5)
    x = np.zeros((50, 4), np.float32)
    src = ArraySource(
        [x], doc_ids=doc, token_ids=np.arange(50), positions=np.tile(np.arange(5), 10)
    )
    win = context_windows(src, np.array([0, 7, 49, -1]), left=2, right=2)
    assert win.tolist() == [
        [-1, -1, 0, 1, 2],
        [5, 6, 7, 8, 9],
        [47, 48, 49, -1, -1],
        [-1, -1, -1, -1, -1],
    ]


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_window_activations_and_examples_match_encode(arch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    doc = np.repeat(np.arange(60), 10)
    src = ArraySource(
        [x], doc_ids=doc, token_ids=rng.integers(0, 50, 600), positions=np.tile(np.arange(10), 60)
    )
    sae = _sae(arch=arch)
    z = sae.encode(torch.from_numpy(x)).detach().numpy()
    win = context_windows(src, np.array([3, 15, 599]), 3, 1)
    acts = window_activations(sae, src, win, np.array([0, 5, 9]), chunk_tokens=7)
    for m, (j, w) in enumerate(zip([0, 5, 9], win, strict=True)):
        exp = np.where(w >= 0, z[np.maximum(w, 0), j], 0.0)
        np.testing.assert_allclose(acts[m], exp, rtol=1e-5, atol=1e-6)
    top = topk_sets_per_latent(sae, src, k=4, n_bands=2, per_band=2)
    ex = collect_examples(sae, src, top, left=3, right=2)
    assert (ex.token_ids[:, 3] == src.token_ids[ex.rows]).all()
    np.testing.assert_allclose(ex.acts[:, 3], ex.values, rtol=1e-5, atol=1e-5)
    assert set(np.unique(ex.kind).tolist()) <= {-1, 0, 1}


def test_store_source_and_tokenizer(demo_store, tiny_backend):
    sae = _sae(d=demo_store.d_model, k=32, bias=-0.5)
    top = topk_sets_per_latent(sae, demo_store, k=5)
    ok = top.rows >= 0
    assert (top.token_ids[ok] == demo_store.token_ids[top.rows[ok]]).all()
    assert (top.doc_ids[ok] == demo_store.doc_ids[top.rows[ok]]).all()
    assert (top.positions[ok] == demo_store.positions[top.rows[ok]]).all()
    tok = tokenizer_for(demo_store)
    assert tok is not None
    text = decode_tokens(tok, demo_store.token_ids[:20])
    assert "".join(text[int(i)] for i in demo_store.token_ids[:5])
    assert decode_tokens(None, [3, -1]) == {3: "<3>"}
    ids, vals = top1_tokens_for_latents(sae, [0, 1], demo_store)
    assert (ids == demo_store.token_ids[top.rows[[0, 1], 0]]).all()
    np.testing.assert_allclose(vals, top.values[[0, 1], 0], rtol=1e-6)


def _merged_sae(d=16, k=40):
    base = _sae(d, k)
    idx = torch.arange(k) % 25  # 40 member latents -> 25 merged latents
    sae = SparseAutoencoder(d, 25, architecture="relu", seed=1, merge_index=idx, merge_mode="max")
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "b_dec"):
            getattr(sae, name).copy_(getattr(base, name))
    return sae


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk", "jumprelu<0", "merged"])
def test_sparse_encoder_matches_dense_encode(arch):
    from integral_superposition.sae.encode import SparseEncoder

    torch.manual_seed(0)
    x = torch.randn(300, 16)
    if arch == "merged":
        sae = _merged_sae()
    else:
        sae = _sae(arch=arch.rstrip("<0"))
        if arch == "jumprelu<0":  # a negative threshold: pre in (thr, 0] gives z <= 0, not active
            with torch.no_grad():
                sae.threshold.fill_(-0.2)
    z = sae.encode(x).detach()
    codes = SparseEncoder(sae)(x, reconstruct=True)
    dense = torch.zeros_like(z)
    dense[codes.t, codes.j] = codes.v
    assert (codes.v > 0).all()
    torch.testing.assert_close(dense, torch.where(z > 0, z, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(codes.x_hat, sae.decode(z).detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="encode_dtype='float16'"):
        SparseEncoder(sae, "float16")


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("K,per_chunk", [(7, 40), (1 << 19, 4000)])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_select_buffer_with_many_merges_matches_sorting(largest, K, per_chunk, backend):
    """A pool limit far below one chunk forces a merge on every add; ties keep earlier rows.
    With 2^19 latents the packed keys leave 14 spare bits, so merges past 16,384 entries take
    the argsort path and smaller ones the packed sort. The torch buffer (the one a scan keeps
    on an accelerator) runs here on the CPU."""
    from integral_superposition.analysis.select import SelectBuffer, TorchSelectBuffer

    rng = np.random.default_rng(3)
    n = 5
    used = np.arange(K - 1) if K < 100 else np.arange(3000) * 174  # latent K-1 never fires
    if backend == "torch":
        buf = TorchSelectBuffer(K, n, largest, [np.int64], limit=3, device="cpu")
        arr = torch.from_numpy
    else:
        buf, arr = SelectBuffer(K, n, largest, [np.int64], limit=3), np.asarray
    js, keys, rows = [], [], []
    for c in range(12):
        j = used[rng.integers(0, used.size, per_chunk)]
        key = rng.integers(1, 9, per_chunk).astype(np.float32) / 10  # many exact ties
        r = np.arange(per_chunk) + per_chunk * c
        ok = buf.candidates(arr(j), arr(key))
        buf.add(arr(j)[ok], arr(key)[ok], [arr(r)[ok]])
        js.append(j), keys.append(key), rows.append(r)
    j, key, r = np.concatenate(js), np.concatenate(keys), np.concatenate(rows)
    got_k, (got_r,) = buf.result(-1.0, [-1])
    empty = np.setdiff1d(np.arange(K), used)
    assert (got_r[empty] == -1).all() and (got_k[empty] == -1.0).all()
    for lat in used[: 400 if K > 100 else None]:
        m = j == lat
        order = np.lexsort((r[m], -key[m] if largest else key[m]))[:n]
        exp_k = np.full(n, -1.0, np.float32)
        exp_r = np.full(n, -1)
        exp_k[: order.size], exp_r[: order.size] = key[m][order], r[m][order]
        np.testing.assert_array_equal(got_k[lat], exp_k)
        np.testing.assert_array_equal(got_r[lat], exp_r)


@pytest.mark.parametrize("stats", [False, True])
@pytest.mark.parametrize("source", ["tensor", "store"])
def test_device_resident_selection_matches_the_host_selection(
    monkeypatch, stats, source, demo_store
):
    """The selection a scan keeps on an accelerator (forced here onto the CPU) returns the same
    top sets, values and counts as the host one, with and without the statistics that need
    every entry on the host (sums, quantile reservoir, label histograms). From a store, the
    accelerator scan also reads chunks ahead in a thread."""
    from integral_superposition.analysis import scan as scan_mod

    torch.manual_seed(2)
    if source == "store":
        x = demo_store
        sae = _sae(d=demo_store.d_model, k=48, arch="topk", bias=-0.5)
    else:
        x = torch.randn(3000, 16)
        x[1500:1600] = x[:100]  # repeated rows: exact ties across chunks
        sae = _sae(arch="topk")
    n_rows = x.n_tokens if source == "store" else x.shape[0]
    kw = dict(n_top=7, stats=stats, chunk_tokens=256)
    if stats:
        kw.update(n_bands=3, per_band=2, labels=np.arange(n_rows) % 4, hist_bins=8)
    host = scan_latents(sae, x, **kw)
    monkeypatch.setattr(scan_mod, "on_accelerator", lambda device: True)
    dev = scan_latents(sae, x, **kw)
    assert dev.top.values.any()
    for name in ("values", "rows", "fire_count", "quantile_values", "quantile_rows"):
        a, b = getattr(host.top, name, None), getattr(dev.top, name, None)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_array_equal(a, b, err_msg=name)
    xs = x.read(0, n_rows).float() if source == "store" else x
    exp_v, _ = _brute_topk(sae.encode(xs).detach().numpy(), 7)
    np.testing.assert_allclose(dev.top.values, exp_v, rtol=1e-6, atol=0)


def test_scan_statistics_match_brute_force_per_architecture():
    for arch in ("relu", "topk", "jumprelu"):
        torch.manual_seed(1)
        x = torch.randn(700, 16)
        sae = _sae(arch=arch)
        z = sae.encode(x).detach().numpy()
        doc = np.repeat(np.arange(70), 10)
        labels = np.arange(700) % 3
        src = ArraySource([x.numpy()], doc_ids=doc)
        scan = scan_latents(
            sae, src, n_top=4, labels=labels, hist_bins=16, doc_threshold=0.5,
            metrics=True, chunk_tokens=128,
        )  # fmt: skip
        assert scan.top.fire_count.tolist() == (z > 0).sum(0).tolist()
        np.testing.assert_allclose(scan.act_sum, z.sum(0), rtol=1e-5)
        np.testing.assert_allclose(scan.act_max, z.max(0), rtol=1e-6)
        l0 = np.bincount((z > 0).sum(1), minlength=sae.d_sae + 1)
        assert scan.l0_counts.tolist() == l0.tolist()
        dmax = z.reshape(70, 10, -1).max(1)
        exp_pairs = np.argwhere(dmax > 0.5)
        np.testing.assert_array_equal(scan.doc_pairs, exp_pairs)
        h = scan.top.label_hist
        for c in range(3):
            assert h[:, c].sum(1).tolist() == (z[labels == c] > 0).sum(0).tolist()
        ev = (
            1
            - ((x.numpy() - sae.decode(torch.from_numpy(z)).detach().numpy()) ** 2).sum()
            / ((x.numpy() - x.numpy().mean(0)) ** 2).sum()
        )
        assert scan.metrics.explained_variance == pytest.approx(float(ev), rel=1e-4, abs=1e-5)
        assert scan.metrics.fire_count.tolist() == scan.top.fire_count.tolist()
        assert set(scan.timings) >= {"read", "encode", "select", "finish"}


def test_bfloat16_encode_is_close_to_float32():
    torch.manual_seed(2)
    x = torch.randn(3000, 16)
    sae = _sae(arch="topk")
    a = topk_sets_per_latent(sae, x, "cpu", k=20)
    b = topk_sets_per_latent(sae, x, "cpu", k=20, encode_dtype="bfloat16")
    both = (a.values > 0) & (b.values > 0)
    np.testing.assert_allclose(b.values[both], a.values[both], rtol=0.05, atol=0.02)
    overlap = [len(a[j] & b[j]) / max(1, len(a[j] | b[j])) for j in range(sae.d_sae) if a[j]]
    assert np.mean(overlap) > 0.8
    win = context_windows(x, a.rows[:, :3].ravel(), 2, 2)
    lat = np.repeat(np.arange(sae.d_sae), 3)
    w32 = window_activations(sae, x, win, lat)
    w16 = window_activations(sae, x, win, lat, encode_dtype="bfloat16")
    assert np.mean(np.isclose(w16, w32, rtol=0.05, atol=0.02)) > 0.95
    with pytest.raises(ValueError, match="encode_dtype"):
        topk_sets_per_latent(sae, x, "cpu", k=20, encode_dtype="int8")
