"""The steering evaluation: target vocabularies, the label classifier, latent picking, and
the published sweep with its controls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from integral_superposition import steering, storage
from integral_superposition.pipelines import steer_eval
from integral_superposition.sae import SparseAutoencoder, save_sae
from integral_superposition.steering import classifier, sweep
from integral_superposition.steering import picks as picking
from matplotlib.figure import Figure


def test_label_vocabulary_holds_label_specific_tokens(demo_store, tiny_backend):
    vocab = steering.label_vocabulary(
        demo_store, per_label=10, tokenizer=tiny_backend.tokenizer, words_only=False
    )
    assert set(vocab["label"]) == set(demo_store.label_names)
    assert (vocab["q"] < 1e-3).all() and (vocab["log_odds"] > 0).all()
    assert vocab.groupby("label").size().max() <= 10
    # each token really is concentrated in its label in the store
    tok, lab = demo_store.token_ids, demo_store.labels
    for row in vocab.itertuples():
        in_label = np.mean(lab[tok == row.token_id] == row.label_id)
        assert in_label == pytest.approx(row.frac_in_label)
        assert in_label > 1 / len(demo_store.label_names)
    words = steering.label_vocabulary(demo_store, per_label=10, tokenizer=tiny_backend.tokenizer)
    assert len(words) and all(len(w.strip()) >= 3 and w.strip().isalpha() for w in words["token"])
    assert (words["q"] < 1e-3).all() and len(words) < len(vocab)


def test_label_classifier_fits_separable_documents(tmp_path):
    import torch
    from integral_superposition.dump.synthetic import write_activation_store

    rng = np.random.default_rng(0)
    n_docs, per_doc, d, C = 120, 8, 16, 3
    doc_label = np.arange(n_docs) % C
    centers = rng.normal(size=(C, d)) * 2
    x = centers[np.repeat(doc_label, per_doc)] + rng.normal(size=(n_docs * per_doc, d)) * 3
    store = write_activation_store(
        torch.tensor(x, dtype=torch.float32), str(tmp_path / "acts"),
        labels=np.repeat(doc_label, per_doc), label_names=["a", "b", "c"], tokens_per_doc=per_doc,
    )  # fmt: skip
    clf = steering.LabelClassifier.fit(store, test_fraction=0.25, seed=0)
    assert clf.n_test + clf.n_train == n_docs and clf.n_test > 10
    assert clf.accuracy > 0.9
    shuffled = steering.LabelClassifier.fit(store, test_fraction=0.25, seed=1)
    assert not np.array_equal(shuffled.test_doc_ids, clf.test_doc_ids)
    proba = clf.predict_proba(centers.astype(np.float32))
    assert proba.argmax(1).tolist() == [0, 1, 2]


def test_label_classifier_reads_texts_like_the_dump(demo_store, tiny_backend):
    """Features of a document's text through the backend equal the store's mean-pooled rows."""
    clf = steering.LabelClassifier.fit(demo_store, test_fraction=0.25, seed=0)
    assert 0.0 <= clf.accuracy <= 1.0 and clf.hook_point == "layer.2"
    doc_ids, pooled = classifier.mean_pooled_documents(demo_store)
    docs = demo_store.docs.set_index("doc_id").loc[doc_ids[:12]]
    X, valid = clf.features(tiny_backend, [*docs["text"].tolist(), "", "   "])
    assert valid.tolist() == [True] * 12 + [False, False]
    np.testing.assert_allclose(X[:12], pooled[:12], rtol=0.03, atol=0.03)  # the store is bf16
    proba = clf.predict_proba(X[valid])
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)


def test_pick_latents_ranks_significant_latents_per_label():
    names = ["a", "b"]
    tok = pd.DataFrame(
        {
            "latent": [0, 0, 1, 1, 2, 2, 3, 3],
            "label": pd.Categorical(["a", "b"] * 4, categories=names),
            "q": [1e-5, 1.0, 1e-9, 1.0, 1.0, 1e-4, 1e-2, 1.0],
            "log_odds": [2.0, -1, 1.0, -1, -1, 3.0, 5.0, -1],
            "frac_in_set": [0.9, 0.1, 0.8, 0.2, 0.1, 0.9, 0.9, 0.1],
        }
    )
    doc = tok[["latent", "label"]].assign(q=[1e-50, 1, 1e-3, 1, 1, 1e-9, 1e-80, 1], log_odds=1.0)
    by_doc = steering.pick_latents(tok, doc, per_label=2, q_max=1e-3)
    assert by_doc[["label", "latent"]].values.tolist() == [["a", 0], ["a", 1], ["b", 2]]
    by_q = steering.pick_latents(tok, doc, per_label=1, rank_by="token_q")
    assert by_q[["label", "latent"]].values.tolist() == [["a", 1], ["b", 2]]
    assert steering.pick_latents(tok, None, labels=["b"])["latent"].tolist() == [2]
    with pytest.raises(ValueError, match=r"\['c'\] not among the store's labels"):
        steering.pick_latents(tok, doc, labels=["c"])


@pytest.fixture(scope="module")
def published(demo_store, tiny_backend, tmp_path_factory):
    root = tmp_path_factory.mktemp("steer_eval")
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    sae_uri = save_sae(sae, str(root / "sae"), metadata={"hook_name": "layer.2"})
    params = steering.SteeringParams(
        latents=[5], labels=[demo_store.label_names[0]], mode="clamp", strengths=[40.0],
        prompts=["the market", "news:"], max_new_tokens=4, samples_per_prompt=1, do_sample=False,
        own_label_prompts=2, vocab_per_label=20, control_strengths="all", classifier_fit_generations=2,
    )  # fmt: skip
    progress = []
    manifest = steer_eval.run_steering_eval(
        sae_uri, demo_store.uris[0], str(root / "out"), params, backend=tiny_backend,
        on_progress=lambda done, total: progress.append((done, total)),
    )  # fmt: skip
    return root, manifest, progress, params


def test_run_steering_eval_publishes_the_sweep_with_controls(published):
    root, manifest, progress, _params = published
    out = str(root / "out")
    assert manifest["kind"] == "steering" and storage.verify_output(out, deep=True)
    assert set(manifest["files"]) == {
        "sweep.parquet", "generations.parquet", "latents.parquet", "vocabulary.parquet",
        "classifier_check.parquet", "check_generations.parquet",
        "classifier_fit_generations.parquet", "sweep.png", "sweep.svg", "summary.json",
    }  # fmt: skip
    assert progress[-1][0] == progress[-1][1] == len(progress)
    res = steer_eval.load_steering(out)
    t = res.sweep.set_index(["control", "prompts", "strength"], drop=False)
    # greedy decoding: no fresh samples, so no confirmation
    assert set(t["control"]) == {"unsteered", "alpha0", "steer", "random", "own_label"}
    base = t[t["control"] == "unsteered"].iloc[0]
    alpha0 = t[t["control"] == "alpha0"].iloc[0]
    for col in ("share", "abstain", "vocab_mass", "perplexity", "distinct2"):
        assert alpha0[col] == pytest.approx(base[col], nan_ok=True)  # the hook itself is neutral
    # the same texts: their classifier features differ only by the rounding of the batches
    # they were read in (the unsteered set shares a call with the classifier's fitting sets)
    assert alpha0["prob"] == pytest.approx(base["prob"], rel=1e-4)
    assert res.generations.query("control == 'alpha0'")["text"].tolist() == (
        res.generations.query("control == 'unsteered' and prompts == 'neutral'")["text"].tolist()
    )
    steer_row = t[t["control"] == "steer"].iloc[0]
    rand_row = t[t["control"] == "random"].iloc[0]
    assert steer_row["edit_value"] == 40.0 and steer_row["steered_latent"] == 5
    assert rand_row["steered_latent"] not in (5, -1)
    norms = res.picks.iloc[0]
    assert rand_row["edit_value"] == pytest.approx(40.0 * norms["random_ratio"])
    assert steer_row["classifier_accuracy"] == res.summary["classifier"]["held_out_accuracy"]
    gens = res.generations
    assert len(gens) == int(res.sweep["n"].sum())
    assert set(gens.columns) >= {"set", "control", "strength", "prompt", "text", "predicted"}
    assert (res.vocabulary.groupby("label").size() <= 20).all()
    assert isinstance(res.figure(), Figure)
    assert res.read("sweep.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_steered_and_control_row_has_its_lift_over_the_unsteered_share(published):
    from integral_superposition.steering.scores import paired_lift

    root, _, _, _params = published
    res = steer_eval.load_steering(str(root / "out"))
    t, g = res.sweep, res.generations
    label = t["label"].iloc[0]
    hits = {i: (grp["predicted"] == label).to_numpy() for i, grp in g.groupby("set")}
    ref_of = {  # the unsteered set of each prompt set
        prompts: int(t.index[(t["control"].isin(["unsteered", "own_label"])) & t["strength"].isna()
                             & (t["prompts"] == prompts)][0])
        for prompts in t["prompts"].unique()
    }  # fmt: skip
    for i, row in t.iterrows():
        if np.isnan(row["strength"]):  # an unsteered set is the reference itself
            assert np.isnan(row["lift"]) and np.isnan(row["lift_lo"])
            continue
        want = paired_lift(hits[i], hits[ref_of[row["prompts"]]][: int(row["n"])])
        assert (row["lift"], row["lift_lo"], row["lift_hi"]) == pytest.approx(want)
        base_share = t.loc[ref_of[row["prompts"]], "share"]
        assert row["lift"] == pytest.approx(row["share"] - base_share)
        assert row["lift_lo"] <= row["lift"] <= row["lift_hi"]
    lat = res.summary["latents"][0]
    assert {"best_lift", "random_lift_at_best", "own_label_lift_at_best"} <= set(lat)
    section = steer_eval.steering_section(res)
    assert "lift" in section.tables[0][0] and "lift_lo" in section.tables[0][1].columns


def test_side_by_side_and_report_section(published):
    root, _, _, params = published
    res = steer_eval.load_steering(str(root / "out"))
    sbs = steer_eval.side_by_side(res)
    assert list(sbs.columns[:2]) == ["prompt", "unsteered"] and len(sbs) == len(params.prompts)
    assert sbs["prompt"].tolist() == params.prompts
    own = steer_eval.side_by_side(res, 5, 40.0, prompts="own_label")
    assert len(own) == params.own_label_prompts
    with pytest.raises(ValueError, match=r"strength=3.0: not in the sweep"):
        steer_eval.side_by_side(res, 5, 3.0)
    section = steer_eval.steering_section(res)
    html = section.to_html()
    assert "Steering" in html and "Latent 5" in html and "<img" in html
    assert "<script" not in html.lower()


def test_run_steering_eval_rejects_bad_input_before_writing(demo_store, tiny_backend, tmp_path):
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"latents=\[64\]: \[64\] out of range .*d_sae=64"):
        steer_eval.run_steering_eval(
            sae, demo_store, str(out), {"latents": [64]}, backend=tiny_backend
        )
    with pytest.raises(ValueError, match=r"labels=\['Cooking'\]"):
        steer_eval.run_steering_eval(
            sae, demo_store, str(out), {"latents": [1], "labels": ["Cooking"]}, backend=tiny_backend
        )
    with pytest.raises(ValueError, match="prompts is empty"):
        steer_eval.run_steering_eval(
            sae, demo_store, str(out), {"prompts": []}, backend=tiny_backend
        )
    with pytest.raises(ValueError, match=r"prompts\[1\]='' is empty"):
        steer_eval.run_steering_eval(
            sae, demo_store, str(out), {"prompts": ["The", ""]}, backend=tiny_backend
        )
    eos = tiny_backend.tokenizer.eos_token
    with pytest.raises(ValueError, match=rf"prompts\[0\]='{eos}' has only special tokens"):
        steer_eval.run_steering_eval(
            sae, demo_store, str(out), {"prompts": [eos]}, backend=tiny_backend
        )
    narrow = SparseAutoencoder(16, 8)
    with pytest.raises(ValueError, match=r"sae.d_in=16 does not match"):
        steer_eval.run_steering_eval(
            narrow, demo_store, str(out), {"latents": [1]}, backend=tiny_backend
        )
    assert not out.exists()


def test_edit_for_matches_decoder_norms():
    assert sweep._edit_for("clamp_max", 3, 2.0, 5.0) == steering.clamp(3, 10.0)
    assert sweep._edit_for("clamp_max", 4, 2.0, 5.0, ratio=0.5) == steering.clamp(4, 5.0)
    assert sweep._edit_for("add", 4, 2.0, 5.0, ratio=3.0) == steering.add(4, 6.0)
    assert sweep._edit_for("scale", 4, 2.0, 5.0, ratio=3.0) == steering.scale(4, 2.0)


def _token_table(q: list[float], log_odds: list[float], fires) -> pd.DataFrame:
    """A token-level enrichment table of labels ``a``, ``b``: rows latent by latent, label
    ``a`` then ``b`` (``q``, ``log_odds`` and ``fires`` in that order)."""
    names = ["a", "b"]
    n_lat = len(q) // 2
    return pd.DataFrame({
        "latent": np.repeat(np.arange(n_lat), 2),
        "label": pd.Categorical(names * n_lat, categories=names),
        "q": q, "log_odds": log_odds, "fires": fires,
    })  # fmt: skip


def test_random_control_is_a_topic_neutral_live_latent_with_matched_norm():
    # latent 0: target (a); 1: enriched for b; 2: enriched for a; 3: dead; 4, 5: neutral
    tok = _token_table(
        [1e-9, 1, 1, 1e-6, 1e-5, 1, 1, 1, 0.5, 1, 1, 0.2],
        [3.0, -1, -1, 2.0, 2.0, -1, 0, 0, 0.5, -0.5, 0.1, 0.3],
        np.repeat([True, True, True, False, True, True], 2),
    )
    norms = np.array([2.0, 1.0, 1.0, 1.0, 4.0, 0.5])
    picks = pd.DataFrame({"label": ["a"], "latent": [0]})
    seen = set()
    for seed in range(20):
        out = picking.random_controls(picks, tok, norms, 1e-3, seed)
        r = int(out["random_latent"].iloc[0])
        seen.add(r)
        assert out["random_ratio"].iloc[0] == pytest.approx(norms[0] / norms[r])
    assert seen == {4, 5}
    # no neutral latent left: fall back to latents not enriched for the target label
    only = tok[tok["latent"].isin([0, 1, 2])]
    out = picking.random_controls(picks, only, norms, 1e-3, 0)
    assert int(out["random_latent"].iloc[0]) == 1


def _group_tables() -> tuple[pd.DataFrame, np.ndarray]:
    """Token-level enrichment of 8 latents over labels a and b, and their decoder norms:
    latents 0, 1 a group for a; 2 enriched for b; 3..7 neutral."""
    tok = _token_table(
        [1e-9, 1, 1e-8, 1, 1, 1e-7] + [0.5, 1] * 5,
        [3.0, -1, 2.0, -1, -1, 2.0] + [0.1, 0.2] * 5,
        True,
    )
    return tok, np.array([2.0, 1.0, 1.0, 4.0, 0.5, 1.0, 2.0, 8.0])


def test_a_group_gets_as_many_distinct_neutral_random_latents_each_matched_to_a_member():
    tok, norms = _group_tables()
    picks = pd.DataFrame({"label": ["a"], "latent": [0], "members": [[0, 1]]})
    for seed in range(10):
        out = picking.random_controls(picks, tok, norms, 1e-3, seed).iloc[0]
        rs = out["random_members"]
        assert len(set(rs)) == 2 and set(rs) <= {3, 4, 5, 6, 7}
        assert out["random_ratios"] == pytest.approx([2.0 / norms[rs[0]], 1.0 / norms[rs[1]]])
        assert out["random_latent"] == rs[0] and out["random_ratio"] == out["random_ratios"][0]
    # a single pick draws exactly what it drew before groups existed
    single = picking.random_controls(picks.drop(columns="members"), tok, norms, 1e-3, 3)
    assert "random_members" not in single
    assert int(single["random_latent"].iloc[0]) == int(
        np.random.default_rng(3).choice(np.array([3, 4, 5, 6, 7]))
    )


def test_random_draws_keep_draw_0_and_draw_each_pick_independently():
    tok, norms = _group_tables()
    group = pd.DataFrame({"label": ["a", "b"], "latent": [0, 2], "members": [[0, 1], [2, 1]]})
    for picks in (group, group.drop(columns="members")):
        for seed in range(5):
            one = picking.random_controls(picks, tok, norms, 1e-3, seed)
            many = picking.random_controls(picks, tok, norms, 1e-3, seed, draws=4)
            # draw 0 is the single draw, and its columns are unchanged
            drawn = ["random_draws", "random_draw_ratios"]
            pd.testing.assert_frame_equal(many.drop(columns=drawn), one.drop(columns=drawn))
            assert [d[:1] for d in many["random_draws"]] == list(one["random_draws"])
            for _, row in many.iterrows():
                members = row["members"] if "members" in picks else [row["latent"]]
                assert row["random_draws"][0][0] == row["random_latent"]
                assert len(row["random_draws"]) == len(row["random_draw_ratios"]) == 4
                for d, rt in zip(row["random_draws"], row["random_draw_ratios"], strict=True):
                    assert len(set(d)) == len(members) and set(d) <= {3, 4, 5, 6, 7}
                    assert rt == pytest.approx(
                        [norms[m] / norms[r] for m, r in zip(members, d, strict=True)]
                    )
    # the draws differ: over seeds, later draws are not copies of draw 0
    differs = [
        len({tuple(d) for d in picking.random_controls(group, tok, norms, 1e-3, seed, draws=3)
             .iloc[0]["random_draws"]}) > 1
        for seed in range(10)
    ]  # fmt: skip
    assert sum(differs) >= 8
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"draws={bad!r}: expected a positive whole number"):
            picking.random_controls(group, tok, norms, 1e-3, 0, draws=bad)


def test_group_picks_keeps_each_labels_best_latents_in_rank_order():
    picks = pd.DataFrame({
        "label": ["a", "a", "a", "b", "b"], "latent": [7, 2, 9, 4, 1],
        "q": [1e-9, 1e-8, 1e-7, 1e-6, 1e-5], "max_act": [1.0, 2.0, 3.0, 4.0, 5.0],
    })  # fmt: skip
    g = picking.group_picks(picks, 2)
    assert g["latent"].tolist() == [7, 4] and g["members"].tolist() == [[7, 2], [4, 1]]
    assert g["member_max_acts"].tolist() == [[1.0, 2.0], [4.0, 5.0]]
    assert g["q"].tolist() == [1e-9, 1e-6]
    with pytest.raises(ValueError, match="group_size=0"):
        picking.group_picks(picks, 0)


def test_a_group_is_steered_together_and_its_random_control_edits_as_many_latents(
    demo_store, tiny_backend, tmp_path
):
    """group_size=3: every steered row clamps the label's three best latents at once (each
    to strength x its own max activation); the random control edits three other latents, each
    scaled to its member's decoder norm; the summary names the members."""
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    label = demo_store.label_names[0]
    params = steering.SteeringParams(
        labels=[label], group_size=3, q_max=1.0, strengths=[0.5], prompts=["the market", "news:"],
        max_new_tokens=3, samples_per_prompt=1, do_sample=False, own_label_prompts=2,
        vocab_per_label=20, classifier_fit_generations=2, controls=["random", "own_label"],
    )  # fmt: skip
    ev = sweep.evaluate_steering(tiny_backend, sae, demo_store, params)
    pick = ev.picks.iloc[0]
    members, mx = list(pick["members"]), list(pick["member_max_acts"])
    assert len(members) == 3 and members[0] == pick["latent"]
    t = ev.table
    row = t[t["control"] == "steer"].iloc[0]
    assert list(row["steered_latents"]) == members and row["edit_value"] == pytest.approx(
        0.5 * mx[0]
    )
    rand = t[t["control"] == "random"].iloc[0]
    assert list(rand["steered_latents"]) == list(pick["random_members"])
    assert not set(rand["steered_latents"]) & set(members)
    assert rand["edit_value"] == pytest.approx(0.5 * mx[0] * pick["random_ratios"][0])
    own = t[(t["control"] == "own_label") & t["strength"].notna()].iloc[0]
    assert list(own["steered_latents"]) == members
    lat = ev.summary["latents"][0]
    assert lat["members"] == members and lat["random_members"] == list(pick["random_members"])
    # one group and one set per strength: the three edits share the rows
    assert len(t[t["control"] == "steer"]) == 1
    with pytest.raises(ValueError, match="group_size=3 with explicit latents"):
        steering.SteeringParams(latents=[1, 2], group_size=3)
