"""Top-set purity, the choice of a label's best latent and the generic-latent flag on planted
data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from integral_superposition.activations import ArraySource
from integral_superposition.analysis.enrichment import document_enrichment, top_set_counts
from integral_superposition.analysis.generic import generic_latents, token_fire_rates
from integral_superposition.analysis.labels import label_enrichment
from integral_superposition.analysis.redundancy import top_latent_candidates, top_latents_table
from integral_superposition.analysis.scan import scan_latents
from integral_superposition.analysis.select import row_uniform
from integral_superposition.sae import SparseAutoencoder

NAMES = ["World", "Sports", "Business", "Sci/Tech"]


def test_top_set_counts_match_a_sort_of_each_latent():
    rng = np.random.default_rng(0)
    P, K, C, n = 600, 7, 3, 9
    lat = rng.integers(0, K, P)
    lab = rng.integers(0, C, P)
    val = rng.integers(0, 5, P).astype(float)  # many ties: broken by the smaller doc id
    doc = rng.permutation(P)
    counts, size = top_set_counts(lat, lab, val, K, C, n, tiebreak=doc)
    frame = pd.DataFrame({"lat": lat, "lab": lab, "val": val, "doc": doc})
    for j in range(K):
        top = frame[frame.lat == j].sort_values(["val", "doc"], ascending=[False, True]).head(n)
        assert size[j] == len(top)
        np.testing.assert_array_equal(counts[j], np.bincount(top.lab, minlength=C))


def _broad_and_specific(seed: int = 0):
    """400 documents, 100 per label. Latent 0 is broad: it fires in every Sports document and in
    half of the others, weakly and at random (smallest q, whole-set purity 0.4). Latent 1 is
    specific: it fires in 25 Sports documents only (q below 1e-6, purity 1). Latent 2 fires in
    4 Sports documents only (purity 1, q above 1e-6). Latent 3 fires strongly in 30 Sports
    documents and weakly in 40 other Sports and 60 other documents."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), 100)
    rng.shuffle(labels)
    docs = pd.DataFrame({"doc_id": np.arange(400), "label": labels})
    sports = np.flatnonzero(labels == 1)
    others = np.flatnonzero(labels != 1)
    pairs, vals = [], []

    def add(latent, ds, v):
        pairs.extend([d, latent] for d in ds)
        vals.extend(np.broadcast_to(v, len(ds)).tolist())

    broad = np.concatenate([sports, rng.choice(others, 150, replace=False)])
    add(0, broad, rng.uniform(0.5, 1.5, broad.size))
    add(1, sports[:25], rng.uniform(2.0, 3.0, 25))
    add(2, sports[40:44], 5.0)
    weak = np.concatenate([sports[60:100], rng.choice(others, 60, replace=False)])
    add(3, sports[50:80], 4.0)
    add(3, weak, rng.uniform(0.1, 0.5, weak.size))
    return np.array(pairs), np.array(vals), docs


def test_document_top_purity_counts_the_strongest_documents():
    pairs, vals, docs = _broad_and_specific()
    t = document_enrichment(pairs, docs, 4, doc_max=vals, label_names=NAMES, top_n=30)
    s = t[t["label"] == "Sports"].set_index("latent")
    # whole-set purity of latent 3 is low (its set is every document where it fires) ...
    assert s.loc[3, "frac_in_set"] < 0.6 and s.loc[3, "set_size"] == 130
    # ... but its 30 strongest documents are all Sports
    assert s.loc[3, "top_n"] == 30 and s.loc[3, "top_purity"] == 1.0
    assert s.loc[2, "top_n"] == 4 and s.loc[2, "top_purity"] == 1.0
    assert s.loc[0, "top_purity"] < 0.7
    assert t.groupby("latent")["top_purity"].sum().round(12).eq(1.0).all()
    with pytest.raises(ValueError, match="top_n=0"):
        document_enrichment(pairs, docs, 4, doc_max=vals, top_n=0)


def test_best_latent_is_significant_and_specific_not_the_smallest_q():
    pairs, vals, docs = _broad_and_specific()
    t = document_enrichment(pairs, docs, 4, doc_max=vals, label_names=NAMES, top_n=30)
    s = t[t["label"] == "Sports"].set_index("latent")
    assert s["q"].idxmin() == 0 and s.loc[1, "q"] < 1e-6 < s.loc[2, "q"] < 0.05
    by_q = top_latent_candidates(t, "document")
    assert by_q[by_q["label"] == "Sports"]["latent"].iloc[0] == 0  # the broad latent
    best = top_latent_candidates(t, "document", best_q=1e-6)
    order = best[best["label"] == "Sports"]["latent"].tolist()
    # purity 1 at q < 1e-6 first (latents 1 and 3: ties to the smaller q), then the broad one;
    # latent 2 (pure but q above 1e-6) after every latent that reaches it
    assert order[:2] == sorted([1, 3], key=lambda j: s.loc[j, "q"]) and order[2] == 0
    assert order[-1] == 2
    top = top_latents_table(t, np.arange(4), "document", best_q=1e-6)
    row = top[top["label"] == "Sports"].iloc[0]
    assert row["latent"] == order[0] and row["top_purity"] == 1.0 and row["top_n"] == 30
    with pytest.raises(ValueError, match="best_q=2"):
        top_latent_candidates(t, "document", best_q=2)


def _frequent_token_store(seed: int = 0, n_docs: int = 240, doc_len: int = 12):
    """Every document ends on token 7 (like "."). Latent 0 is a detector of that token: it
    fires on it in every label, a little more strongly in Sports. Latent 1 is topical: it
    fires on the same token only in Business documents (the topic carried on the period).
    Latent 2 reads a Sports direction spread over the Sports documents' tokens."""
    rng = np.random.default_rng(seed)
    d = 8
    doc_label = np.arange(n_docs) % 4
    doc = np.repeat(np.arange(n_docs), doc_len)
    lab = doc_label[doc]
    pos = np.tile(np.arange(doc_len), n_docs)
    tok = rng.integers(100, 400, doc.size)
    last = pos == doc_len - 1
    tok[last] = 7
    x = 0.1 * rng.normal(size=(doc.size, d))
    x[last, 0] += 3.0 + 1.0 * (lab[last] == 1)
    x[last & (lab == 2), 1] += 2.0 + rng.random(int((last & (lab == 2)).sum()))
    x[(lab == 1) & (rng.random(doc.size) < 0.3), 2] += 2.0
    sae = SparseAutoencoder(d, 6, architecture="relu", seed=1)
    with torch.no_grad():
        W = torch.zeros(6, d)
        for j in range(6):
            W[j, j] = 1.0
        sae.W_enc.copy_(W.T)
        sae.W_dec.copy_(W)
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
    src = ArraySource(
        [x.astype(np.float32)], doc_ids=doc, token_ids=tok, positions=pos, labels=lab,
        label_names=NAMES,
    )  # fmt: skip
    return src, sae, doc_label


def test_a_topical_latent_on_a_frequent_token_is_not_generic():
    src, sae, doc_label = _frequent_token_store()
    scan = scan_latents(sae, src, n_top=20, doc_threshold=0.0, firing_budget=10**6, stats=False)
    top_tok = scan.top.token_ids
    args = (top_tok, src.token_ids, src.doc_ids, src.labels, 4)
    old = generic_latents(*args)
    # the token rule alone flags both latents whose top contexts are the frequent token
    assert old["generic"].tolist()[:3] == [True, True, False]
    rows = np.arange(src.n_tokens)
    sample = rows[row_uniform(rows, 0) < scan.firing_rate]
    dominant = np.where(old["generic"], old["generic_token_id"], -1)
    rates = token_fire_rates(
        dominant, scan.firing_rows, scan.firing_latents, sample, src.token_ids, src.labels, 4
    )
    np.testing.assert_allclose(rates[0], 1.0)  # fires on the token in every label
    np.testing.assert_allclose(rates[1], [0.0, 0.0, 1.0, 0.0])  # only in Business
    assert np.isnan(rates[2:]).all()
    g = generic_latents(*args, fire_rates=rates)
    assert g["generic"].tolist() == [True, False, False, False, False, False]
    assert g.loc[0, "generic_rate_ratio"] == 1.0 and g.loc[1, "generic_rate_ratio"] == 0.0
    with pytest.raises(ValueError, match="fire_rates has shape"):
        generic_latents(*args, fire_rates=rates[:3])
    with pytest.raises(ValueError, match="rate_ratio=2"):
        generic_latents(*args, fire_rates=rates, rate_ratio=2)
    # the topical latent can be its label's best latent; the detector never is
    res = label_enrichment(
        scan_latents(sae, src, n_top=20, labels=src.labels, hist_bins=16, doc_threshold=0.0),
        src.labels, NAMES, W_dec=sae.W_dec, generic=g["generic"].to_numpy(),
        doc_labels=pd.DataFrame({"doc_id": np.arange(doc_label.size), "label": doc_label}),
        row_doc=src.doc_ids, control_seeds=0, purity_top_n=20,
    )  # fmt: skip
    best = res.summary["best_latents"]
    assert best["Business"] == 1 and best["Sports"] == 2 and 0 not in best.values()
    assert res.summary["purity_top_n"] == {"document": 20, "token": 20}
    assert "top-set purity" in res.summary["best_latents_rule"]
    assert res.latents.loc[1, "doc_top_purity"] == 1.0 and res.latents.loc[1, "doc_top_n"] == 20


def test_analysis_run_flags_the_token_detector_and_keeps_the_topical_latent(tmp_path):
    """End to end: the run measures the firing rates on its own token firing sample."""
    from integral_superposition.analysis import load_analysis
    from integral_superposition.dump.synthetic import write_activation_store
    from integral_superposition.pipelines import run_analysis

    src, sae, _ = _frequent_token_store()
    store = write_activation_store(
        torch.from_numpy(np.asarray(src.read(0, src.n_tokens), dtype=np.float32)),
        str(tmp_path / "acts"), doc_ids=src.doc_ids, token_ids=src.token_ids,
        labels=src.labels, label_names=NAMES,
    )  # fmt: skip
    params = {"reducer": "pca", "n_top": 20, "n_bands": 0, "dashboards": "none",
              "hist_bins": 16, "probe": False, "control_seeds": 0, "purity_top_n": 20}  # fmt: skip
    run_analysis(sae, store, str(tmp_path / "analysis"), params, allow_other_store=True)
    a = load_analysis(str(tmp_path / "analysis"))
    assert a.summary["generic_latents"] == [0]
    lat = a.latents
    assert lat.loc[0, "generic_rate_ratio"] > 0.9 and lat.loc[1, "generic_rate_ratio"] == 0.0
    assert a.summary["best_latents"]["Business"] == 1
    top = a.top_latents
    assert top.loc[top["label"] == "Business", "top_purity"].iloc[0] == 1.0
    # the report's headline gives the top-set purity with the N it was measured on
    from integral_superposition.viz.headline import headline_rows

    row = next(r for r in headline_rows(analysis=a) if r.result == "best latent: Business")
    assert row.latent == 1 and row.extra["purity"] == 1.0
    assert "purity of its 20 strongest documents" in row.detail
