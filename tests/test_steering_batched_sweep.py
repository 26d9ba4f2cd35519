"""The sweep runs sets that do not wait on each other in one generation call (the unsteered
sets, each round of every latent's strengths, the controls) and gives the tables that one set
per call gives; a round's early-stop decisions use the rows of every strength so far."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from integral_superposition import steering
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.steering.generation import Generations
from integral_superposition.steering.scores import wilson_interval
from integral_superposition.steering.sweep import _refine_next, _Scored, _stop_reasons

FLOATS = ["share", "share_lo", "share_hi", "prob", "vocab_mass", "perplexity", "ppl_ratio",
          "lift", "lift_lo", "lift_hi", "target_prob", "nll"]  # fmt: skip


PROMPTS = ["the market", "news:", "In other news"]


def _two_latents(labels: list[str], **kw) -> steering.SteeringParams:
    """Latents 5 and 11 toward ``labels``, every strength in full, 2 samples of 3 prompts."""
    return steering.SteeringParams(
        latents=[5, 11], labels=labels, mode="clamp", strengths=[0.5, 5.0], controls=["random"],
        prompts=PROMPTS, max_new_tokens=3, samples_per_prompt=2, own_label_prompts=2,
        check_labels="targets", classifier_fit_generations=2, classifier_test_fraction=0.25,
        early_stop=False, stop_above_ppl=False, **kw,
    )  # fmt: skip


def _spy_calls(monkeypatch, sizes: bool = False) -> list:
    """Every generation call the sweep makes, in order: its rows ``[(prompt, sample)]``, or
    with ``sizes`` their number."""
    from integral_superposition.steering import generation, sweep

    calls: list = []

    def counted(*args, **kw):
        calls.append(len(kw["rows"]) if sizes else list(kw["rows"]))
        return generation.generate_continuations(*args, **kw)

    monkeypatch.setattr(sweep, "generate_continuations", counted)
    return calls


def test_one_call_per_group_of_sets_gives_the_tables_of_one_call_per_set(
    demo_store, tiny_backend, monkeypatch
):
    from integral_superposition.steering import sweep

    calls = _spy_calls(monkeypatch, sizes=True)
    # the tiny random model's perplexity hardly moves under any edit: the strongest strength
    # is made to end after its first round, as a 5x perplexity would end it
    decide = sweep._stop_reasons

    def forced(sets, lats, ppl_ratio_max):
        why = decide(sets, lats, ppl_ratio_max)
        return {key: "perplexity" if key[1] == 500.0 else w for key, w in why.items()}

    monkeypatch.setattr(sweep, "_stop_reasons", forced)
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    labels = list(demo_store.label_names[:2])
    prompts = ["the market", "news:", "In other news"]
    params = steering.SteeringParams(
        latents=[5, 11], labels=labels, mode="clamp", strengths=[0.5, 5.0, 500.0],
        controls=["alpha0", "random", "own_label"], prompts=prompts, max_new_tokens=3,
        samples_per_prompt=2, own_label_prompts=2, check_labels="targets",
        classifier_fit="both", classifier_fit_generations=2, classifier_test_fraction=0.25,
        batch_size=16, refine=0, confirm=False,  # the refinement, the confirmation: own tests
    )  # fmt: skip
    tok, doc, scan = steering.picks.enrichment_tables(sae, demo_store)
    kw = dict(enrichment=(tok, doc), max_acts=scan.act_max)
    batched = steering.evaluate_steering(tiny_backend, sae, demo_store, params, **kw)
    n_batched = len(calls)
    alone = steering.evaluate_steering(tiny_backend, sae, demo_store, params, sets_per_call=1, **kw)
    n_alone = len(calls) - n_batched
    t, ref = batched.table, alone.table
    # the same sets in the same order, with the same rows, decisions and scores
    assert list(t.columns) == list(ref.columns) and len(t) == len(ref)
    exact = [c for c in t.columns if c not in FLOATS]
    pd.testing.assert_frame_equal(t[exact], ref[exact])
    close = [c for c in FLOATS[:-2] if c != "prob"]
    pd.testing.assert_frame_equal(t[close], ref[close], rtol=1e-5, atol=1e-6)
    # the classifier's probabilities come from a solver that stops at its tolerance: features
    # that differ by the rounding of other batches move them by about that much
    pd.testing.assert_frame_equal(t[["prob"]], ref[["prob"]], rtol=2e-2, atol=1e-3)
    g, gref = batched.generations, alone.generations
    exact = [c for c in g.columns if c not in FLOATS]
    pd.testing.assert_frame_equal(g[exact], gref[exact])
    pd.testing.assert_frame_equal(g[["nll"]], gref[["nll"]], rtol=1e-5, atol=1e-5)
    pd.testing.assert_frame_equal(g[["target_prob"]], gref[["target_prob"]], rtol=2e-2, atol=1e-3)
    pd.testing.assert_frame_equal(batched.check_generations, alone.check_generations)
    pd.testing.assert_frame_equal(batched.fit_generations, alone.fit_generations)
    for lat, lref in zip(batched.summary["latents"], alone.summary["latents"], strict=True):
        assert lat.keys() == lref.keys()
        for k, v in lat.items():
            if isinstance(v, float):
                assert v == pytest.approx(lref[k], rel=1e-5, nan_ok=True), k
            else:
                assert v == lref[k], k
    # both latents' sweeps and controls ran, and early stopping ended the strongest strength
    steer_rows = t[t["control"] == "steer"]
    assert set(t["control"]) == {"unsteered", "alpha0", "steer", "random", "own_label"}
    assert set(steer_rows["label"]) == set(labels)
    assert (steer_rows.loc[steer_rows["strength"] == 500.0, "stopped"] == "perplexity").all()
    assert (steer_rows.loc[steer_rows["strength"] == 500.0, "n"] == len(prompts)).all()
    whole = t["stopped"].isna() & (t["prompts"] == "neutral")
    # the random control pools its draws (the default 3), each a whole set
    assert (t.loc[whole, "n"] == 2 * len(prompts) * t.loc[whole, "draws"]).all()
    assert (t.loc[t["control"] == "random", "draws"] == params.random_draws).all()
    # calls: the unsteered sets, each round of the strengths, the controls; against one per set
    # (the classifier's fitting set and its "none" set (2 topic-neutral openings), the neutral
    # set, a check per label, every round of every strength, every control)
    assert n_batched == 4 and calls[:4] == [
        2 * 8 + 2 + 2 * len(prompts) + len(batched.check_generations),
        3 * 2 * len(prompts),
        2 * 2 * len(prompts),
        int(t.loc[t["strength"].notna() & (t["control"] != "steer"), "n"].sum())
        + (params.random_draws - 1) * 2 * len(prompts),  # the later draws' unsteered sets
    ]
    # the control sets (each random draw one), and the unsteered sets of the later draws
    n_ctrl = int(t.loc[t["strength"].notna() & (t["control"] != "steer"), "draws"].sum())
    n_ctrl += params.random_draws - 1
    assert n_alone == 1 + 1 + 1 + len(labels) + steer_rows["n"].sum() // len(prompts) + n_ctrl


def _set(hits: int, n: int, per_token_nll: float, spread: float = 0.05, seed: int = 0):
    """A scored set of ``n`` continuations of 10 tokens, ``hits`` of them label 0."""
    rng = np.random.default_rng(seed)
    pred = np.array([0] * hits + [1] * (n - hits))
    proba = np.eye(2)[pred]
    gens = Generations([""] * n, ["x"] * n, [[1]] * n, [[2] * 10] * n)
    nll = rng.normal(per_token_nll, spread, n) * 10
    return _Scored(gens, proba, np.ones(n, bool), nll, np.full(n, 10))


def test_a_round_stops_a_strength_that_a_surely_fluent_strength_beats():
    base = math.exp(3.0)
    lats = [(7, 0, base)]
    sets = {
        (0, 0.25): _set(1, 24, 3.0, seed=1),  # share 0.04: upper bound 0.20
        (0, 0.5): _set(20, 24, 3.2, seed=2),  # share 0.83: lower bound 0.64, 1.2x perplexity
        (0, 4.0): _set(23, 24, 3.0 + math.log(6.0), seed=3),  # 6x perplexity
    }
    why = _stop_reasons(sets, lats, 2.0)
    assert why == {(0, 0.25): "cannot win", (0, 0.5): None, (0, 4.0): "perplexity"}
    # a rival that may yet prove not fluent (1.9x, wide) decides nothing
    sets[(0, 0.5)] = _set(20, 24, 3.0 + math.log(1.9), spread=0.5, seed=2)
    assert _stop_reasons(sets, lats, 2.0)[(0, 0.25)] is None
    # nor does a strength of another latent
    two = {(0, 0.25): sets[(0, 0.25)], (1, 0.5): _set(20, 24, 3.2, seed=2)}
    assert _stop_reasons(two, [(7, 0, base), (8, 0, base)], 2.0) == {
        (0, 0.25): None,
        (1, 0.5): None,
    }


def test_sets_per_call_is_checked(demo_store, tiny_backend):
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    with pytest.raises(ValueError, match="sets_per_call=0: expected None"):
        steering.evaluate_steering(tiny_backend, sae, demo_store, {}, sets_per_call=0)


def test_refinement_tries_between_the_last_fluent_strength_and_the_first_beyond_it():
    base = math.exp(3.0)
    ppl = lambda ratio: 3.0 + math.log(ratio)  # noqa: E731
    sets = [
        (1.0, _set(16, 24, ppl(1.2), seed=1)),  # the best fluent share, 0.67
        (2.0, _set(12, 24, ppl(1.5), seed=2)),  # fluent, the strongest fluent strength
        (4.0, _set(20, 24, ppl(3.0), seed=3)),  # 0.83, beyond the bound
        (8.0, _set(24, 24, ppl(9.0), seed=4)),
    ]
    assert _refine_next(sets, 0, base, 2.0) == pytest.approx(math.sqrt(8.0))
    # a strength that ended early for perplexity bounds the bracket too; one that ended
    # because another surely beats it is neither fluent nor beyond
    sets[2][1].stopped = "perplexity"
    assert _refine_next(sets, 0, base, 2.0) == pytest.approx(math.sqrt(8.0))
    sets[1][1].stopped = "cannot win"  # the bracket is [1, 4], whose midpoint ran (and lost)
    assert _refine_next(sets, 0, base, 2.0) is None
    sets[1][1].stopped = None
    # once the midpoint has run, the next round halves the bracket it leaves
    mid = (math.sqrt(8.0), _set(18, 24, ppl(2.6), seed=5))  # beyond: [2, 2.83]
    assert _refine_next(sorted([*sets, mid], key=lambda x: x[0]), 0, base, 2.0) == pytest.approx(
        math.sqrt(2.0 * math.sqrt(8.0))
    )
    # nothing to gain: the stronger set's share does not beat the best fluent one
    weak = [sets[0], sets[1], (4.0, _set(16, 24, ppl(3.0), seed=3))]
    assert _refine_next(weak, 0, base, 2.0) is None
    # every strength fluent, none fluent, or no unsteered perplexity to compare with
    assert _refine_next(sets[:2], 0, base, 2.0) is None
    assert _refine_next(sets[2:], 0, base, 2.0) is None
    assert _refine_next(sets, 0, float("nan"), 2.0) is None
    # the target label's share decides: label 1's best fluent share (0.5) beats the 0.17
    # beyond the bound
    assert _refine_next(sets[:3], 1, base, 2.0) is None
    # a bracket with a strength of 0: the arithmetic mean
    zero = [(0.0, _set(10, 24, ppl(1.0), seed=6)), (1.0, _set(20, 24, ppl(4.0), seed=7))]
    assert _refine_next(zero, 0, base, 2.0) == pytest.approx(0.5)


def test_refined_strengths_run_in_one_call_and_join_the_sweep(
    demo_store, tiny_backend, monkeypatch
):
    from integral_superposition.steering import sweep

    calls = _spy_calls(monkeypatch, sizes=True)
    # the tiny random model's perplexity hardly moves: every round tries the midpoint of the
    # two strongest strengths (the decision itself: the test above)
    asked: list[list[float]] = []

    def between(sets, c, base_ppl, ppl_ratio_max):
        asked.append([st for st, _ in sets])
        (a, _), (b, _) = sets[-2:]
        return (a + b) / 2

    monkeypatch.setattr(sweep, "_refine_next", between)
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    labels, prompts = list(demo_store.label_names[:2]), PROMPTS
    progress: list[tuple[int, int]] = []
    params = _two_latents(labels, refine=2, text_judge=False)
    res = steering.evaluate_steering(
        tiny_backend, sae, demo_store, params, on_progress=lambda d, t: progress.append((d, t))
    )
    t = res.table
    steer_rows = t[t["control"] == "steer"]
    # round 1 tries 2.75 for both latents, round 2 the midpoint of 2.75 and 5
    assert asked == [[0.5, 5.0], [0.5, 5.0], [0.5, 2.75, 5.0], [0.5, 2.75, 5.0]]
    for lb in labels:
        mine = steer_rows[steer_rows["label"] == lb]
        assert mine["strength"].tolist() == [0.5, 2.75, 3.875, 5.0]
        assert mine["refined"].tolist() == [False, True, True, False]
        assert (mine["n"] == 2 * len(prompts)).all()
    # each round ran both latents' refined sets in one call of full sets
    assert calls[2:4] == [2 * 2 * len(prompts)] * 2
    for lat in res.summary["latents"]:
        assert lat["refined_strengths"] == [2.75, 3.875]
        assert lat["strengths_run"] == [0.5, 2.75, 3.875, 5.0]
        best = lat["best_strength"]
        rnd = t[(t["control"] == "random") & (t["label"] == lat["label"])]
        assert rnd["strength"].tolist() == [best]  # the control runs at the best, refined or not
    assert res.summary["refine"] == 2 and res.summary["strengths"] == [0.5, 5.0]
    assert progress[-1][0] == progress[-1][1]  # the planned total counted the refined sets
    # controls at every strength: the refined ones too, and the total still adds up
    progress.clear()
    every = params.model_copy(update={"control_strengths": "all", "refine": 1})
    res = steering.evaluate_steering(
        tiny_backend, sae, demo_store, every, on_progress=lambda d, t: progress.append((d, t))
    )
    rnd = res.table[res.table["control"] == "random"]
    for lb in labels:
        assert rnd.loc[rnd["label"] == lb, "strength"].tolist() == [0.5, 2.75, 5.0]
    assert progress[-1][0] == progress[-1][1]


def test_the_best_strength_is_confirmed_on_fresh_samples(demo_store, tiny_backend, monkeypatch):
    calls = _spy_calls(monkeypatch)
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    labels, prompts = list(demo_store.label_names[:2]), PROMPTS
    progress: list[tuple[int, int]] = []
    params = _two_latents(labels, refine=0)
    res = steering.evaluate_steering(
        tiny_backend, sae, demo_store, params, on_progress=lambda d, t: progress.append((d, t))
    )
    t = res.table
    assert progress[-1][0] == progress[-1][1]
    # the controls' call ends with the confirmation: the unsteered set and each latent's best
    # strength, on samples 2 and 3 of every prompt (the sweep used 0 and 1)
    n = len(prompts)
    last = calls[-1]
    # (before it, the random control's three draws of both latents: the first on the sweep's
    # samples, the others on 4-5 and 6-7; after it, the unsteered model on those)
    draw = [[0] * n + [1] * n, [4] * n + [5] * n, [6] * n + [7] * n]
    assert params.random_draws == 3
    assert [smp for _, smp in last] == (
        (draw[0] + draw[1] + draw[2]) * 2 + ([2] * n + [3] * n) * 3 + draw[1] + draw[2]
    )
    for lat in res.summary["latents"]:
        assert lat["best_strength"] is not None
        mine = t[(t["label"] == lat["label"]) & (t["prompts"] == "confirm")]
        assert mine["control"].tolist() == ["unsteered", "confirm"]
        base, conf = mine.iloc[0], mine.iloc[1]
        assert conf["strength"] == lat["best_strength"] and (mine["n"] == 2 * n).all()
        assert lat["confirmed_share"] == pytest.approx(conf["share"])
        assert lat["confirmed_baseline_share"] == pytest.approx(base["share"])
        assert lat["confirmed_lift"] == pytest.approx(conf["lift"])
        assert lat["confirmed_ppl_ratio"] == pytest.approx(conf["ppl_ratio"])
        assert lat["confirm_samples"] == [2, 3]
        # fresh samples: other continuations than the sweep's at the same strength
        g = res.generations
        same = g[(g["label"] == lat["label"]) & (g["strength"] == lat["best_strength"])]
        swept = same.loc[same["control"] == "steer", "text"].tolist()
        fresh = same.loc[same["control"] == "confirm", "text"].tolist()
        assert len(fresh) == len(swept) == 2 * n and fresh != swept
    assert res.summary["confirm"] is True
    line = steer_eval_text(res)
    assert "that strength again on fresh samples" in line
    off = steering.evaluate_steering(
        tiny_backend, sae, demo_store, params.model_copy(update={"confirm": False})
    )
    assert "confirm" not in set(off.table["prompts"]) and "confirm" not in set(off.table["control"])
    assert all("confirmed_share" not in lat for lat in off.summary["latents"])
    greedy = steering.evaluate_steering(
        tiny_backend, sae, demo_store, params.model_copy(update={"do_sample": False})
    )
    assert "confirm" not in set(greedy.table["prompts"]) and greedy.summary["confirm"] is False
    # without it, every row is the same as with it
    pd.testing.assert_frame_equal(
        off.table.drop(columns=["prob"]),
        t[t["prompts"] != "confirm"].drop(columns=["prob"]).reset_index(drop=True),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def steer_eval_text(res) -> str:
    """The report section's text of a steering result."""
    from integral_superposition.pipelines.steer_eval import _latent_line

    return " ".join(_latent_line(lat) for lat in res.summary["latents"])


def test_the_random_control_pools_independent_draws(demo_store, tiny_backend, monkeypatch):
    calls = _spy_calls(monkeypatch)
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    labels, n = list(demo_store.label_names[:2]), len(PROMPTS)
    progress: list[tuple[int, int]] = []
    params = _two_latents(labels, refine=0, confirm=False, random_draws=3)
    res = steering.evaluate_steering(
        tiny_backend, sae, demo_store, params, on_progress=lambda d, t: progress.append((d, t))
    )
    assert progress[-1][0] == progress[-1][1]
    # the controls' call: three random sets per latent, draw 0 on the sweep's samples 0 and 1,
    # draws 1 and 2 on samples 4-5 and 6-7 (after the confirmation's 2-3), then the unsteered
    # model on samples 4-5 and 6-7 once for both latents
    draw = {0: [0] * n + [1] * n, 1: [4] * n + [5] * n, 2: [6] * n + [7] * n}
    assert [smp for _, smp in calls[-1]] == ((draw[0] + draw[1] + draw[2]) * 2 + draw[1] + draw[2])
    one = steering.evaluate_steering(
        tiny_backend, sae, demo_store, params.model_copy(update={"random_draws": 1})
    )
    t, g, g1 = res.table, res.generations, one.generations
    for lat, lat1 in zip(res.summary["latents"], one.summary["latents"], strict=True):
        label, best = lat["label"], lat["best_strength"]
        mine = t[(t["label"] == label) & (t["prompts"] == "random")]
        assert mine["control"].tolist() == ["unsteered", "random"]
        base, row = mine.iloc[0], mine.iloc[1]
        assert row["strength"] == best and (mine["n"] == 3 * 2 * n).all()
        assert (mine["draws"] == 3).all()
        texts = g[(g["label"] == label) & (g["control"] == "random")]
        assert texts["draw"].tolist() == [0] * 2 * n + [1] * 2 * n + [2] * 2 * n
        # draw 0 is the one-draw control, on the sweep's samples; its unsteered rows are the
        # sweep's unsteered set
        rand1 = g1[(g1["label"] == label) & (g1["control"] == "random")]
        assert texts.loc[texts["draw"] == 0, "text"].tolist() == rand1["text"].tolist()
        unst = g[(g["label"] == label) & (g["control"] == "unsteered")]
        pooled = unst[unst["prompts"] == "random"]
        assert pooled.loc[pooled["draw"] == 0, "text"].tolist() == (
            unst.loc[unst["prompts"] == "neutral", "text"].tolist()
        )
        # later draws are fresh samples: the unsteered texts differ from draw 0's
        assert pooled.loc[pooled["draw"] == 1, "text"].tolist() != (
            pooled.loc[pooled["draw"] == 0, "text"].tolist()
        )
        assert lat["random_samples"] == [[0, 1], [4, 5], [6, 7]]
        assert lat1["random_samples"] == [[0, 1]] and "random_baseline_share" not in lat1
        draws = lat["random_draws"]
        assert len(draws) == 3 and draws[0] == [lat1["random_latent"]] == [lat["random_latent"]]
        assert len({d[0] for d in draws}) > 1
        # the pooled share is the draws' hits over all their rows, and their mean share
        hit = texts["predicted"] == label
        shares = hit.groupby(texts["draw"]).mean().tolist()
        assert lat["random_draw_shares_at_best"] == pytest.approx(shares)
        assert row["hits"] == hit.sum() and row["share"] == pytest.approx(np.mean(shares))
        assert lat["random_share_at_best"] == pytest.approx(row["share"])
        lo, hi = wilson_interval(int(hit.sum()), 3 * 2 * n)
        assert (row["share_lo"], row["share_hi"]) == pytest.approx((lo, hi))
        # each draw's continuation is paired with the unsteered one of its prompt and sample
        assert row["lift"] == pytest.approx(row["share"] - base["share"])
        assert lat["random_lift_at_best"] == pytest.approx(row["lift"])
        assert lat["random_baseline_share"] == pytest.approx(base["share"])
        assert row["ppl_ratio"] == pytest.approx(row["perplexity"] / base["perplexity"])
    # every other row is the one-draw run's
    keep = ~t["prompts"].eq("random")
    pd.testing.assert_frame_equal(
        t[keep].drop(columns=["prob"]).reset_index(drop=True),
        one.table[one.table["control"] != "random"].drop(columns=["prob"]).reset_index(drop=True),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    line = steer_eval_text(res)
    assert "(1 of 3 draws; by draw" in line and "draws; by draw" not in steer_eval_text(one)
