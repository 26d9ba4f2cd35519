"""The label classifier judges the text it is shown: fitted on the model's own continuations
of training documents as well as the documents, its labels balanced, and checked on
continuations of held-out documents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from integral_superposition import data, steering
from integral_superposition.dump.synthetic import write_activation_store
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.steering.classifier import balanced_weights


def _store(tmp_path, doc_label: np.ndarray, centers: np.ndarray, per_doc: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (
        centers[np.repeat(doc_label, per_doc)]
        + rng.normal(size=(doc_label.size * per_doc, centers.shape[1])) * 2
    )
    names = [f"t{c}" for c in range(centers.shape[0])]
    return write_activation_store(
        torch.tensor(x, dtype=torch.float32), str(tmp_path / "acts"),
        labels=np.repeat(doc_label, per_doc), label_names=names, tokens_per_doc=per_doc,
    )  # fmt: skip


def test_balanced_weights_give_each_source_and_label_the_same_weight():
    docs = np.array([0] * 70 + [1] * 20 + [2] * 10)
    gens = np.array([0, 1, 1, 2, 2, 2])
    w = balanced_weights([docs, gens])
    assert w.shape == (106,) and w.mean() == pytest.approx(1.0)
    wd, wg = w[:100], w[100:]
    assert wd.sum() == pytest.approx(wg.sum())
    for y, ws in ((docs, wd), (gens, wg)):
        per_label = [ws[y == c].sum() for c in range(3)]
        np.testing.assert_allclose(per_label, per_label[0])


def test_fitting_on_continuations_reads_what_documents_alone_misread(tmp_path):
    """Planted: continuations carry a weak label signal on top of a shift that resembles label
    0's documents (generic text looks like one topic). A classifier fitted on documents calls
    them all label 0; fitted on continuations of training documents too, it reads held-out
    continuations right, and it still reads documents."""
    rng = np.random.default_rng(1)
    C, d = 3, 12
    centers = np.eye(C, d) * 4
    doc_label = np.arange(180) % C
    store = _store(tmp_path, doc_label, centers)
    docs_only = steering.LabelClassifier.fit(store, test_fraction=0.2, seed=0)
    assert docs_only.fitted_on == "documents" and docs_only.accuracy > 0.9

    shift = centers[0] * 1.5 + np.r_[np.zeros(C), np.ones(d - C)] * 3

    def continuations(n):
        y = np.arange(n) % C
        return (0.6 * centers[y] + shift + rng.normal(size=(n, d)) * 0.8).astype(np.float32), y

    X_fit, y_fit = continuations(150)
    X_new, y_new = continuations(300)  # continuations of held-out documents
    pred = docs_only.predict_proba(X_new).argmax(1)
    assert (pred == 0).mean() > 0.9  # the misreading planted above

    both = docs_only.with_generations(X_fit, y_fit)
    assert both.fitted_on == "documents+generations" and both.n_train_generations == 150
    pred = both.predict_proba(X_new).argmax(1)
    for c in range(C):
        assert (pred[y_new == c] == c).mean() > 0.85, c
    assert both.accuracy > 0.9  # documents are still read
    assert docs_only.fitted_on == "documents"  # a copy: the original is unchanged
    gens_only = docs_only.with_generations(X_fit, y_fit, documents=False)
    assert gens_only.fitted_on == "generations"
    assert (gens_only.predict_proba(X_new).argmax(1) == y_new).mean() > 0.85
    with pytest.raises(ValueError, match=r"y holds label ids \[7\]"):
        docs_only.with_generations(X_fit, np.full(150, 7))
    with pytest.raises(ValueError, match=r"expected one label per row"):
        docs_only.with_generations(X_fit, y_fit[:10])


def test_balanced_classifier_has_no_default_label(tmp_path):
    """With 70% of documents in label 0, text equally far from every label goes to label 0
    unless the labels are balanced."""
    C, d = 3, 8
    centers = np.eye(C, d) * 1.5
    doc_label = np.array(([0] * 14 + [1] * 3 + [2] * 3) * 15)
    store = _store(tmp_path, doc_label, centers, per_doc=2, seed=2)
    middle = centers.mean(0, keepdims=True).astype(np.float32)
    plain = steering.LabelClassifier.fit(store, test_fraction=0.2, balanced=False)
    fair = steering.LabelClassifier.fit(store, test_fraction=0.2, balanced=True)
    p_plain, p_fair = plain.predict_proba(middle)[0], fair.predict_proba(middle)[0]
    assert p_plain.argmax() == 0 and p_plain[0] > 0.5
    assert p_fair.max() < 0.5 and p_fair[0] < p_plain[0]
    assert np.nanmean(fair.test_recall) > np.nanmean(plain.test_recall) - 0.05


def test_steering_fits_its_classifier_on_continuations_of_training_documents(
    demo_store, tiny_backend
):
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    target = demo_store.label_names[1]
    params = steering.SteeringParams(
        latents=[5], labels=[target], mode="clamp", strengths=[1.0], controls=[],
        prompts=["the market"], max_new_tokens=3, samples_per_prompt=1, do_sample=False,
        own_label_prompts=2, check_labels="targets", classifier_fit_generations=3,
        classifier_test_fraction=0.25,
    )  # fmt: skip
    ev = steering.evaluate_steering(tiny_backend, sae, demo_store, params)
    clf = ev.summary["classifier"]
    assert clf["fitted_on"] == "documents+generations" and clf["balanced"]
    everything = ev.fit_generations
    fit = everything[everything["label"] != "none"]
    n_labels = len(demo_store.label_names)
    assert len(fit) == 3 * n_labels and set(fit["label"]) == set(demo_store.label_names)
    assert clf["n_train_generations"] == int(fit["used"].sum())
    # the "none" class: continuations of the first 3 topic-neutral fitting openings
    none = everything[everything["label"] == "none"]
    assert none["prompt"].tolist() == data.neutral_fit_prompts()[:3]
    assert clf["abstain"] and clf["n_none_generations"] == int(none["used"].sum())
    # fit prompts open training documents of their label; check prompts open held-out ones
    docs = demo_store.docs
    opening = docs.assign(p=[" ".join(t.split()[:5]) for t in docs["text"]])
    test_ids = set(
        np.asarray(demo_store.doc_ids)[demo_store.split_mask("test", test_fraction=0.25, seed=0)]
    )
    names = demo_store.label_names
    for row in fit.itertuples():
        src = opening[(opening["p"] == row.prompt) & (opening["label"] == names.index(row.label))]
        assert len(src) and not set(src["doc_id"]) & test_ids, row.prompt
    fit_prompts = set(fit["prompt"])
    assert not set(ev.check_generations["prompt"]) & fit_prompts
    # the per-label accuracy on generations sits beside the shares
    lat = ev.summary["latents"][0]
    row = ev.check.set_index("label").loc[target]
    assert lat["classifier_recall"] == pytest.approx(row["recall"])
    assert lat["classifier_recall_lo"] <= lat["classifier_recall"] <= lat["classifier_recall_hi"]
    base = ev.generations[ev.generations["control"] == "unsteered"]
    for name, share in clf["neutral"].items():
        assert share == pytest.approx((base["predicted"] == name).mean())


def _noisy(n: int, d: int, signal: float, seed: int):
    """``n`` rows of ``d`` features, the label (0/1) in feature 0 at ``signal``, the rest noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, d))
    X[:, 0] += signal * (2 * y - 1)
    return X.astype(np.float32), y


def test_cross_validated_c_penalises_noise_dimensions_and_not_a_clean_signal():
    """Planted: one weak label feature among 200 noise features on 120 rows (a weakly
    penalised fit memorises the noise: the grid's smallest C wins) against one strong
    feature among two on 600 rows (nothing to overfit: the largest C wins)."""
    from integral_superposition.steering.classifier import (
        CLASSIFIER_CS,
        _activation_model,
        cross_validated_c,
    )

    X, y = _noisy(120, 200, 0.6, 0)
    C, search = cross_validated_c(_activation_model, X, y, np.ones(120))
    assert search["cs"] == sorted(CLASSIFIER_CS) and search["folds"] == 3
    loss = search["log_loss"]
    assert search["cs"][int(np.argmin(loss))] == C and C <= 1e-2
    assert loss[-1] > loss[int(np.argmin(loss))] + 0.1  # C = 1 overfits, by a clear margin
    X, y = _noisy(600, 2, 3.0, 1)
    C, search = cross_validated_c(_activation_model, X, y, np.ones(600))
    assert C == 1.0 and search["log_loss"][-1] < search["log_loss"][0]


def test_cross_validated_c_scores_with_the_weights_and_keeps_single_rows_in_training():
    from integral_superposition.steering.classifier import _activation_model, cross_validated_c

    X, y = _noisy(60, 3, 2.0, 2)
    # a third class with one row: fitted in every fold, scored in none
    X3, y3 = np.r_[X, X[:1] + 10], np.r_[y, 2]
    C, search = cross_validated_c(_activation_model, X3, y3, np.ones(61), folds=4)
    assert search["folds"] == 4 and C in search["cs"]
    # zero weight on half the rows: the same losses as leaving them out of the scoring
    w = np.r_[np.ones(30), np.zeros(30)]
    _, with_w = cross_validated_c(_activation_model, X, y, w, cs=(0.01, 1.0), folds=3)
    _, unit = cross_validated_c(_activation_model, X, y, np.ones(60), cs=(0.01, 1.0), folds=3)
    assert with_w["log_loss"] != unit["log_loss"]
    with pytest.raises(
        ValueError, match=r"C='cv' needs two or more rows .*\{0: 1, 1: 5\}.*classifier_c"
    ):
        cross_validated_c(_activation_model, X[:6], np.r_[0, 1, 1, 1, 1, 1], np.ones(6))
    with pytest.raises(ValueError, match=r"cs=\[-1.0\]: expected one or more finite positive"):
        cross_validated_c(_activation_model, X, y, np.ones(60), cs=(-1.0,))


def test_classifier_chooses_its_regularisation_by_cross_validation(tmp_path):
    """The default ``C="cv"`` fits the model at the grid's best value, reported by describe();
    a refit on continuations chooses again, and a given number is kept."""
    from integral_superposition.steering.classifier import CLASSIFIER_CS

    C, d = 3, 12
    store = _store(tmp_path, np.arange(90) % C, np.eye(C, d) * 4)
    clf = steering.LabelClassifier.fit(store, test_fraction=0.2, seed=0)
    info = clf.describe()
    assert clf.C == "cv" and info["C_chosen_by"] == "cross-validation"
    assert info["C"] in CLASSIFIER_CS and info["C"] == clf.model[-1].C
    search = info["C_search"]
    assert info["C"] == search["cs"][int(np.argmin(search["log_loss"]))]
    rng = np.random.default_rng(3)
    X = rng.normal(size=(30, d)).astype(np.float32)
    again = clf.with_generations(X, np.arange(30) % C)
    assert again.c_search is not None and again.c_search is not clf.c_search
    given = clf.with_generations(X, np.arange(30) % C, C=0.5)
    assert given.describe()["C"] == 0.5 == given.model[-1].C and "C_search" not in given.describe()
    assert given.describe()["C_chosen_by"] == "given"
    with pytest.raises(ValueError, match=r"C='auto': expected a positive number or 'cv'"):
        clf.with_generations(X, np.arange(30) % C, C="auto")
    with pytest.raises(ValueError, match=r"C=0: expected a positive number or 'cv'"):
        steering.LabelClassifier.fit(store, test_fraction=0.2, C=0)
