"""Dead latents are counted on at least ``dead_min_tokens`` tokens (or all of the store's)."""

from __future__ import annotations

import json

import numpy as np
import torch
from integral_superposition import storage
from integral_superposition.dump.synthetic import write_activation_store
from integral_superposition.pipelines.analyze import run_analysis
from integral_superposition.pipelines.analyze_inputs import dead_count
from integral_superposition.sae import SparseAutoencoder, save_sae
from integral_superposition.viz.report import summary_tables


def _identity_sae(d: int) -> SparseAutoencoder:
    """ReLU SAE whose latent i fires exactly when ``x[i] > 0.5``."""
    sae = SparseAutoencoder(d, d, seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.fill_(-0.5)
        sae.b_dec.zero_()
    return sae


def test_dead_count_adds_rows_outside_the_split(tmp_path):
    n, d = 5000, 4
    x = torch.zeros(n, d)
    x[:, 0] = 1.0  # latent 0 fires everywhere
    x[1000:, 3] = 1.0  # latent 3 fires only outside the analysed rows
    store = write_activation_store(x, str(tmp_path / "acts"), rows_per_shard=1024)
    sae = _identity_sae(d)
    mask = np.zeros(n, dtype=bool)
    mask[:1000] = True
    split_fires = np.array([1000, 0, 0, 0])
    fires, used = dead_count(sae, store, mask, split_fires, 3000, device="cpu")
    assert used == 3000
    assert fires[0] == 3000 and fires[3] == 2000 and fires[1] == fires[2] == 0
    # enough analysed rows: nothing is added
    fires, used = dead_count(sae, store, mask, split_fires, 500, device="cpu")
    assert used == 1000 and fires[3] == 0
    # fewer tokens in the store than asked: all of them
    fires, used = dead_count(sae, store, mask, split_fires, 100_000, device="cpu")
    assert used == n and fires[3] == 4000


def test_analysis_reports_the_dead_count_tokens(demo_store, tmp_path):
    sae = SparseAutoencoder(demo_store.d_model, 32, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-1.2)
    sae_dir = save_sae(sae, str(tmp_path / "sae"))
    out = str(tmp_path / "analysis")
    params = {"reducer": "pca", "n_top": 2, "n_bands": 0, "split": "test", "test_fraction": 0.1}
    manifest = run_analysis(sae_dir, demo_store, out, params)
    summary = json.loads(storage.read_bytes(f"{out}/summary.json"))
    assert summary["n_tokens"] < demo_store.n_tokens  # the held-out split alone
    assert summary["dead_tokens"] == demo_store.n_tokens  # < 100k tokens: all of them
    assert manifest["summary"]["dead_tokens"] == demo_store.n_tokens
    assert summary["metrics"]["dead_frac"] == summary["n_dead"] / 32
    metrics = summary_tables(out)["metrics"].set_index("metric")["value"]
    assert metrics["tokens for the dead count"] == demo_store.n_tokens


def test_evaluate_sae_counts_dead_latents_beyond_the_held_out_split(tmp_path):
    from integral_superposition.sae import evaluate_sae

    n, d = 5000, 4
    first = write_activation_store(torch.zeros(n, d), str(tmp_path / "shape"))
    test = first.split_mask("test", 0.05, 0)
    x = torch.zeros(n, d)
    x[:, 0] = 1.0
    x[torch.from_numpy(~test), 3] = 1.0  # latent 3 never fires on held-out tokens
    store = write_activation_store(x, str(tmp_path / "acts"))
    assert np.array_equal(store.split_mask("test", 0.05, 0), test)
    sae = _identity_sae(d)
    ev = evaluate_sae(sae, store, device="cpu")
    assert ev["n_tokens"] == int(test.sum()) < n
    assert ev["dead_tokens"] == n and ev["dead_frac"] == 0.5  # latents 1 and 2
    ev = evaluate_sae(sae, store, device="cpu", dead_min_tokens=10)
    assert ev["dead_tokens"] == int(test.sum()) and ev["dead_frac"] == 0.75
