"""Label enrichment: Fisher against scipy, planted features, shuffled controls, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from integral_superposition.activations import ArraySource
from integral_superposition.analysis.enrichment import (
    auroc_from_hist,
    best_labels,
    document_enrichment,
    fisher_enrichment,
    fisher_table,
)
from integral_superposition.analysis.scan import scan_latents
from integral_superposition.sae import SparseAutoencoder
from scipy.stats import false_discovery_control, fisher_exact
from sklearn.metrics import roc_auc_score


def test_fisher_matches_scipy_on_random_tables():
    rng = np.random.default_rng(0)
    K, C = 120, 4
    counts = rng.integers(20, 400, C)
    N = int(counts.sum())
    set_size = rng.integers(0, 120, K)
    in_set = np.zeros((K, C), np.int64)
    for j in range(K):  # a random draw without replacement from the population
        pop = np.repeat(np.arange(C), counts)
        # skew some latents towards one label so that tiny p-values are tested too
        w = np.where(pop == j % C, 1 + 8 * (j % 3), 1.0)
        pick = rng.choice(N, size=set_size[j], replace=False, p=w / w.sum())
        in_set[j] = np.bincount(pop[pick], minlength=C)
    t = fisher_table(in_set, set_size, counts, [f"c{c}" for c in range(C)])
    checked = 0
    for row in t.itertuples(index=False):
        a = row.in_set
        n = row.set_size
        nc = counts[row.label_id]
        table = [[a, n - a], [nc - a, N - nc - (n - a)]]
        p = fisher_exact(table, alternative="greater").pvalue if n > 0 else 1.0
        if p > 1e-290:
            assert abs(row.p - p) <= 1e-9 * p, (row.latent, row.label, row.p, p)
            checked += 1
        haldane = ((a + 0.5) * (N - nc - (n - a) + 0.5)) / ((n - a + 0.5) * (nc - a + 0.5))
        if n > 0:
            assert row.odds_ratio == pytest.approx(haldane, rel=1e-12)
            assert row.log_odds == pytest.approx(np.log(haldane), rel=1e-12, abs=1e-12)
    assert checked > K * C * 0.9
    assert t["p"].min() < 1e-10  # the skewed latents
    live = t["set_size"] > 0
    np.testing.assert_allclose(
        t.loc[live, "q"], false_discovery_control(t.loc[live, "p"]), rtol=1e-12
    )


def _planted(seed=0, n_docs=150, doc_len=20, C=3, K=24, d=16, planted=(5, 1)):
    """Activations where latent j fires only on tokens of documents labelled c."""
    rng = np.random.default_rng(seed)
    doc_label = rng.integers(0, C, n_docs)
    doc = np.repeat(np.arange(n_docs), doc_len)
    lab = doc_label[doc]
    N = doc.size
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    x = 0.2 * rng.normal(size=(N, d))
    j, c = planted
    hit = (lab == c) & (rng.random(N) < 0.4)
    x[hit] += 3.0 * basis[0]
    sae = SparseAutoencoder(d, K, seed=seed + 1)
    with torch.no_grad():
        W = torch.tensor(rng.normal(size=(K, d)), dtype=torch.float32)
        W /= W.norm(dim=1, keepdim=True)
        W[j] = torch.tensor(basis[0], dtype=torch.float32)
        W[(j + 1) % K] = 0.0  # with a negative bias: a latent that never fires
        sae.W_enc.copy_(W.T)
        sae.W_dec.copy_(W)
        sae.b_enc.fill_(-0.15)
        sae.b_enc[j] = -1.5
        sae.b_enc[(j + 1) % K] = -1.0
    src = ArraySource(
        [x.astype(np.float32)],
        doc_ids=doc,
        token_ids=np.arange(N) % 97,
        positions=np.tile(np.arange(doc_len), n_docs),
        labels=lab,
        label_names=[f"topic{i}" for i in range(C)],
    )
    docs = pd.DataFrame({"doc_id": np.arange(n_docs), "label": doc_label})
    return src, sae, docs


def test_planted_feature_is_found_token_and_document_level():
    src, sae, docs = _planted()
    scan = scan_latents(sae, src, n_top=40, hist_bins=64, doc_threshold=0.0)
    t = fisher_enrichment(scan.top, src.labels)
    row = t[(t.latent == 5) & (t.label == "topic1")].iloc[0]
    assert row.q < 1e-6 and row.significant and row.purity == 1.0 and row.frac_in_set == 1.0
    assert row.auroc > 0.65
    others = t[(t.latent == 5) & (t.label != "topic1")]
    assert (others.q > 0.05).all()
    d = document_enrichment(scan.doc_pairs, docs, sae.d_sae, label_names=src.label_names)
    drow = d[(d.latent == 5) & (d.label == "topic1")].iloc[0]
    assert drow.q < 1e-6 and drow.level == "document"
    dead = t[t.latent == 6]
    assert (
        (~dead.fires).all()
        and (dead.p == 1).all()
        and (dead.q == 1).all()
        and dead.log_odds.isna().all()
    )
    assert best_labels(t).set_index("latent").loc[5, "best_label"] == "topic1"


def test_shuffled_labels_find_nothing():
    src, sae, docs = _planted()
    rng = np.random.default_rng(123)
    shuffled_docs = docs.assign(label=rng.permutation(docs["label"].to_numpy()))
    shuffled_tokens = shuffled_docs["label"].to_numpy()[src.doc_ids]
    scan = scan_latents(sae, src, n_top=40, labels=shuffled_tokens, hist_bins=32, doc_threshold=0.0)
    t = fisher_enrichment(scan.top, shuffled_tokens, label_names=src.label_names)
    d = document_enrichment(scan.doc_pairs, shuffled_docs, sae.d_sae, label_names=src.label_names)
    assert not (t.q < 0.05).any()
    assert not (d.q < 0.05).any()


def test_auroc_from_histogram_close_to_exact():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    lab = rng.integers(0, 3, 3000)
    x[lab == 2, 0] += 1.0  # make label 2 shift the activations
    sae = SparseAutoencoder(16, 8, seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(-0.2)
    src = ArraySource([x], labels=lab)
    top = scan_latents(sae, src, n_top=10, hist_bins=96).top
    auc = auroc_from_hist(top.label_hist, top.label_counts)
    z = sae.encode(torch.from_numpy(x)).detach().numpy()
    for j in range(8):
        for c in range(3):
            assert auc[j, c] == pytest.approx(roc_auc_score(lab == c, z[:, j]), abs=5e-3)


def test_seed_inputs_and_string_labels():
    labels = np.array(["sport", "other"] * 50)
    sets = [set(range(0, 40, 2)), set(range(1, 41, 2)), set()]
    t = fisher_enrichment(sets, labels)
    assert set(t["label"].astype(str)) == {"other", "sport"}
    assert len(t) == 6
    sport = t[(t.latent == 0) & (t.label == "sport")].iloc[0]
    assert sport.in_set == 20 and sport.q < 1e-6
    t2 = fisher_enrichment({0: np.arange(0, 40, 2), 1: np.arange(1, 41, 2)}, labels)
    np.testing.assert_allclose(t2["p"], t["p"][:4])


def test_bad_input_is_rejected():
    src, sae, docs = _planted(n_docs=30)
    top = scan_latents(sae, src, n_top=5).top
    with pytest.raises(
        ValueError, match="labels_global has 599 labels, but the top sets were computed over 600"
    ):
        fisher_enrichment(top, src.labels[:-1])
    with pytest.raises(ValueError, match="single class"):
        fisher_enrichment(top, np.zeros(600, int))
    with pytest.raises(ValueError, match="not aligned"):
        fisher_enrichment([{0, 700}], np.arange(600) % 2)
    with pytest.raises(ValueError, match="doc_labels has no label for 1 document ids"):
        document_enrichment(np.array([[0, 1], [999, 2]]), docs, sae.d_sae)
    with pytest.raises(ValueError, match="single class"):
        document_enrichment(np.array([[0, 1]]), docs.assign(label=0), sae.d_sae)
    with pytest.raises(ValueError, match="non-negative"):
        fisher_enrichment([{0}], np.array([-1, 0, 1]))
    with pytest.raises(ValueError, match="alpha"):
        fisher_enrichment([{0}], np.array([0, 1]), alpha=2)


def test_enrichment_and_scan_still_export_the_names_their_parts_define():
    """The Fisher tests, rank statistics, label encoding and the scan's buffers live in their
    own modules; every public name stays importable from its old module, as the same object."""
    from integral_superposition.analysis import accumulate, enrichment, label_ids, ranks, scan

    for part in (ranks, label_ids):
        for name in part.__all__:
            if name in enrichment.__all__:
                assert getattr(enrichment, name) is getattr(part, name), name
    assert set(ranks.__all__) <= set(enrichment.__all__)
    assert {"align_documents", "encode_label_array"} <= set(enrichment.__all__)
    for name in ("HIST_LOG10_RANGE", "LatentScan", "TopKSets"):
        assert getattr(scan, name) is getattr(accumulate, name)
    assert set(enrichment.__all__) <= set(dir(enrichment))
    assert set(scan.__all__) <= set(dir(scan))
