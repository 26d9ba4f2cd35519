"""Batched generation, side-by-side comparisons and perplexity for steering.

Prompts are tokenised with the model's BOS and left-padded, so every row's last prompt token
sits in the last column and generated tokens follow it directly. Sampling draws each row's
random numbers from a stream of its own, seeded by ``(seed, prompt index, sample index)``:
a row's continuation does not depend on the batch it runs in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from integral_superposition.data.tokenize import pad_batch, pad_token_id, special_ids

__all__ = [
    "Generations",
    "RowSampler",
    "check_prompts",
    "compare_generations",
    "continuation_nll",
    "encode_prompts",
    "generate_continuations",
    "inverse_cdf",
]

_MAX_PROMPT_TOKENS = 4096


def check_prompts(prompts: Any, name: str = "prompts") -> list[str]:
    """``prompts`` as a non-empty list of strings (a single string is one prompt)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts is None or not isinstance(prompts, Sequence):
        raise TypeError(f"{name}={prompts!r}: expected a list of prompt strings")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{name} is empty: expected at least one prompt string")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{name}: expected strings, got {type(bad[0]).__name__} ({bad[0]!r})")
    return prompts


def check_steerable_prompts(
    tokenizer, prompts: Sequence[str], name: str = "prompts"
) -> list[list[int]]:
    """Token ids of each prompt (:func:`encode_prompts`), after checking that each prompt has a
    token steering can edit: special tokens (BOS, EOS, pad, ...) are never steered, so an empty
    prompt or one of only special tokens is refused, naming the prompt."""
    from integral_superposition.steering.positions import steerable_token_mask

    enc = encode_prompts(tokenizer, prompts)
    for i, (prompt, ids) in enumerate(zip(prompts, enc, strict=True)):
        if not steerable_token_mask(tokenizer, torch.tensor([ids])).any():
            what = "is empty" if not prompt.strip() else f"has only special tokens {ids}"
            raise ValueError(
                f"{name}[{i}]={prompt!r} {what}: expected text with at least one token that is "
                "not special (BOS, EOS and pad tokens are never steered)"
            )
    return enc


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, with the BOS token the model saw in training."""
    from integral_superposition.data.tokenize import tokenize_texts

    return tokenize_texts(tokenizer, list(prompts), _MAX_PROMPT_TOKENS, prepend_bos=True)


@dataclass
class Generations:
    """Continuations of ``prompts``: one row per prompt x sample, prompt-major (every sample of
    the first prompt, then of the second, ...) or sample-major (``sample_major=True``)."""

    prompts: list[str]
    """The prompt of each row."""
    texts: list[str]
    """The decoded continuation of each row (special tokens skipped)."""
    prompt_ids: list[list[int]]
    """The prompt's token ids (BOS included)."""
    token_ids: list[list[int]]
    """The continuation's token ids, up to and including the first EOS."""
    vocab_mass: np.ndarray | None = None
    """``float64 [rows, C]``: next-token probability on each vocabulary set, averaged over the
    row's generation steps (None unless ``vocab_sets`` was given)."""
    nll: np.ndarray | None = None
    """``float64 [rows]``: the generating model's summed negative log-likelihood of each
    continuation (its ``token_ids``; None unless ``score=True``). Unsteered, this is
    :func:`continuation_nll` without a second forward."""
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: slice) -> Generations:
        """The rows ``rows`` as Generations of their own."""
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return Generations(
            self.prompts[rows], self.texts[rows], self.prompt_ids[rows], self.token_ids[rows],
            pick(self.vocab_mass), pick(self.nll), dict(self.meta),
        )  # fmt: skip


class _VocabMass:
    """Model-level forward hook: probability mass of the next-token distribution on each of
    ``C`` vocabulary sets, at every forward of one ``generate`` call."""

    def __init__(self, sets: Sequence[Sequence[int]], device: torch.device):
        ids = [torch.as_tensor(list(s), dtype=torch.long) for s in sets]
        self.ids = torch.cat(ids).to(device) if ids else torch.zeros(0, dtype=torch.long)
        self.seg = torch.repeat_interleave(
            torch.arange(len(ids)), torch.tensor([len(i) for i in ids])
        ).to(device)
        self.C = len(ids)
        self.steps: list[torch.Tensor] = []

    def __call__(self, _module, _args, output) -> None:
        logits = output.logits if hasattr(output, "logits") else output[0]
        last = logits[:, -1, :].float()  # [B, V]
        # softmax at the sets' ids only: exp(logit - logsumexp), without a [B, V] softmax
        p = (last[:, self.ids] - torch.logsumexp(last, dim=-1, keepdim=True)).exp()  # [B, n_ids]
        mass = torch.zeros(p.shape[0], self.C, device=p.device).index_add_(1, self.seg, p)
        self.steps.append(mass)


class _StepNLL:
    """Model-level forward hook: the generating model's negative log-likelihood of each
    sampled token. A step's forward receives the token the previous step sampled, so its
    log-probability is read from the previous step's distribution (kept for one step);
    :meth:`finish` scores the last token from the final distribution."""

    def __init__(self):
        self.prev: torch.Tensor | None = None  # [B, V] logits of the last step
        self.prev_lse: torch.Tensor | None = None  # [B] their log-sum-exp
        self.steps: list[torch.Tensor] = []  # per fed-back token: [B]

    def _nll(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B]`` -log p(token) under the last step's distribution: logsumexp - logit."""
        assert self.prev is not None and self.prev_lse is not None
        picked = self.prev.gather(1, tokens[:, None].to(self.prev.device))[:, 0]
        return self.prev_lse - picked

    def __call__(self, _module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.prev is not None and ids is not None:
            self.steps.append(self._nll(ids[:, -1]))
        logits = output.logits if hasattr(output, "logits") else output[0]
        self.prev = logits[:, -1, :].float()
        self.prev_lse = torch.logsumexp(self.prev, dim=-1)

    def finish(self, last: torch.Tensor) -> torch.Tensor:
        """``[steps, B]`` NLL of every generated token, ``last [B]`` the final token."""
        if self.prev is not None:
            self.steps.append(self._nll(last))
        self.prev = self.prev_lse = None
        return torch.stack(self.steps, 0).cpu().double()


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse transform sampling: ``weights [B, V]`` (non-negative, unnormalised, each row
    with positive mass) and ``u [B]`` uniform numbers in ``[0, 1)`` -> ``[B]`` the first token
    whose cumulative weight exceeds ``u`` x the row's total (never a zero-weight token).

    Two levels instead of one cumulative sum over the whole vocabulary: the weights' sums over
    blocks of about ``sqrt(V)`` tokens, accumulated from block to block in float64, pick the
    block, then the float64 cumulative sum of that block's weights picks the token. It reads
    the weights once and converts only ``[B, sqrt(V)]`` values to float64, where a float64
    cumulative sum over a 262k vocabulary wrote and read 16 bytes per token."""
    if weights.ndim != 2 or weights.shape[1] < 1:
        raise ValueError(
            f"weights has shape {tuple(weights.shape)}: expected [rows, vocabulary] with a vocabulary"
        )
    B, V = weights.shape
    if tuple(u.shape) != (B,):
        raise ValueError(f"u has shape {tuple(u.shape)}: expected [{B}], one number per row")
    dt = torch.float64 if weights.device.type != "mps" else torch.float32
    bs = max(1, math.isqrt(V))
    n_full = V // bs
    w = weights.contiguous()
    sums = w.as_strided((B, n_full, bs), (V, bs, 1)).sum(-1)  # [B, n_full] full blocks
    if n_full * bs < V:
        sums = torch.cat([sums, w[:, n_full * bs :].sum(-1, keepdim=True)], 1)
    cdf = sums.to(dt).cumsum(-1)  # [B, n_blocks]
    total = cdf[:, -1]
    target = u.to(device=w.device, dtype=dt) * total
    # the first block whose cumulative mass exceeds the target, at most the last block with mass
    blk = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    blk = torch.minimum(blk, (cdf < total[:, None]).sum(-1))
    hi = cdf.gather(1, blk[:, None])[:, 0]
    lo = torch.where(blk > 0, cdf.gather(1, (blk - 1).clamp_min(0)[:, None])[:, 0], 0.0)
    cols = blk[:, None] * bs + torch.arange(bs, device=w.device)  # [B, bs]
    inside = w.gather(1, cols.clamp_max(V - 1)).masked_fill(cols >= V, 0.0)
    local = inside.to(dt).cumsum(-1)  # [B, bs]
    # the target's place within the block, as a share of the block's own float64 mass
    within = (target - lo) / (hi - lo) * local[:, -1]
    idx = torch.searchsorted(local, within[:, None], right=True)[:, 0]
    idx = torch.minimum(idx, (local < local[:, -1:]).sum(-1))
    return blk * bs + idx


def nucleus(probs: torch.Tensor, top_p: float, k: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p nucleus of each row: ``probs [B, V]`` (rows summing to 1) -> ``(p [B, K],
    ids [B, K])``, the ``K`` most probable tokens in decreasing order with their
    probabilities, zero past the smallest prefix whose mass reaches ``top_p``.

    Starts from the ``k`` most probable tokens (``torch.topk``) and doubles ``k`` until every
    row's nucleus fits, so a peaked distribution never sorts its whole vocabulary (a stable
    sort of a 262k vocabulary took most of a sampling step)."""
    V = probs.shape[-1]
    k = min(max(1, k), V)
    while True:
        p, ids = probs.topk(k, dim=-1, sorted=True)
        before = p.cumsum(-1) - p  # mass of the more probable tokens
        if k == V or bool((before[:, -1] + p[:, -1] >= top_p).all()):
            return p.masked_fill(before >= top_p, 0.0), ids
        k = min(2 * k, V)


class RowSampler(LogitsProcessor):
    """Sampling with temperature and top-p (nucleus) where every row draws from its own random
    stream, as a logits processor for a greedy ``generate`` call.

    At each step row ``i`` takes one uniform number ``u`` from ``rngs[i]`` and picks the token
    where ``u`` falls in the cumulative distribution of ``softmax(scores / temperature)``
    (restricted to the smallest set of most probable tokens whose mass reaches ``top_p``): an
    exact sample of that distribution (inverse transform sampling, :func:`inverse_cdf`). The
    returned scores are ``0`` at the picked token and ``-inf`` elsewhere, so greedy decoding
    takes it. One number per row and step: a row's tokens depend on its logits and its stream
    only, not on the other rows of the batch.
    """

    def __init__(self, rngs: Sequence[np.random.Generator], temperature: float, top_p: float):
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: expected a number > 0")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r}: expected a number in (0, 1]")
        self.rngs = list(rngs)
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores [B, V]`` logits -> ``[B]`` the sampled token of each row."""
        if scores.shape[0] != len(self.rngs):
            raise ValueError(f"scores has {scores.shape[0]} rows but {len(self.rngs)} streams")
        u = torch.tensor([g.random() for g in self.rngs], dtype=torch.float64)
        scores = scores.float()
        # exp((s - max) / T): softmax(s / T) up to each row's constant, which the sampler ignores
        weights = torch.sub(scores, scores.amax(-1, keepdim=True))
        if self.temperature != 1.0:
            weights.div_(self.temperature)
        weights.exp_()  # [B, V]
        if self.top_p >= 1.0:
            return inverse_cdf(weights, u)
        probs, order = nucleus(weights / weights.sum(-1, keepdim=True), self.top_p)
        return order.gather(1, inverse_cdf(probs, u)[:, None])[:, 0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``scores [B, V]`` -> ``[B, V]``: 0 at each row's sampled token, -inf elsewhere."""
        picked = self.pick(scores)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picked[:, None], 0.0)


def row_streams(
    seed: int, prompt_index: Sequence[int], sample_index: Sequence[int]
) -> list[np.random.Generator]:
    """One random stream per row, seeded by ``(seed, prompt index, sample index)`` (numpy's
    ``SeedSequence``: independent streams for distinct triples)."""
    return [
        np.random.default_rng(np.random.SeedSequence([seed % 2**64, int(i), int(s)]))
        for i, s in zip(prompt_index, sample_index, strict=True)
    ]


def _eos_ids(backend) -> set[int]:
    ids: set[int] = set()
    for src in (backend.model.generation_config, backend.tokenizer):
        e = getattr(src, "eos_token_id", None)
        if e is None:
            continue
        ids.update(int(i) for i in (e if isinstance(e, list | tuple) else [e]))
    return ids


@torch.inference_mode()
def generate_continuations(
    backend,
    prompts: Sequence[str],
    max_new_tokens: int = 30,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    samples_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    vocab_sets: Sequence[Sequence[int]] | None = None,
    score: bool = False,
    first_sample: int = 0,
    sample_major: bool = False,
    rows: Sequence[tuple[int, int]] | None = None,
    stream_ids: Sequence[int] | None = None,
    on_batch: Callable[[range | None, int], None] | None = None,
) -> Generations:
    """Generate ``samples_per_prompt`` continuations of every prompt (left-padded batches).

    Sampling (:class:`RowSampler`) gives every row a random stream seeded by ``(seed, prompt
    index, sample index)``: a row's continuation depends on its prompt, its sample index and
    the seed only, not on ``batch_size`` or the other rows, and a steered and an unsteered call
    draw the same numbers row by row. Sample indices run from ``first_sample``: a call with
    ``first_sample=r, samples_per_prompt=1`` gives the rows of sample ``r`` of a larger call.
    ``sample_major``: rows ordered sample by sample (every prompt's sample 0, then every
    prompt's sample 1, ...) instead of prompt by prompt. ``vocab_sets``: lists of token ids;
    the result's ``vocab_mass`` is the next-token probability on each set, averaged over each
    row's steps. ``score``: also record the generating model's NLL of every continuation
    (``nll``), from the logits the generation computed anyway.

    ``rows``: the rows of the call as ``(prompt index, sample index)`` pairs, in order, instead
    of the grid that ``samples_per_prompt``, ``first_sample`` and ``sample_major`` describe.
    ``stream_ids``: the index that seeds each prompt's streams in place of its position, so
    that the prompts of several sets in one call draw what each set draws alone. Rows run in
    the fewest batches of at most ``batch_size``, of equal size; ``on_batch(rows, n_rows)`` is
    called with the rows of each batch (a range) and the call's row count before the batch
    runs, and with ``rows=None`` after the call (e.g.
    :meth:`~integral_superposition.steering.hooks.SteeringHandle.select_rows` for per-row
    edits).
    """
    prompts = check_prompts(prompts)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive int")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt={samples_per_prompt}: expected >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    if not isinstance(first_sample, int) or first_sample < 0:
        raise ValueError(f"first_sample={first_sample!r}: expected an int >= 0")
    if not isinstance(seed, int):
        raise TypeError(f"seed={seed!r}: expected an int")
    if do_sample:  # checks temperature and top_p before anything is generated
        RowSampler([], temperature, top_p)
    if stream_ids is None:
        stream_ids = range(len(prompts))
    elif len(stream_ids) != len(prompts):
        raise ValueError(
            f"stream_ids has {len(stream_ids)} entries for {len(prompts)} prompts: expected one per prompt"
        )
    if rows is None:
        samples = range(first_sample, first_sample + samples_per_prompt)
        pairs = (  # (prompt index, sample index) of each row
            [(i, s) for s in samples for i in range(len(prompts))]
            if sample_major
            else [(i, s) for i in range(len(prompts)) for s in samples]
        )
    else:
        pairs = [(int(i), int(s)) for i, s in rows]
        bad = [(i, s) for i, s in pairs if not (0 <= i < len(prompts) and s >= 0)]
        if bad or not pairs:
            raise ValueError(
                f"rows: {bad[0] if bad else 'none'}: expected (prompt index in 0..{len(prompts) - 1}, "
                "sample index >= 0) pairs, at least one"
            )
    tok = backend.tokenizer
    pad = pad_token_id(tok)
    eos = _eos_ids(backend)
    enc = encode_prompts(tok, prompts)
    streams = [(int(stream_ids[i]), s) for i, s in pairs]
    enc_rows = [enc[i] for i, _ in pairs]
    out_ids: list[list[int]] = []
    masses: list[np.ndarray] = []
    nlls: list[np.ndarray] = []
    # greedy decoding of the sampler's one-hot scores; the model's own sampling defaults
    # (temperature, top_k, top_p of its generation config) are silenced
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "do_sample": False,
        "temperature": None, "top_p": None, "top_k": None,
    }  # fmt: skip
    n_batches = -(-len(pairs) // batch_size)
    size = -(-len(pairs) // n_batches)  # equal batches: 72 rows at 64 run as 36 + 36
    try:
        for a in range(0, len(pairs), size):
            b = min(a + size, len(pairs))
            if on_batch is not None:
                on_batch(range(a, b), len(pairs))
            g = _generate_batch(
                backend, enc_rows[a:b], streams[a:b], gen_kwargs, pad, eos, do_sample, seed,
                temperature, top_p, vocab_sets, score,
            )  # fmt: skip
            out_ids += g[0]
            if g[1] is not None:
                nlls.append(g[1])
            if g[2] is not None:
                masses.append(g[2])
    finally:
        if on_batch is not None:
            on_batch(None, len(pairs))
    specials = special_ids(tok)
    texts = [
        tok.decode([t for t in ids if t not in specials], skip_special_tokens=True)
        for ids in out_ids
    ]
    return Generations(
        prompts=[prompts[i] for i, _ in pairs],
        texts=texts,
        prompt_ids=[list(e) for e in enc_rows],
        token_ids=out_ids,
        vocab_mass=np.concatenate(masses, 0) if masses else None,
        nll=np.concatenate(nlls, 0) if nlls else None,
        meta={
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature if do_sample else None,
            "top_p": top_p if do_sample else None,
            "samples_per_prompt": samples_per_prompt if rows is None else None,
            "first_sample": first_sample if rows is None else None,
            "sample_major": sample_major if rows is None else None,
            "seed": seed,
        },
    )


def _generate_batch(
    backend, enc_rows, streams, gen_kwargs, pad, eos, do_sample, seed, temperature, top_p,
    vocab_sets, score,
) -> tuple[list[list[int]], np.ndarray | None, np.ndarray | None]:  # fmt: skip
    """One ``generate`` call: ``(token ids of each row, nll [B] or None, vocab mass [B, C] or
    None)``."""
    out_ids: list[list[int]] = []
    nll = mass = None
    batch = pad_batch(enc_rows, pad, "left")
    if do_sample:
        rngs = row_streams(seed, *zip(*streams, strict=True))
        sampler = RowSampler(rngs, temperature, top_p)
        gen_kwargs = {**gen_kwargs, "logits_processor": LogitsProcessorList([sampler])}
    recorder = _VocabMass(vocab_sets, backend.device) if vocab_sets else None
    handle = backend.model.register_forward_hook(recorder) if recorder is not None else None
    scorer = _StepNLL() if score else None
    score_handle = backend.model.register_forward_hook(scorer, with_kwargs=True) if scorer else None
    try:
        seqs = backend.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pad_token_id=pad,
            **gen_kwargs,
        )
    finally:
        for h in (handle, score_handle):
            if h is not None:
                h.remove()
    step_nll = scorer.finish(seqs[:, -1]) if scorer is not None else None
    new = seqs[:, batch.input_ids.shape[1] :].cpu().tolist()
    lengths = []
    for ids in new:
        n = len(ids)
        for i, t in enumerate(ids):
            if t in eos:
                n = i + 1
                break
        out_ids.append(ids[:n])
        lengths.append(n)
    if step_nll is not None:
        upto = torch.arange(step_nll.shape[0])[:, None] < torch.tensor(lengths)[None, :]
        nll = (step_nll * upto).sum(0).numpy()
    if recorder is not None:
        steps = torch.stack(recorder.steps[: max(lengths, default=0)], 0).cpu().double()
        valid = torch.arange(steps.shape[0])[:, None] < torch.tensor(lengths)[None, :]
        total = (steps * valid[..., None]).sum(0)
        mass = (total / valid.sum(0).clamp_min(1)[:, None]).numpy()
    return out_ids, nll, mass


@torch.inference_mode()
def continuation_nll(
    backend,
    prompt_ids: Sequence[Sequence[int]],
    cont_ids: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood of each continuation given its prompt under ``backend`` as it
    is (call it outside any steering block to score with the unsteered model).

    Returns ``(nll_sum [n], n_tokens [n])``; rows with an empty continuation get ``(0, 0)``.
    Rows run in batches of similar lengths, right-padded, and the LM head runs only from the
    shortest prompt's last token on (``logits_to_keep``): with a 262k vocabulary the head costs
    more than the blocks.
    """
    if len(prompt_ids) != len(cont_ids):
        raise ValueError(
            f"prompt_ids has {len(prompt_ids)} rows but cont_ids has {len(cont_ids)}: expected one continuation per prompt"
        )
    n = len(cont_ids)
    nll = np.zeros(n)
    count = np.zeros(n, dtype=np.int64)
    for i, lp, target in continuation_log_probs(backend, prompt_ids, cont_ids, batch_size):
        nll[i] = float(-lp.gather(1, target[:, None]).sum())
        count[i] = target.numel()
    return nll, count


def continuation_log_probs(
    backend,
    prompt_ids: Sequence[Sequence[int]],
    cont_ids: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(i, log_probs [c_i, V], target [c_i])`` for each row ``i`` with a non-empty
    continuation: the next-token log-probabilities (float32) at the positions that predict
    its ``c_i`` continuation tokens, under ``backend`` as it is (inside a steering block:
    steered), and those tokens. Rows run in batches of similar lengths, right-padded, and the
    LM head runs only from the shortest prompt's last token on (``logits_to_keep``)."""
    todo = [i for i in range(len(cont_ids)) if len(cont_ids[i]) > 0]
    # batches of similar prompt and total lengths: less padding, a shorter span for the head
    todo.sort(key=lambda i: (len(prompt_ids[i]), len(prompt_ids[i]) + len(cont_ids[i])))
    pad = pad_token_id(backend.tokenizer)
    for a in range(0, len(todo), batch_size):
        idx = todo[a : a + batch_size]
        seqs = [list(prompt_ids[i]) + list(cont_ids[i]) for i in idx]
        batch = pad_batch(seqs, pad, "right")
        T = batch.input_ids.shape[1]
        first = min(len(prompt_ids[i]) for i in idx) - 1  # first position whose logits count
        out = backend.model(
            input_ids=batch.input_ids.to(backend.device),
            attention_mask=batch.attention_mask.to(backend.device),
            use_cache=False,
            logits_to_keep=T - first,
        )
        logits = out.logits  # [B, T - first, V]: positions first..T-1
        for r, i in enumerate(idx):
            p, c = len(prompt_ids[i]), len(cont_ids[i])
            lp = torch.log_softmax(logits[r, p - 1 - first : p + c - 1 - first].float(), dim=-1)
            yield i, lp, torch.tensor(cont_ids[i], device=lp.device)
        del out, logits


def compare_generations(
    backend,
    sae,
    hook_point: Any,
    edits: Any,
    prompts: Sequence[str] | str,
    max_new_tokens: int = 30,
    positions: Any = "all",
    *,
    max_acts: Any = None,
    keep_error: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[tuple[str, str, str]]:
    """Generate each prompt's continuation without and with steering: a list of
    ``(prompt, unsteered, steered)``.

    Both runs use the same decoding settings and seed. Every argument is checked before
    anything is generated.
    """
    from integral_superposition.steering.hooks import steer

    prompts = check_prompts(prompts)
    check_steerable_prompts(backend.tokenizer, prompts)
    kw = dict(
        do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size
    )
    # The steered run goes first: steer() checks every argument before anything is generated.
    with steer(
        backend, sae, hook_point, edits, positions, max_acts=max_acts, keep_error=keep_error
    ):
        steered = generate_continuations(backend, prompts, max_new_tokens, **kw)
    base = generate_continuations(backend, prompts, max_new_tokens, **kw)
    return list(zip(prompts, base.texts, steered.texts, strict=True))
