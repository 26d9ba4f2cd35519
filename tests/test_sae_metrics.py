"""SAE metric identities: explained variance about the mean, firing statistics, spliced CE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from integral_superposition.data import demo_corpus
from integral_superposition.dump.synthetic import write_activation_store
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.sae.metrics import evaluate_sae, explained_variance, spliced_ce


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices gain nothing from threads, and thread hand-offs dominate on busy CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def identity_sae(d: int) -> SparseAutoencoder:
    """ReLU SAE with ``2d`` latents that reconstructs every input exactly: relu(x) - relu(-x)."""
    sae = SparseAutoencoder(d, 2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def constant_sae(d: int, value: torch.Tensor | float, d_sae: int = 8) -> SparseAutoencoder:
    """An SAE whose reconstruction is always ``value`` (zero decoder, ``b_dec = value``)."""
    sae = SparseAutoencoder(d, d_sae)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(torch.as_tensor(value, dtype=torch.float32).expand(d))
    return sae.eval()


@pytest.fixture(scope="module")
def gauss_store(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=g) * 3 + torch.arange(8.0)
    return write_activation_store(x, str(tmp_path_factory.mktemp("ev") / "acts"), tokens_per_doc=10)


def test_explained_variance_is_taken_about_the_mean():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 6, generator=g) + 10.0  # far from the origin: EV about 0 would be ~1
    assert explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(x, x) == pytest.approx(1.0)
    assert explained_variance(x, torch.zeros_like(x)) < -10  # worse than predicting the mean


def test_store_metrics_identities(gauss_store):
    mask = gauss_store.split_mask("test")
    mean = gauss_store.read(0, gauss_store.n_tokens).float()[torch.from_numpy(mask)].mean(0)
    perfect = evaluate_sae(identity_sae(8), gauss_store)
    assert perfect["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert perfect["fvu"] == pytest.approx(0.0, abs=1e-9)
    assert perfect["cos_sim"] == pytest.approx(1.0) and perfect["norm_ratio"] == pytest.approx(1.0)
    mean_pred = evaluate_sae(constant_sae(8, mean), gauss_store)
    assert mean_pred["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert mean_pred["n_tokens"] == int(mask.sum()) == perfect["n_tokens"]
    assert mean_pred["split"] == "test"


def test_firing_statistics(gauss_store):
    d_sae = 10
    sae = SparseAutoencoder(8, d_sae)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([1.0, 1.0] + [-1.0] * (d_sae - 2)))  # 2 always on, 8 never
    out = evaluate_sae(sae.eval(), gauss_store, split="all")
    assert out["l0"] == pytest.approx(2.0)
    assert out["dead_frac"] == pytest.approx(0.8)
    assert out["dense_frac"] == pytest.approx(0.2) and out["dense_frac_001"] == pytest.approx(0.2)
    assert sum(out["density_hist"]["counts"]) == d_sae
    assert len(out["density_hist"]["edges"]) == len(out["density_hist"]["counts"]) + 1
    assert out["density"][:2] == [1.0, 1.0] and max(out["density"][2:]) == 0.0


def test_evaluate_rejects_mismatched_store(gauss_store):
    with pytest.raises(ValueError, match="d_model=8"):
        evaluate_sae(SparseAutoencoder(4, 8), gauss_store)


@pytest.fixture(scope="module")
def texts():
    return demo_corpus(24)["title"].tolist()


def test_identity_sae_leaves_ce_unchanged(tiny_backend, texts):
    d = tiny_backend.d_model
    out = spliced_ce(tiny_backend, identity_sae(d), "layer.2", texts, batch_size=8, max_len=24)
    assert out["ce_sae"] == pytest.approx(out["ce_clean"], abs=1e-5)
    assert out["kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert out["ce_zero"] > out["ce_clean"] and out["n_predictions"] > 100


def test_zero_sae_gives_the_zero_ablation_ce(tiny_backend, texts):
    d = tiny_backend.d_model
    out = spliced_ce(tiny_backend, constant_sae(d, 0.0), "layer.2", texts, batch_size=8, max_len=24)
    assert out["ce_sae"] == pytest.approx(out["ce_zero"], abs=1e-6)
    assert out["kl"] == pytest.approx(out["kl_zero"], abs=1e-6)
    assert out["ce_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert out["delta_ce"] == pytest.approx(out["ce_zero"] - out["ce_clean"])


def test_spliced_ce_averages_predictions_at_stored_positions(tiny_backend, texts):
    """Spliced positions are the dump's (no BOS); predictions made there of a stored token count."""
    from integral_superposition.data.tokenize import tokenize_texts

    seqs = tokenize_texts(tiny_backend.tokenizer, texts[:8], 24)
    assert all(s[0] == tiny_backend.tokenizer.bos_token_id for s in seqs)
    sae = identity_sae(tiny_backend.d_model)
    out = spliced_ce(tiny_backend, sae, "layer.2", texts[:8], max_len=24)
    assert out["n_predictions"] == sum(len(s) - 2 for s in seqs)  # positions 1..n-2
    with_bos = spliced_ce(tiny_backend, sae, "layer.2", texts[:8], max_len=24, drop_bos=False)
    assert with_bos["n_predictions"] == sum(len(s) - 1 for s in seqs)  # positions 0..n-2


def test_evaluate_with_backend_on_a_dump(tiny_backend, demo_store):
    d = tiny_backend.d_model
    out = evaluate_sae(identity_sae(d), demo_store, tiny_backend, n_ce_docs=16)
    assert out["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert out["ce_sae"] == pytest.approx(out["ce_clean"], abs=1e-5)
    assert out["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert np.isfinite(out["ce_zero"])


def test_spliced_ce_input_errors(tiny_backend, texts):
    with pytest.raises(ValueError, match="d_in"):
        spliced_ce(tiny_backend, SparseAutoencoder(7, 8), "layer.2", texts)
    with pytest.raises(ValueError, match="texts is empty"):
        spliced_ce(tiny_backend, identity_sae(tiny_backend.d_model), "layer.2", [])
    with pytest.raises(ValueError, match="hook_point"):
        spliced_ce(tiny_backend, identity_sae(tiny_backend.d_model), None, texts)
