"""Sampled continuations: every row draws from its own random stream, seeded by (seed, prompt,
sample), so a row's continuation does not depend on its batch, and the sampler draws from
softmax(logits / T) restricted to the top-p nucleus."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.steering.edits import Edit
from integral_superposition.steering.generation import (
    RowSampler,
    generate_continuations,
    inverse_cdf,
    nucleus,
    row_streams,
)
from integral_superposition.steering.hooks import steer
from scipy.stats import chisquare

PROMPTS = ["the market", "In other news, the", "a", "sports today:"]
SAMPLE = dict(do_sample=True, temperature=0.8, top_p=0.9)


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> np.ndarray:
    """``[V]`` the distribution a top-p sampler at ``temperature`` draws from."""
    p = torch.softmax(logits.double() / temperature, -1).numpy()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, dtype=bool)
    keep[order[before < top_p]] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def _chi2_pvalue(counts: np.ndarray, expected_p: np.ndarray) -> float:
    """Chi-square goodness of fit, bins with under 5 expected draws pooled into one."""
    n = counts.sum()
    assert counts[expected_p == 0].sum() == 0, "a token outside the support was drawn"
    exp = expected_p * n
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    ex = np.append(exp[big], exp[~big].sum())
    if ex[-1] == 0:
        obs, ex = obs[:-1], ex[:-1]
    return float(chisquare(obs, ex).pvalue)


def test_a_row_does_not_depend_on_its_batch(tiny_backend):
    kw = dict(max_new_tokens=4, samples_per_prompt=3, seed=7, **SAMPLE)
    whole = generate_continuations(tiny_backend, PROMPTS, batch_size=64, **kw)
    other = generate_continuations(tiny_backend, PROMPTS, batch_size=5, **kw)
    assert whole.token_ids == other.token_ids
    # the same rows, sample by sample: one call equals its rounds of one sample each
    major = generate_continuations(tiny_backend, PROMPTS, batch_size=3, sample_major=True, **kw)
    rounds = [
        generate_continuations(
            tiny_backend, PROMPTS, batch_size=64, first_sample=r, **{**kw, "samples_per_prompt": 1}
        )
        for r in range(3)
    ]
    assert major.token_ids == [t for g in rounds for t in g.token_ids]
    assert major.prompts == PROMPTS * 3
    # ... and the prompt-major call's rows, reordered
    n = len(PROMPTS)
    assert [whole.token_ids[i * 3 + s] for s in range(3) for i in range(n)] == major.token_ids
    # a prompt's rows do not depend on the other prompts of the call
    alone = generate_continuations(tiny_backend, PROMPTS[:2], batch_size=64, **kw)
    assert alone.token_ids == whole.token_ids[:6]
    # the sample index matters: different samples of a prompt differ
    assert len({tuple(t) for t in whole.token_ids[:3]}) > 1


def test_seeds_change_the_samples_and_greedy_ignores_them(tiny_backend):
    kw = dict(max_new_tokens=6, samples_per_prompt=2, **SAMPLE)
    a = generate_continuations(tiny_backend, PROMPTS, seed=1, **kw)
    b = generate_continuations(tiny_backend, PROMPTS, seed=2, **kw)
    assert a.token_ids != b.token_ids
    assert a.token_ids == generate_continuations(tiny_backend, PROMPTS, seed=1, **kw).token_ids
    g1 = generate_continuations(tiny_backend, PROMPTS, 6, seed=1, batch_size=3)
    g2 = generate_continuations(tiny_backend, PROMPTS, 6, seed=2)
    assert g1.token_ids == g2.token_ids  # greedy decoding draws nothing
    assert not g1.meta["do_sample"] and a.meta["sample_major"] is False


def test_steered_and_unsteered_rows_pair(tiny_backend):
    """The identity edit in another batch layout reproduces the unsteered rows exactly; a real
    edit changes the continuations but keeps each row's random stream."""
    sae = SparseAutoencoder(tiny_backend.d_model, 64, seed=4)
    kw = dict(max_new_tokens=6, samples_per_prompt=2, seed=5, **SAMPLE)
    base = generate_continuations(tiny_backend, PROMPTS, batch_size=64, **kw)
    with steer(tiny_backend, sae, "layer.2", [Edit(5, "add", 0.0)], keep_error=True):
        same = generate_continuations(tiny_backend, PROMPTS, batch_size=3, **kw)
    assert same.token_ids == base.token_ids
    with steer(tiny_backend, sae, "layer.2", [Edit(5, "set", 500.0)], keep_error=True):
        moved = generate_continuations(tiny_backend, PROMPTS, batch_size=3, **kw)
    assert moved.token_ids != base.token_ids


def test_row_streams_depend_on_seed_prompt_and_sample():
    u = lambda *k: row_streams(*k)[0].random()  # noqa: E731
    first = u(0, [1], [2])
    assert first == u(0, [1], [2])
    assert len({first, u(1, [1], [2]), u(0, [2], [1]), u(0, [1], [3]), u(0, [2], [2])}) == 5


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.6, 1.0), (1.3, 0.7)])
def test_the_sampler_draws_from_the_tempered_nucleus(temperature, top_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, -20.0, float("-inf")])
    n = 20_000
    rngs = row_streams(11, range(n), [0] * n)
    picked = RowSampler(rngs, temperature, top_p).pick(logits.expand(n, -1).clone())
    counts = np.bincount(picked.numpy(), minlength=len(logits))
    expected = _nucleus(logits, temperature, top_p)
    assert _chi2_pvalue(counts, expected) > 1e-3
    # the test can tell distributions apart: the untempered full softmax is rejected
    other = _nucleus(logits, 1.0 if temperature != 1.0 else 2.0, 1.0)
    with np.errstate(divide="ignore"):
        assert (counts[other == 0].sum() > 0) or _chi2_pvalue(counts, other) < 1e-6
    scores = RowSampler(row_streams(0, [0, 1], [0, 0]), temperature, top_p)(
        None, logits.expand(2, -1).clone()
    )
    assert (torch.isfinite(scores).sum(1) == 1).all() and scores.max() == 0


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_first_sampled_tokens_follow_the_model(tiny_backend, top_p):
    """The first token of many sampled continuations of one prompt follows softmax(logits/T)
    of the model's next-token logits (within the top-p nucleus)."""
    temperature, n = 0.1, 3000
    g = generate_continuations(
        tiny_backend, ["the market"], 1, do_sample=True, temperature=temperature, top_p=top_p,
        samples_per_prompt=n, seed=3, batch_size=1000,
    )  # fmt: skip
    ids = torch.tensor([g.prompt_ids[0]], device=tiny_backend.device)
    with torch.inference_mode():
        logits = tiny_backend.model(input_ids=ids).logits[0, -1].float().cpu()
    V = logits.shape[0]
    counts = np.bincount([t[0] for t in g.token_ids], minlength=V)[:V]
    assert counts.sum() == n
    assert _chi2_pvalue(counts, _nucleus(logits, temperature, top_p)) > 1e-3
    assert _chi2_pvalue(counts, _nucleus(logits, 1.0, 1.0)) < 1e-6


def test_bad_sampling_arguments_are_refused_before_generating(tiny_backend):
    for kw, msg in [
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"first_sample": -1}, "first_sample=-1"),
    ]:
        with pytest.raises(ValueError, match=msg):
            generate_continuations(tiny_backend, PROMPTS, 2, do_sample=True, **kw)


def _reference_inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One float64 cumulative sum over the whole row: the first index whose mass exceeds u."""
    cdf = w.double().cumsum(-1)
    return torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True)[:, 0]


@pytest.mark.parametrize("V", [1, 2, 7, 10, 97, 1024, 50257])
def test_inverse_cdf_matches_one_cumulative_sum(V):
    """The two-level search picks the token one float64 cumulative sum picks, for vocabularies
    that blocks divide and that they do not, with zero weights and sparse rows."""
    g = torch.Generator().manual_seed(V)
    B = 64
    w = torch.rand(B, V, generator=g) ** 4
    w[w < 0.3] = 0.0  # zero-weight tokens between the others
    w[0] = 0.0
    w[0, -1] = 1.0  # all mass on the last token
    w[1] = 0.0
    w[1, 0] = 2.5  # ... on the first
    w[2, V // 2] += 1e-30  # a row with a tiny mass somewhere
    w[w.sum(-1) == 0, 0] = 1.0
    u = torch.rand(B, generator=g, dtype=torch.float64)
    u[3], u[4] = 0.0, 1.0 - 2.0**-53  # both ends of [0, 1)
    got = inverse_cdf(w, u)
    ref = _reference_inverse_cdf(w, u).clamp_max(V - 1)
    assert (w.gather(1, got[:, None]) > 0).all(), "a zero-weight token was picked"
    # rounding of the block sums may move a pick across a boundary only where u sits on it
    differ = (got != ref).nonzero()[:, 0]
    for r in differ.tolist():
        cdf = w[r].double().cumsum(0) / w[r].double().sum()
        edge = cdf[torch.minimum(got[r], ref[r])]
        assert abs(float(edge) - float(u[r])) < 1e-6, (r, int(got[r]), int(ref[r]))
    assert differ.numel() <= 1


def test_inverse_cdf_never_picks_a_zero_weight_token_at_the_top_of_u():
    """u just under 1 with trailing zero weights: the last token with mass, not a zero after it
    (in either level: a zero block after the mass, and zeros inside the last block)."""
    V = 100  # blocks of 10
    w = torch.zeros(3, V)
    w[0, 37] = 1.0  # one token, zeros after it in its block and in later blocks
    w[1, :5] = 1.0
    w[2, 89] = 1e-6
    w[2, 3] = 1.0
    u = torch.full((3,), 1.0 - 2.0**-53, dtype=torch.float64)
    assert inverse_cdf(w, u).tolist() == [37, 4, 89]
    assert inverse_cdf(w, torch.zeros(3, dtype=torch.float64)).tolist() == [37, 0, 3]


def test_vocab_mass_and_nll_of_one_step_match_the_models_softmax(tiny_backend):
    """With one new token, ``vocab_mass`` is the next-token probability of each set and ``nll``
    the sampled token's -log p, both from the softmax of the prompt's last logits."""
    sets = [[5, 6, 7], [11], list(range(40, 90))]
    g = generate_continuations(
        tiny_backend, PROMPTS, 1, do_sample=True, samples_per_prompt=1, seed=2,
        vocab_sets=sets, score=True,
    )  # fmt: skip
    for r, ids in enumerate(g.prompt_ids):
        x = torch.tensor([ids], device=tiny_backend.device)
        with torch.inference_mode():
            logp = torch.log_softmax(tiny_backend.model(input_ids=x).logits[0, -1].double(), -1)
        want = [float(logp[s].exp().sum()) for s in sets]
        np.testing.assert_allclose(g.vocab_mass[r], want, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(g.nll[r], -float(logp[g.token_ids[r][0]]), rtol=1e-4)


def test_inverse_cdf_refuses_shapes_it_cannot_sample_from():
    with pytest.raises(ValueError, match=r"weights has shape \(5,\)"):
        inverse_cdf(torch.ones(5), torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"u has shape \(3,\): expected \[2\]"):
        inverse_cdf(torch.ones(2, 4), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("spread", [0.05, 1.0, 8.0])
def test_the_nucleus_equals_a_full_sort(spread):
    """The top-k nucleus keeps exactly the tokens a full sort keeps, with their probabilities,
    for peaked rows (a few tokens) and flat ones (the candidates grow past the first k)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5000, generator=g) * spread
    logits[0] = torch.randn(5000, generator=g) * 1e-3  # near uniform: most of the vocabulary
    probs = torch.softmax(logits, -1)
    p, ids = nucleus(probs, 0.9, k=16)
    full, order = probs.sort(dim=-1, descending=True, stable=True)
    before = full.cumsum(-1) - full
    for r in range(probs.shape[0]):
        want = set(order[r][before[r] < 0.9].tolist())
        got = set(ids[r][p[r] > 0].tolist())
        assert got == want and len(want) >= 1
        assert torch.equal(p[r][p[r] > 0], probs[r, ids[r][p[r] > 0]])
    assert int((p[0] > 0).sum()) > 4000  # the flat row's candidates grew from 16 to 5000
