"""The merged SAE flattened to a plain SAE and fine-tuned with the training recipe."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from _merge_setup import store_and_topk_sae
from integral_superposition import pipelines, storage
from integral_superposition.config import SAEConfig
from integral_superposition.merge import MergeParams
from integral_superposition.merge.finetune import finetune_merged, finetune_recipe, flatten_merged
from integral_superposition.merge.refit import build_merged_sae
from integral_superposition.pipelines.report import merge_section
from integral_superposition.sae import SparseAutoencoder, load_sae, read_sae_manifest, save_sae


@pytest.fixture(scope="module")
def setup(tiny_backend, tmp_path_factory):
    """A store of 240 demo headlines at layer 2 of tiny:gemma and a TopK SAE (K=96) on it,
    saved with the training config the fine-tune takes as its recipe."""
    root = tmp_path_factory.mktemp("merge_ft")
    store, sae = store_and_topk_sae(tiny_backend, root)
    recipe = SAEConfig(
        k=96, architecture="topk", top_k=6, batch_size=64, lr=1e-3, lr_warmup_steps=2,
        log_every=2, device="cpu", seed=3,
    )  # fmt: skip
    save_sae(sae, str(root / "sae"), metadata={"hook_name": "layer.2"}, training_config=recipe)
    return root, store, sae


def fast_params(**kw) -> MergeParams:
    base = {"fraction": 0.25, "top_n": 10, "sweep_fractions": [0.5, 0.125], "chunk_tokens": 512}
    return MergeParams(**{**base, **kw})


def weighted_merge(k=64, d=12, n_c=16, seed=0):
    """A TopK SAE with biases and decoder rows of varied norms, and a weighted sum merge of it."""
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d, k, architecture="topk", top_k=5, seed=seed)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(k, generator=g))
        sae.b_dec.copy_(torch.randn(d, generator=g))
        sae.W_dec.mul_(torch.rand(k, 1, generator=g) + 0.5)
    labels = np.arange(k) % n_c
    medoids = np.arange(n_c)
    w = np.random.default_rng(seed).uniform(0.2, 2.0, k)
    return sae.eval(), build_merged_sae(sae, labels, medoids, weights=w), labels, w


@torch.no_grad()
def test_flattened_sae_encodes_as_documented():
    sae, merged, labels, w = weighted_merge()
    flat = flatten_merged(merged)
    assert not flat.is_merged and flat.d_sae == 16 and flat.d_pre == 16
    assert flat.architecture == "topk" and flat.top_k == sae.top_k
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(5))
    m = torch.zeros(64, 16, dtype=torch.float64)
    m[torch.arange(64), torch.from_numpy(labels)] = torch.from_numpy(w)
    norms = merged.W_dec.double().norm(dim=1)
    # pre'_j = ||W_dec[j]|| * sum_{i in C_j} w_i pre_i, with unit decoder rows
    want = (sae.pre_activations(x).double() @ m) * norms
    torch.testing.assert_close(flat.pre_activations(x).double(), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(flat.W_dec.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(flat.b_dec, merged.b_dec)
    z = flat.encode(x)
    assert bool(((z > 0).sum(-1) <= sae.top_k).all()) and float((z > 0).sum(-1).float().mean()) > 4
    # a selected latent decodes to the merged decoder row times its weighted pre-activation
    pre = (sae.pre_activations(x).double() @ m).float()
    on = z > 0
    torch.testing.assert_close(
        flat.decode(z), (pre * on) @ merged.W_dec + merged.b_dec, atol=1e-4, rtol=1e-4
    )


@torch.no_grad()
def test_identity_merge_of_a_unit_row_sae_flattens_to_the_same_sae():
    sae = SparseAutoencoder(12, 40, architecture="topk", top_k=4, seed=1)
    sae.b_enc.normal_()
    ident = np.arange(40)
    flat = flatten_merged(build_merged_sae(sae, ident, ident))
    x = torch.randn(100, 12)
    torch.testing.assert_close(flat.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flat.reconstruct(x), sae.reconstruct(x), atol=1e-5, rtol=1e-5)


def test_flatten_refuses_what_does_not_flatten():
    sae, _merged, labels, _w = weighted_merge()
    with pytest.raises(ValueError, match="expected a merged SAE"):
        flatten_merged(sae)
    maxed = build_merged_sae(sae, labels, np.arange(16), mode="max")
    with pytest.raises(ValueError, match="merge_mode='max'"):
        flatten_merged(maxed)


def planted(n=6000, d=16, k=32, seed=0):
    """Activations of ``k`` sparse unit features (3 active per token) and a TopK SAE that reads
    them exactly; merging pairs of features then loses half of the directions."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, d, generator=g)
    rows = rows / rows.norm(dim=1, keepdim=True)
    idx = torch.rand(n, k, generator=g).argsort(dim=1)[:, :3]
    z = torch.zeros(n, k).scatter_(1, idx, torch.rand(n, 3, generator=g) + 0.5)
    x = z @ rows + 0.01 * torch.randn(n, d, generator=g)
    sae = SparseAutoencoder(d, k, architecture="topk", top_k=3, seed=0)
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(torch.linalg.pinv(rows))
    return sae.eval(), x


def _fvu(sae: SparseAutoencoder, x: torch.Tensor) -> float:
    with torch.no_grad():
        r = x - sae.reconstruct(x)
        return float(r.pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_finetune_lowers_the_training_loss_on_a_planted_store():
    sae, x = planted()
    labels = np.arange(32) // 2
    flat = flatten_merged(build_merged_sae(sae, labels, np.arange(0, 32, 2)))
    before = _fvu(flat, x)
    recipe = finetune_recipe(
        SAEConfig(k=32, architecture="topk", top_k=3, batch_size=200, lr=3e-3, lr_warmup_steps=2,
                  log_every=5, device="cpu"),
        sae, epochs=3.0, test_fraction=0.05,
    ).model_copy(update={"k": 16})  # fmt: skip
    record = finetune_merged(flat, x, recipe)
    after = _fvu(flat, x)
    assert record["finetune_steps"] == 90 and record["finetune_tokens"] == 18000
    assert record["finetune_cpu_seconds"] > 0
    assert record["finetune_train_fvu_last"] < record["finetune_train_fvu_first"]
    assert after < 0.8 * before, (before, after)
    assert flat.top_k == 3 and not flat.is_merged


def test_bad_budget_is_refused_naming_field_and_value(setup, tmp_path):
    root, _store, _sae = setup
    for bad, why in (
        (-0.5, "greater than or equal to 0"),
        (float("nan"), "finite"),
        ("x", "number"),
    ):
        with pytest.raises(ValueError, match=why) as err:
            MergeParams(finetune_epochs=bad)
        assert "finetune_epochs" in str(err.value) and str(bad) in str(err.value)
    with pytest.raises(ValueError, match=r"finetune_epochs=0.5 with split_seed=3"):
        MergeParams(finetune_epochs=0.5, split_seed=3)
    with pytest.raises(ValueError, match=r"finetune_epochs=0.5 with aggregation='max'"):
        MergeParams(finetune_epochs=0.5, aggregation="max")
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match="finetune_epochs"):
        pipelines.run_merge(str(root / "sae"), str(root / "acts"), str(out),
                            {"finetune_epochs": -1})  # fmt: skip
    assert not out.exists()


def test_finetuned_merge_and_its_random_control_publish_and_load(setup, tmp_path):
    root, store, sae = setup
    out = str(tmp_path / "ft")
    manifest = pipelines.run_merge(
        str(root / "sae"),
        str(root / "acts"),
        out,
        fast_params(finetune_epochs=1.0, sweep_fractions=[0.25, 0.125]),
    )
    assert storage.verify_output(out, deep=True)
    rec = manifest["merge"]["finetune"]
    assert rec["finetune_epochs"] == 1.0 and rec["finetune_steps"] > 0
    # the recipe is the source SAE's training config, at the merged width
    assert rec["recipe"]["lr"] == 1e-3 and rec["recipe"]["batch_size"] == 64
    assert rec["recipe"]["seed"] == 3 and rec["recipe"]["epochs"] == 1.0

    sw = pd.read_parquet(os.path.join(out, "merge_sweep.parquet"))
    tuned = sw[sw["partition"].isin(["cluster", "random"])]
    assert tuned["finetuned"].astype(bool).all()
    assert not sw.loc[sw["partition"] == "original_refit", "finetuned"].astype(bool).any()
    for _k, grp in tuned.groupby("k_prime"):  # the control gets exactly the same budget
        assert set(grp["partition"]) == {"cluster", "random"}
        for col in ("finetune_epochs", "finetune_steps", "finetune_tokens"):
            assert grp[col].nunique() == 1, col
    assert (tuned["l0"] > 0).all() and (tuned["l0"] <= sae.top_k).all()
    assert tuned["enrichment_retention"].notna().all()

    ev = pd.read_parquet(os.path.join(out, "merge_eval.parquet")).set_index("sae")
    assert bool(ev.loc["merged", "finetuned"]) and ev.loc["merged", "n_latents"] == 24
    # the published SAE is the sweep's fine-tuned K/4 clustering (built once, reused)
    row = sw[(sw["partition"] == "cluster") & (sw["k_prime"] == 24)].iloc[0]
    assert ev.loc["merged", "fvu"] == pytest.approx(row["fvu"])

    ref = SimpleNamespace(
        kind="sae", name="m", uri=out, summary={"n_latents_before": 96, "n_latents_after": 24}
    )
    text = merge_section(ref, None).text
    assert (
        "96 latents merged into 24, flattened to a plain SAE and fine-tuned for 1 epoch (" in text
    )

    merged = load_sae(out)
    assert not merged.is_merged and merged.d_sae == 24 and merged.top_k == sae.top_k
    assert read_sae_manifest(out)["sae"]["k"] == 24
    x = store.read(0, 200).float()
    again = str(tmp_path / "again")
    save_sae(merged, again)
    back = load_sae(again)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), merged.encode(x))
        held = merged.reconstruct(x)
    assert float(1 - (x - held).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) > 0
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(out, device="cpu")
    assert theirs.cfg.architecture() == "topk" and theirs.cfg.d_sae == 24
    with torch.no_grad():
        z_ours, z_theirs = merged.encode(x), theirs.encode(x)
        assert float((z_ours - z_theirs).abs().max()) <= 1e-4
        assert float((merged.decode(z_ours) - theirs.decode(z_ours)).abs().max()) <= 1e-4


def test_finetuned_merge_without_a_sweep_is_compared_by_its_clusters(setup, tmp_path):
    root, _store, _sae = setup
    out = str(tmp_path / "nosweep")
    pipelines.run_merge(
        str(root / "sae"), str(root / "acts"), out, fast_params(finetune_epochs=0.5, sweep=False)
    )
    ev = pd.read_parquet(os.path.join(out, "merge_eval.parquet")).set_index("sae")
    assert ev.index.tolist() == ["original", "original_refit", "merged"]
    assert bool(ev.loc["merged", "finetuned"]) and ev.loc["merged", "finetune_epochs"] == 0.5
    assert 0 <= ev.loc["merged", "enrichment_retention"] <= 1
    assert ev.loc["merged", "n_enriched_before"] == ev.loc["original", "n_enriched"]
