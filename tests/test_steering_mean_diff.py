"""Steering along a label's mean difference: each label's mean document code, the latents that
fire more on its documents than on the others', and a sweep that adds strength x each
latent's difference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from integral_superposition import steering
from integral_superposition.activations import ArraySource
from integral_superposition.analysis.stats import document_codes, label_mean_codes
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.steering.picks import mean_diff_latents, target_latents
from integral_superposition.viz.templates import latent_list


def test_label_mean_codes_average_documents_not_tokens():
    """Two labels; label 0 has a long and a short document. Each label's row is the mean of its
    documents' mean codes, so the short document counts as much as the long one."""
    rng = np.random.default_rng(0)
    d, K = 8, 16
    sae = SparseAutoencoder(d, K, seed=1)
    doc_ids = np.array([0] * 9 + [1] * 2 + [2] * 4 + [3] * 3)
    labels = np.array([0] * 11 + [1] * 7)
    x = rng.normal(size=(doc_ids.size, d)).astype(np.float32)
    src = ArraySource([x], doc_ids=doc_ids, labels=labels, label_names=["a", "b"])
    _, codes = document_codes(sae, src, "mean")
    want = np.stack([codes[[0, 1]].mean(0), codes[[2, 3]].mean(0)])
    got, n_docs = label_mean_codes(sae, src, chunk_tokens=5)
    assert n_docs.tolist() == [2, 2]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    z = sae.encode(torch.from_numpy(x)).detach().numpy()
    assert not np.allclose(got[0], z[:11].mean(0), atol=1e-4)  # not the token mean
    # a mask keeps documents 0 and 2 only; a label without documents gets NaN
    mask = np.isin(doc_ids, [0, 2])
    got, n_docs = label_mean_codes(sae, src, mask=mask)
    np.testing.assert_allclose(got, codes[[0, 2]], rtol=1e-5, atol=1e-6)
    got, n_docs = label_mean_codes(sae, src, mask=doc_ids == 0)
    assert n_docs.tolist() == [1, 0] and np.isnan(got[1]).all()
    with pytest.raises(ValueError, match="mask has shape"):
        label_mean_codes(sae, src, mask=np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="document ids and labels"):
        label_mean_codes(sae, ArraySource([x]))


def test_mean_diff_latents_rank_each_labels_latents_against_the_other_labels():
    codes = np.array([
        [5.0, 1.0, 0.0, 3.0],
        [1.0, 1.0, 4.0, 0.0],
        [0.0, 1.0, 0.0, 9.0],
    ])  # fmt: skip
    t = mean_diff_latents(codes, ["a", "b", "c"], per_label=3)
    a = t[t["label"] == "a"]
    # a: latent 0 gains 5 - (1 + 0) / 2 = 4.5; latent 3 gains 3 - 4.5 < 0, latent 1 gains 0
    assert a["latent"].tolist() == [0] and a["mean_diff"].tolist() == [4.5]
    assert t[t["label"] == "b"]["latent"].tolist() == [2]  # latent 0: 1 - 2.5 < 0
    assert t[t["label"] == "c"][["latent", "mean_diff"]].values.tolist() == [[3, 7.5]]
    # each other label weighs the same, whatever its size: c's 9 counts half for a and b
    assert t[(t["label"] == "b") & (t["latent"] == 2)]["mean_diff"].item() == 4.0
    one = mean_diff_latents(codes, ["a", "b", "c"], labels=["b"], per_label=1)
    assert one.values.tolist() == [["b", 2, 4.0]]
    with pytest.raises(ValueError, match=r"label_codes has shape \(3, 4\): expected \[2, K\]"):
        mean_diff_latents(codes, ["a", "b"])
    with pytest.raises(ValueError, match=r"\['z'\] not among"):
        mean_diff_latents(codes, ["a", "b", "c"], labels=["z"])
    with pytest.raises(ValueError, match="per_label=0"):
        mean_diff_latents(codes, ["a", "b", "c"], per_label=0)
    # a label without documents (NaN row) has no picks and is left out of the others' reference
    codes[2] = np.nan
    t = mean_diff_latents(codes, ["a", "b", "c"], per_label=4)
    assert set(t["label"]) == {"a", "b"} and a["latent"].iloc[0] in t["latent"].tolist()
    assert t[t["label"] == "a"]["mean_diff"].tolist() == [4.0, 3.0]


def test_target_latents_by_mean_diff_join_the_enrichment_where_it_exists():
    names = ["a", "b"]
    tok = pd.DataFrame({
        "latent": np.repeat(np.arange(3), 2),
        "label": pd.Categorical(names * 3, categories=names),
        "q": [1e-9, 1, 0.5, 0.5, 1, 1e-4], "log_odds": [2, -1, 0.1, -0.1, -1, 2],
        "frac_in_set": 0.9,
    })  # fmt: skip
    codes = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 2.0]])
    p = steering.SteeringParams(mode="mean_diff", rank_by="mean_diff", labels=["a"], group_size=2)
    picks = target_latents(p.model_copy(update={"per_label": 2}), tok, None, names,
                           label_codes=codes)  # fmt: skip
    assert picks["latent"].tolist() == [1, 0] and picks["mean_diff"].tolist() == [3.0, 1.0]
    assert picks["q"].iloc[1] == 1e-9 and picks["q"].iloc[0] == 0.5  # not filtered by q
    with pytest.raises(ValueError, match="rank_by='mean_diff' needs label_codes"):
        target_latents(p, tok, None, names)


def test_mean_diff_params_go_together():
    with pytest.raises(ValueError, match="mode='mean_diff' and rank_by='mean_diff' together"):
        steering.SteeringParams(mode="mean_diff")
    with pytest.raises(ValueError, match="mode='clamp_max' with rank_by='mean_diff'"):
        steering.SteeringParams(rank_by="mean_diff")
    with pytest.raises(ValueError, match="latents='auto'"):
        steering.SteeringParams(mode="mean_diff", rank_by="mean_diff", latents=[3])


def test_a_mean_diff_sweep_adds_each_members_difference(demo_store, tiny_backend):
    """End to end: the group is the label's latents with the largest difference of mean
    document code on the training split; every steered row adds strength x each member's
    difference, and the random control as much to as many other latents, norm-matched."""
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    label = demo_store.label_names[0]
    p = steering.SteeringParams(
        labels=[label], mode="mean_diff", rank_by="mean_diff", group_size=6, strengths=[3.0],
        controls=["random"], prompts=["the market", "news:"], max_new_tokens=3,
        samples_per_prompt=1, do_sample=False, own_label_prompts=2, vocab_per_label=20,
        classifier_fit_generations=2, classifier_test_fraction=0.25,
    )  # fmt: skip
    ev = steering.evaluate_steering(tiny_backend, sae, demo_store, p)
    pick = ev.picks.iloc[0]
    codes, _ = label_mean_codes(sae, demo_store, mask=demo_store.split_mask("train", 0.25, 0))
    want = mean_diff_latents(codes, demo_store.label_names, labels=[label], per_label=6)
    assert list(pick["members"]) == want["latent"].tolist()
    np.testing.assert_allclose(pick["member_mean_diffs"], want["mean_diff"], rtol=1e-6)
    t = ev.table
    row = t[t["control"] == "steer"].iloc[0]
    assert row["mode"] == "mean_diff" and list(row["steered_latents"]) == list(pick["members"])
    assert row["edit_value"] == pytest.approx(3.0 * want["mean_diff"].iloc[0])
    rand = t[t["control"] == "random"].iloc[0]
    assert not set(rand["steered_latents"]) & set(pick["members"])
    assert rand["edit_value"] == pytest.approx(
        3.0 * want["mean_diff"].iloc[0] * pick["random_ratios"][0]
    )
    # the edit moves the text: the steered continuations differ from the unsteered ones
    g = ev.generations
    steered = g[g["control"] == "steer"]["text"].tolist()
    assert steered != g[g["set"] == "unsteered"]["text"].tolist()[: len(steered)]


def test_latent_list_names_a_large_group_in_one_short_line():
    assert latent_list([3, 5], "+", "L") == "L3+L5"
    text = latent_list(range(256), "+", "L", limit=3)
    assert text == "L0+L1+L2+... (256 latents)"


def test_mean_diff_mode_brings_its_own_strengths_and_group_unless_given():
    p = steering.SteeringParams(mode="mean_diff", rank_by="mean_diff")
    assert p.strengths == [4.0, 6.0, 8.0, 10.0, 12.0, 16.0] and p.group_size == 256
    p = steering.SteeringParams(
        mode="mean_diff", rank_by="mean_diff", strengths=[2.0, 1.0], group_size=32
    )
    assert p.strengths == [1.0, 2.0] and p.group_size == 32
    assert steering.SteeringParams().strengths == [0.125, 0.25, 0.5, 1.0, 2.0]
