"""The one encode layer: ``encode_chunks`` against a direct ``sae.encode`` of the whole matrix."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from integral_superposition.activations import ArraySource
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.sae.encode import Codes, encode_chunks


def _sae(arch: str = "topk") -> SparseAutoencoder:
    sae = SparseAutoencoder(12, 40, architecture=arch, top_k=5, seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(-0.1)
    return sae


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_encode_chunks_equals_one_encode_of_the_whole_matrix(arch):
    torch.manual_seed(0)
    x = torch.randn(333, 12)
    sae = _sae(arch)
    with torch.no_grad():
        z = sae.encode(x)
        x_hat = sae.decode(z, x)
    dense = torch.zeros_like(z)
    recon = torch.zeros_like(x)
    seen = []
    for rows, xc, codes, xh in encode_chunks(sae, x, chunk_tokens=50, reconstruct=True):
        assert codes.shape == (rows.size, 40) and xc.shape == (rows.size, 12)
        dense[torch.from_numpy(rows)] = codes
        recon[torch.from_numpy(rows)] = xh
        seen.append(rows)
    assert [r.size for r in seen] == [50] * 6 + [33]
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(333))
    torch.testing.assert_close(dense, z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(recon, x_hat, rtol=1e-6, atol=1e-6)
    # sparse codes hold exactly the active entries
    sparse = torch.zeros_like(z)
    for rows, _x, codes, _ in encode_chunks(sae, ArraySource([x]), chunk_tokens=64, sparse=True):
        assert isinstance(codes, Codes)
        sparse[torch.from_numpy(rows)] = codes.dense(40)
    torch.testing.assert_close(sparse, torch.where(z > 0, z, 0.0), rtol=1e-6, atol=1e-6)


def test_encode_chunks_mask_streams_and_bf16():
    torch.manual_seed(1)
    x = torch.randn(200, 12)
    sae = _sae()
    with torch.no_grad():
        z = sae.encode(x)
    mask = np.zeros(200, bool)
    mask[::3] = True
    got = list(encode_chunks(sae, x, chunk_tokens=16, mask=mask))
    rows = np.concatenate([g.rows for g in got])
    np.testing.assert_array_equal(rows, np.flatnonzero(mask))
    torch.testing.assert_close(torch.cat([g.codes for g in got]), z[mask], rtol=1e-6, atol=1e-6)
    # a stream of chunks (tensors, then (rows, x) pairs) gets running row offsets
    stream = list(encode_chunks(sae, [x[:120], x[120:]]))
    assert [s.rows[0] for s in stream] == [0, 120]
    torch.testing.assert_close(torch.cat([s.codes for s in stream]), z, rtol=1e-6, atol=1e-6)
    pairs = list(encode_chunks(sae, [(np.arange(5, 10), x[5:10])]))
    np.testing.assert_array_equal(pairs[0].rows, np.arange(5, 10))
    # bf16 encoder matmul: close to the float32 codes (ReLU: no top-k ranks that can swap)
    relu = _sae("relu")
    with torch.no_grad():
        z = relu.encode(x)
    bf = torch.cat([c.codes for c in encode_chunks(relu, x, dtype="bfloat16")])
    assert bf.shape == z.shape and not torch.equal(bf, z)
    torch.testing.assert_close(bf, z, rtol=0.05, atol=0.05)


def test_encode_chunks_checks_its_input_and_keeps_the_training_mode():
    sae = _sae()
    with pytest.raises(ValueError, match=r"sae.d_in=12 does not match the activations' d_model=7"):
        next(encode_chunks(sae, torch.zeros(4, 7)))
    with pytest.raises(ValueError, match=r"source chunk 1 has shape \(3, 5\): expected \[n, 12\]"):
        list(encode_chunks(sae, [torch.zeros(2, 12), torch.zeros(3, 5)]))
    with pytest.raises(ValueError, match=r"mask: expected bool\[4\]"):
        next(encode_chunks(sae, torch.zeros(4, 12), mask=np.ones(3, bool)))
    with pytest.raises(ValueError, match="encode_dtype='float16'"):
        next(encode_chunks(sae, torch.zeros(4, 12), dtype="float16"))
    with pytest.raises(TypeError, match="sae: expected a SparseAutoencoder"):
        next(encode_chunks("sae", torch.zeros(4, 12)))
    sae.train()
    for _ in encode_chunks(sae, torch.zeros(4, 12)):
        assert not sae.training  # encoded in eval mode ...
    assert sae.training  # ... and the caller's mode is back afterwards


def test_top_activations_panel_reads_codes_through_the_encode_layer():
    from integral_superposition.viz.activations_panel import top_activations_panel

    rng = np.random.default_rng(0)
    n_docs, length = 30, 6
    x = rng.normal(0, 0.1, (n_docs * length, 12)).astype(np.float32)
    peak = rng.permutation(n_docs)[:4]  # documents where latent 0 peaks, in decreasing order
    for rank, doc in enumerate(peak):
        x[doc * length + 2, :] = 0.0
        x[doc * length + 2, 0] = 5.0 - rank
    src = ArraySource(
        [x], doc_ids=np.repeat(np.arange(n_docs), length), token_ids=np.arange(x.shape[0]) % 7
    )
    sae = SparseAutoencoder(12, 8, architecture="relu", seed=0)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0, 0] = 1.0
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()

    class Tok:
        def batch_decode(self, ids, **_):
            return [f"t{i[0]}" for i in ids]

    html = top_activations_panel(0, src, sae, tokenizer=Tok(), top_titles=3)._repr_html_()
    shown = [float(v) for v in re.findall(r'<span class="v">([^<]+)</span>', html)]
    assert shown == [4.0, 3.0, 2.0]  # the three documents with the highest maxima, best first
