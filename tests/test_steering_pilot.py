"""The pilot among each label's candidate latents: the pick rule, and the pilot's
continuations drawn from sample indices the final sweep never uses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from integral_superposition import steering
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.steering import sweep
from integral_superposition.steering.scores import pilot_choice


def test_pilot_picks_the_best_fluent_share_per_label():
    rows = [
        # label a: rank 0 is weak; rank 1 is best within the bound (its 0.9 is not fluent)
        ("a", 10, 0, 0.25, 0.20, 1.1), ("a", 10, 0, 0.5, 0.25, 1.5),
        ("a", 11, 1, 0.25, 0.40, 1.2), ("a", 11, 1, 0.5, 0.60, 1.9), ("a", 11, 1, 1.0, 0.90, 3.0),
        ("a", 12, 2, 0.25, 0.95, 2.5),  # never fluent
        # label b: a tie goes to the better ranked; c: nothing fluent, the best ranked
        ("b", 20, 0, 0.25, 0.50, 1.0), ("b", 21, 1, 0.25, 0.50, 1.0),
        ("c", 30, 0, 0.25, 0.70, 4.0), ("c", 31, 1, 0.25, 0.80, float("nan")),
    ]  # fmt: skip
    frame = pd.DataFrame(
        rows, columns=["label", "latent", "rank", "strength", "share", "ppl_ratio"]
    )
    got = pilot_choice(frame, per_label=1, ppl_ratio_max=2.0)
    assert got["latent"].tolist() == [11, 20, 30]
    a = got.iloc[0]
    assert a["pilot_share"] == 0.60 and a["pilot_strength"] == 0.5
    assert got.iloc[2]["pilot_share"] is None or np.isnan(got.iloc[2]["pilot_share"])
    two = pilot_choice(frame, per_label=2, ppl_ratio_max=2.0)
    assert two.loc[two["label"] == "a", "latent"].tolist() == [10, 11]


def test_pilot_draws_fresh_samples_and_the_sweep_runs_its_pick(
    demo_store, tiny_backend, monkeypatch
):
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    calls = []
    real = sweep.generate_continuations

    def spy(backend, prompts, max_new_tokens, **kw):
        calls.append(list(kw["rows"]))
        return real(backend, prompts, max_new_tokens, **kw)

    monkeypatch.setattr(sweep, "generate_continuations", spy)
    labels = list(demo_store.label_names[:2])
    params = steering.SteeringParams(
        labels=labels, mode="clamp", strengths=[1.0, 5.0], controls=["random"],
        prompts=["Breaking news:", "In other news,"], max_new_tokens=3, samples_per_prompt=2,
        own_label_prompts=2, check_labels="targets", classifier_fit_generations=2,
        classifier_test_fraction=0.25, q_max=1.0, pilot_candidates=3,
        pilot_strengths=[1.0, 5.0], pilot_samples=2,
    )  # fmt: skip
    ev = steering.evaluate_steering(tiny_backend, sae, demo_store, params)
    pilot = ev.pilot
    assert pilot is not None and set(pilot["label"]) == set(labels)
    assert (pilot.groupby("label")["latent"].nunique() == 3).all()
    assert len(pilot) == 2 * 3 * 2 and (pilot["n"] == 2 * 2).all()
    # the pilot's call draws sample indices 2, 3; the confirmation (in the controls' call,
    # the last) 4, 5; every other row before it only 0, 1
    pilot_calls = [c for c in calls[:-1] if any(s >= 2 for _, s in c)]
    assert len(pilot_calls) == 1 and {s for _, s in pilot_calls[0]} == {2, 3}
    assert len(pilot_calls[0]) == pilot["n"].sum()
    assert all(s < 2 for c in calls[:-1] if c is not pilot_calls[0] for _, s in c)
    fresh = [s for _, s in calls[-1] if s >= 2]
    n_confirm = int((ev.table["prompts"] == "confirm").sum()) - len(labels) + 1  # one unsteered
    assert sum(s in (4, 5) for s in fresh) == n_confirm * 2 * 2
    # the random control's later draws (and the unsteered model beside them): 6-7 and 8-9
    assert set(fresh) == {4, 5, 6, 7, 8, 9} and params.random_draws == 3
    for lat in ev.summary["latents"]:
        assert lat["random_samples"] == [[0, 1], [6, 7], [8, 9]]
    assert all(lat["confirm_samples"] == [4, 5] for lat in ev.summary["latents"])
    # one latent per label is swept: the pilot's pick by its rule
    chosen = pilot_choice(pilot, 1, params.ppl_ratio_max)
    assert pilot.loc[pilot["chosen"], "latent"].unique().tolist() == chosen["latent"].tolist()
    steered = ev.table.loc[ev.table["control"] == "steer", ["label", "latent"]].drop_duplicates()
    assert sorted(map(tuple, steered.values.tolist())) == sorted(
        zip(chosen["label"], chosen["latent"], strict=True)
    )
    s = ev.summary["pilot"]
    assert s["samples"] == [2, 3] and s["continuations"] == int(pilot["n"].sum())
    assert {lb: v[0] for lb, v in s["chosen"].items()} == dict(
        zip(chosen["label"], chosen["latent"], strict=True)
    )
    for lat in ev.summary["latents"]:
        mine = pilot[pilot["latent"] == lat["latent"]]
        assert lat["pilot_share"] == pytest.approx(mine["share"].max())
    # without a pilot: no pilot table, the best ranked latent is swept
    params.pilot_candidates = 1
    plain = steering.evaluate_steering(tiny_backend, sae, demo_store, params)
    assert plain.pilot is None and plain.summary["pilot"] is None
    assert (plain.picks["rank"] == 0).all()
