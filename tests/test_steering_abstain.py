"""The abstaining classifier: text of no label goes to a ``none`` class fitted on the model's
continuations of topic-neutral openings that the evaluation never uses; a ``none`` is a miss
for every label, and a classifier that abstains on everything cannot judge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from integral_superposition import data, steering
from integral_superposition.dump.synthetic import write_activation_store
from integral_superposition.pipelines import steer_eval
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.steering.classifier import ABSTAIN, EMPTY, LabelClassifier
from integral_superposition.steering.scores import judge_generations, paired_lift, set_metrics


def _planted(tmp_path):
    """A store of 3 labels (clusters), labelled continuations near their label's cluster, and
    off-topic continuations: generic text that sits nearer label 0 than any other label."""
    rng = np.random.default_rng(0)
    C, d, per_doc = 3, 12, 6
    centers = np.eye(C, d) * 4
    doc_label = np.arange(180) % C
    x = centers[np.repeat(doc_label, per_doc)] + rng.normal(size=(180 * per_doc, d)) * 2
    store = write_activation_store(
        torch.tensor(x, dtype=torch.float32), str(tmp_path / "acts"),
        labels=np.repeat(doc_label, per_doc), label_names=["a", "b", "c"], tokens_per_doc=per_doc,
    )  # fmt: skip
    generic = centers[0] * 0.5 + np.r_[np.zeros(C), np.ones(d - C)] * 2

    def topical(n):
        y = np.arange(n) % C
        return (centers[y] + rng.normal(size=(n, d))).astype(np.float32), y

    def off_topic(n):
        return (generic + rng.normal(size=(n, d)) * 0.8).astype(np.float32)

    return store, topical, off_topic


def test_abstaining_classifier_assigns_planted_off_topic_text_to_none(tmp_path):
    store, topical, off_topic = _planted(tmp_path)
    docs = LabelClassifier.fit(store, test_fraction=0.2, seed=0)
    X_fit, y_fit = topical(60)
    forced = docs.with_generations(X_fit, y_fit)
    abstaining = docs.with_generations(X_fit, y_fit, X_none=off_topic(40))
    assert not forced.abstain and forced.classes == ["a", "b", "c"]
    assert abstaining.abstain and abstaining.classes == ["a", "b", "c", "none"]
    assert abstaining.n_none_generations == 40
    assert abstaining.describe()["abstain"] and abstaining.describe()["n_none_generations"] == 40

    X_off = off_topic(200)
    # the forced choice gives off-topic text a label, most often the nearest one (a), so
    # label a's share of text of no topic is far from 0
    assert forced.predict_proba(X_off).shape == (200, 3)
    assert (forced.predict(X_off) == 0).mean() > 0.4
    # the abstaining classifier says "no label" for it
    assert abstaining.predict_proba(X_off).shape == (200, 4)
    assert (abstaining.predict(X_off) == ABSTAIN).mean() > 0.9
    assert (abstaining.predict(X_off) == 0).mean() < 0.05
    # and still reads topical text and held-out documents
    X_new, y_new = topical(300)
    assert (abstaining.predict(X_new) == y_new).mean() > 0.9
    assert abstaining.accuracy > 0.9 and abstaining.test_abstain < 0.05
    valid = np.r_[np.ones(299, bool), False]
    assert abstaining.predict(X_new, valid)[-1] == EMPTY


def test_none_class_is_checked(tmp_path):
    store, topical, _ = _planted(tmp_path)
    docs = LabelClassifier.fit(store, test_fraction=0.2, seed=0)
    X_fit, y_fit = topical(30)
    with pytest.raises(ValueError, match=r"X_none \(0, 12\): expected continuations"):
        docs.with_generations(X_fit, y_fit, X_none=np.zeros((0, 12)))
    with pytest.raises(ValueError, match=r"X_none \(4, 5\)"):
        docs.with_generations(X_fit, y_fit, X_none=np.zeros((4, 5)))


def test_a_share_counts_abstentions_as_misses():
    # 8 continuations of label 1: 2 hits, 4 abstentions, 1 other label, 1 empty
    predicted = np.array([1, 1, ABSTAIN, ABSTAIN, ABSTAIN, ABSTAIN, 0, EMPTY])
    proba = np.full((8, 3), 1 / 3)
    m = set_metrics(predicted, proba, np.ones(8), np.ones(8), [[1, 2]] * 8, 1, None)
    assert m["n"] == 8 and m["hits"] == 2 and m["share"] == pytest.approx(2 / 8)
    assert m["abstain"] == pytest.approx(4 / 8) and m["empty"] == 1
    # the unsteered set abstained on everything: the lift counts only real hits
    base = np.full(8, ABSTAIN)
    assert paired_lift(predicted == 1, base == 1)[0] == pytest.approx(2 / 8)


def test_a_classifier_that_abstains_on_everything_cannot_judge():
    names = ["Sports", "Business", "World"]
    prompt_labels = np.repeat([0, 1, 2], 20)
    check = judge_generations(prompt_labels, np.full(60, ABSTAIN), names, abstain=True)
    assert not check.can_judge and not any(check.judged.values())
    assert check.dominant_label == "none"
    assert "no label" in check.reason("Sports")
    assert check.table["to_none"].tolist() == [1.0, 1.0, 1.0]
    assert check.table["recall"].tolist() == [0.0, 0.0, 0.0]
    # abstaining on a third and reading the rest passes; abstention is no majority then
    pred = prompt_labels.copy()
    pred[::3] = ABSTAIN
    check = judge_generations(prompt_labels, pred, names, abstain=True)
    assert check.can_judge and check.dominant_label is None
    # abstaining on most continuations of one label fails that label only
    pred = prompt_labels.copy()
    pred[:15] = ABSTAIN
    check = judge_generations(prompt_labels, pred, names, abstain=True)
    assert check.judged == {"Sports": False, "Business": True, "World": True}
    assert "0.25" in check.reason("Sports")


def test_fit_openings_are_disjoint_from_the_evaluation_prompts():
    fit = [" ".join(t.split()).casefold() for t in data.neutral_fit_prompts()]
    evaluation = {" ".join(t.split()).casefold() for t in data.neutral_prompts()}
    assert len(fit) >= 48 and len(set(fit)) == len(fit)
    assert not set(fit) & evaluation
    # a given list that shares an opening with the evaluation is refused, named
    p = steering.SteeringParams(
        prompts=["Breaking news:", "Today's top story:"],
        abstain_prompts=["Just in:", "breaking   NEWS:"],
    )
    with pytest.raises(ValueError, match=r"abstain_prompts share 1 opening\(s\).*breaking news"):
        steering.sweep.abstain_openings(p, p.prompts)
    with pytest.raises(ValueError, match=r"abstain_prompts"):
        steering.SteeringParams(abstain_prompts=[])


def _params(**kw):
    return steering.SteeringParams(
        latents=[5], labels=["Sports"], mode="clamp", strengths=[1.0], controls=["random"],
        prompts=["Breaking news:", "In other news,"], max_new_tokens=3, samples_per_prompt=2,
        own_label_prompts=2, check_labels="targets", classifier_fit_generations=3,
        classifier_test_fraction=0.25, **kw,
    )  # fmt: skip


def test_steering_never_fits_on_continuations_of_the_evaluation_prompts(
    demo_store, tiny_backend, monkeypatch
):
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    seen = {}
    fit = LabelClassifier.with_generations

    def spy(self, X, y, **kw):
        seen.update(X=np.asarray(X), X_none=kw.get("X_none"), clf=self)
        return fit(self, X, y, **kw)

    monkeypatch.setattr(LabelClassifier, "with_generations", spy)
    ev = steering.evaluate_steering(tiny_backend, sae, demo_store, _params())
    frame = ev.fit_generations
    evaluation = set(_params().prompts)
    assert not set(frame["prompt"]) & evaluation
    assert frame.loc[frame["label"] == "none", "prompt"].tolist() == data.neutral_fit_prompts()[:3]
    # no row the classifier was fitted on is the features of an evaluated continuation
    texts = ev.generations.loc[ev.generations["prompts"] == "neutral", "text"].tolist()
    X_eval, _ = seen["clf"].features(tiny_backend, texts)
    fitted = np.concatenate([seen["X"], seen["X_none"]])
    assert len(seen["X_none"]) == 3
    dist = np.abs(fitted[:, None, :] - X_eval[None, :, :]).max(-1)
    assert dist.min() > 1e-6
    # the abstain share is in the tables and the summary
    clf = ev.summary["classifier"]
    assert clf["abstain"] and set(clf["neutral"]) == {*demo_store.label_names, "none"}
    g = ev.generations
    base = g[(g["control"] == "unsteered") & (g["prompts"] == "neutral")]
    assert clf["neutral"]["none"] == pytest.approx((base["predicted"] == "none").mean())
    assert sum(clf["neutral"].values()) == pytest.approx(1.0)
    row = ev.table[ev.table["control"] == "unsteered"].iloc[0]
    assert row["abstain"] == pytest.approx(clf["neutral"]["none"])
    lat = ev.summary["latents"][0]
    assert lat["baseline_abstain"] == pytest.approx(row["abstain"])
    assert "to_none" in ev.check.columns
    # the report says what a share counts and gives the abstain share column
    sec = steer_eval.steering_section(ev)
    assert "assigns to no label, 'none', is a miss" in sec.text
    assert "continuations of topic-neutral openings as 'none'" in sec.text
    assert "abstain" in dict(sec.tables)[next(iter(dict(sec.tables)))].columns


def test_forced_choice_stays_available(demo_store, tiny_backend):
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    ev = steering.evaluate_steering(
        tiny_backend, sae, demo_store, _params(classifier_abstain=False)
    )
    clf = ev.summary["classifier"]
    assert not clf["abstain"] and clf["n_none_generations"] == 0
    assert "none" not in set(ev.fit_generations["label"])
    assert set(clf["neutral"]) == set(demo_store.label_names)
    assert sum(clf["neutral"].values()) == pytest.approx(1.0)
    assert (ev.table["abstain"] == 0).all()
    assert "to_none" not in ev.check.columns
    assert ev.generations["predicted"].isin(demo_store.label_names).all()
    sec = steer_eval.steering_section(ev)
    assert "a forced choice among the labels" in sec.text and "'none'" not in sec.text
