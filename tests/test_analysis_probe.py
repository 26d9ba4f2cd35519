"""Sparse probing and generic-latent flagging on planted synthetic data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from integral_superposition.activations import ArraySource
from integral_superposition.analysis.generic import generic_latents
from integral_superposition.analysis.params import AnalysisParams
from integral_superposition.analysis.probe import (
    CS,
    balanced_task,
    doc_latent_matrix,
    mean_over_labels,
    rank_latents,
    sparse_probe,
    wilson_interval,
)
from integral_superposition.analysis.scan import scan_latents
from integral_superposition.sae import SparseAutoencoder

ARTEFACT = 500  # a token present in every document of every label (like "(AP)")


def _planted(seed=0, n_docs=240, doc_len=16, C=3, K=32, d=16):
    """Latent 5 fires on label-1 documents; latent 9 fires on the artefact token, which every
    document has, with larger activations than latent 5 (it wins a naive best-latent pick)."""
    rng = np.random.default_rng(seed)
    doc_label = np.arange(n_docs) % C
    doc = np.repeat(np.arange(n_docs), doc_len)
    lab = doc_label[doc]
    N = doc.size
    pos = np.tile(np.arange(doc_len), n_docs)
    tok = rng.integers(0, 400, N)
    tok[pos == 3] = ARTEFACT
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    x = 0.2 * rng.normal(size=(N, d))
    x[(lab == 1) & (rng.random(N) < 0.4)] += 3.0 * basis[0]
    art = pos == 3
    x[art] += (5.0 + 2.0 * (lab[art] == 2))[:, None] * basis[
        1
    ]  # skewed: top contexts mostly label 2
    sae = SparseAutoencoder(d, K, seed=seed + 1)
    with torch.no_grad():
        W = torch.tensor(rng.normal(size=(K, d)), dtype=torch.float32)
        B = torch.tensor(basis[:2], dtype=torch.float32)
        W -= (W @ B.T) @ B  # the other latents ignore both planted directions
        W /= W.norm(dim=1, keepdim=True)
        W[5] = torch.tensor(basis[0], dtype=torch.float32)
        W[9] = torch.tensor(basis[1], dtype=torch.float32)
        sae.W_enc.copy_(W.T)
        sae.W_dec.copy_(W)
        sae.b_enc.fill_(-0.3)
        sae.b_enc[5] = -1.5
        sae.b_enc[9] = -2.0
    src = ArraySource(
        [x.astype(np.float32)],
        doc_ids=doc,
        token_ids=tok,
        positions=pos,
        labels=lab,
        label_names=[f"topic{i}" for i in range(C)],
    )
    return src, sae, doc_label, x


def test_generic_latent_is_flagged_and_topical_one_is_not():
    src, sae, _, _ = _planted()
    scan = scan_latents(sae, src, n_top=20, doc_threshold=0.0)
    g = generic_latents(scan.top.token_ids, src.token_ids, src.doc_ids, src.labels, 3)
    assert bool(g.loc[9, "generic"]) and g.loc[9, "generic_token_id"] == ARTEFACT
    assert g.loc[9, "generic_token_share"] == 1.0 and g.loc[9, "generic_min_label_fraction"] == 1.0
    assert not g.loc[5, "generic"]
    assert set(g.index[g["generic"]]) == {9}
    # the same dominant token confined to one label is topical, not generic
    only1 = np.where((src.labels == 1) & (src.positions == 0), 7, 401)
    top = np.full((2, 4), 7)
    g2 = generic_latents(top, only1, src.doc_ids, src.labels, 3)
    assert not g2["generic"].any() and (g2["generic_min_label_fraction"] == 0).all()
    with pytest.raises(ValueError, match="token_share"):
        generic_latents(top, only1, src.doc_ids, src.labels, 3, token_share=0)
    # frequent in two labels, rare (2 of 80 documents) in the third: still topical
    rare = only1.copy()
    rare[(src.labels == 0) & (src.positions == 0)] = 7
    rare[(src.labels == 2) & (src.positions == 0) & (src.doc_ids < 12)] = 7
    g3 = generic_latents(top, rare, src.doc_ids, src.labels, 3)
    assert not g3["generic"].any() and g3.loc[0, "generic_min_label_fraction"] == 4 / 80


def test_sparse_probe_finds_planted_latent_and_random_is_near_chance():
    src, sae, doc_label, x = _planted()
    scan = scan_latents(sae, src, n_top=4, doc_threshold=0.0)
    docs = np.arange(doc_label.size)
    F = doc_latent_matrix(scan.doc_pairs, scan.doc_max, docs, sae.d_sae)
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x.astype(np.float32))).numpy()
    exact = np.stack([z[src.doc_ids == i].max(0) for i in docs])
    np.testing.assert_allclose(F.toarray(), exact, rtol=1e-5, atol=1e-6)
    assert F[:, 9].min() > 2.0
    train = np.random.default_rng(1).random(docs.size) < 0.6
    dense = np.stack([x[src.doc_ids == i].mean(0) for i in docs])
    t = sparse_probe(F, doc_label, train, ["topic0", "topic1", "topic2"], ks=(1, 5), dense=dense)
    one = t[(t.label == "topic1") & (t.method == "sae") & (t.k == 1)].iloc[0]
    assert one.latents == [5] and one.accuracy > 0.97 and one.f1 > 0.95
    rnd = t[(t.label == "topic1") & (t.method == "random")]
    assert len(rnd) == 2 and (rnd.balanced_accuracy < 0.7).all()
    assert 5 not in rnd.latents.iloc[0]
    assert set(t.label) == {"topic0", "topic1", "topic2"}
    d1 = t[(t.label == "topic1") & (t.method == "dense")].iloc[0]
    assert d1.k == x.shape[1] and d1.accuracy > 0.9
    # each task is class-balanced: every held-out document of the label and as many others
    pos = t.label_id.map(lambda c: int(((doc_label == c) & ~train).sum()))
    assert (t.n_test_pos == pos).all() and (t.n_test == 2 * pos).all()
    # every accuracy carries its Wilson interval over the label's balanced test documents
    np.testing.assert_allclose(t.accuracy, t.n_correct / t.n_test)
    assert (t.accuracy_low <= t.accuracy).all() and (t.accuracy <= t.accuracy_high).all()
    for r in t.itertuples():
        assert (r.accuracy_low, r.accuracy_high) == wilson_interval(r.n_correct, r.n_test)
    assert (t.accuracy_high - t.accuracy_low).between(0.01, 0.5).all()
    with pytest.raises(ValueError, match="doc_labels"):
        sparse_probe(F, doc_label[:-1], train, ["a", "b", "c"])


def _wilson(k, n, z=1.959963984540054):
    """The Wilson score interval from its formula."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_interval_matches_the_formula_and_checks_its_arguments():
    for k, n in [(45, 50), (0, 100), (100, 100), (57, 110), (1, 1)]:
        np.testing.assert_allclose(wilson_interval(k, n), _wilson(k, n), rtol=1e-9, atol=1e-12)
    lo, hi = wilson_interval(95, 100)
    assert 0.88 < lo < 0.9 and 0.97 < hi < 0.99  # not the Wald interval's 0.907-0.993
    lo90, hi90 = wilson_interval(95, 100, confidence=0.9)
    assert lo < lo90 and hi90 < hi
    for bad, match in [((5, 0), "n=0"), ((7, 5), "successes=7"), ((2.5, 5), "successes=2.5"),
                       ((-1, 5), "successes=-1")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="confidence=1"):
        wilson_interval(3, 5, confidence=1)


def test_mean_over_labels_gives_the_mean_accuracy_and_its_interval():
    t = pd.DataFrame(
        {"method": ["sae", "sae", "dense", "dense"], "k": [1, 1, 16, 16],
         "accuracy": [0.9, 0.7, 0.95, 0.85], "balanced_accuracy": [0.9, 0.7, 0.95, 0.85],
         "f1": [0.9, 0.6, 0.95, 0.8], "n_test": [100, 100, 100, 100]}
    )  # fmt: skip
    m = mean_over_labels(t).set_index("method")
    assert m.loc["sae", "accuracy"] == pytest.approx(0.8) and m.loc["sae", "n_test"] == 200
    np.testing.assert_allclose(
        m.loc["sae", ["accuracy_low", "accuracy_high"]].to_numpy(float), _wilson(160, 200)
    )
    np.testing.assert_allclose(
        m.loc["dense", ["accuracy_low", "accuracy_high"]].to_numpy(float), _wilson(180, 200)
    )
    with pytest.raises(ValueError, match="n_test"):
        mean_over_labels(t.drop(columns="n_test"))


def test_doc_latent_matrix_rows_follow_doc_ids_and_drop_other_documents():
    pairs = np.array([[3, 0], [3, 2], [7, 2], [9, 1]])
    F = doc_latent_matrix(pairs, np.array([1.0, 2.0, 3.0, 4.0]), np.array([3, 7]), 3).toarray()
    np.testing.assert_array_equal(F, [[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])


def test_analysis_run_lists_generic_latents_apart_and_publishes_probes(tmp_path):
    """End to end on a store: the artefact latent is flagged, never a label's best latent, and
    the report shows it apart next to the sparse-probing table."""
    from integral_superposition import storage
    from integral_superposition.analysis import load_analysis
    from integral_superposition.dump.synthetic import write_activation_store
    from integral_superposition.pipelines import run_analysis
    from integral_superposition.viz.report import analysis_sections, summary_tables

    src, sae, _, x = _planted(n_docs=300)
    store = write_activation_store(
        torch.from_numpy(x.astype(np.float32)),
        str(tmp_path / "acts"),
        doc_ids=src.doc_ids,
        token_ids=src.token_ids,
        labels=src.labels,
        label_names=src.label_names,
    )
    out = str(tmp_path / "analysis")
    params = {"reducer": "pca", "n_top": 20, "n_bands": 0, "dashboards": "all", "hist_bins": 16,
              "test_fraction": 0.3, "probe_ks": [1, 10]}  # fmt: skip
    run_analysis(sae, store, out, params, allow_other_store=True)
    a = load_analysis(out)
    lat = a.latents
    assert lat.loc[9, "generic"] and lat["generic"].sum() == 1
    assert lat.loc[9, "best_label"] == "topic2"  # the naive pick: the artefact is strongest there
    assert a.summary["generic_latents"] == [9] and a.summary["best_latents"]["topic2"] != 9
    assert a.summary["best_latents"]["topic1"] == 5
    probe = a.table("probe")
    one = probe[(probe.label == "topic1") & (probe.method == "sae") & (probe.k == 1)].iloc[0]
    assert one.latents.tolist() == [5] and one.accuracy > 0.95
    assert a.summary["probe"]["pool"] == {"latents": "mean", "dense": "mean"}
    tables = summary_tables(a)
    assert 9 not in set(tables["top_latents"]["latent"])
    assert tables["generic_latents"]["latent"].tolist() == [9]
    assert tables["generic_latents"]["generic_token"].tolist() == ["<500>"]
    pt = tables["probe"].set_index("label")
    assert pt.loc["topic1", "k=1 acc"] > 0.95 and np.isfinite(pt.loc["topic1", "random k=10 acc"])
    assert {"k=10 acc", "dense acc", "dense F1"} <= set(pt.columns) and "mean" in pt.index
    # intervals: each label's from its own test documents, the mean row's from all of them
    lo, hi = wilson_interval(round(one.accuracy * one.n_test), int(one.n_test))
    assert pt.loc["topic1", "k=1 acc 95% CI"] == f"{lo:.3f}-{hi:.3f}"
    for name in ("k=1", "k=10", "random k=10", "dense"):
        assert pt[f"{name} acc 95% CI"].str.fullmatch(r"[01]\.\d{3}-[01]\.\d{3}").all(), name
    means = {(r["method"], r["k"]): r for r in a.summary["probe"]["mean_over_labels"]}
    m1 = means[("sae", 1)]
    assert m1["n_test"] == int(probe.loc[(probe.method == "sae") & (probe.k == 1), "n_test"].sum())
    assert m1["accuracy_low"] < m1["accuracy"] < m1["accuracy_high"]
    assert pt.loc["mean", "k=1 acc 95% CI"] == f"{m1['accuracy_low']:.3f}-{m1['accuracy_high']:.3f}"
    from integral_superposition.viz.headline import headline_rows

    head = {r.result: r for r in headline_rows(analysis=a) if r.group == "Sparse probing"}
    top1 = head["accuracy, top 1 latent"]
    assert top1.interval == pytest.approx((m1["accuracy_low"], m1["accuracy_high"]))
    d = next(r for (meth, _), r in means.items() if meth == "dense")
    assert top1.control_interval == pytest.approx((d["accuracy_low"], d["accuracy_high"]))
    assert f"[{m1['accuracy_low']:.3f}, {m1['accuracy_high']:.3f}]" in top1.shown
    pages = [storage.read_bytes(a.dashboard_uri(j)).decode() for j in (5, 9)]
    assert "generic (artefact)" not in pages[0]
    assert "generic (artefact)</b>&lt;500&gt; in 100% of top contexts" in pages[1]
    titles = [s.title for s in analysis_sections(a)]
    assert "Sparse probing" in titles and "Generic latents" in titles


def test_scan_doc_sum_is_each_latents_sum_over_the_document():
    """Documents span chunks; the sum takes every entry, the threshold only picks the pairs."""
    src, sae, doc_label, x = _planted(n_docs=60)
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x.astype(np.float32))).numpy().astype(np.float64)
    docs = np.arange(doc_label.size)
    sums = np.stack([z[src.doc_ids == i].sum(0) for i in docs])
    maxes = np.stack([z[src.doc_ids == i].max(0) for i in docs])
    for thr in (0.0, 1.0):
        scan = scan_latents(sae, src, n_top=4, doc_threshold=thr, chunk_tokens=50, stats=False)
        d, j = scan.doc_pairs[:, 0], scan.doc_pairs[:, 1]
        np.testing.assert_allclose(scan.doc_sum, sums[d, j], rtol=1e-5)
        np.testing.assert_allclose(scan.doc_max, maxes[d, j], rtol=1e-6)
        assert len(d) == int((maxes > thr).sum())


def test_balanced_task_takes_every_positive_and_an_even_share_of_the_others():
    y = np.repeat([0, 1, 2, 3], [30, 60, 90, 20])
    docs = np.flatnonzero(np.arange(y.size) % 2 == 0)  # a split: every other document
    task = balanced_task(docs, y, 0, np.random.default_rng(0))
    assert set(task) <= set(docs) and np.unique(task).size == task.size
    assert (y[task] == 0).sum() == 15 and task.size == 30
    np.testing.assert_array_equal(np.bincount(y[task], minlength=4), [15, 5, 5, 5])
    again = balanced_task(docs, y, 0, np.random.default_rng(0))
    np.testing.assert_array_equal(task, again)
    # the majority label: as many positives as there are others
    big = balanced_task(docs, y, 2, np.random.default_rng(1))
    assert (y[big] == 2).sum() == (y[big] != 2).sum() == 45


def _four_label_documents(label: int, D: int = 800):
    """``rng, D, y, train, pos``: D documents of 4 labels in turn, about 70% of them training
    documents, ``pos`` those of ``label``; ``rng`` (seed 0) continues for the features."""
    rng = np.random.default_rng(0)
    y = np.arange(D) % 4
    train = rng.random(D) < 0.7
    return rng, D, y, train, y == label


def test_probe_picks_latents_by_class_mean_difference_on_training_documents():
    """Latent 0 fires in six training documents of the label only (the largest log odds of
    firing); latent 1 is broad but much larger in the label's documents (the largest mean
    difference); latent 2 matches the label on the test documents only (a leak if the test
    documents chose the latents)."""
    rng, D, y, train, pos = _four_label_documents(1)
    F = np.zeros((D, 4))
    F[np.flatnonzero(pos & train)[:6], 0] = 1.0
    F[:, 1] = np.clip(rng.normal(np.where(pos, 1.0, 0.5), 0.3), 0, None)
    F[~train & pos, 2] = 5.0
    F[:, 3] = 0.05 * rng.random(D)  # noise
    assert rank_latents(F[train], pos[train])[0] == 1
    t = sparse_probe(F, y, train, ["a", "b", "c", "d"], ks=(1, 2), random_baseline=False)
    b = t[(t.label == "b") & (t.method == "sae")].set_index("k")
    assert b.loc[1, "latents"] == [1] and b.loc[2, "latents"] == [1, 0]
    assert 0.7 < b.loc[1, "accuracy"] < 0.95  # the broad latent alone, not the leak
    with pytest.raises(ValueError, match="positive"):
        rank_latents(F, np.ones(D, bool))


def test_probe_ranks_by_standardised_difference_so_a_large_dense_latent_does_not_come_first():
    """Latent 0 fires in every document with a large, noisy activation that differs between
    the classes by a fraction of its spread (the largest raw difference of class means);
    latent 1 is a clean label latent of small scale (the largest standardised difference)."""
    rng, D, y, train, pos = _four_label_documents(2)
    F = np.zeros((D, 3))
    F[:, 0] = rng.normal(np.where(pos, 105.0, 100.0), 30.0)
    F[:, 1] = np.where(pos, rng.normal(1.0, 0.2, D), 0.0).clip(0)
    F[:, 2] = 0.05 * rng.random(D)
    assert rank_latents(F[train], pos[train], "mean_diff")[0] == 0
    assert rank_latents(F[train], pos[train])[0] == 1  # std_diff is the default
    names = ["a", "b", "c", "d"]
    ours = sparse_probe(F, y, train, names, ks=(1,), random_baseline=False, rank_by="std_diff")
    raw = sparse_probe(F, y, train, names, ks=(1,), random_baseline=False, rank_by="mean_diff")
    c_ours = ours[(ours.label == "c") & (ours.method == "sae")].iloc[0]
    c_raw = raw[(raw.label == "c") & (raw.method == "sae")].iloc[0]
    assert c_ours["latents"] == [1] and c_raw["latents"] == [0]
    assert c_ours["accuracy"] > 0.95 and c_raw["accuracy"] < 0.7
    # a latent that is constant in both classes scores 0 instead of dividing by zero
    const = np.column_stack([np.full(D, 3.0), F[:, 1]])
    assert rank_latents(const[train], pos[train]).tolist() == [1, 0]
    with pytest.raises(ValueError, match="rank_by='logodds'"):
        sparse_probe(F, y, train, names, ks=(1,), rank_by="logodds")
    with pytest.raises(ValueError, match="by='x'"):
        rank_latents(F, pos, "x")


def test_probe_chooses_its_c_by_cross_validation_on_the_training_documents():
    """Dense probes on 60 dimensions, each weakly informative of one label (15 per label),
    from about 40 training documents per label: a weak penalty (C = 100) fits the noise; the C chosen by cross-validation on the
    training documents is much stronger and scores better. The test documents never choose
    it: scrambling their features leaves every probe's C and latents unchanged."""
    rng, D, y, train, _ = _four_label_documents(0, D=240)
    X = rng.normal(size=(D, 60)) + 0.25 * np.eye(4)[y].repeat(15, 1)
    F = np.abs(X[:, :12])  # latents: folded copies of the first 12 dimensions
    names = ["a", "b", "c", "d"]
    kw = {"ks": (1,), "dense": X, "seed": 3, "random_baseline": False}
    cv = sparse_probe(F, y, train, names, **kw)
    weak = sparse_probe(F, y, train, names, cs=[100.0], **kw)
    assert (weak.C == 100.0).all() and len(cv) == len(weak) == 8
    assert set(cv.C) <= set(CS)
    dense_cv, dense_weak = cv[cv.method == "dense"], weak[weak.method == "dense"]
    assert (dense_cv.C < 1.0).all()
    assert dense_cv.accuracy.mean() > dense_weak.accuracy.mean() + 0.03
    scrambled = X.copy()
    scrambled[~train] = rng.permutation(scrambled[~train])[:, ::-1]
    F2 = F.copy()
    F2[~train] = F2[~train][::-1]
    other = sparse_probe(F2, y, train, names, **{**kw, "dense": scrambled})
    assert other.C.tolist() == cv.C.tolist()
    assert other.latents.tolist() == cv.latents.tolist()
    with pytest.raises(ValueError, match=r"cs=\[\]: expected positive"):
        sparse_probe(F, y, train, names, cs=[])
    with pytest.raises(ValueError, match=r"cs=\[1.0, -2.0\]"):
        sparse_probe(F, y, train, names, cs=[1.0, -2.0])
    with pytest.raises(ValueError, match="cv_folds=1: expected"):
        sparse_probe(F, y, train, names, cv_folds=1)
    assert AnalysisParams().probe_cs == list(CS)  # the pipeline's default grid is the library's


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_probes_cv_score_is_scikit_learns_neg_log_loss(dtype):
    """The cross-validation's scorer gives scikit-learn's ``neg_log_loss`` (clipping included:
    a confidently wrong probe on a far-off row), so it picks the same ``C``."""
    from integral_superposition.analysis.probe import _neg_log_loss
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import get_scorer

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    X = (rng.normal(size=(200, 5)) + y[:, None]).astype(dtype)
    lr = LogisticRegression(C=10.0).fit(X, y)
    Xt = rng.normal(size=(50, 5)).astype(dtype)
    Xt[0] = 400.0 * (1 - 2 * y[0])  # pushes row 0 far to the wrong side: clipped
    ours, theirs = _neg_log_loss(lr, Xt, y[:50]), get_scorer("neg_log_loss")(lr, Xt, y[:50])
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert ours < -0.5  # the clipped row dominates: a real loss, not a trivial one
    text = LogisticRegression(C=10.0).fit(X, np.where(y == 1, "yes", "no"))
    assert _neg_log_loss(text, Xt, np.where(y[:50] == 1, "yes", "no")) == pytest.approx(ours)


def test_forward_selection_skips_near_duplicates_and_takes_the_independent_evidence():
    """Latents 0-4 are near-copies of one noisy label signal (the five largest standardised
    differences); latents 5 and 6 carry independent, weaker evidence of the label. Ranked by the
    difference of class means a 3-latent probe gets three copies of the same evidence; forward
    selection takes one copy and then the two independent latents, and its probe scores
    higher on the held-out documents."""
    rng, D, y, train, pos = _four_label_documents(1, D=1600)
    F = np.zeros((D, 40))
    shared = pos + rng.normal(0.0, 0.7, D)
    for j in range(5):
        F[:, j] = np.maximum(shared + rng.normal(0.0, 0.05, D), 0.0)
    for j in (5, 6):
        F[:, j] = np.maximum(pos + rng.normal(0.0, 1.0, D), 0.0)
    F[:, 7:] = np.abs(rng.normal(size=(D, 33))) * (rng.random((D, 33)) < 0.2)
    by_diff = rank_latents(F[train], pos[train])
    by_forward = rank_latents(F[train], pos[train], "forward", forward_steps=3)
    assert set(by_diff[:3].tolist()) <= {0, 1, 2, 3, 4}
    assert by_forward[0] in range(5) and set(by_forward[1:3].tolist()) == {5, 6}
    # the rest follow by the difference of class means, every latent exactly once
    assert sorted(by_forward.tolist()) == list(range(40))
    assert by_forward[3:].tolist() == [j for j in by_diff.tolist() if j not in by_forward[:3]]
    names = ["a", "b", "c", "d"]
    kw = {"ks": (3,), "random_baseline": False, "cs": (1.0,)}
    diff = sparse_probe(F, y, train, names, rank_by="std_diff", **kw)
    fwd = sparse_probe(F, y, train, names, rank_by="forward", **kw)
    acc_diff = diff[diff.label == "b"].iloc[0]["accuracy"]
    acc_fwd = fwd[fwd.label == "b"].iloc[0]["accuracy"]
    assert acc_fwd > acc_diff + 0.03, (acc_fwd, acc_diff)
    with pytest.raises(ValueError, match="forward_steps=0"):
        rank_latents(F, pos, "forward", forward_steps=0)
    with pytest.raises(ValueError, match="positive has shape"):
        rank_latents(F, pos[:10], "forward")


def test_forward_selection_stops_at_the_live_latents_and_ignores_constant_ones():
    """Only two latents vary: forward selection returns those two first, the constant and
    all-zero latents after them, and never fails for want of candidates."""
    rng, D, _, _, pos = _four_label_documents(3, D=400)
    F = np.zeros((D, 4))
    F[:, 1] = np.where(pos, rng.normal(1.0, 0.3, D), 0.0).clip(0)
    F[:, 2] = 3.0
    F[:, 3] = rng.random(D)
    order = rank_latents(F, pos, "forward", forward_steps=4)
    assert order[:2].tolist() == [1, 3] and sorted(order.tolist()) == [0, 1, 2, 3]
