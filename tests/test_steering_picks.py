"""Picking a latent that writes its topic: among the enriched latents of a label, the one
whose decoder direction promotes the label's vocabulary through the unembedding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from integral_superposition import steering
from integral_superposition.steering.picks import target_latents, vocabulary_logit_scores


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
