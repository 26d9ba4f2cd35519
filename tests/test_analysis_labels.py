"""Document-level enrichment, the shuffled-label control and redundancy grouping on planted
synthetic stores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from integral_superposition.activations import ArraySource
from integral_superposition.analysis.control import shuffled_label_control
from integral_superposition.analysis.enrichment import (
    auroc_from_hist,
    document_enrichment,
    lead_level,
    max_auroc,
)
from integral_superposition.analysis.labels import label_enrichment
from integral_superposition.analysis.redundancy import redundancy_groups, top_latents_table
from integral_superposition.analysis.scan import scan_latents
from integral_superposition.sae import SparseAutoencoder
from sklearn.metrics import roc_auc_score

D_MODEL, K, C = 16, 12, 4
DOC_LEN, N_DOCS = 10, 160


def _store(planted: bool = True, seed: int = 0):
    """Documents of ``DOC_LEN`` tokens with random labels 0..3. With ``planted``, one token of
    every label-0 document carries direction e0 (the planted label latent's input)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, N_DOCS)
    labels[:C] = np.arange(C)  # every label occurs
    x = rng.normal(0, 0.3, (N_DOCS * DOC_LEN, D_MODEL)).astype(np.float32)
    x[:, 0] = 0.0
    doc_ids = np.repeat(np.arange(N_DOCS), DOC_LEN)
    if planted:
        for doc in np.flatnonzero(labels == 0):
            x[doc * DOC_LEN + rng.integers(0, DOC_LEN), 0] = 3.0 + rng.random()
    src = ArraySource(
        [x],
        doc_ids=doc_ids,
        labels=labels[doc_ids],
        positions=np.tile(np.arange(DOC_LEN), N_DOCS),
        token_ids=rng.integers(0, 50, doc_ids.size),
        label_names=[f"topic{c}" for c in range(C)],
    )
    return src, labels


def _sae(duplicate: bool = False) -> SparseAutoencoder:
    """ReLU SAE: latent 0 reads e0 (fires only on planted tokens); with ``duplicate``, latent 1
    is a copy of it (the same encoder and decoder direction); the rest read random directions
    of the noise."""
    sae = SparseAutoencoder(D_MODEL, K, architecture="relu", seed=4)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        W = torch.randn(D_MODEL, K, generator=g)
        W[0] = 0.0
        W /= W.norm(dim=0, keepdim=True)
        W[:, 0] = 0.0
        W[0, 0] = 1.0
        if duplicate:
            W[:, 1] = W[:, 0]
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W.T)
        sae.b_enc.fill_(-0.2)
        sae.b_enc[0] = -1.0
        if duplicate:
            sae.b_enc[1] = -1.0
        sae.b_dec.zero_()
    return sae


def _doc_labels(labels: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"doc_id": np.arange(labels.size), "label": labels})


def test_document_level_finds_the_planted_latent_the_token_level_misses():
    src, labels = _store()
    scan = scan_latents(
        _sae(), src, n_top=20, labels=src.labels, hist_bins=64, doc_threshold=0.0, stats=False
    )
    doc = document_enrichment(
        scan.doc_pairs, _doc_labels(labels), K, doc_max=scan.doc_max,
        label_names=src.label_names,
    )  # fmt: skip
    row = doc[(doc["latent"] == 0) & (doc["label"] == "topic0")].iloc[0]
    assert row["level"] == "document"
    assert row["q"] < 1e-30 and row["odds_ratio"] > 100
    assert row["auroc"] == pytest.approx(1.0)
    assert row["in_set"] == (labels == 0).sum() == row["set_size"]
    # the token level: the latent fires on one token in ten of its label's documents
    tok_auroc = auroc_from_hist(scan.top.label_hist, scan.top.label_counts)[0, 0]
    assert 0.5 < tok_auroc < 0.6
    # the document AUROC scores documents by the latent's maximum: sklearn agrees
    dense = np.zeros((N_DOCS, K))
    dense[scan.doc_pairs[:, 0], scan.doc_pairs[:, 1]] = scan.doc_max
    for j in (0, 3, 7):
        for c in range(C):
            exp = roc_auc_score(labels == c, dense[:, j])
            got = doc[(doc["latent"] == j) & (doc["label_id"] == c)]["auroc"].iloc[0]
            assert got == pytest.approx(exp, abs=1e-12)
    with pytest.raises(ValueError, match=r"doc_max has shape \(3,\)"):
        document_enrichment(scan.doc_pairs, _doc_labels(labels), K, doc_max=np.zeros(3))


def test_max_auroc_with_no_firing_is_one_half_and_lead_rule():
    out = max_auroc(np.zeros(0, int), np.zeros(0, int), np.zeros(0), np.array([3, 4]), 2)
    np.testing.assert_array_equal(out, np.full((2, 2), 0.5))
    assert lead_level(np.array([10, 20, 64, 80])) == "document"
    assert lead_level(np.array([65, 70, 300])) == "token"
    assert lead_level(np.array([100, 100]), max_median_tokens=128) == "document"


def test_shuffled_labels_give_no_significant_tests():
    # no signal: the labels are unrelated to the activations
    src, labels = _store(planted=False, seed=3)
    scan = scan_latents(_sae(), src, n_top=20, doc_threshold=0.0, stats=False)
    ctrl = shuffled_label_control(
        scan.doc_pairs, _doc_labels(labels), K, seeds=3, top=scan.top, row_doc=src.doc_ids
    )
    assert sorted(ctrl["level"].unique()) == ["document", "token"]
    assert list(ctrl["seed"].unique()) == [0, 1, 2]
    assert (ctrl["n_tests"] > 0).all() and (ctrl["n_significant"] == 0).all()
    assert (ctrl["min_q"] > 0.05).all()
    # a planted signal is found with the real labels and gone once they are shuffled
    src, labels = _store(seed=5)
    scan = scan_latents(_sae(), src, n_top=20, doc_threshold=0.0, stats=False)
    real = document_enrichment(scan.doc_pairs, _doc_labels(labels), K)
    assert real["significant"].sum() >= 1
    ctrl = shuffled_label_control(scan.doc_pairs, _doc_labels(labels), K, seeds=[11, 12, 13])
    assert (ctrl["level"] == "document").all() and len(ctrl) == 3
    assert (ctrl["n_significant"] == 0).all()
    with pytest.raises(ValueError, match="seeds=0"):
        shuffled_label_control(scan.doc_pairs, _doc_labels(labels), K, seeds=0)
    with pytest.raises(ValueError, match="row_doc: required"):
        shuffled_label_control(scan.doc_pairs, _doc_labels(labels), K, top=scan.top)


def test_redundancy_groups_planted_duplicates_into_one_row():
    src, labels = _store(seed=7)
    sae = _sae(duplicate=True)
    scan = scan_latents(sae, src, n_top=20, doc_threshold=0.0, stats=False)
    doc = document_enrichment(scan.doc_pairs, _doc_labels(labels), K, doc_max=scan.doc_max)
    sig = doc[(doc["label_id"] == 0) & doc["significant"]]["latent"].tolist()
    assert {0, 1} <= set(sig)  # both copies are enriched ...
    groups = redundancy_groups(sae.W_dec, latents=np.arange(K))
    assert groups[0] == groups[1] == 0 and len(set(groups[2:].tolist()) & {0}) == 0
    top = top_latents_table(doc, groups, "document", per_label=5)
    t0 = top[top["label"] == "0"]
    assert len(t0) == 1  # ... and share one row
    assert t0["group_size"].iloc[0] == 2 and sorted(t0["members"].iloc[0]) == [0, 1]
    assert t0["unit"].iloc[0] == "document"
    # without grouping (each latent its own group) they take two rows
    alone = top_latents_table(doc, np.arange(K), "document")
    assert (alone["label"] == "0").sum() == 2
    # a merge's clusters stand in for the groups
    merged = top_latents_table(doc, np.zeros(K, int), "document", grouping="merge")
    assert merged.loc[merged["label"] == "0", "grouping"].iloc[0] == "merge"
    with pytest.raises(ValueError, match="groups has 3 entries"):
        top_latents_table(doc, np.zeros(3, int), "document")


def test_label_enrichment_leads_with_documents_when_they_are_short():
    src, labels = _store(seed=9)
    sae = _sae(duplicate=True)
    scan = scan_latents(
        sae, src, n_top=20, labels=src.labels, hist_bins=32, doc_threshold=0.0,
        firing_budget=100_000, stats=False,
    )  # fmt: skip
    generic = np.zeros(K, bool)
    generic[1] = True  # a generic latent is never a label's best
    res = label_enrichment(
        scan, src.labels, src.label_names, W_dec=sae.W_dec, generic=generic,
        doc_labels=_doc_labels(labels), row_doc=src.doc_ids,
    )  # fmt: skip
    s = res.summary
    assert s["lead_level"] == "document" and s["median_doc_tokens"] == DOC_LEN
    assert s["best_latents"]["topic0"] == 0
    assert set(res.table["level"].astype(str)) == {"token", "document"}
    assert (res.top_latents["unit"] == "document").all()
    assert res.top_latents.iloc[0]["latent"] == 0
    assert res.latents.loc[0, "doc_best_label"] == "topic0"
    ctrl = s["enrichment_control"]
    assert ctrl["document"]["n_significant"] == [0, 0, 0]
    assert ctrl["document"]["observed_significant"] >= 1
    assert len(res.control) == 6
