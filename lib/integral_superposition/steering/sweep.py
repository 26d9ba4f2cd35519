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
(:func:`~integral_superposition.pipelines.steer_eval.run_steering_eval`) publishes them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from integral_superposition import compute
from integral_superposition.analysis.stats import label_mean_codes
from integral_superposition.progress import ProgressFn, Reporter
from integral_superposition.steering.classifier import (
    NONE_LABEL,
    LabelClassifier,
    TextJudge,
    fit_weights,
    label_prompts,
    label_vocabulary,
    predicted_labels,
)
from integral_superposition.steering.edits import Edit, RowEdits
from integral_superposition.steering.generation import (
    Generations,
    check_prompts,
    check_steerable_prompts,
    continuation_nll,
    generate_continuations,
)
from integral_superposition.steering.hooks import resolve_sae_hook_point, steer
from integral_superposition.steering.params import SteeringParams
from integral_superposition.steering.picks import (
    enrichment_tables,
    group_picks,
    random_controls,
    target_latents,
    vocabulary_gain_scores,
)
from integral_superposition.steering.plot import plot_sweep
from integral_superposition.steering.scores import (
    confirmed_summary,
    early_stop_reason,
    judge_generations,
    latent_summary,
    lift_over,
    log_perplexity_interval,
    pick_best_strength,
    pilot_choice,
    set_metrics,
    text_metrics,
    wilson_interval,
)

log = logging.getLogger(__name__)

__all__ = ["SteeringEval", "SteeringParams", "evaluate_steering"]


# -- the sweep --------------------------------------------------------------------------------------
@dataclass
class _Scored:
    """A set of generations and its per-row scores."""

    gens: Generations
    proba: np.ndarray  # [n, C]
    valid: np.ndarray  # [n]
    nll: np.ndarray  # [n]
    n_tok: np.ndarray  # [n]
    n_labels: int | None = None
    """Labels of the classifier; ``proba``'s column ``n_labels`` (if any) is ``none`` (None:
    every column is a label)."""

    stopped: str | None = None
    """Why the set ended before all its rounds (``perplexity``, ``cannot win``), else None."""
    refined: bool = False
    """A strength the refinement added between two of the grid's (:func:`_refine_next`)."""

    @classmethod
    def concat(cls, parts: list[_Scored]) -> _Scored:
        """Rounds of the same set, in order."""
        gs = [s.gens for s in parts]
        vm = [g.vocab_mass for g in gs]
        gens = Generations(
            prompts=[t for g in gs for t in g.prompts],
            texts=[t for g in gs for t in g.texts],
            prompt_ids=[t for g in gs for t in g.prompt_ids],
            token_ids=[t for g in gs for t in g.token_ids],
            vocab_mass=np.concatenate(vm, 0) if all(v is not None for v in vm) else None,
            meta=gs[0].meta,
        )
        cat = lambda k: np.concatenate([getattr(s, k) for s in parts], 0)  # noqa: E731
        return cls(gens, cat("proba"), cat("valid"), cat("nll"), cat("n_tok"), parts[0].n_labels)

    @property
    def predicted(self) -> np.ndarray:
        """``[n]`` the classifier's label of each continuation (-1: nothing to classify, -2:
        no label, the classifier abstained)."""
        n_labels = self.n_labels if self.n_labels is not None else self.proba.shape[1]
        return predicted_labels(self.proba, self.valid, n_labels)

    def metrics(self, label: int, base_ppl: float | None) -> dict[str, Any]:
        return set_metrics(
            self.predicted, self.proba, self.nll, self.n_tok, self.gens.token_ids, label,
            base_ppl, self.gens.vocab_mass,
        )  # fmt: skip


@dataclass
class _Set:
    """A set of generations to run: samples ``first .. first + samples - 1`` of every prompt,
    rows sample by sample, with the edits ``edit`` (None: unsteered; several for a group)."""

    prompts: list[str]
    edit: tuple[Edit, ...] | None
    samples: int
    first: int = 0


@dataclass
class _Raw:
    """A generated set before the classifier reads it: ``X [n, d]`` its features."""

    gens: Generations
    X: np.ndarray
    valid: np.ndarray
    nll: np.ndarray
    n_tok: np.ndarray

    def scored(self, classifier: LabelClassifier) -> _Scored:
        proba = classifier.predict_proba(self.X)
        n_labels = len(classifier.label_names)
        return _Scored(self.gens, proba, self.valid, self.nll, self.n_tok, n_labels)


def fit_text_judge(
    p: SteeringParams, store, classifier: LabelClassifier, fit_frame: pd.DataFrame | None
) -> tuple[TextJudge | None, str | None]:
    """The second judge (:class:`TextJudge`), fitted on the classifier's texts with its
    weights: the training documents (when the classifier was fitted on them), the
    continuations of their openings and the ``none`` continuations (``fit_frame``'s used rows).
    ``(None, why)`` when those texts cannot fit one (fewer than two labels, or no word shared
    by two texts)."""
    names = list(store.label_names)
    docs = store.docs
    if "text" not in docs.columns:  # a store without document texts: continuations only
        docs = docs.iloc[:0].assign(text=pd.Series(dtype=object))
    docs = docs[docs["text"].notna() & (docs["text"].astype(str).str.strip() != "")]
    parts: list[tuple[list[str], np.ndarray]] = []
    if classifier.fitted_on != "generations":
        d = docs[docs["doc_id"].isin(classifier.train_doc_ids)]
        parts.append((d["text"].astype(str).tolist(), d["label"].to_numpy(np.int64)))
    none_texts: list[str] = []
    if fit_frame is not None:
        f = fit_frame[fit_frame["used"].astype(bool)]
        g = f[f["label"] != NONE_LABEL]
        if len(g):
            parts.append((g["text"].tolist(), np.array([names.index(x) for x in g["label"]])))
        none_texts = f.loc[f["label"] == NONE_LABEL, "text"].tolist()
    texts = [t for ts, _ in parts for t in ts] + none_texts
    y = np.concatenate([ys for _, ys in parts] + [np.full(len(none_texts), len(names))])
    w = fit_weights([ys for _, ys in parts], len(none_texts), len(names), p.classifier_balanced)
    test = docs[docs["doc_id"].isin(classifier.test_doc_ids)]
    try:
        judge = TextJudge.fit(
            texts, y.astype(np.int64), w, names, C=p.classifier_c,
            test_texts=test["text"].astype(str).tolist(),
            test_y=test["label"].to_numpy(np.int64),
        )  # fmt: skip
    except ValueError as e:
        return None, str(e)
    return judge, None


def _judge_summary(
    judge: TextJudge | None,
    why: str | None,
    base: _Scored,
    check_gens: pd.DataFrame,
    names: list[str],
) -> dict[str, Any]:
    """The second judge in the summary: how it was fitted, its held-out document accuracy,
    its recall on the classifier check's continuations (each checked label's own prompts) and
    what it calls the unsteered continuations of the neutral prompts; or why it is absent."""
    if judge is None:
        return {"fitted": False, "reason": why}
    pred = judge.predict(base.gens.texts)
    n = max(len(pred), 1)
    neutral = {name: float((pred == c).sum() / n) for c, name in enumerate(names)}
    if judge.abstain:
        neutral[NONE_LABEL] = float((pred == -2).sum() / n)
    recall = {
        lb: float((g["predicted_text"] == lb).mean())
        for lb, g in check_gens.groupby("prompt_label", sort=False)
    } if "predicted_text" in check_gens else {}  # fmt: skip
    return {"fitted": True, **judge.describe(), "recall": recall, "neutral": neutral}


def _stop_reasons(
    sets: dict[tuple[int, float], _Scored],
    lats: list[tuple[int, int, float]],
    ppl_ratio_max: float,
) -> dict[tuple[int, float], str | None]:
    """Why each running strength ``(latent k, strength)`` ends after this round (None: it goes
    on), decided for all of them at once from the rows so far: ``perplexity`` when its
    perplexity's 95% lower bound is above the fluency bound, ``cannot win`` when its share's 95%
    upper bound is below the 95% lower bound of the share of another running strength of the
    same latent whose perplexity's 95% upper bound is within the bound (surely fluent and
    surely better). ``lats[k] = (latent, label id, unsteered perplexity)``."""
    rival: dict[int, list[tuple[float, float]]] = {}  # latent -> (strength, share lower bound)
    for (k, st), sc in sets.items():
        _, c, base_ppl = lats[k]
        if not (base_ppl is not None and math.isfinite(base_ppl) and base_ppl > 0):
            continue
        if log_perplexity_interval(sc.nll, sc.n_tok)[1] <= math.log(ppl_ratio_max * base_ppl):
            lo = wilson_interval(int((sc.predicted == c).sum()), len(sc.gens))[0]
            rival.setdefault(k, []).append((st, lo))
    out = {}
    for (k, st), sc in sets.items():
        _, c, base_ppl = lats[k]
        others = [lo for other, lo in rival.get(k, []) if other != st]
        out[(k, st)] = early_stop_reason(
            int((sc.predicted == c).sum()), len(sc.gens), sc.nll, sc.n_tok, base_ppl,
            ppl_ratio_max, max(others) if others else None,
        )  # fmt: skip
    return out


def _advance(rep: Reporter, n_sets: int) -> None:
    """Count ``n_sets`` finished sets, one progress report each."""
    for _ in range(n_sets):
        rep.advance()


def _sweep_strengths(p: SteeringParams, lats, prompts, edit_of, run_sets, rep, skip):
    """The steered sets of every latent's strengths, ``[[(strength, scored), ...] per
    latent]`` in increasing strength; the sets of a round (or of a strength) of all latents
    run in one call. ``lats[k] = (latent, label id, unsteered perplexity)``. With
    ``early_stop`` (and ``stop_above_ppl``) every strength runs in rounds of one continuation
    per prompt and may end after a round (:func:`_stop_reasons`); else with
    ``stop_above_ppl`` strengths run in increasing order and a latent's sweep ends after the
    first one above the fluency bound; else every strength runs in full, all in one call.
    Then ``refine`` rounds, each one more full set per latent where :func:`_refine_next`
    gives a strength, all latents' in one call."""
    keys = [(k, st) for k in range(len(lats)) for st in p.strengths]
    edits = {(k, st): edit_of(k, None, st) for k, st in keys}
    full = p.samples_per_prompt
    out: dict[tuple[int, float], _Scored] = {}
    if p.early_stop and p.stop_above_ppl:
        parts: dict[tuple[int, float], list[_Scored]] = {key: [] for key in keys}
        running = list(keys)
        for r in range(full):
            what = f"strengths: round {r + 1} of {full}, {len(running)} sets"
            got = run_sets([_Set(prompts, edits[key], 1, r) for key in running], what)
            now = {}
            for key, sc in zip(running, got, strict=True):
                parts[key].append(sc)
                now[key] = _Scored.concat(parts[key])
            why = (
                _stop_reasons(now, lats, p.ppl_ratio_max)
                if r + 1 < full
                else dict.fromkeys(running)
            )
            for key, reason in why.items():
                if reason is not None or r + 1 == full:
                    now[key].stopped = reason
                    out[key] = now[key]
                    rep.advance()
            running = [key for key in running if why[key] is None and r + 1 < full]
            if not running:
                break
    elif p.stop_above_ppl:
        active = list(range(len(lats)))
        for i, st in enumerate(p.strengths):
            got = run_sets(
                [_Set(prompts, edits[(k, st)], full) for k in active], f"strength {st:g}"
            )
            _advance(rep, len(active))
            still = []
            for k, sc in zip(active, got, strict=True):
                out[(k, st)] = sc
                if sc.metrics(lats[k][1], lats[k][2])["ppl_ratio"] <= p.ppl_ratio_max:
                    still.append(k)
                else:
                    skip(len(p.strengths) - i - 1)
            active = still
            if not active:
                break
    else:
        got = run_sets([_Set(prompts, edits[key], full) for key in keys], "strengths")
        out.update(zip(keys, got, strict=True))
        _advance(rep, len(keys))
    sets = [[(st, out[(k, st)]) for st in p.strengths if (k, st) in out] for k in range(len(lats))]
    for r in range(p.refine):
        todo = [(k, st) for k, (_, c, bp) in enumerate(lats)
                if (st := _refine_next(sets[k], c, bp, p.ppl_ratio_max)) is not None]  # fmt: skip
        skip(len(lats) - len(todo))
        if not todo:
            skip((p.refine - r - 1) * len(lats))
            break
        got = run_sets(
            [_Set(prompts, edit_of(k, None, st), full) for k, st in todo],
            f"refine: round {r + 1} of {p.refine}, {len(todo)} sets",
        )
        _advance(rep, len(todo))
        for (k, st), sc in zip(todo, got, strict=True):
            sc.refined = True
            sets[k] = sorted([*sets[k], (st, sc)], key=lambda x: x[0])
    return sets


def _refine_next(
    sets: list[tuple[float, _Scored]], c: int, base_ppl: float | None, ppl_ratio_max: float
) -> float | None:
    """The strength a refinement round tries for one latent's steered ``sets`` (``[(strength,
    scored)]``, target label ``c``), or None: between the strongest full set within the
    fluency bound and the next stronger set beyond it (above the bound, or ended early for
    perplexity), when that one's share beat every fluent share (the bound, not the grid,
    limits the best). Their geometric mean (arithmetic when a strength is not positive)."""
    if not (base_ppl is not None and math.isfinite(base_ppl) and base_ppl > 0):
        return None
    ms = [(st, sc, sc.metrics(c, base_ppl)) for st, sc in sets]
    within = {st: math.isfinite(m["ppl_ratio"]) and m["ppl_ratio"] <= ppl_ratio_max
              for st, _, m in ms}  # fmt: skip
    fluent = [(st, m["share"]) for st, sc, m in ms if sc.stopped is None and within[st]]
    if not fluent:
        return None
    lo, best = max(st for st, _ in fluent), max(sh for _, sh in fluent)
    above = [
        (st, m["share"]) for st, sc, m in ms
        if st > lo and (sc.stopped == "perplexity" or (sc.stopped is None and not within[st]))
    ]  # fmt: skip
    if not above:
        return None
    hi, share = min(above)
    if not share > best:
        return None
    mid = math.sqrt(lo * hi) if lo > 0 and hi > 0 else (lo + hi) / 2
    return None if any(math.isclose(mid, st) for st, _ in sets) else float(mid)


def _edit_for(mode: str, latent: int, strength: float, unit: float, ratio: float = 1.0) -> Edit:
    """The sweep's edit of ``latent`` at ``strength``; ``unit``: the latent's max activation
    (``clamp_max``) or mean difference (``mean_diff``); ``ratio`` rescales it so that another
    latent's injected vector matches the target's norm (random control)."""
    if mode == "clamp_max":
        return Edit(latent, "set", strength * unit * ratio)
    if mode == "mean_diff":
        return Edit(latent, "add", strength * unit * ratio)
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
    check: pd.DataFrame | None = None
    """The classifier on unsteered continuations of each label's own prompts
    (:class:`~integral_superposition.steering.scores.GenerationCheck` ``.table``)."""
    check_generations: pd.DataFrame | None = None
    """Those continuations: ``prompt_label, prompt, text, predicted``."""
    fit_generations: pd.DataFrame | None = None
    """The continuations of training documents the classifier was fitted on: ``label, prompt,
    text, used`` (None when it was fitted on documents alone or given)."""
    pilot: pd.DataFrame | None = None
    """The pilot (``pilot_candidates > 1``): one row per candidate latent and pilot strength,
    ``label, latent, rank, strength, first_sample, n, hits, share, share_lo, share_hi,
    abstain, ppl_ratio, chosen`` (None without a pilot)."""

    def figure(self) -> Figure:
        return plot_sweep(self.table, self.summary.get("ppl_ratio_max"))


def _same_text(a: str) -> str:
    return " ".join(a.split()).casefold()


def abstain_openings(p: SteeringParams, prompts: list[str]) -> list[str]:
    """The topic-neutral openings the classifier's ``none`` class is fitted on
    (``p.abstain_prompts``, default ``data.neutral_fit_prompts()``), checked to share no
    opening with the evaluation's ``prompts`` (compared with case and spacing ignored): the
    classifier must never be fitted on continuations of the prompts it judges."""
    from integral_superposition.data import neutral_fit_prompts

    own = p.abstain_prompts if p.abstain_prompts is not None else neutral_fit_prompts()
    shared = sorted({_same_text(t) for t in own} & {_same_text(t) for t in prompts})
    if shared:
        raise ValueError(
            f"abstain_prompts share {len(shared)} opening(s) with the evaluation's prompts "
            f"({shared[:3]}): expected openings disjoint from the prompts it judges"
        )
    return check_prompts(own)


def _check_inputs(p: SteeringParams, backend, sae, store) -> tuple[list[str], Any]:
    from integral_superposition.data import neutral_prompts

    prompts = check_prompts(p.prompts if p.prompts is not None else neutral_prompts())
    check_steerable_prompts(backend.tokenizer, prompts)
    if p.classifier_abstain:
        check_steerable_prompts(backend.tokenizer, abstain_openings(p, prompts))
        if NONE_LABEL in store.label_names:
            raise ValueError(
                f"classifier_abstain=True but the store has a label named {NONE_LABEL!r} "
                f"({store.label_names}): expected labels other than the abstaining class's name"
            )
    hp = resolve_sae_hook_point(backend, sae, p.hook_point or store.hook_point)
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
    return prompts, hp


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
    sets_per_call: int | None = None,
) -> SteeringEval:
    """Sweep steering strengths for the chosen latents and score every set of generations.

    ``store``: the activation store the SAE was trained on (labels, token ids, documents).
    ``enrichment``: ``(token table, document table)`` to reuse (else one SAE scan of the
    store computes them and the max activations). ``max_acts``: per-latent max activations
    for ``clamp_max`` (default: from that scan). Every input is checked before generating.

    Before any steering, the classifier is checked on unsteered continuations of each
    label's own prompts (:func:`~integral_superposition.steering.scores.judge_generations`);
    a latent whose target label it cannot judge keeps its shares, flagged
    ``classifier_valid=False``.

    Sets that do not wait on each other share a generation call (in batches of at most
    ``batch_size`` rows, each steered set's rows with its own edit): the unsteered sets (the
    classifier's fitting continuations and its "none" set, the neutral prompts', the
    classifier check's), each round of every latent's strengths, and every latent's controls. ``sets_per_call``: at most
    that many sets per call (None: no limit; 1: one set per call, which gives the same rows).
    """
    from integral_superposition.steering.edits import max_activations

    p = (
        params
        if isinstance(params, SteeringParams)
        else SteeringParams.model_validate(dict(params or {}))
    )
    if sets_per_call is not None and (
        isinstance(sets_per_call, bool) or not isinstance(sets_per_call, int) or sets_per_call < 1
    ):
        raise ValueError(
            f"sets_per_call={sets_per_call!r}: expected None (no limit) or an int >= 1"
        )
    prompts, hp = _check_inputs(p, backend, sae, store)
    t0 = time.perf_counter()
    names = list(store.label_names)
    scan = None
    rep = Reporter("steering", on_progress, unit="sets")
    if enrichment is None:
        rep.set_phase("enrichment scan")
        tok_table, doc_table, scan = enrichment_tables(
            # auto: where the model runs (it generates the steered texts)
            sae,
            store,
            p.n_top,
            device=compute.resolve_device(p.device, default=getattr(backend, "device", None)),
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

    vocab = label_vocabulary(
        store, p.vocab_per_label, p.q_max, p.vocab_min_count, backend.tokenizer, p.vocab_words_only
    )
    # with a pilot, each label's pilot_candidates best latents; the pilot keeps per_label
    pilot_on = p.latents == "auto" and p.pilot_candidates > p.per_label
    # with group_size > 1, each label's group_size best latents, steered as one group
    pool = (
        p.model_copy(update={"per_label": p.pilot_candidates})
        if pilot_on
        else p.model_copy(update={"per_label": p.group_size})
        if p.group_size > 1
        else p
    )
    gain_scorer = None
    if p.latents == "auto" and p.rank_by == "vocab_gain":
        if mx is None:
            raise ValueError("rank_by='vocab_gain' needs the latents' max activations (max_acts=)")
        rep.set_phase("vocabulary gain of the candidates")
        # the unsteered continuations of topic-neutral fitting openings (the classifier's
        # "none" openings), never of the prompts the sweep evaluates
        teach = generate_continuations(
            backend, abstain_openings(p, prompts)[: p.gain_prompts], p.max_new_tokens,
            do_sample=p.do_sample, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
            batch_size=p.batch_size,
        )  # fmt: skip

        def gain_scorer(label: str, latents: list[int]) -> pd.DataFrame:
            return vocabulary_gain_scores(
                backend, sae, hp, latents, [p.gain_strength * float(mx[j]) for j in latents],
                vocab.loc[vocab["label"] == label, "token_id"].tolist(),
                teach.prompt_ids, teach.token_ids,
            )  # fmt: skip

    label_codes = None
    if p.latents == "auto" and p.rank_by == "mean_diff":
        rep.set_phase("mean codes of the labels")
        label_codes, _ = label_mean_codes(
            sae, store, mask=store.split_mask("train", p.classifier_test_fraction, p.split_seed),
            device=compute.resolve_device(p.device, default=getattr(backend, "device", None)),
        )  # fmt: skip
    picks = target_latents(
        pool, tok_table, doc_table, names, sae=sae, backend=backend, vocab=vocab,
        gain_scorer=gain_scorer, label_codes=label_codes,
    )  # fmt: skip
    # the per-latent unit a strength multiplies
    unit_col = "mean_diff" if p.mode == "mean_diff" else "max_act"
    norms = sae.W_dec.detach().float().norm(dim=1).cpu().numpy()
    picks["max_act"] = mx[picks["latent"].to_numpy()] if mx is not None else np.nan
    picks["decoder_norm"] = norms[picks["latent"].to_numpy()]
    picks["rank"] = picks.groupby("label", sort=False).cumcount()
    if p.group_size > 1:
        picks = group_picks(picks, p.group_size)
    n_final = int(picks.groupby("label").size().clip(upper=p.per_label).sum())
    n_pilot = len(picks) * len(p.pilot_strengths) if pilot_on else 0

    rep.set_phase("label classifier")
    fit_here = classifier is None
    fit_gens = fit_here and p.classifier_fit != "documents"
    fit_none = fit_here and p.classifier_abstain
    if classifier is None:
        # refitted on the continuations below, so a cross-validated C is chosen there, once
        classifier = LabelClassifier.fit(
            store, test_fraction=p.classifier_test_fraction, seed=p.split_seed,
            C=1.0 if (fit_gens or fit_none) and p.classifier_c == "cv" else p.classifier_c,
            balanced=p.classifier_balanced,
        )  # fmt: skip
    vocab_sets = [vocab.loc[vocab["label_id"] == c, "token_id"].tolist() for c in range(len(names))]

    gen_kw = dict(
        do_sample=p.do_sample, temperature=p.temperature, top_p=p.top_p,
        samples_per_prompt=p.samples_per_prompt, seed=p.seed, batch_size=p.batch_size,
        vocab_sets=vocab_sets,
    )  # fmt: skip
    targets = sorted({names.index(lb) for lb in picks["label"]})
    checked = list(range(len(names))) if p.check_labels == "all" else targets
    n_ctrl = 1 if p.control_strengths == "best" else len(p.strengths) + p.refine
    confirm = p.confirms
    per_latent = (
        len(p.strengths)
        + p.refine
        + confirm
        + ("alpha0" in p.controls)
        + n_ctrl * (("random" in p.controls) * p.random_draws + ("own_label" in p.controls))
    )
    # the unsteered sets of the random control's later draws (shared by every latent)
    draw_bases = ("random" in p.controls) * (p.random_draws - 1)
    rep.update(
        0,
        1 + len(checked) + n_pilot + n_final * per_latent + fit_gens + fit_none + confirm
        + draw_bases,
    )  # fmt: skip

    def generate(chunk: list[_Set]) -> list[_Raw]:
        """One generation call of every row of ``chunk``'s sets (in batches of at most
        ``batch_size``), each steered set's rows with its own edit; then the perplexity and
        the classifier's features of every row."""
        offset: dict[int, int] = {}  # a prompt list's first index in the call's prompts
        call_prompts: list[str] = []
        stream_ids: list[int] = []
        for st in chunk:
            if id(st.prompts) not in offset:
                offset[id(st.prompts)] = len(call_prompts)
                call_prompts += st.prompts
                stream_ids += range(len(st.prompts))
        rows: list[tuple[int, int]] = []
        spans: list[slice] = []
        groups = []
        for st in chunk:
            o, a0 = offset[id(st.prompts)], len(rows)
            samples = range(st.first, st.first + st.samples)
            rows += [(o + i, smp) for smp in samples for i in range(len(st.prompts))]
            spans.append(slice(a0, len(rows)))
            if st.edit is not None:
                groups.append((range(a0, len(rows)), list(st.edit)))
        unsteered = any(st.edit is None for st in chunk)
        kw = {**gen_kw, "rows": rows, "stream_ids": stream_ids, "score": unsteered}
        if not groups:
            g = generate_continuations(backend, call_prompts, p.max_new_tokens, **kw)
        else:
            edits = RowEdits(len(rows), groups)
            with steer(backend, sae, hp, edits, p.positions, keep_error=p.keep_error) as h:
                g = generate_continuations(
                    backend, call_prompts, p.max_new_tokens, on_batch=h.select_rows, **kw
                )
        # an unsteered row scores its own tokens as it generates them; a steered row is
        # scored by the unsteered model in a second forward
        nll = g.nll if g.nll is not None else np.zeros(len(rows))
        n_tok = np.array([len(t) for t in g.token_ids], dtype=np.int64)
        steered = [i for st, sp in zip(chunk, spans, strict=True) if st.edit is not None
                   for i in range(sp.start, sp.stop)]  # fmt: skip
        if steered:
            nll[steered], n_tok[steered] = continuation_nll(
                backend, [g.prompt_ids[i] for i in steered], [g.token_ids[i] for i in steered]
            )
        X, valid = classifier.features(backend, g.texts, p.batch_size)
        return [_Raw(g.take(sp), X[sp], valid[sp], nll[sp], n_tok[sp]) for sp in spans]

    def run_sets(sets: list[_Set], what: str) -> list[_Scored]:
        """``sets`` in as few generation calls as ``sets_per_call`` allows, scored."""
        rep.set_phase(what)
        per = sets_per_call or max(len(sets), 1)
        raw = [r for i in range(0, len(sets), per) for r in generate(sets[i : i + per])]
        return [r.scored(classifier) for r in raw]

    def skip(n_sets: int) -> None:
        """Sets planned but not run (a sweep stopped early): the total shrinks."""
        if n_sets > 0:
            rep.update(rep.done, rep.total - n_sets)

    # unsteered sets, in one call: the classifier's fitting continuations (continuations the
    # unsteered model writes after the openings of training documents, labelled by their
    # document: the classifier learns the text it judges), the neutral prompts' set and the
    # classifier check's sets (continuations of each label's held-out documents' openings)
    full = p.samples_per_prompt
    first: list[_Set] = []
    fit_y: list[int] = []
    if fit_gens:
        fit_prompts = []
        for c in range(len(names)):
            got = label_prompts(
                store, c, classifier.train_doc_ids, p.classifier_fit_generations,
                p.own_prompt_words, p.seed, fallback=False,
            )  # fmt: skip
            fit_prompts += got
            fit_y += [c] * len(got)
        fit_gens = bool(fit_prompts)  # no training document with text: documents alone
        if fit_gens:
            first.append(_Set(fit_prompts, None, 1))
    n_none = p.classifier_fit_generations
    if fit_none:
        # the "none" class: continuations of other topic-neutral openings than the
        # evaluation's, one per opening (more samples each when there are fewer openings)
        openings = abstain_openings(p, prompts)[:n_none]
        first.append(_Set(openings, None, -(-n_none // len(openings))))
    first.append(_Set(prompts, None, full))
    own_prompts: dict[int, list[str]] = {}
    for c in checked:
        own = label_prompts(
            store, c, classifier.test_doc_ids, p.own_label_prompts, p.own_prompt_words, p.seed,
            exclude=classifier.train_doc_ids if fit_gens else None,
        )  # fmt: skip
        if own:
            own_prompts[c] = own
            first.append(_Set(own, None, full))
        else:
            skip(1)
    rep.set_phase("unsteered continuations and the classifier check")
    per = sets_per_call or len(first)
    raw = [r for i in range(0, len(first), per) for r in generate(first[i : i + per])]
    fit_frame = None
    fit_parts = []
    X_fit, y_fit = np.zeros((0, store.d_model), np.float32), np.zeros(0, np.int64)
    if fit_gens:
        fit_raw, raw = raw[0], raw[1:]
        y = np.asarray(fit_y, dtype=np.int64)
        X_fit, y_fit = fit_raw.X[fit_raw.valid], y[fit_raw.valid]
        fit_parts.append(pd.DataFrame({
            "label": [names[c] for c in fit_y], "prompt": fit_raw.gens.prompts,
            "text": fit_raw.gens.texts, "used": fit_raw.valid,
        }))  # fmt: skip
    X_none = None
    if fit_none:
        none_raw, raw = raw[0], raw[1:]
        sl = slice(0, n_none)  # rows run sample by sample: the first n_none openings' rows
        X_none = none_raw.X[sl][none_raw.valid[sl]]
        fit_parts.append(pd.DataFrame({
            "label": NONE_LABEL, "prompt": none_raw.gens.prompts[sl],
            "text": none_raw.gens.texts[sl], "used": none_raw.valid[sl],
        }))  # fmt: skip
        if not len(X_none):
            raise ValueError(
                "no continuation of the abstain_prompts had a token to classify: expected "
                "text to fit the classifier's 'none' class on"
            )
    if fit_gens or fit_none:
        classifier = classifier.with_generations(
            X_fit, y_fit, documents=p.classifier_fit == "both" or not fit_gens, X_none=X_none,
            C=p.classifier_c,
        )  # fmt: skip
        fit_frame = pd.concat(fit_parts, ignore_index=True)
    base = raw[0].scored(classifier)
    judge, judge_why = (
        fit_text_judge(p, store, classifier, fit_frame) if p.text_judge else (None, None)
    )
    own_sets: dict[int, tuple[list[str], _Scored]] = {
        c: (own, r.scored(classifier))
        for (c, own), r in zip(own_prompts.items(), raw[1:], strict=True)
    }
    _advance(rep, len(first))
    check = judge_generations(
        np.concatenate([np.full(len(s.gens), c) for c, (_, s) in own_sets.items()] or [[]]),
        np.concatenate([s.predicted for _, s in own_sets.values()] or [[]]),
        names, margin=p.judge_margin, heldout_recall=classifier.test_recall or None,
        heldout_docs=classifier.test_docs or None, abstain=classifier.abstain,
    )  # fmt: skip
    shown = {**dict(enumerate(names)), -1: None, -2: NONE_LABEL}  # a predicted code's name
    check_gens = pd.DataFrame({
        "prompt_label": [names[c] for c, (_, s) in own_sets.items() for _ in range(len(s.gens))],
        "prompt": [t for _, s in own_sets.values() for t in s.gens.prompts],
        "text": [t for _, s in own_sets.values() for t in s.gens.texts],
        "predicted": [shown[i] for _, s in own_sets.values() for i in s.predicted],
    })  # fmt: skip
    if judge is not None:
        check_gens["predicted_text"] = [shown[i] for i in judge.predict(check_gens["text"])]

    # the pilot: every candidate at the pilot strengths, on sample indices the sweep never
    # uses (samples_per_prompt on), so the picked latent's swept shares are fresh draws
    pilot_frame = None
    if pilot_on:
        base_ppl0 = base.metrics(0, None)["perplexity"]
        keys = [(k, st) for k in range(len(picks)) for st in p.pilot_strengths]
        mx_of = [float(m) if np.isfinite(m) else 1.0 for m in picks[unit_col]]
        sets = [
            _Set(
                prompts, (_edit_for(p.mode, int(picks.iloc[k]["latent"]), st, mx_of[k]),),
                p.pilot_samples, p.samples_per_prompt,
            )
            for k, st in keys
        ]  # fmt: skip
        pilot_rows = []
        for (k, st), sc in zip(keys, run_sets(sets, "pilot"), strict=True):
            pk = picks.iloc[k]
            m = sc.metrics(names.index(pk["label"]), base_ppl0)
            pilot_rows.append({
                "label": pk["label"], "latent": int(pk["latent"]), "rank": int(pk["rank"]),
                "strength": st, "first_sample": p.samples_per_prompt,
                **{c: m[c] for c in ("n", "hits", "share", "share_lo", "share_hi", "abstain",
                                     "ppl_ratio")},
            })  # fmt: skip
        _advance(rep, len(sets))
        pilot_frame = pd.DataFrame(pilot_rows)
        chosen = pilot_choice(pilot_frame, p.per_label, p.ppl_ratio_max)
        won = set(zip(chosen["label"], chosen["latent"], strict=True))
        pilot_frame["chosen"] = [
            (lb, j) in won
            for lb, j in zip(pilot_frame["label"], pilot_frame["latent"], strict=True)
        ]
        keep = [(lb, j) in won for lb, j in zip(picks["label"], picks["latent"], strict=True)]
        picks = picks[keep].reset_index(drop=True)
    picks = random_controls(picks, tok_table, norms, p.q_max, p.seed, p.random_draws)

    rows: list[dict[str, Any]] = []
    gen_frames: list[pd.DataFrame] = []

    text_of: dict[int, np.ndarray] = {}  # id of a set -> the text judge's labels

    def judged_text(s: _Scored | None) -> np.ndarray | None:
        """The text judge's labels of set ``s`` (None without the judge or the set), once per
        set: an unsteered set is the reference of many rows."""
        if judge is None or s is None:
            return None
        if id(s) not in text_of:
            text_of[id(s)] = judge.predict(s.gens.texts)
        return text_of[id(s)]

    def record(s: _Scored, pick, control: str, prompt_set: str, base_ppl: float | None,
               strength: float = float("nan"), edit: tuple[Edit, ...] | None = None,
               ref: _Scored | None = None, draws: int = 1) -> dict[str, Any]:  # fmt: skip
        """One row of the table; ``ref``: the unsteered set of the same prompts, whose share
        the row's ``lift`` is measured from (None for that set itself); ``draws``: the random
        control's draws pooled in ``s``, in order, each as many rows as ``ref``."""
        c = names.index(pick["label"])
        m = s.metrics(c, base_ppl)
        lift = lift_over(s.predicted, c, ref.predicted if ref is not None else None)
        m.update(zip(("lift", "lift_lo", "lift_hi"), lift, strict=True))
        by_text = judged_text(s)
        if by_text is not None:
            m.update(text_metrics(by_text, c, judged_text(ref)))
        rows.append({
            "latent": int(pick["latent"]), "label": pick["label"], "control": control,
            "strength": strength, "steered_latent": edit[0].latent if edit else -1,
            "edit_value": edit[0].value if edit else float("nan"), "mode": p.mode,
            "steered_latents": [e.latent for e in edit] if edit else [],
            "prompts": prompt_set, **m, "classifier_accuracy": classifier.accuracy,
            "classifier_valid": check.judged.get(pick["label"], False),
            "stopped": s.stopped, "refined": s.refined, "draws": draws,
        })  # fmt: skip
        gen_frames.append(pd.DataFrame({
            "set": len(rows) - 1, "latent": int(pick["latent"]), "label": pick["label"],
            "control": control, "strength": strength, "prompts": prompt_set,
            "prompt": s.gens.prompts, "text": s.gens.texts,
            "predicted": [shown[i] for i in s.predicted],
            "target_prob": s.proba[:, c], "n_tokens": s.n_tok, "nll": s.nll,
            **({"predicted_text": [shown[i] for i in by_text]} if by_text is not None else {}),
            "draw": np.repeat(np.arange(draws), len(s.gens.texts) // draws),
        }))  # fmt: skip
        return m

    # the strength sweeps of every picked latent, together
    lat_of = [(int(pk["latent"]), names.index(pk["label"])) for _, pk in picks.iterrows()]
    pick_rows = [pk for _, pk in picks.iterrows()]
    base_ppls = [base.metrics(c, None)["perplexity"] for _, c in lat_of]

    def edit_of(
        k: int, latents: list[int] | None, strength: float, ratios: list[float] | None = None
    ) -> tuple[Edit, ...]:
        """Pick ``k``'s edit at ``strength``: of its members (``latents=None``), or of other
        latents in their place, member ``i``'s edit moved to ``latents[i]`` and scaled by
        ``ratios[i]`` (the random control)."""
        pk = pick_rows[k]
        members = list(pk["members"]) if "members" in pk else [int(pk["latent"])]
        mxs = list(pk[f"member_{unit_col}s"]) if "members" in pk else [pk[unit_col]]
        latents = members if latents is None else latents
        ratios = [1.0] * len(latents) if ratios is None else ratios
        return tuple(
            _edit_for(p.mode, int(j), strength, float(m) if np.isfinite(m) else 1.0, float(r))
            for j, m, r in zip(latents, mxs, ratios, strict=True)
        )

    steer_sets = _sweep_strengths(
        p, [(j, c, bp) for (j, c), bp in zip(lat_of, base_ppls, strict=True)], prompts,
        edit_of, run_sets, rep, skip,
    )  # fmt: skip

    # the controls of every latent, in one call: alpha0 (the identity edit), the random latent
    # and the same latent on its own label's prompts at the control strengths
    # (pick, control, strength, edit, prompts, draw of the random control)
    controls: list[tuple[int, str, float, tuple[Edit, ...], list[str], int]] = []
    bests: list[float | None] = []
    for k, (j, c) in enumerate(lat_of):
        best = pick_best_strength(
            pd.DataFrame([
                {"strength": st, **sc.metrics(c, base_ppls[k]), "stopped": sc.stopped}
                for st, sc in steer_sets[k]
            ]), p.ppl_ratio_max,
        )  # fmt: skip
        bests.append(float(best["strength"]) if best is not None else None)
        if p.control_strengths == "best":
            ctrl = [float(best["strength"])] if best is not None else []
        else:
            ctrl = [st for st, _ in steer_sets[k]]
        if "alpha0" in p.controls:
            controls.append((k, "alpha0", 0.0, (Edit(j, "add", 0.0),), prompts, 0))
        r = int(pick_rows[k]["random_latent"])
        if "random" in p.controls:
            pk = pick_rows[k]
            if r >= 0:
                controls += [
                    (k, "random", st, edit_of(k, list(r_lat), st, list(r_ratio)), prompts, g)
                    for st in ctrl
                    for g, (r_lat, r_ratio) in enumerate(
                        zip(pk["random_draws"], pk["random_draw_ratios"], strict=True)
                    )
                ]
            skip((n_ctrl - (len(ctrl) if r >= 0 else 0)) * p.random_draws)
        if "own_label" in p.controls:
            if c in own_sets:
                own = own_sets[c][0]
                controls += [(k, "own_label", st, edit_of(k, None, st), own, 0) for st in ctrl]
            skip(n_ctrl - (len(ctrl) if c in own_sets else 0))
    # the confirmation: each best strength again, and the unsteered model, on sample indices
    # neither the sweep nor the pilot used, in the controls' call
    conf_first = p.samples_per_prompt + (p.pilot_samples if pilot_on else 0)
    conf_keys = [k for k, b in enumerate(bests) if confirm and b is not None]
    conf_sets = [_Set(prompts, None, full, conf_first)] if conf_keys else []
    conf_sets += [_Set(prompts, edit_of(k, None, bests[k]), full, conf_first) for k in conf_keys]
    skip(confirm * (len(lat_of) + 1) - len(conf_sets))
    # the random control's draw g > 0 runs on samples of its own after the confirmation's,
    # beside the unsteered model on the same samples (one set per draw for every latent)
    drawn = sorted({g for _, ctl, _, _, _, g in controls if ctl == "random" and g > 0})
    draw_first = {0: 0, **{g: conf_first + g * full for g in drawn}}
    base_sets = [_Set(prompts, None, full, draw_first[g]) for g in drawn]
    skip(draw_bases - len(base_sets))
    got = run_sets(
        [*(_Set(pr, e, full, draw_first[g]) for _, _, _, e, pr, g in controls), *conf_sets,
         *base_sets], "controls",
    )  # fmt: skip
    ctrl_scored = got[: len(controls)]
    conf_scored = got[len(controls) : len(controls) + len(conf_sets)]
    # the random control's unsteered reference: the sweep's set, and with several draws the
    # unsteered sets of the later draws' samples after it (every latent's)
    rand_ref = _Scored.concat([base, *got[len(got) - len(base_sets) :]]) if base_sets else base
    conf_of = dict(zip(conf_keys, conf_scored[1:], strict=True))
    _advance(rep, len(got))

    # the tables, latent by latent: unsteered, alpha0, strengths, random, own label
    summary_latents = []
    for k, (j, c) in enumerate(lat_of):
        pick, base_ppl = pick_rows[k], base_ppls[k]
        mine = [(ctl, st, e, sc) for (kk, ctl, st, e, _, _), sc
                in zip(controls, ctrl_scored, strict=True) if kk == k]  # fmt: skip
        base_m = record(base, pick, "unsteered", "neutral", base_ppl)
        for _, st, e, sc in (x for x in mine if x[0] == "alpha0"):
            record(sc, pick, "alpha0", "neutral", base_ppl, st, e, base)
        steer_ms = [
            (st, record(sc, pick, "steer", "neutral", base_ppl, st, edit_of(k, None, st), base))
            for st, sc in steer_sets[k]
        ]
        # the random control's draws at a strength, pooled into one row (draw order); with
        # several, against the unsteered model on the draws' samples (its own row)
        rand_sets: dict[float, list[tuple[tuple[Edit, ...], _Scored]]] = {}
        for ctl, st, e, sc in mine:
            if ctl == "random":
                rand_sets.setdefault(st, []).append((e, sc))
        n_drawn = len(draw_first)
        rand_prompts, rand_ppl = "neutral", base_ppl
        if n_drawn > 1 and rand_sets:
            rand_prompts = "random"
            rand_ppl = rand_ref.metrics(c, None)["perplexity"]
            rand_base_m = record(rand_ref, pick, "unsteered", "random", rand_ppl, draws=n_drawn)
        rand_ms = [
            (st, record(_Scored.concat([sc for _, sc in ds]), pick, "random", rand_prompts,
                        rand_ppl, st, ds[0][0], rand_ref, len(ds)))
            for st, ds in rand_sets.items()
        ]  # fmt: skip
        draw_shares = {
            st: [float(sc.metrics(c, None)["share"]) for _, sc in ds]
            for st, ds in rand_sets.items()
        }
        own_m, own_ms = None, []
        if "own_label" in p.controls and c in own_sets:
            own_base = own_sets[c][1]
            own_ppl = own_base.metrics(c, None)["perplexity"]
            own_m = record(own_base, pick, "own_label", "own_label", own_ppl)
            own_ms = [
                (st, record(sc, pick, "own_label", "own_label", own_ppl, st, e, own_base))
                for ctl, st, e, sc in mine
                if ctl == "own_label"
            ]
        lat = latent_summary(
            j, pick["label"], base_m, steer_ms, rand_ms, int(pick["random_latent"]),
            p.ppl_ratio_max, own_base_m=own_m, own_ms=own_ms,
            stopped={st: sc.stopped for st, sc in steer_sets[k]},
        )  # fmt: skip
        lat["rank"] = int(pick["rank"])
        if "random" in p.controls:
            lat["random_draws"] = [[int(m) for m in d] for d in pick["random_draws"]]
            lat["random_draw_shares_at_best"] = draw_shares.get(bests[k])
            lat["random_samples"] = [
                [draw_first[g], draw_first[g] + full - 1] for g in range(n_drawn)
            ] if rand_sets else None  # fmt: skip
            if n_drawn > 1 and rand_sets:
                lat.update({f"random_baseline_{x}": rand_base_m[x]
                            for x in ("share", "share_lo", "share_hi")})  # fmt: skip
        if confirm:
            conf_m = conf_base_m = None
            if k in conf_of:
                conf_ppl = conf_scored[0].metrics(c, None)["perplexity"]
                conf_base_m = record(conf_scored[0], pick, "unsteered", "confirm", conf_ppl)
                conf_m = record(
                    conf_of[k], pick, "confirm", "confirm", conf_ppl, bests[k],
                    edit_of(k, None, bests[k]), conf_scored[0],
                )  # fmt: skip
            lat.update(confirmed_summary(conf_m, conf_base_m, conf_first, full))
        lat["refined_strengths"] = [float(st) for st, sc in steer_sets[k] if sc.refined]
        if "members" in pick:
            lat["members"] = [int(m) for m in pick["members"]]
            lat["random_members"] = [int(m) for m in pick["random_members"]]
        if pilot_frame is not None:
            mine = pilot_frame[pilot_frame["latent"] == j]
            lat["pilot_share"] = float(mine["share"].max()) if len(mine) else None
        lat["classifier_valid"] = check.judged.get(pick["label"], False)
        lat["classifier_note"] = check.reason(pick["label"])
        lat.update(check.recall_of(pick["label"]))
        summary_latents.append(lat)
    table = pd.DataFrame(rows)
    generations = pd.concat(gen_frames, ignore_index=True)
    neutral = np.bincount(base.predicted[base.predicted >= 0], minlength=len(names))
    neutral_share = {
        n: float(k / max(len(base.gens), 1)) for n, k in zip(names, neutral, strict=True)
    }
    if classifier.abstain:
        neutral_share[NONE_LABEL] = float((base.predicted == -2).mean())
    clf = {
        **classifier.describe(),
        "generations": check.describe(),
        # what it calls unsteered continuations of the neutral prompts: no label should own
        # them (with abstention: mostly "none")
        "neutral": neutral_share,
        "text_judge": _judge_summary(judge, judge_why, base, check_gens, names)
        if p.text_judge
        else None,
    }
    summary = {
        "hook_point": hp.name,
        "mode": p.mode,
        "positions": p.positions,
        "strengths": list(p.strengths),
        "n_prompts": len(prompts),
        "samples_per_prompt": p.samples_per_prompt,
        "early_stop": p.early_stop,
        "refine": p.refine,
        "confirm": confirm,
        "ppl_ratio_max": p.ppl_ratio_max,
        "classifier": clf,
        "latents": summary_latents,
        "pilot": None
        if pilot_frame is None
        else {
            "candidates": p.pilot_candidates,
            "strengths": list(p.pilot_strengths),
            "samples_per_prompt": p.pilot_samples,
            # sample indices of the pilot's continuations: none of them is the sweep's
            "samples": [p.samples_per_prompt, p.samples_per_prompt + p.pilot_samples - 1],
            "continuations": int(pilot_frame["n"].sum()),
            "chosen": {
                lb: [int(j) for j in g["latent"]]
                for lb, g in pilot_frame[pilot_frame["chosen"]]
                .drop_duplicates(["label", "latent"])
                .groupby("label", sort=False)
            },
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return SteeringEval(
        table, generations, picks, vocab, clf, summary, check=check.table,
        check_generations=check_gens, fit_generations=fit_frame, pilot=pilot_frame,
    )  # fmt: skip
