"""Steering scores a researcher can trust: Wilson intervals, the best fluent strength, the
classifier's check on generations, the store's split, and batched generation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from integral_superposition import steering
from integral_superposition.pipelines.steer_eval import steering_section
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.steering.generation import generate_continuations
from integral_superposition.steering.scores import (
    judge_generations,
    pick_best_strength,
    set_metrics,
    wilson_interval,
)
from scipy.stats import norm


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (24, 48), (47, 48), (43, 43), (1, 1)])
def test_wilson_interval_matches_the_closed_form(k, n):
    z = norm.ppf(0.975)
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(max(0.0, center - half), abs=1e-9)
    assert hi == pytest.approx(min(1.0, center + half), abs=1e-9)
    assert lo <= p <= hi


def test_wilson_interval_width_at_the_default_sample_size():
    lo, hi = wilson_interval(24, 48)  # 12 neutral prompts x 4 samples, p = 0.5
    assert (hi - lo) / 2 <= 0.15
    lo, hi = wilson_interval(12, 24)  # the former 12 prompts x 2 samples
    assert (hi - lo) / 2 > 0.18
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError, match=r"k=5, n=3: expected 0 <= k <= n"):
        wilson_interval(5, 3)


def test_set_metrics_counts_unclassifiable_rows_as_misses():
    pred = np.array([1, 1, -1, 0])
    proba = np.array([[0.2, 0.8], [0.4, 0.6], [0.0, 0.0], [0.9, 0.1]])
    m = set_metrics(pred, proba, np.array([2.0, 2.0, 0.0, 4.0]), np.array([2, 2, 0, 2]),
                    [[1, 2, 3], [4], [], [5, 6]], 1, base_ppl=math.exp(1.0))  # fmt: skip
    assert m["n"] == 4 and m["hits"] == 2 and m["share"] == 0.5 and m["empty"] == 1
    assert (m["share_lo"], m["share_hi"]) == wilson_interval(2, 4)
    assert m["prob"] == pytest.approx((0.8 + 0.6 + 0.1) / 3)
    assert m["perplexity"] == pytest.approx(math.exp(8.0 / 6))
    assert m["ppl_ratio"] == pytest.approx(math.exp(8.0 / 6 - 1.0))


def test_best_strength_is_the_highest_share_within_the_fluency_bound():
    table = pd.DataFrame(
        {
            "strength": [0.125, 0.25, 0.5, 1.0, 2.0],
            "share": [0.20, 0.55, 0.55, 0.90, 0.95],
            "ppl_ratio": [1.05, 1.3, 1.9, 2.4, 25.0],
        }
    )
    best = pick_best_strength(table, 2.0)
    assert best["strength"] == 0.25  # ties go to the smaller strength; 1.0 and 2.0 too dysfluent
    assert pick_best_strength(table, 3.0)["strength"] == 1.0
    table.loc[2, "share"] = 0.6
    assert pick_best_strength(table, 2.0)["strength"] == 0.5
    assert pick_best_strength(table.assign(ppl_ratio=[3.0, np.nan, 4, 5, 6]), 2.0) is None


def test_a_classifier_that_predicts_one_label_cannot_judge():
    names = ["World", "Sports", "Business", "Sci/Tech"]
    prompt_labels = np.repeat(np.arange(4), 12)
    always_sports = judge_generations(prompt_labels, np.ones(48, int), names)
    assert always_sports.dominant_label == "Sports" and not always_sports.can_judge
    assert always_sports.judged == dict.fromkeys(names, False)  # even Sports, recall 1.0
    assert "predicts Sports for most continuations" in always_sports.reason("Sports")

    good = prompt_labels.copy()
    good[::6] = (good[::6] + 1) % 4  # 2 of 12 wrong per label
    check = judge_generations(prompt_labels, good, names, margin=0.2)
    assert check.can_judge and check.dominant_label is None
    assert check.table["recall"].tolist() == pytest.approx([10 / 12] * 4)
    assert check.table.loc[0, "to_Sports"] == pytest.approx(2 / 12)

    weak = prompt_labels.copy()
    weak[prompt_labels == 2] = np.array([2, 2, 2, 2, 2, 0, 0, 1, 1, 3, 3, 3])  # 5/12 < 0.45
    check = judge_generations(prompt_labels, weak, names, margin=0.2)
    assert check.judged == {"World": True, "Sports": True, "Business": False, "Sci/Tech": True}
    assert "predicts Business for 0.42 of them (n=12)" in check.reason("Business")


def test_classifier_split_is_the_stores_split_mask(demo_store):
    clf = steering.LabelClassifier.fit(demo_store, test_fraction=0.25, seed=3)
    rows = demo_store.split_mask("test", test_fraction=0.25, seed=3)
    expect = np.unique(np.asarray(demo_store.doc_ids)[rows])
    assert np.array_equal(np.sort(clf.test_doc_ids), expect)
    assert clf.n_test == expect.size and clf.n_train + clf.n_test == demo_store.docs.shape[0]
    assert sum(clf.test_docs) == clf.n_test and len(clf.test_recall) == 8
    assert "split_mask('test', 0.25, seed=3)" in clf.describe()["split"]
    with pytest.raises(ValueError, match=r"test_fraction=0.0001 \(seed 0\) holds out 0 of"):
        steering.LabelClassifier.fit(demo_store, test_fraction=1e-4)


def test_batched_greedy_generation_equals_one_by_one(tiny_backend):
    prompts = ["The market", "Breaking news: the local team", "In other news,", "Scientists"]
    batched = generate_continuations(tiny_backend, prompts, 6, batch_size=len(prompts))
    for i, prompt in enumerate(prompts):
        alone = generate_continuations(tiny_backend, [prompt], 6, batch_size=1)
        assert alone.token_ids[0] == batched.token_ids[i]
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    with steering.steer(tiny_backend, sae, "layer.2", steering.clamp(5, 40.0), positions="all"):
        steered = generate_continuations(tiny_backend, prompts, 6, batch_size=len(prompts))
        for i, prompt in enumerate(prompts):
            alone = generate_continuations(tiny_backend, [prompt], 6, batch_size=1)
            assert alone.token_ids[0] == steered.token_ids[i]
    assert steered.token_ids != batched.token_ids  # the edit did act


class _OneLabel:
    """A classifier model that predicts label 0 for every text."""

    classes_ = np.array([0, 1, 2, 3, 4, 5, 6, 7])

    def predict_proba(self, X):
        out = np.zeros((len(X), 8))
        out[:, 0] = 1.0
        return out


def test_steering_flags_shares_a_one_label_classifier_cannot_judge(demo_store, tiny_backend):
    fitted = steering.LabelClassifier.fit(demo_store, test_fraction=0.25)
    broken = steering.LabelClassifier(
        model=_OneLabel(), label_names=fitted.label_names, hook_point=fitted.hook_point,
        max_len=fitted.max_len, prepend_bos=fitted.prepend_bos, accuracy=fitted.accuracy,
        n_train=fitted.n_train, n_test=fitted.n_test, test_doc_ids=fitted.test_doc_ids,
    )  # fmt: skip
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    target = demo_store.label_names[1]
    params = steering.SteeringParams(
        latents=[5], labels=[target], mode="clamp", strengths=[1.0], controls=[],
        prompts=["the market"], max_new_tokens=3, samples_per_prompt=1, do_sample=False,
        own_label_prompts=2, check_labels="all",
    )  # fmt: skip
    ev = steering.evaluate_steering(tiny_backend, sae, demo_store, params, classifier=broken)
    lat = ev.summary["latents"][0]
    assert lat["classifier_valid"] is False and "for most continuations" in lat["classifier_note"]
    assert ev.summary["classifier"]["generations"]["dominant_label"] == demo_store.label_names[0]
    assert not ev.table["classifier_valid"].any()
    assert set(ev.check["label"]) == set(demo_store.label_names)
    assert (ev.check[f"to_{demo_store.label_names[0]}"] == 1.0).all()
    assert len(ev.check_generations) == 2 * len(demo_store.label_names)
    text = steering_section(ev).text
    assert "Not evidence: the classifier cannot judge generations" in text

    good = steering.evaluate_steering(
        tiny_backend, sae, demo_store, params.model_copy(update={"check_labels": "targets"}),
        classifier=fitted,
    )  # fmt: skip
    assert set(good.check["label"]) == {target}
    valid = good.summary["latents"][0]["classifier_valid"]
    assert ("Not evidence" in steering_section(good).text) == (not valid)


def test_continuation_nll_equals_a_full_forward_per_row(tiny_backend):
    from integral_superposition.steering.generation import continuation_nll, encode_prompts

    prompts = encode_prompts(tiny_backend.tokenizer, ["The market", "Breaking news: the team", "A"])
    conts = [[5, 9, 11], [], [7, 8, 9, 10, 12]]
    nll, n = continuation_nll(tiny_backend, prompts, conts, batch_size=3)
    assert n.tolist() == [3, 0, 5] and nll[1] == 0.0
    # rows are batched by length: other batch sizes give every row its own number back
    for bs in (1, 2):
        other, n_other = continuation_nll(tiny_backend, prompts, conts, batch_size=bs)
        assert n_other.tolist() == n.tolist()
        np.testing.assert_allclose(other, nll, rtol=1e-5, atol=1e-5)
    for p, c, got in zip(prompts, conts, nll, strict=True):
        if not c:
            continue
        with torch.inference_mode():
            logits = tiny_backend.model(input_ids=torch.tensor([p + c])).logits[0]
        lp = torch.log_softmax(logits[len(p) - 1 : -1].float(), dim=-1)
        want = -lp.gather(1, torch.tensor(c)[:, None]).sum().item()
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_a_check_without_continuations_says_so_instead_of_failing():
    from integral_superposition.steering.scores import judge_generations

    check = judge_generations(prompt_labels=[], predicted=[], label_names=["Sports", "World"])
    assert not check.can_judge and check.describe()["recall"] == {}
    assert check.reason("Sports") == "no continuation of a Sports prompt was checked"


def _pairs(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.repeat([True, True, False, False], [both, only_a, only_b, neither])
    b = np.repeat([True, False, True, False], [both, only_a, only_b, neither])
    return a, b


def test_paired_lift_is_newcombes_interval_for_paired_shares():
    from integral_superposition.steering.scores import paired_lift

    # Fagerland, Lydersen & Laake, the paired 2x2 table of Cavo et al. (2012): 59 / 6 / 16 / 80,
    # Newcombe square-and-add estimate -0.0621, 95% CI -0.1186 to -0.0046
    lift, lo, hi = paired_lift(*_pairs(59, 6, 16, 80))
    assert (lift, lo, hi) == pytest.approx((-10 / 161, -0.1186, -0.0046), abs=5e-5)
    # a control that changes nothing: lift 0, its interval around 0 and within [-1, 1]
    a, _ = _pairs(8, 0, 0, 40)
    lift, lo, hi = paired_lift(a, a)
    assert lift == 0.0 and lo < 0 < hi and hi - lo < 0.2
    # a random edit at the classifier's floor: 7/48 against 8/48 unsteered is a lift near 0
    lift, lo, hi = paired_lift(*_pairs(5, 2, 3, 38))
    assert lift == pytest.approx(-1 / 48) and lo < 0 < hi
    # pairing narrows the interval of positively correlated pairs
    ind_lo, ind_hi = paired_lift(*_pairs(0, 20, 20, 8))[1:]
    cor_lo, cor_hi = paired_lift(*_pairs(20, 0, 0, 28))[1:]
    assert cor_hi - cor_lo < ind_hi - ind_lo
    assert paired_lift(*_pairs(0, 48, 0, 0))[2] == 1.0  # clipped to [-1, 1]
    assert all(math.isnan(x) for x in paired_lift(np.zeros(0, bool), np.zeros(0, bool)))
    with pytest.raises(ValueError, match=r"hits \(3,\) and base_hits \(2,\): expected one flag"):
        paired_lift(np.ones(3, bool), np.ones(2, bool))


def test_latent_summary_gives_each_controls_lift_at_the_best_strength():
    from integral_superposition.steering.scores import latent_summary

    def m(share, lift, ppl_ratio=1.0, n=48):
        return {"n": n, "share": share, "share_lo": share - 0.1, "share_hi": share + 0.1,
                "lift": lift, "lift_lo": lift - 0.15, "lift_hi": lift + 0.15,
                "vocab_mass": 0.01, "perplexity": 30.0, "ppl_ratio": ppl_ratio}  # fmt: skip

    base = {**m(0.17, float("nan")), "lift_lo": float("nan"), "lift_hi": float("nan")}
    steer_ms = [(0.25, m(0.4, 0.23)), (0.5, m(0.69, 0.52, 1.68)), (1.0, m(0.9, 0.73, 3.0))]
    rand_ms = [(0.5, m(0.15, -0.02))]
    own_ms = [(0.5, m(0.8, 0.3))]
    s = latent_summary(
        3, "Sports", base, steer_ms, rand_ms, 7, 2.0, own_base_m=m(0.5, 0.0), own_ms=own_ms
    )
    assert s["best_strength"] == 0.5 and s["best_share"] == 0.69
    assert (s["best_lift"], s["best_lift_lo"], s["best_lift_hi"]) == pytest.approx(
        (0.52, 0.37, 0.67)
    )
    assert s["random_share_at_best"] == 0.15
    assert (s["random_lift_at_best"], s["random_lift_at_best_lo"]) == pytest.approx((-0.02, -0.17))
    assert s["own_label_baseline_share"] == 0.5
    assert (s["own_label_share_at_best"], s["own_label_lift_at_best"]) == (0.8, 0.3)
    none = latent_summary(3, "Sports", base, [(1.0, m(0.9, 0.7, 3.0))], [], 7, 2.0)
    assert none["best_lift"] is None and none["random_lift_at_best"] is None
    assert none["own_label_share_at_best"] is None and none["own_label_baseline_share"] is None
