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


def test_splicing_the_clean_activation_back_is_exact(tiny_backend, texts):
    """An identity reconstruction: the spliced forward is the clean one, bit for bit."""
    out = spliced_ce(tiny_backend, lambda x: x, "layer.2", texts, batch_size=8, max_len=24)
    assert out["delta_ce"] == 0.0 and out["kl"] == 0.0
    assert out["ce_recovered"] == 1.0
    zero = spliced_ce(tiny_backend, torch.zeros_like, "layer.2", texts, batch_size=8, max_len=24)
    assert zero["ce_recovered"] == 0.0 and zero["kl"] == zero["kl_zero"] > 0
    assert zero["ce_sae"] == zero["ce_zero"] == out["ce_zero"]


def _manual_ce(backend, texts, max_len: int, zero_layer: int | None = None) -> float:
    """Mean next-token CE over predictions made at positions 1..n-2 of each text, one unpadded
    text per forward; ``zero_layer``: hook point ``layer.{zero_layer}`` (the residual stream
    entering that block, ``hidden_states[zero_layer]``) set to 0 after the BOS position, by a
    plain torch forward hook on the output of the block before it."""
    from integral_superposition.data.tokenize import tokenize_texts

    def zero_after_bos(_module, _inputs, output):
        out = output.clone()
        out[:, 1:] = 0
        return out

    block = backend.model.model.layers[zero_layer - 1] if zero_layer is not None else None
    handle = block.register_forward_hook(zero_after_bos) if block is not None else None
    total, n = 0.0, 0
    try:
        for seq in tokenize_texts(backend.tokenizer, texts, max_len):
            ids = torch.tensor([seq])
            with torch.no_grad():
                logits = backend.model(input_ids=ids).logits[0].double()
            lp = torch.log_softmax(logits[1:-1], dim=-1)  # predictions at positions 1..n-2
            total -= float(lp.gather(1, ids[0, 2:, None]).sum())
            n += len(seq) - 2
    finally:
        if handle is not None:
            handle.remove()
    return total / n


def test_clean_and_ablated_ce_use_the_same_tokens_and_positions(tiny_backend, texts):
    """Padded batches give what one unpadded text per forward gives: the clean CE, and the
    zero-ablated CE with block 1's output (the residual entering block 2, hook point
    ``layer.2``) zeroed after BOS by an independent torch hook."""
    out = spliced_ce(tiny_backend, lambda x: x, "layer.2", texts, batch_size=8, max_len=24)
    one = spliced_ce(tiny_backend, lambda x: x, "layer.2", texts, batch_size=1, max_len=24)
    assert out["n_predictions"] == one["n_predictions"]
    assert out["ce_clean"] == pytest.approx(_manual_ce(tiny_backend, texts, 24), abs=1e-5)
    assert one["ce_clean"] == pytest.approx(out["ce_clean"], abs=1e-5)
    manual_zero = _manual_ce(tiny_backend, texts, 24, zero_layer=2)
    assert out["ce_zero"] == pytest.approx(manual_zero, abs=1e-5)
    assert one["ce_zero"] == pytest.approx(manual_zero, abs=1e-5)
    # zeroing the residual one block later gives another CE: the splice is at layer.2
    assert abs(_manual_ce(tiny_backend, texts, 24, zero_layer=3) - manual_zero) > 1e-3


def test_the_splice_sees_exactly_the_hook_points_output(tiny_backend, texts):
    """The function spliced in receives the residual stream entering block 2 (the model's
    ``hidden_states[2]``) and nothing else."""
    from integral_superposition.data.tokenize import pad_batch, pad_token_id, tokenize_texts

    seen = []
    spliced_ce(
        tiny_backend, lambda x: seen.append(x.clone()) or x, "layer.2", texts[:4], max_len=24
    )
    seqs = tokenize_texts(tiny_backend.tokenizer, texts[:4], 24)
    assert len({len(q) for q in seqs}) > 1, "texts of one length cannot show the batch order"
    seqs = sorted(seqs, key=len)  # batches run shortest first
    batch = pad_batch(seqs, pad_token_id(tiny_backend.tokenizer), "right")
    with torch.no_grad():
        hidden = tiny_backend.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        ).hidden_states
    assert len(seen) == 1 and seen[0].shape == hidden[2].shape
    real = batch.attention_mask.bool()
    torch.testing.assert_close(seen[0][real], hidden[2][real], atol=1e-6, rtol=1e-6)
    assert (seen[0][real] - hidden[3][real]).abs().max() > 1e-3


def test_spliced_ce_many_shares_the_clean_and_zero_forwards(tiny_backend, texts, monkeypatch):
    """Several SAEs in one pass: the same numbers as one call each, from 2 + n forwards per
    batch instead of 3 n."""
    from integral_superposition.sae.metrics import spliced_ce_many

    d = tiny_backend.d_model
    saes = {"identity": identity_sae(d), "half": lambda x: 0.5 * x, "zero": constant_sae(d, 0.0)}
    single = {
        name: spliced_ce(tiny_backend, s, "layer.2", texts, batch_size=24, max_len=24)
        for name, s in saes.items()
    }
    calls = []
    logits = tiny_backend.logits
    monkeypatch.setattr(tiny_backend, "logits", lambda *a, **k: calls.append(1) or logits(*a, **k))
    many = spliced_ce_many(tiny_backend, saes, "layer.2", texts, batch_size=24, max_len=24)
    assert len(calls) == 2 + len(saes)
    for name, want in single.items():
        for key, value in want.items():
            assert many[name][key] == pytest.approx(value, abs=1e-9), (name, key)
    assert many["half"]["kl"] > 0 and many["half"]["delta_ce"] != 0
    with pytest.raises(ValueError, match="saes is empty"):
        spliced_ce_many(tiny_backend, {}, "layer.2", texts)
    with pytest.raises(ValueError, match=r"saes\['bad'\].d_in=7"):
        spliced_ce_many(tiny_backend, {"bad": SparseAutoencoder(7, 8)}, "layer.2", texts)
    with pytest.raises(TypeError, match=r"saes\['odd'\]"):
        spliced_ce_many(tiny_backend, {"odd": 3}, "layer.2", texts)


def test_spliced_ce_batches_texts_of_similar_length(tiny_backend, texts, monkeypatch):
    """Texts run shortest first, so a batch pads to the length of texts like its own: the
    forwards see the fewest padded positions, and the result is the one of the given order."""
    from integral_superposition.data.tokenize import tokenize_texts
    from integral_superposition.sae.metrics import spliced_ce_many

    lengths = sorted(len(q) for q in tokenize_texts(tiny_backend.tokenizer, texts, 24))
    assert lengths[0] < lengths[-1]
    shapes = []
    logits = tiny_backend.logits
    monkeypatch.setattr(
        tiny_backend,
        "logits",
        lambda ids, *a, **k: shapes.append(tuple(ids.shape)) or logits(ids, *a, **k),
    )
    saes = {"half": lambda x: 0.5 * x}
    got = spliced_ce_many(tiny_backend, saes, "layer.2", texts, batch_size=3, max_len=24)
    per_batch = [lengths[a : a + 3] for a in range(0, len(lengths), 3)]
    want = [(len(b), max(b)) for b in per_batch for _ in range(3)]  # clean, zero, one SAE
    assert shapes == want
    reverse = spliced_ce_many(tiny_backend, saes, "layer.2", texts[::-1], batch_size=3, max_len=24)
    for key, value in got["half"].items():
        assert reverse["half"][key] == pytest.approx(value, rel=1e-5), key
