"""The second judge of steered text: logistic regression on the words alone (TF-IDF), fitted
on the classifier's texts and weights, reported beside every share."""

from __future__ import annotations

import numpy as np
import pytest
from integral_superposition import steering
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.steering.classifier import (
    ABSTAIN,
    EMPTY,
    TextJudge,
    balanced_weights,
    fit_weights,
)

_WORDS = {
    0: "match goal striker league coach season playoff team",
    1: "stocks profit shares market earnings investors quarter bank",
    2: "weather garden recipe dinner holiday family kitchen music",  # "none"
}


def _texts(label: int, n: int, rng) -> list[str]:
    words = _WORDS[label].split()
    return [" ".join(rng.choice(words, 5)) for _ in range(n)]


def test_text_judge_reads_planted_words_and_abstains_on_text_of_no_label():
    rng = np.random.default_rng(0)
    texts = _texts(0, 40, rng) + _texts(1, 40, rng) + _texts(2, 30, rng)
    y = np.r_[np.zeros(40), np.ones(40), np.full(30, 2)].astype(np.int64)
    w = fit_weights([y[:80]], 30, 2, balanced=True)
    judge = TextJudge.fit(
        texts, y, w, ["Sports", "Business"],
        test_texts=_texts(0, 10, rng) + _texts(1, 10, rng), test_y=np.r_[np.zeros(10), np.ones(10)],
    )  # fmt: skip
    assert judge.abstain and judge.classes == ["Sports", "Business", "none"]
    assert judge.accuracy == 1.0 and judge.n_train == 110
    new = _texts(0, 20, rng) + _texts(1, 20, rng) + _texts(2, 20, rng)
    pred = judge.predict(new)
    assert (pred[:20] == 0).all() and (pred[20:40] == 1).all() and (pred[40:] == ABSTAIN).all()
    # a text with no term the judge knows is not judged; an empty list gives empty arrays
    assert judge.predict(["zzz qqq", ""]).tolist() == [EMPTY, EMPTY]
    proba, valid = judge.predict_proba([])
    assert proba.shape == (0, 3) and valid.shape == (0,)
    assert judge.describe()["held_out_accuracy"] == 1.0


def test_text_judge_refuses_bad_input():
    rng = np.random.default_rng(1)
    texts = _texts(0, 5, rng) + _texts(1, 5, rng)
    y = np.r_[np.zeros(5), np.ones(5)].astype(np.int64)
    with pytest.raises(ValueError, match=r"texts \(10\), y \(9,\) and weights \(10,\)"):
        TextJudge.fit(texts, y[:9], np.ones(10), ["a", "b"])
    with pytest.raises(ValueError, match=r"y holds label ids \[7\]: expected 0..2"):
        TextJudge.fit(texts, np.r_[y[:9], 7], np.ones(10), ["a", "b"])
    with pytest.raises(ValueError, match=r"y has a single label \(\[0\]\)"):
        TextJudge.fit(texts, np.zeros(10, np.int64), np.ones(10), ["a", "b"])
    with pytest.raises(ValueError, match="weights: expected finite non-negative"):
        TextJudge.fit(texts, y, np.r_[np.ones(9), -1.0], ["a", "b"])
    with pytest.raises(ValueError, match="texts: expected words shared by at least two texts"):
        TextJudge.fit(["alpha", "beta"], np.array([0, 1]), np.ones(2), ["a", "b"])


def test_fit_weights_give_none_the_weight_of_one_label():
    y_docs, y_gens = np.array([0, 0, 0, 1]), np.array([0, 1, 1, 1, 1, 1])
    w = fit_weights([y_docs, y_gens], 5, 2, balanced=True)
    assert w.shape == (15,) and w.mean() == pytest.approx(1.0)
    labels, none = w[:10], w[10:]
    # within the sources: balanced_weights (up to the common scale)
    base = balanced_weights([y_docs, y_gens])
    assert labels / labels.sum() == pytest.approx(base / base.sum())
    y = np.r_[y_docs, y_gens]
    assert none.sum() == pytest.approx(labels[y == 0].sum()) == pytest.approx(labels[y == 1].sum())
    assert fit_weights([y_docs], 0, 2, balanced=False).tolist() == [1.0] * 4


def _params(**kw):
    return steering.SteeringParams(**{
        "latents": [5], "labels": None, "mode": "clamp", "strengths": [1.0, 8.0],
        "controls": ["random"], "prompts": ["the market", "a new"], "max_new_tokens": 4,
        "samples_per_prompt": 2, "own_label_prompts": 2, "check_labels": "targets",
        "classifier_fit_generations": 3, "classifier_test_fraction": 0.25, **kw,
    })  # fmt: skip


def test_every_steering_row_has_the_text_judges_share_of_its_generations(demo_store, tiny_backend):
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    ev = steering.evaluate_steering(tiny_backend, sae, demo_store, _params())
    tj = ev.summary["classifier"]["text_judge"]
    assert tj["fitted"] and tj["kind"].startswith("logistic regression on TF-IDF")
    # documents (training split), continuations of their openings and the none set
    fit = ev.fit_generations
    n_docs = len(demo_store.docs) - ev.summary["classifier"]["n_test_docs"]
    assert tj["n_train_texts"] == n_docs + int(fit["used"].sum())
    assert 0 <= tj["held_out_accuracy"] <= 1 and tj["abstain"]
    g, t = ev.generations, ev.table
    assert {"text_share", "text_share_lo", "text_share_hi", "text_lift"} <= set(t.columns)
    for i, row in t.iterrows():
        mine = g[g["set"] == i]
        assert row["text_share"] == pytest.approx((mine["predicted_text"] == row["label"]).mean())
        assert row["text_share_lo"] <= row["text_share"] <= row["text_share_hi"]
        if row["control"] == "unsteered":
            assert np.isnan(row["text_lift"])
        else:  # paired with the unsteered set of the same prompts
            ref = g[(g["control"] == "unsteered") & (g["label"] == row["label"])]
            hit = (mine["predicted_text"] == row["label"]).to_numpy()
            base = (ref["predicted_text"] == row["label"]).to_numpy()[: len(hit)]
            assert row["text_lift"] == pytest.approx(hit.mean() - base.mean())
    # the judge's labels are its own: they may differ from the classifier's
    assert set(g["predicted_text"].dropna()) <= {*demo_store.label_names, "none"}
    lat = ev.summary["latents"][0]
    assert lat["baseline_text_share"] == pytest.approx(
        t.loc[t["control"] == "unsteered", "text_share"].iloc[0]
    )
    if lat["best_strength"] is not None:
        best = t[(t["control"] == "steer") & (t["strength"] == lat["best_strength"])].iloc[0]
        assert lat["best_text_share"] == pytest.approx(best["text_share"])
        rnd = t[(t["control"] == "random") & (t["strength"] == lat["best_strength"])].iloc[0]
        assert lat["random_text_share_at_best"] == pytest.approx(rnd["text_share"])
    # its check on the classifier check's continuations, and what it calls neutral text
    chk = ev.check_generations
    for lb, r in tj["recall"].items():
        assert r == pytest.approx(
            (chk.loc[chk["prompt_label"] == lb, "predicted_text"] == lb).mean()
        )
    assert sum(tj["neutral"].values()) <= 1.0 + 1e-9


def test_without_the_text_judge_the_outputs_have_no_second_share(demo_store, tiny_backend):
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    ev = steering.evaluate_steering(
        tiny_backend, sae, demo_store, _params(text_judge=False, strengths=[1.0])
    )
    assert ev.summary["classifier"]["text_judge"] is None
    assert "text_share" not in ev.table and "predicted_text" not in ev.generations
    assert "predicted_text" not in ev.check_generations
    assert ev.summary["latents"][0]["best_text_share"] is None


def test_the_steering_sentence_gives_the_text_judges_share_beside_the_classifiers():
    from integral_superposition.pipelines.steer_eval import _latent_line

    lat = {"latent": 7, "label": "Sports", "baseline_share": 0.1, "best_strength": 0.25,
           "best_share": 0.8, "best_ppl_ratio": 1.6, "random_latent": 3,
           "random_share_at_best": 0.05, "baseline_text_share": 0.12, "best_text_share": 0.7,
           "best_text_share_lo": 0.56, "best_text_share_hi": 0.81, "best_text_lift": 0.58,
           "random_text_share_at_best": 0.1}  # fmt: skip
    line = _latent_line(lat)
    assert (
        "The text judge (words only) gives 0.70 [0.56, 0.81] (lift +0.58) at that strength "
        "and 0.10 to the random control, against 0.12 unsteered." in line
    )
    plain = {k: v for k, v in lat.items() if "text" not in k}
    assert "text judge" not in _latent_line(plain)


def test_lift_over_pairs_rows_with_the_unsteered_set_and_needs_enough_of_them():
    from integral_superposition.steering.scores import lift_over, paired_lift

    steered, base = np.array([1, 1, 0, 1]), np.array([0, 1, 0, 0, 1])
    assert lift_over(steered, 1, base) == paired_lift(steered == 1, base[:4] == 1)
    assert np.isnan(lift_over(steered, 1, None)).all()
    assert np.isnan(lift_over(steered, 1, base[:3])).all()


def test_text_judge_chooses_its_regularisation_by_cross_validation():
    from integral_superposition.steering.classifier import TEXT_JUDGE_CS

    rng = np.random.default_rng(4)
    texts = _texts(0, 30, rng) + _texts(1, 30, rng)
    y = np.r_[np.zeros(30), np.ones(30)].astype(np.int64)
    judge = TextJudge.fit(texts, y, np.ones(60), ["Sports", "Business"])
    search = judge.describe()["C_search"]
    assert search["cs"] == sorted(TEXT_JUDGE_CS)
    assert judge.C == search["cs"][int(np.argmin(search["log_loss"]))] == judge.model[-1].C
    fixed = TextJudge.fit(texts, y, np.ones(60), ["Sports", "Business"], C=2.0)
    assert fixed.C == 2.0 and "C_search" not in fixed.describe()
