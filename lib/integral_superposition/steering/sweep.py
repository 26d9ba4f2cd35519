"""Does steering work? Strength sweeps with a label classifier, vocabulary mass, fluency and
controls.

For every steered latent (picked per label by enrichment, or given) and every strength, the
model continues a fixed list of neutral prompts with the latent edited, and each set of
generations is scored by

- **vocab_mass**: the next-token probability the steered model puts on the target label's
  vocabulary (the label's most enriched token ids in the activation store, a one-sided Fisher
  test per token), averaged over generation steps;
- **share**: the fraction of continuations that a label classifier assigns to the target
  label - scikit-learn logistic regression on mean-pooled activations of the store's labelled
  documents at the store's hook point, applied to each continuation read by the unsteered
  model (its held-out accuracy is reported next to it);
- **perplexity** of the continuations under the unsteered model (and the ratio to the
  unsteered generations' perplexity), plus the distinct-bigram fraction.

Controls are rows of their own: ``unsteered`` (no hook), ``alpha0`` (the hook with an identity
edit), ``random`` (a random live latent enriched for no label, its edit scaled so the
injected vector has the target's norm) and ``own_label`` (the same latent on prompts cut from
held-out documents of its own label).

:func:`evaluate_steering` returns the tables; the runner
(:func:`~integral_superposition.steering.evaluate.run_steering_eval`) publishes them.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, field_validator

from integral_superposition.progress import ProgressFn, Reporter
from integral_superposition.steering.classifier import LabelClassifier, label_vocabulary
from integral_superposition.steering.edits import Edit
from integral_superposition.steering.generation import (
    Generations,
    check_prompts,
    check_steerable_prompts,
    continuation_nll,
    generate_continuations,
)
from integral_superposition.steering.hooks import resolve_sae_hook_point, steer
from integral_superposition.steering.picks import (
    enrichment_tables,
    random_controls,
    resolve_scan_device,
    target_latents,
)
from integral_superposition.steering.plot import plot_sweep

Mode = Literal["clamp_max", "clamp", "add", "scale"]
Control = Literal["alpha0", "random", "own_label"]

log = logging.getLogger(__name__)

__all__ = ["SteeringEval", "SteeringParams", "evaluate_steering"]


class SteeringParams(BaseModel):
    """What :func:`run_steering_eval` sweeps and how it scores it."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
    )

    latents: list[int] | Literal["auto"] = "auto"
    """Latents to steer, or ``auto``: the most enriched latents of each label (``labels``)."""
    labels: list[str] | None = None
    """``auto``: the target labels (default: every label). Explicit latents: one target label per latent (default: each latent's most enriched label)."""
    per_label: int = Field(1, ge=1)
    """``auto``: latents picked per label."""
    q_max: float = Field(1e-3, gt=0, le=1)
    """A picked latent's token-level enrichment q-value must be below this."""
    rank_by: Literal["doc_q", "token_q", "log_odds"] = "doc_q"
    """Order of the significant latents: document-level q (broad, label-specific latents first), token-level q, or token-level log odds."""
    n_top: int = Field(20, ge=1)
    """Top activating tokens per latent in the token-level enrichment test."""
    mode: Mode = "clamp_max"
    """Edit swept: ``clamp_max`` (clamp to strength x the latent's max activation in the store), ``clamp`` (to strength), ``add`` (strength x decoder row), ``scale``."""
    strengths: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    """Strengths of the sweep."""
    positions: str | list[str] = "all"
    """Steered positions: ``last_prompt``, ``prompt``, ``generated``, ``all`` (or a list of them)."""
    prompts: list[str] | None = None
    """Neutral prompts (default: ``data.neutral_prompts()``)."""
    max_new_tokens: int = Field(24, ge=1)
    """Tokens generated per continuation."""
    do_sample: bool = True
    """Sample (``True``) or decode greedily."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    samples_per_prompt: int = Field(2, ge=1)
    """Continuations per prompt (with sampling)."""
    seed: int = 0
    """Seed of sampling, the random control latent and the classifier split."""
    batch_size: int = Field(16, ge=1)
    """Prompts per generate call."""
    keep_error: bool = True
    """Keep the SAE error term (``x + dec(z') - dec(z)``); False replaces ``x`` by ``dec(z')``."""
    controls: list[Control] = Field(default_factory=lambda: ["alpha0", "random", "own_label"])
    """Control rows to add."""
    own_label_prompts: int = Field(12, ge=1)
    """``own_label`` control: prompts cut from held-out documents of the latent's label."""
    own_prompt_words: int = Field(5, ge=1)
    """``own_label`` control: words kept from each document as its prompt."""
    vocab_per_label: int = Field(50, ge=1)
    """Target vocabulary: most enriched token ids per label."""
    vocab_min_count: int = Field(5, ge=1)
    """Target vocabulary: a token must occur at least this often in the store."""
    vocab_words_only: bool = True
    """Target vocabulary: keep only tokens that read as words (three or more letters)."""
    classifier_test_fraction: float = Field(0.2, gt=0, lt=1)
    """Held-out documents for the classifier's accuracy."""
    classifier_c: float = Field(1.0, gt=0)
    """Inverse regularisation strength of the logistic regression."""
    ppl_ratio_max: float = Field(2.0, gt=1)
    """Fluency bound: the summary's best strength keeps perplexity within this factor of unsteered."""
    hook_point: str | None = None
    """Where to steer (default: the store's hook point, where the SAE was trained)."""
    device: str = "auto"
    """Torch device of the SAE scan: ``auto`` (the model's), ``cpu``, ``cuda:0``, ..."""

    @field_validator("strengths")
    @classmethod
    def _strengths(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("strengths is empty: expected at least one strength")
        if any(not math.isfinite(s) for s in v):
            raise ValueError(f"strengths={v}: expected finite numbers")
        return v

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError(
                "prompts is empty: expected at least one prompt (or None for the neutral prompts)"
            )
        blank = [i for i, s in enumerate(v or []) if not s]
        if blank:
            raise ValueError(
                f"prompts[{blank[0]}]={v[blank[0]]!r} is empty: expected text to steer"
            )
        return v

    @field_validator("latents")
    @classmethod
    def _latents(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("latents is empty: expected latent indices or 'auto'")
            if any(j < 0 for j in v):
                raise ValueError(f"latents={v}: expected non-negative latent indices")
        return v


# -- the sweep --------------------------------------------------------------------------------------
@dataclass
class _Scored:
    """A set of generations and its per-row scores."""

    gens: Generations
    proba: np.ndarray  # [n, C]
    valid: np.ndarray  # [n]
    nll: np.ndarray  # [n]
    n_tok: np.ndarray  # [n]


def _distinct2(token_ids: Sequence[Sequence[int]]) -> float:
    pairs = [(a, b) for ids in token_ids for a, b in itertools.pairwise(ids)]
    return len(set(pairs)) / len(pairs) if pairs else float("nan")


def _metrics(s: _Scored, c: int, base_ppl: float | None) -> dict[str, Any]:
    pred = np.where(s.valid, s.proba.argmax(1), -1)
    total = s.n_tok.sum()
    ppl = float(math.exp(s.nll.sum() / total)) if total > 0 else float("nan")
    return {
        "n": len(s.gens),
        "share": float((pred == c).mean()),
        "prob": float(s.proba[s.valid, c].mean()) if s.valid.any() else float("nan"),
        "vocab_mass": float(s.gens.vocab_mass[:, c].mean())
        if s.gens.vocab_mass is not None
        else float("nan"),
        "perplexity": ppl,
        "ppl_ratio": ppl / base_ppl if base_ppl else float("nan"),
        "distinct2": _distinct2(s.gens.token_ids),
        "mean_tokens": float(s.n_tok.mean()),
        "empty": int((~s.valid).sum()),
    }


def _edit_for(mode: str, latent: int, strength: float, max_act: float, ratio: float = 1.0) -> Edit:
    """The sweep's edit of ``latent`` at ``strength``; ``ratio`` rescales it so that another
    latent's injected vector matches the target's norm (random control)."""
    if mode == "clamp_max":
        return Edit(latent, "set", strength * max_act * ratio)
    if mode == "clamp":
        return Edit(latent, "set", strength * ratio)
    if mode == "add":
        return Edit(latent, "add", strength * ratio)
    return Edit(latent, "scale", strength)


@dataclass
class SteeringEval:
    """The result of :func:`evaluate_steering`."""

    table: pd.DataFrame
    """The sweep: one row per (latent, control, strength)."""
    generations: pd.DataFrame
    """Every generation: ``set, latent, label, control, strength, prompt, text, predicted, target_prob, n_tokens, nll``."""
    picks: pd.DataFrame
    """The steered latents with their enrichment, max activation and random control."""
    vocabulary: pd.DataFrame
    """The target vocabularies."""
    classifier: dict[str, Any]
    summary: dict[str, Any]

    def figure(self) -> Figure:
        return plot_sweep(self.table, self.summary.get("ppl_ratio_max"))


def _own_label_prompts(
    store, label_id: int, test_docs: np.ndarray, n: int, words: int, seed: int
) -> list[str]:
    docs = store.docs
    pool = docs[(docs["label"] == label_id) & docs["doc_id"].isin(test_docs)]
    if len(pool) < n:
        pool = docs[docs["label"] == label_id]
    pool = pool.sample(n=min(n, len(pool)), random_state=seed) if len(pool) else pool
    return [" ".join(str(t).split()[:words]) for t in pool["text"]]


def _latent_summary(j, label, base_m, steer_ms, rand_ms, r, ppl_ratio_max) -> dict[str, Any]:
    """The strongest share within the fluency bound, and how far the random control moved."""
    fluent = [(s, m) for s, m in steer_ms if m["ppl_ratio"] <= ppl_ratio_max]
    best = max(fluent, key=lambda sm: (sm[1]["share"], -sm[0])) if fluent else None
    rand_at = dict(rand_ms)
    return {
        "latent": j, "label": label, "baseline_share": base_m["share"],
        "baseline_vocab_mass": base_m["vocab_mass"], "baseline_perplexity": base_m["perplexity"],
        "best_strength": best[0] if best else None,
        "best_share": best[1]["share"] if best else None,
        "best_vocab_mass": best[1]["vocab_mass"] if best else None,
        "best_ppl_ratio": best[1]["ppl_ratio"] if best else None,
        "max_share": max(m["share"] for _, m in steer_ms),
        "random_latent": r,
        "random_share_at_best": rand_at[best[0]]["share"] if best and best[0] in rand_at else None,
        "random_max_shift": max((abs(m["share"] - base_m["share"]) for _, m in rand_ms), default=None),
    }  # fmt: skip


def evaluate_steering(
    backend,
    sae,
    store,
    params: SteeringParams | Mapping[str, Any] | None = None,
    *,
    classifier: LabelClassifier | None = None,
    enrichment: tuple[pd.DataFrame, pd.DataFrame | None] | None = None,
    max_acts: Any = None,
    on_progress: ProgressFn | None = None,
) -> SteeringEval:
    """Sweep steering strengths for the chosen latents and score every set of generations.

    ``store``: the activation store the SAE was trained on (labels, token ids, documents).
    ``enrichment``: ``(token table, document table)`` to reuse (else one SAE scan of the
    store computes them and the max activations). ``max_acts``: per-latent max activations
    for ``clamp_max`` (default: from that scan). Every input is checked before generating.
    """
    from integral_superposition.data import neutral_prompts
    from integral_superposition.steering.edits import max_activations

    p = (
        params
        if isinstance(params, SteeringParams)
        else SteeringParams.model_validate(dict(params or {}))
    )
    prompts = check_prompts(p.prompts if p.prompts is not None else neutral_prompts())
    check_steerable_prompts(backend.tokenizer, prompts)
    hook = p.hook_point or store.hook_point
    hp = resolve_sae_hook_point(backend, sae, hook)
    if store.d_model != sae.d_in:
        raise ValueError(f"sae.d_in={sae.d_in} does not match the store's d_model={store.d_model}")
    if isinstance(p.latents, list):
        bad = [j for j in p.latents if not 0 <= j < sae.d_sae]
        if bad:
            raise ValueError(
                f"latents={p.latents}: {bad} out of range for an SAE with d_sae={sae.d_sae} (0..{sae.d_sae - 1})"
            )
        if p.labels is not None and len(p.labels) != len(p.latents):
            raise ValueError(
                f"labels={p.labels}: expected one target label per latent ({len(p.latents)})"
            )
    if p.labels is not None:
        unknown = [lb for lb in p.labels if lb not in store.label_names]
        if unknown:
            raise ValueError(
                f"labels={p.labels}: {unknown} not among the store's labels {store.label_names}"
            )
    t0 = time.perf_counter()
    names = list(store.label_names)
    scan = None
    rep = Reporter("steering", on_progress, unit="sets")
    if enrichment is None:
        rep.set_phase("enrichment scan")
        tok_table, doc_table, scan = enrichment_tables(
            sae, store, p.n_top, device=resolve_scan_device(p.device, backend)
        )
    else:
        tok_table, doc_table = enrichment
    mx = (
        max_activations(max_acts, sae.d_sae)
        if max_acts is not None
        else (np.asarray(scan.act_max, dtype=np.float64) if scan is not None else None)
    )
    if p.mode == "clamp_max" and mx is None:
        raise ValueError("mode='clamp_max' needs max_acts= when enrichment tables are given")

    picks = target_latents(p, tok_table, doc_table, names)
    norms = sae.W_dec.detach().float().norm(dim=1).cpu().numpy()
    picks["max_act"] = mx[picks["latent"].to_numpy()] if mx is not None else np.nan
    picks["decoder_norm"] = norms[picks["latent"].to_numpy()]
    picks = random_controls(picks, tok_table, norms, p.q_max, p.seed)

    rep.set_phase("label classifier")
    classifier = classifier or LabelClassifier.fit(
        store, test_fraction=p.classifier_test_fraction, seed=p.seed, C=p.classifier_c
    )
    vocab = label_vocabulary(
        store, p.vocab_per_label, p.q_max, p.vocab_min_count, backend.tokenizer, p.vocab_words_only
    )
    vocab_sets = [vocab.loc[vocab["label_id"] == c, "token_id"].tolist() for c in range(len(names))]

    gen_kw = dict(
        do_sample=p.do_sample, temperature=p.temperature, top_p=p.top_p,
        samples_per_prompt=p.samples_per_prompt, seed=p.seed, batch_size=p.batch_size,
        vocab_sets=vocab_sets,
    )  # fmt: skip
    own = "own_label" in p.controls
    n_sets = 1 + len(picks) * (
        len(p.strengths) * (1 + ("random" in p.controls) + own) + ("alpha0" in p.controls) + own
    )
    rep.update(0, n_sets)

    def run(prompt_list: list[str], edits: list[Edit] | None, what: str) -> _Scored:
        rep.set_phase(what)
        if edits is None:
            g = generate_continuations(backend, prompt_list, p.max_new_tokens, **gen_kw)
        else:
            with steer(backend, sae, hp, edits, p.positions, keep_error=p.keep_error):
                g = generate_continuations(backend, prompt_list, p.max_new_tokens, **gen_kw)
        X, valid = classifier.features(backend, g.texts, p.batch_size)
        nll, n_tok = continuation_nll(backend, g.prompt_ids, g.token_ids)
        rep.advance()
        return _Scored(g, classifier.predict_proba(X), valid, nll, n_tok)

    rows: list[dict[str, Any]] = []
    gen_frames: list[pd.DataFrame] = []

    def record(s: _Scored, pick, control: str, prompt_set: str, base_ppl: float | None,
               strength: float = float("nan"), edit: Edit | None = None) -> dict[str, Any]:  # fmt: skip
        c = names.index(pick["label"])
        m = _metrics(s, c, base_ppl)
        rows.append({
            "latent": int(pick["latent"]), "label": pick["label"], "control": control,
            "strength": strength, "steered_latent": edit.latent if edit else -1,
            "edit_value": edit.value if edit else float("nan"), "mode": p.mode,
            "prompts": prompt_set, **m, "classifier_accuracy": classifier.accuracy,
        })  # fmt: skip
        pred = np.where(s.valid, s.proba.argmax(1), -1)
        gen_frames.append(pd.DataFrame({
            "set": len(rows) - 1, "latent": int(pick["latent"]), "label": pick["label"],
            "control": control, "strength": strength, "prompts": prompt_set,
            "prompt": s.gens.prompts, "text": s.gens.texts,
            "predicted": [names[i] if i >= 0 else None for i in pred],
            "target_prob": s.proba[:, c], "n_tokens": s.n_tok, "nll": s.nll,
        }))  # fmt: skip
        return m

    def sweep(pick, control: str, latent: int, ratio: float, prompt_list, prompt_set, base_ppl):
        """One steered set per strength; returns ``[(strength, metrics)]``."""
        max_act = float(pick["max_act"]) if np.isfinite(pick["max_act"]) else 1.0
        out = []
        for s in p.strengths:
            e = _edit_for(p.mode, latent, s, max_act, ratio)
            what = f"{pick['label']}: {control} latent {latent}, strength {s:g}"
            scored = run(prompt_list, [e], what)
            out.append((s, record(scored, pick, control, prompt_set, base_ppl, s, e)))
        return out

    base = run(prompts, None, "unsteered")
    summary_latents = []
    for _, pick in picks.iterrows():
        j, c = int(pick["latent"]), names.index(pick["label"])
        base_ppl = _metrics(base, c, None)["perplexity"]
        base_m = record(base, pick, "unsteered", "neutral", base_ppl)
        if "alpha0" in p.controls:
            identity = Edit(j, "add", 0.0)
            scored = run(prompts, [identity], f"{pick['label']}: alpha0 control latent {j}")
            record(scored, pick, "alpha0", "neutral", base_ppl, 0.0, identity)
        steer_ms = sweep(pick, "steer", j, 1.0, prompts, "neutral", base_ppl)
        r = int(pick["random_latent"])
        rand_ms = []
        if "random" in p.controls and r >= 0:
            rand_ms = sweep(
                pick, "random", r, float(pick["random_ratio"]), prompts, "neutral", base_ppl
            )
        if own:
            own_prompts = _own_label_prompts(
                store, c, classifier.test_doc_ids, p.own_label_prompts, p.own_prompt_words, p.seed
            )
            if own_prompts:
                own_base = run(own_prompts, None, f"{pick['label']}: own-label prompts")
                own_ppl = _metrics(own_base, c, None)["perplexity"]
                record(own_base, pick, "own_label", "own_label", own_ppl)
                sweep(pick, "own_label", j, 1.0, own_prompts, "own_label", own_ppl)
        summary_latents.append(
            _latent_summary(j, pick["label"], base_m, steer_ms, rand_ms, r, p.ppl_ratio_max)
        )
    table = pd.DataFrame(rows)
    generations = pd.concat(gen_frames, ignore_index=True)
    summary = {
        "hook_point": hp.name,
        "mode": p.mode,
        "positions": p.positions,
        "strengths": list(p.strengths),
        "n_prompts": len(prompts),
        "ppl_ratio_max": p.ppl_ratio_max,
        "classifier": classifier.describe(),
        "latents": summary_latents,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return SteeringEval(table, generations, picks, vocab, classifier.describe(), summary)
