"""run_merge end to end on a tiny model's activations: publish, load, analyse, steer; the sweep;
bad input leaves nothing behind."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from _merge_setup import store_and_topk_sae
from integral_superposition import merge, pipelines, steering, storage
from integral_superposition.dump import ActivationStore
from integral_superposition.merge import MergeParams
from integral_superposition.sae import SparseAutoencoder, load_sae, save_sae
from matplotlib.figure import Figure


@pytest.fixture(scope="module")
def setup(tiny_backend, tmp_path_factory):
    """A store of 240 demo headlines at layer 2 of tiny:gemma and a TopK SAE (K=96) on it."""
    root = tmp_path_factory.mktemp("merge")
    store, sae = store_and_topk_sae(tiny_backend, root)
    save_sae(sae, str(root / "sae"), metadata={"hook_name": "layer.2"})
    return root, store, sae


def fast_params(**kw) -> MergeParams:
    base = {"fraction": 0.25, "top_n": 10, "sweep_fractions": [0.5, 0.125], "chunk_tokens": 512}
    return MergeParams(**{**base, **kw})


def _merge(root, out: str, **params) -> dict:
    """``run_merge`` of the fixture's SAE and store into ``out`` with :func:`fast_params`."""
    return pipelines.run_merge(str(root / "sae"), str(root / "acts"), out, fast_params(**params))


def test_run_merge_publishes_a_loadable_merged_sae(setup, tiny_backend):
    root, store, sae = setup
    out = str(root / "merged")
    seen = []
    manifest = pipelines.run_merge(
        str(root / "sae"),
        str(root / "acts"),
        out,
        fast_params(similarity={"decoder": 0.5, "coactivation": 0.5}, ce_docs=4),
        backend=tiny_backend,
        on_progress=lambda d, t: seen.append((d, t)),
    )
    assert storage.verify_output(out, deep=True)
    assert manifest["kind"] == "sae" and manifest["activation_manifest_hash"] == store.content_hash
    assert {
        "merge_map.parquet",
        "merge_eval.parquet",
        "merge_sweep.parquet",
        "merge_sweep.png",
    } <= set(manifest["files"])
    assert seen[-1][0] == seen[-1][1]
    assert manifest["merge"]["n_latents_after"] == 24

    merged = load_sae(out)
    assert merged.is_merged and merged.d_sae == 24 and merged.d_pre == 96
    mm = pd.read_parquet(os.path.join(out, "merge_map.parquet"))
    np.testing.assert_array_equal(mm["cluster"].to_numpy(), merged.merge_index.numpy())
    assert (mm.loc[mm["is_medoid"], "distance_to_medoid"] == 0).all()

    # the encoder is the original one followed by the merge: by default the sum of the member
    # codes times their projection weights, listed in the merge map
    assert manifest["merge"]["aggregation"] == "projection" and merged.merge_mode == "sum"
    np.testing.assert_array_equal(mm["weight"].to_numpy(), merged.merge_weight.double().numpy())
    x = store.read(0, 300).float()
    with torch.no_grad():
        z = sae.encode(x) * merged.merge_weight
        want = torch.zeros(300, 24).index_add_(1, merged.merge_index, z)
        torch.testing.assert_close(merged.encode(x), want, atol=1e-4, rtol=1e-4)

    ev = pd.read_parquet(os.path.join(out, "merge_eval.parquet")).set_index("sae")
    assert ev.index.tolist() == ["original", "original_refit", "merged"]
    assert ev.loc["merged", "n_latents"] == 24 and ev.loc["original", "n_latents"] == 96
    assert ev.loc["original_refit", "n_latents"] == 96
    assert ev.loc["original_refit", "l0"] == pytest.approx(ev.loc["original", "l0"], rel=1e-6)
    assert 0 <= ev.loc["merged", "enrichment_retention"] <= 1
    assert manifest["metrics"]["fvu"] == pytest.approx(ev.loc["merged", "fvu"])
    # spliced forwards through the backend: CE recovered, delta CE and KL for both SAEs
    assert ev[["ce_recovered", "delta_ce", "kl"]].notna().all().all()
    assert (ev["kl"] >= 0).all()
    sweep = pd.read_parquet(os.path.join(out, "merge_sweep.parquet"))
    assert sweep["ce_recovered"].notna().all()


def test_large_k_path_without_a_dense_gram(setup, tmp_path, monkeypatch, caplog):
    """Above DENSE_MAX_LATENTS: k-NN graph, no K x K statistics, refit from merged codes; the
    projection weights run as the sum, and the log and the manifest say so."""
    root, _store, _sae = setup
    monkeypatch.setattr(merge.evaluate, "DENSE_MAX_LATENTS", 32)
    monkeypatch.setattr(merge.cluster, "DENSE_MAX_LATENTS", 32)
    with pytest.raises(ValueError, match="reconstruction"):
        pipelines.run_merge(
            str(root / "sae"), str(root / "acts"), str(tmp_path / "x"), fast_params()
        )
    assert not (tmp_path / "x").exists()
    called = []
    monkeypatch.setattr(merge.evaluate, "original_stats", lambda *a, **k: called.append(1) or None)
    out = str(tmp_path / "knn")
    with caplog.at_level("WARNING", logger="integral_superposition.pipelines.merge"):
        manifest = pipelines.run_merge(
            str(root / "sae"),
            str(root / "acts"),
            out,
            fast_params(
                similarity={"decoder": 1.0}, aggregation="projection", n_neighbors=8, sweep=False
            ),
        )
    assert not called
    note = (
        "aggregation='projection' -> 'sum' (K=96 > 32 latents: the dense K x K Gram matrix of "
        "the codes does not fit)"
    )
    assert manifest["merge"]["aggregation"] == "sum"
    assert manifest["merge"]["dense_fallback"] == [note] and note in caplog.text
    merged = load_sae(out)
    assert merged.d_sae == 24 and merged.merge_weight is None
    ev = pd.read_parquet(os.path.join(out, "merge_eval.parquet")).set_index("sae")
    assert np.isfinite(ev.loc["merged", "fvu"]) and ev.loc["merged", "fit_tokens"] > 0
    # no K x K statistics above DENSE_MAX_LATENTS: no refit control row either
    assert ev.index.tolist() == ["original", "merged"]


def test_compare_adds_the_refit_control_without_a_sweep(setup, tmp_path):
    """Also the plain sum aggregation (no merge weights) through the pipeline."""
    root, store, sae = setup
    out = str(tmp_path / "nosweep")
    manifest = pipelines.run_merge(
        str(root / "sae"), str(root / "acts"), out, fast_params(sweep=False, aggregation="sum")
    )
    merged = load_sae(out)
    assert manifest["merge"]["aggregation"] == "sum" and merged.merge_weight is None
    x = store.read(0, 100).float()
    with torch.no_grad():
        want = torch.zeros(100, merged.d_sae).index_add_(1, merged.merge_index, sae.encode(x))
        torch.testing.assert_close(merged.encode(x), want, atol=1e-5, rtol=1e-5)
    ev = pd.read_parquet(os.path.join(out, "merge_eval.parquet")).set_index("sae")
    assert ev.index.tolist() == ["original", "original_refit", "merged"]
    assert ev.loc["original_refit", "fit_tokens"] > 0
    assert ev.loc["original_refit", "fvu"] != ev.loc["original", "fvu"]


def test_merged_sae_works_with_analysis_and_steers(setup, tiny_backend, tmp_path):
    root, store, _sae = setup
    merged_dir = root / "merged"
    if not (merged_dir / "manifest.json").exists():
        pipelines.run_merge(
            str(root / "sae"), str(root / "acts"), str(merged_dir), fast_params(sweep=False)
        )
    merged = load_sae(str(merged_dir))
    from integral_superposition.analysis.top_tokens import topk_sets_per_latent

    top = topk_sets_per_latent(merged, store, k=5)
    assert top.n_latents == merged.d_sae

    ids = tiny_backend.tokenizer(["the market rallied after the vote"], return_tensors="pt")
    ids = ids["input_ids"]
    clean = tiny_backend.logits(ids)
    j = int(top.values[:, 0].argmax())
    with steering.steer(tiny_backend, merged, "layer.2", steering.scale(j, 1.0)):
        same = tiny_backend.logits(ids)  # an edit that changes nothing keeps the output
    with steering.steer(tiny_backend, merged, "layer.2", steering.clamp(j, 50.0)):
        steered = tiny_backend.logits(ids)
    torch.testing.assert_close(same, clean, atol=1e-4, rtol=1e-4)
    assert (steered - clean).abs().max() > 1e-2


def test_sweep_returns_table_and_figure(setup):
    _root, store, sae = setup
    table, fig = merge.evaluate.sweep(sae, store, fast_params(), sizes=[48, 12])
    assert isinstance(fig, Figure)
    parts = ["original", "original_refit", "cluster", "random", "cluster", "random"]
    assert table["partition"].tolist() == parts
    assert table["k_prime"].tolist() == [96, 96, 48, 48, 12, 12]
    assert table[["fvu", "l0", "dead_frac"]].notna().all().all()
    # the random control has exactly the clustering's cluster sizes, so same K'
    assert (table.loc[1:, "fit_tokens"] > 0).all()
    # the refit control keeps the original codes (same L0) and only changes the decoder
    orig, refit = table.iloc[0], table.iloc[1]
    assert refit["l0"] == pytest.approx(orig["l0"], rel=1e-6)
    assert refit["fvu"] != orig["fvu"]
    no_refit, _ = merge.evaluate.sweep(sae, store, fast_params(refit=False), sizes=[48])
    assert no_refit["partition"].tolist() == ["original", "cluster", "random"]


def test_refit_identity_is_the_ridge_optimum_of_the_original_codes(setup):
    """The refit control decodes the original codes with the least-squares decoder: on the
    fit tokens it reconstructs at least as well as the original decoder does."""
    from integral_superposition.sae.metrics import explained_variance

    _root, store, sae = setup
    params = fast_params(ridge_lambda=0.0)
    refit, info = merge.evaluate.refit_identity(sae, params, store=store)
    assert refit.is_merged and refit.d_sae == sae.d_sae and info["fit_tokens"] > 0
    x = torch.cat([c for c in merge.evaluate._fit_chunks(store, params)]).float()
    with torch.no_grad():
        torch.testing.assert_close(refit.encode(x), sae.encode(x))
        fvu_orig = 1 - explained_variance(x, sae.reconstruct(x))
        fvu_refit = 1 - explained_variance(x, refit.reconstruct(x))
    assert fvu_refit < fvu_orig - 1e-3
    assert info["fit_fvu"] == pytest.approx(fvu_refit, abs=1e-4)


def test_bad_input_writes_nothing(setup, tmp_path):
    root, _store, _sae = setup
    out = tmp_path / "never"
    for params, match in (
        ({"n_clusters": 97}, "n_clusters=97"),
        ({"n_clusters": 0}, "greater than or equal to 1"),
        ({"similarity": {"decoder": 1, "bogus": 1}}, "unknown name"),
    ):
        with pytest.raises(ValueError, match=match):
            pipelines.run_merge(str(root / "sae"), str(root / "acts"), str(out), params)
        assert not out.exists()
    with pytest.raises(ValueError, match="source SAE's folder"):
        pipelines.run_merge(str(root / "sae"), str(root / "acts"), str(root / "sae"), fast_params())
    other = SparseAutoencoder(8, 16)
    save_sae(other, str(tmp_path / "small"))
    with pytest.raises(ValueError, match="d_model"):
        pipelines.run_merge(str(tmp_path / "small"), str(root / "acts"), str(out), fast_params())
    assert not out.exists()


def test_max_aggregation_and_distance_threshold(setup, tmp_path):
    root, _store, sae = setup
    out = str(tmp_path / "m")
    manifest = _merge(root, out, aggregation="max", distance_threshold=0.5, sweep=False)
    merged = load_sae(out)
    assert merged.merge_mode == "max" and manifest["merge"]["aggregation"] == "max"
    assert 1 <= merged.d_sae <= 96
    x = ActivationStore(str(root / "acts")).read(0, 100).float()
    with torch.no_grad():
        z = sae.encode(x)
        want = torch.zeros(100, merged.d_sae).scatter_reduce(
            1, merged.merge_index.expand(100, -1), z, reduce="amax", include_self=True
        )
        torch.testing.assert_close(merged.encode(x), want, atol=1e-4, rtol=1e-4)


def test_merges_take_their_dead_fraction_from_one_pass_of_the_original(setup, monkeypatch):
    """A merged latent of non-negative codes is dead exactly when all its members are: the
    evaluation's dead fraction and token count equal a full pass of each merged SAE, and the
    rows outside the held-out split are encoded once, by the original."""
    from integral_superposition.sae import metrics as sm

    _root, store, sae = setup
    dead_sae = SparseAutoencoder(sae.d_in, sae.d_sae, architecture="topk", top_k=6, seed=0)
    dead_sae.load_state_dict(sae.state_dict())
    with torch.no_grad():
        dead_sae.b_enc[:8] = -1e6  # latents 0..7 never fire
    dead_sae.eval()
    params = fast_params(ce_docs=0)
    # latents 0..7 in 4 pairs of dead latents, the rest in pairs of live ones
    labels = np.concatenate([np.arange(8) // 2, 4 + np.arange(88) // 2])
    labels[8] = 0  # a live latent joins the first dead pair, which then fires
    _, labels = np.unique(labels, return_inverse=True)
    merged = merge.refit.build_merged_sae(dead_sae, labels, np.unique(labels, return_index=True)[1])
    ref = merge.evaluate.reference_metrics(dead_sae, store, params)
    assert ref.extra is not None and (ref.extra.fires[:8] == 0).all()
    seen = []
    stats = sm.latent_stats
    monkeypatch.setattr(
        sm,
        "latent_stats",
        lambda s, st, mask=None, *a, **k: (
            seen.append(int(mask.sum())) or stats(s, st, mask, *a, **k)
        ),
    )
    table = merge.evaluate.compare(dead_sae, merged, store, params, reference=ref).set_index("sae")
    monkeypatch.setattr(sm, "latent_stats", stats)
    n_test = int(store.split_mask("test", params.test_fraction, params.split_seed).sum())
    assert seen and all(n <= n_test for n in seen)  # no pass over the rows outside the split
    full = sm.evaluate_sae(merged, store, split="test", chunk_tokens=params.chunk_tokens)
    assert table.loc["merged", "dead_frac"] == pytest.approx(full["dead_frac"])
    assert table.loc["merged", "dead_tokens"] == full["dead_tokens"]
    assert full["dead_frac"] >= 3 / merged.d_sae  # the three all-dead pairs
    orig = sm.evaluate_sae(dead_sae, store, split="test", chunk_tokens=params.chunk_tokens)
    assert table.loc["original", "dead_frac"] == pytest.approx(orig["dead_frac"])


def test_projection_aggregation_publishes_its_weights(setup, tmp_path):
    root, store, sae = setup
    out = str(tmp_path / "p")
    manifest = _merge(root, out, aggregation="projection", sweep=False)
    merged = load_sae(out)
    assert manifest["merge"]["aggregation"] == "projection" and merged.merge_mode == "sum"
    mm = pd.read_parquet(os.path.join(out, "merge_map.parquet"))
    w = merged.merge_weight.double().numpy()
    np.testing.assert_array_equal(mm["weight"].to_numpy(), w)
    assert (w >= 0).all() and (w[mm["cluster_size"].to_numpy() > 1] != 1).any()
    x = store.read(0, 100).float()
    with torch.no_grad():
        want = torch.zeros(100, merged.d_sae).index_add_(
            1, merged.merge_index, sae.encode(x) * merged.merge_weight
        )
        torch.testing.assert_close(merged.encode(x), want, atol=1e-5, rtol=1e-5)
    rows = pd.read_parquet(os.path.join(out, "merge_eval.parquet")).set_index("sae")
    assert rows.loc["merged", "fit_fvu"] <= rows.loc["merged", "fvu"] * 2


def test_a_member_of_weight_zero_does_not_make_its_cluster_fire(setup):
    """The dead fraction taken from the original's firing counts only members that count."""
    from integral_superposition.sae import metrics as sm

    _root, store, sae = setup
    dead_sae = SparseAutoencoder(sae.d_in, sae.d_sae, architecture="topk", top_k=6, seed=0)
    dead_sae.load_state_dict(sae.state_dict())
    with torch.no_grad():
        dead_sae.b_enc[:2] = -1e6  # latents 0 and 1 never fire
    dead_sae.eval()
    params = fast_params(ce_docs=0)
    labels = np.concatenate([[0, 0, 0], 1 + np.arange(93) // 3])  # latent 2 joins the dead pair
    weights = np.ones(96, dtype=np.float32)
    weights[2] = 0.0  # ... with weight 0: the cluster never fires
    medoids = np.unique(labels, return_index=True)[1]
    merged = merge.refit.build_merged_sae(dead_sae, labels, medoids, weights=weights)
    ref = merge.evaluate.reference_metrics(dead_sae, store, params)
    assert ref.extra is not None and ref.extra.fires[2] > 0
    table = merge.evaluate.compare(dead_sae, merged, store, params, reference=ref).set_index("sae")
    full = sm.evaluate_sae(merged, store, split="test", chunk_tokens=params.chunk_tokens)
    assert table.loc["merged", "dead_frac"] == pytest.approx(full["dead_frac"])
    assert full["dead_frac"] >= 1 / merged.d_sae
