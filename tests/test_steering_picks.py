"""Picking a latent that writes its topic: among the enriched latents of a label, the one
whose decoder direction promotes the label's vocabulary through the unembedding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from integral_superposition import steering
from integral_superposition.steering.picks import (
    enrichment_tables,
    target_latents,
    vocabulary_logit_scores,
)


def test_vocabulary_logit_scores_rank_rows_by_what_they_promote():
    g = torch.Generator().manual_seed(0)
    V, d = 500, 16
    W_U = torch.randn(V, d, generator=g)
    vocab = [3, 7, 11, 19]
    toward = W_U[vocab].mean(0)
    rows = torch.stack([toward, -toward, torch.randn(d, generator=g), 3 * toward])
    score = vocabulary_logit_scores(rows, W_U, None, vocab)
    assert score[0] > 1.5 and score[1] < -1.5 and score[0] > abs(score[2])
    assert score[3] == pytest.approx(score[0], rel=1e-5)  # scale-free
    norm = torch.nn.LayerNorm(d)
    with torch.no_grad():
        norm.bias.fill_(0.3)  # a bias moves every row alike: subtracted
    normed = vocabulary_logit_scores(rows, W_U, norm, vocab)
    assert normed[0] > 1.5 and normed[1] < -1.5
    assert (vocabulary_logit_scores(rows, W_U, None, []) == 0).all()


class _Unembed:
    def __init__(self, W_U):
        self.W_U = W_U

    def output_embedding(self):
        return self.W_U

    def final_norm(self):
        return None


def test_vocab_logit_picks_the_enriched_latent_that_writes_the_label():
    g = torch.Generator().manual_seed(1)
    V, d, K = 300, 12, 6
    W_U = torch.randn(V, d, generator=g)
    sae = type("SAE", (), {})()
    W_dec = torch.randn(K, d, generator=g) * 0.1
    W_dec[4] = W_U[[10, 20, 30]].mean(0)  # latent 4 writes label a's words
    W_dec[5] = W_U[[40, 50]].mean(0)  # latent 5 writes label b's words
    sae.W_dec = W_dec
    names = ["a", "b"]
    tok = pd.DataFrame({
        "latent": np.repeat(np.arange(K), 2),
        "label": pd.Categorical(names * K, categories=names),
        "q": [1e-9, 1, 1e-8, 1, 1, 1e-9, 1, 1e-7, 1e-5, 1, 1, 1e-6],
        "log_odds": [2, -1, 2, -1, -1, 2, -1, 2, 2, -1, -1, 2],
        "frac_in_set": 0.9,
    })  # fmt: skip
    doc = tok[["latent", "label"]].assign(
        q=[1e-50, 1, 1e-40, 1, 1, 1e-30, 1, 1e-20, 1e-5, 1, 1, 1e-3], log_odds=1.0
    )
    vocab = pd.DataFrame({"label": ["a"] * 3 + ["b"] * 2, "token_id": [10, 20, 30, 40, 50]})
    p = steering.SteeringParams(rank_by="vocab_logit", candidates=3)
    picks = target_latents(p, tok, doc, names, sae=sae, backend=_Unembed(W_U), vocab=vocab)
    assert picks[["label", "latent"]].values.tolist() == [["a", 4], ["b", 5]]
    assert (picks["vocab_logit"] > 1).all()
    by_doc = target_latents(p.model_copy(update={"rank_by": "doc_q"}), tok, doc, names)
    assert by_doc[["label", "latent"]].values.tolist() == [["a", 0], ["b", 2]]
    # a candidate pool of one is plain document ranking
    one = target_latents(
        p.model_copy(update={"candidates": 1}), tok, doc, names, sae=sae,
        backend=_Unembed(W_U), vocab=vocab,
    )  # fmt: skip
    assert one["latent"].tolist() == [0, 2]
    with pytest.raises(ValueError, match="needs the SAE, the backend and the vocabulary"):
        target_latents(p, tok, doc, names)


def test_vocabulary_gain_scores_find_the_latent_that_writes_the_words(tiny_backend):
    """Through the whole (tiny) model: a decoder row along the vocabulary's output embeddings,
    clamped before the last block, raises their probability; a zero row changes nothing; a
    row against them lowers it."""
    from integral_superposition.sae import SparseAutoencoder
    from integral_superposition.steering.generation import generate_continuations
    from integral_superposition.steering.picks import vocabulary_gain_scores

    b = tiny_backend
    sae = SparseAutoencoder(b.d_model, 8, seed=0)
    vocab = [11, 23, 57, 101]
    toward = b.output_embedding()[vocab].detach().float().mean(0)
    with torch.no_grad():
        sae.W_dec[1] = toward / toward.norm()
        sae.W_dec[2] = 0.0
        sae.W_dec[3] = -toward / toward.norm()
    g = generate_continuations(b, ["the market", "a new day", "sports"], 5, do_sample=True, seed=1)
    hp = f"layer.{b.n_layers - 1}"
    out = vocabulary_gain_scores(
        b, sae, hp, [2, 1, 3], [40.0, 40.0, 40.0], vocab, g.prompt_ids, g.token_ids
    )
    gain = out.set_index("latent")["vocab_gain"]
    assert out["latent"].tolist() == [2, 1, 3]
    assert gain[2] == pytest.approx(0.0, abs=1e-6) and out["nll_gain"].iloc[0] == pytest.approx(
        0, abs=1e-5
    )
    assert gain[1] > 0.2 and gain[3] < -0.3  # measured 0.38 and -0.70
    assert np.isfinite(out["nll_gain"]).all()
    with pytest.raises(ValueError, match="values has 1 entries but latents has 2"):
        vocabulary_gain_scores(b, sae, hp, [1, 2], [1.0], vocab, g.prompt_ids, g.token_ids)
    with pytest.raises(ValueError, match="at least one non-empty continuation"):
        vocabulary_gain_scores(b, sae, hp, [1], [1.0], vocab, g.prompt_ids, [[]] * 3)


def test_vocab_gain_ranks_the_candidates_by_their_scorer():
    names = ["a", "b"]
    tok = pd.DataFrame({
        "latent": np.repeat(np.arange(4), 2),
        "label": pd.Categorical(names * 4, categories=names),
        "q": [1e-9, 1, 1e-8, 1, 1e-7, 1, 1, 1e-6], "log_odds": [2, -1, 2, -1, 2, -1, -1, 2],
        "frac_in_set": 0.9,
    })  # fmt: skip
    doc = tok[["latent", "label"]].assign(q=[1e-50, 1, 1e-40, 1, 1e-30, 1, 1, 1e-3], log_odds=1.0)
    seen = []

    def scorer(label, latents):
        seen.append((label, latents))
        gain = {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.2}
        return pd.DataFrame({"latent": latents, "vocab_gain": [gain[j] for j in latents],
                             "nll_gain": 0.0})  # fmt: skip

    p = steering.SteeringParams(rank_by="vocab_gain", candidates=3, per_label=2)
    picks = target_latents(p, tok, doc, names, gain_scorer=scorer)
    assert seen == [("a", [0, 1, 2]), ("b", [3])]  # the candidates, best document q first
    assert picks[["label", "latent"]].values.tolist() == [["a", 1], ["a", 2], ["b", 3]]
    assert picks["vocab_gain"].tolist() == [0.9, 0.5, 0.2]
    with pytest.raises(ValueError, match="rank_by='vocab_gain' needs gain_scorer"):
        target_latents(p, tok, doc, names)


def test_a_sweep_ranked_by_vocab_gain_steers_the_candidate_that_writes_most(
    demo_store, tiny_backend
):
    """End to end: the sweep scores each label's candidates on continuations of the fitting
    openings and steers the one with the highest gain; the scores are published."""
    from integral_superposition.data import neutral_fit_prompts
    from integral_superposition.sae import SparseAutoencoder
    from integral_superposition.steering.generation import generate_continuations
    from integral_superposition.steering.picks import vocabulary_gain_scores

    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    p = steering.SteeringParams(
        labels=[demo_store.label_names[0]], rank_by="vocab_gain", candidates=3, gain_prompts=4,
        strengths=[0.5], controls=["random"], prompts=["the market", "a new"],
        max_new_tokens=4, samples_per_prompt=2, own_label_prompts=2, check_labels="targets",
        classifier_fit_generations=3, classifier_test_fraction=0.25, q_max=0.5,
    )  # fmt: skip
    ev = steering.evaluate_steering(tiny_backend, sae, demo_store, p)
    pick = ev.picks.iloc[0]
    assert {"vocab_gain", "nll_gain"} <= set(ev.picks.columns)
    # the same score, computed by hand on the same continuations, is the candidates' best
    tok, doc, scan = enrichment_tables(sae, demo_store, n_top=p.n_top)
    cands = steering.pick_latents(tok, doc, labels=p.labels, per_label=3, q_max=p.q_max)
    cands = cands["latent"].tolist()
    assert len(cands) == 3
    g = generate_continuations(
        tiny_backend, neutral_fit_prompts()[:4], 4, do_sample=True, seed=p.seed
    )
    vocab = ev.vocabulary
    scores = vocabulary_gain_scores(
        tiny_backend,
        sae,
        demo_store.hook_point,
        cands,
        [p.gain_strength * float(scan.act_max[j]) for j in cands],
        vocab.loc[vocab["label"] == p.labels[0], "token_id"].tolist(),
        g.prompt_ids,
        g.token_ids,
    ).sort_values("vocab_gain", ascending=False, kind="stable")
    assert int(pick["latent"]) == int(scores["latent"].iloc[0])
    assert pick["vocab_gain"] == pytest.approx(scores["vocab_gain"].iloc[0], abs=1e-6)
    assert scores["vocab_gain"].nunique() == 3  # the candidates' scores differ
