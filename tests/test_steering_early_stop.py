"""A strength sweep that spends continuations only where they can change the answer: a
strength ends early once it is clearly not fluent or cannot beat a complete fluent strength;
the best strength and the controls always get every continuation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from integral_superposition import steering
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.steering.scores import early_stop_reason, log_perplexity_interval


def _nll(rng, n, per_token, tokens=12, spread=0.5):
    """Summed NLL of ``n`` continuations whose per-token NLL scatters around ``per_token``."""
    return rng.normal(per_token, spread, size=n) * tokens, np.full(n, tokens)


def test_log_perplexity_interval_covers_the_pooled_perplexity():
    rng = np.random.default_rng(0)
    nll, tok = _nll(rng, 48, 3.0)
    lo, hi = log_perplexity_interval(nll, tok)
    pooled = nll.sum() / tok.sum()
    assert lo < pooled < hi and hi - lo < 0.5
    # coverage over repeated sets: about 95% of intervals hold the true mean
    covered = [
        (lambda iv: iv[0] <= 3.0 <= iv[1])(log_perplexity_interval(*_nll(rng, 12, 3.0)))
        for _ in range(400)
    ]
    assert 0.88 < np.mean(covered) <= 1.0
    assert log_perplexity_interval(np.array([5.0]), np.array([3])) == (-math.inf, math.inf)


def test_a_strength_stops_when_clearly_not_fluent_or_unable_to_win():
    rng = np.random.default_rng(1)
    base_ppl = math.exp(3.0)
    far, tok = _nll(rng, 12, 3.0 + math.log(5.0))  # 5x perplexity
    assert early_stop_reason(3, 12, far, tok, base_ppl, 2.0, None) == "perplexity"
    near, tok = _nll(rng, 12, 3.0 + math.log(2.1))  # 2.1x: not decided by 12 continuations
    assert early_stop_reason(3, 12, near, tok, base_ppl, 2.0, None) is None
    fluent, tok = _nll(rng, 12, 3.0)
    # 1 of 12: upper bound 0.35 - below a complete strength's 0.6, not below 0.3
    assert early_stop_reason(1, 12, fluent, tok, base_ppl, 2.0, 0.6) == "cannot win"
    assert early_stop_reason(1, 12, fluent, tok, base_ppl, 2.0, 0.3) is None
    assert early_stop_reason(1, 12, fluent, tok, base_ppl, 2.0, None) is None
    assert early_stop_reason(1, 12, far, tok, float("nan"), 2.0, None) is None


def test_early_stopped_sweep_keeps_the_winner_and_controls_complete(
    demo_store, tiny_backend, monkeypatch
):
    from integral_superposition.steering import generation, sweep

    calls: list[int] = []  # rows of every generation call of the sweep

    def counted(*args, **kw):
        calls.append(len(kw["rows"]))
        return generation.generate_continuations(*args, **kw)

    monkeypatch.setattr(sweep, "generate_continuations", counted)
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    target = demo_store.label_names[1]
    prompts = ["the market", "news:", "In other news"]
    params = steering.SteeringParams(
        latents=[5], labels=[target], mode="clamp", strengths=[0.5, 5.0, 500.0],
        controls=["alpha0", "random"], prompts=prompts, max_new_tokens=4,
        samples_per_prompt=3, own_label_prompts=2, check_labels="targets",
        classifier_fit="documents", classifier_test_fraction=0.25,
        refine=0, confirm=False,  # their sets: tests/test_steering_batched_sweep.py
    )  # fmt: skip
    tok, doc, scan = steering.picks.enrichment_tables(sae, demo_store)
    shared = dict(
        enrichment=(tok, doc), max_acts=scan.act_max,
        classifier=steering.LabelClassifier.fit(demo_store, test_fraction=0.25),
    )  # fmt: skip
    ev = steering.evaluate_steering(tiny_backend, sae, demo_store, params, **shared)
    t = ev.table
    full = len(prompts) * params.samples_per_prompt
    steer_rows = t[t["control"] == "steer"]
    assert sorted(steer_rows["strength"]) == [0.5, 5.0, 500.0]
    # every set is whole rounds of one continuation per prompt (the random control: its
    # draws' sets pooled)
    per_set = t["n"] / t["draws"]
    assert (per_set % len(prompts) == 0).all() and (per_set <= full).all()
    assert (per_set[t["stopped"].isna()] == full).all()
    assert (t.loc[t["stopped"].notna(), "n"] < full).all()
    assert set(t["stopped"].dropna()) <= {"perplexity", "cannot win"}
    assert t.loc[t["control"] != "steer", "stopped"].isna().all()  # controls run in full
    # steered and unsteered rounds draw the same random numbers: the identity edit equals
    base = ev.generations[
        (ev.generations["control"] == "unsteered") & (ev.generations["prompts"] == "neutral")
    ]
    alpha0 = ev.generations[ev.generations["control"] == "alpha0"]
    assert base["text"].tolist() == alpha0["text"].tolist()
    assert base["prompt"].tolist() == prompts * params.samples_per_prompt  # sample-major rows
    # one call of the unsteered sets, one per round of the strengths still running (all of
    # them in the first), one of the controls
    # (each random draw a set, and the unsteered sets of the draws after the first)
    ctrl_sets = int(t.loc[t["control"].isin(["alpha0", "random"]), "draws"].sum())
    ctrl_sets += params.random_draws - 1
    n_rounds = int(steer_rows["n"].max() // len(prompts))
    assert len(calls) == 2 + n_rounds
    assert calls[0] == full + len(ev.check_generations)
    assert calls[1] == 3 * len(prompts) and sum(calls[1:-1]) == steer_rows["n"].sum()
    assert calls[-1] == full * ctrl_sets
    # ... with the rows its rounds give: the unsteered set is the same call outside the sweep
    alone = generation.generate_continuations(
        tiny_backend, prompts, params.max_new_tokens, do_sample=True,
        samples_per_prompt=3, seed=params.seed, sample_major=True,
    )  # fmt: skip
    assert base["text"].tolist() == alone.texts
    lat = ev.summary["latents"][0]
    if lat["best_strength"] is not None:
        win = steer_rows.set_index("strength").loc[lat["best_strength"]]
        assert win["n"] == full and win["stopped"] is None
        assert lat["best_share_hi"] - lat["best_share_lo"] <= 2 * 0.5
    # the same sweep without early stopping runs every strength in full
    whole = steering.evaluate_steering(
        tiny_backend, sae, demo_store,
        params.model_copy(update={
            "early_stop": False, "stop_above_ppl": False, "strengths": [0.5, 500.0],
            "controls": [],
        }), **shared,
    )  # fmt: skip
    w = whole.table
    assert (w["n"] == full).all() and w["stopped"].isna().all()
    assert sorted(w.loc[w["control"] == "steer", "strength"]) == [0.5, 500.0]
    # a strength in rounds (stopped or not) holds the first rows of the same set in one call
    wg, eg = whole.generations, ev.generations
    for st in (0.5, 500.0):
        rounds = eg.loc[(eg["control"] == "steer") & (eg["strength"] == st), "text"].tolist()
        one = wg.loc[(wg["control"] == "steer") & (wg["strength"] == st), "text"].tolist()
        assert len(one) == full and rounds == one[: len(rounds)]
    assert wg.loc[wg["control"] == "unsteered", "text"].tolist() == base["text"].tolist()
    # the random control's later draws ran on fresh samples beside the unsteered model's
    pooled = eg[(eg["control"] == "unsteered") & (eg["prompts"] == "random")]
    assert pooled.loc[pooled["draw"] == 0, "text"].tolist() == base["text"].tolist()
    assert sorted(set(pooled["draw"])) == list(range(params.random_draws))
    # the outputs keep their columns
    assert list(wg.columns) == list(ev.generations.columns) == [
        "set", "latent", "label", "control", "strength", "prompts", "prompt", "text",
        "predicted", "target_prob", "n_tokens", "nll", "predicted_text", "draw",
    ]  # fmt: skip
    assert list(w.columns) == list(t.columns)


@pytest.mark.parametrize("n", [48])
def test_a_winner_of_48_has_an_interval_within_the_stated_width(n):
    from integral_superposition.steering.scores import wilson_interval

    widest = max(wilson_interval(k, n)[1] - wilson_interval(k, n)[0] for k in range(n + 1))
    assert widest / 2 <= 0.15


def test_generation_scores_its_tokens_like_a_second_forward(tiny_backend):
    """The unsteered sets take their perplexity from the logits generation computed: equal to
    ``continuation_nll``'s separate forward, row by row, EOS and left padding included."""
    from integral_superposition.steering.generation import (
        continuation_nll,
        generate_continuations,
    )

    prompts = ["the market", "In other news, the", "a"]
    g = generate_continuations(
        tiny_backend, prompts, 6, do_sample=True, samples_per_prompt=2, seed=3, score=True
    )
    nll, n_tok = continuation_nll(tiny_backend, g.prompt_ids, g.token_ids)
    assert g.nll.shape == (6,) and (n_tok == [len(t) for t in g.token_ids]).all()
    np.testing.assert_allclose(g.nll, nll, rtol=1e-4, atol=1e-3)
    plain = generate_continuations(
        tiny_backend, prompts, 6, do_sample=True, samples_per_prompt=2, seed=3
    )
    assert plain.nll is None and plain.token_ids == g.token_ids  # scoring changes nothing
