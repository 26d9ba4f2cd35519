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
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from integral_superposition import compute
from integral_superposition.progress import ProgressFn, Reporter
from integral_superposition.steering.classifier import (
    LabelClassifier,
    label_prompts,
    label_vocabulary,
)
from integral_superposition.steering.edits import Edit
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
    random_controls,
    target_latents,
)
from integral_superposition.steering.plot import plot_sweep
from integral_superposition.steering.scores import (
    early_stop_reason,
    judge_generations,
    latent_summary,
    paired_lift,
    pick_best_strength,
    set_metrics,
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

    stopped: str | None = None
    """Why the set ended before all its rounds (``perplexity``, ``cannot win``), else None."""

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
        return cls(gens, cat("proba"), cat("valid"), cat("nll"), cat("n_tok"))

    @property
    def predicted(self) -> np.ndarray:
        """``[n]`` the classifier's label of each continuation (-1: nothing to classify)."""
        return np.where(self.valid, self.proba.argmax(1), -1)

    def metrics(self, label: int, base_ppl: float | None) -> dict[str, Any]:
        return set_metrics(
            self.predicted, self.proba, self.nll, self.n_tok, self.gens.token_ids, label,
            base_ppl, self.gens.vocab_mass,
        )  # fmt: skip


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
    check: pd.DataFrame | None = None
    """The classifier on unsteered continuations of each label's own prompts
    (:class:`~integral_superposition.steering.scores.GenerationCheck` ``.table``)."""
    check_generations: pd.DataFrame | None = None
    """Those continuations: ``prompt_label, prompt, text, predicted``."""
    fit_generations: pd.DataFrame | None = None
    """The continuations of training documents the classifier was fitted on: ``label, prompt,
    text, used`` (None when it was fitted on documents alone or given)."""

    def figure(self) -> Figure:
        return plot_sweep(self.table, self.summary.get("ppl_ratio_max"))


def _check_inputs(p: SteeringParams, backend, sae, store) -> tuple[list[str], Any]:
    from integral_superposition.data import neutral_prompts

    prompts = check_prompts(p.prompts if p.prompts is not None else neutral_prompts())
    check_steerable_prompts(backend.tokenizer, prompts)
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
    """
    from integral_superposition.steering.edits import max_activations

    p = (
        params
        if isinstance(params, SteeringParams)
        else SteeringParams.model_validate(dict(params or {}))
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
    picks = target_latents(p, tok_table, doc_table, names, sae=sae, backend=backend, vocab=vocab)
    norms = sae.W_dec.detach().float().norm(dim=1).cpu().numpy()
    picks["max_act"] = mx[picks["latent"].to_numpy()] if mx is not None else np.nan
    picks["decoder_norm"] = norms[picks["latent"].to_numpy()]
    picks = random_controls(picks, tok_table, norms, p.q_max, p.seed)

    rep.set_phase("label classifier")
    fit_here = classifier is None
    if classifier is None:
        classifier = LabelClassifier.fit(
            store, test_fraction=p.classifier_test_fraction, seed=p.split_seed,
            C=p.classifier_c, balanced=p.classifier_balanced,
        )  # fmt: skip
    vocab_sets = [vocab.loc[vocab["label_id"] == c, "token_id"].tolist() for c in range(len(names))]

    gen_kw = dict(
        do_sample=p.do_sample, temperature=p.temperature, top_p=p.top_p,
        samples_per_prompt=p.samples_per_prompt, seed=p.seed, batch_size=p.batch_size,
        vocab_sets=vocab_sets,
    )  # fmt: skip
    targets = sorted({names.index(lb) for lb in picks["label"]})
    checked = list(range(len(names))) if p.check_labels == "all" else targets
    n_ctrl = 1 if p.control_strengths == "best" else len(p.strengths)
    per_latent = (
        len(p.strengths)
        + ("alpha0" in p.controls)
        + n_ctrl * (("random" in p.controls) + ("own_label" in p.controls))
    )
    fit_gens = fit_here and p.classifier_fit != "documents"
    rep.update(0, 1 + len(checked) + len(picks) * per_latent + fit_gens)

    def score_set(prompt_list: list[str], edits: list[Edit] | None, samples: int, first: int):
        """Samples ``first .. first + samples - 1`` of every prompt, sample by sample."""
        kw = {**gen_kw, "samples_per_prompt": samples, "first_sample": first, "sample_major": True}
        if edits is None:  # the unsteered model scores its own tokens as it generates them
            g = generate_continuations(backend, prompt_list, p.max_new_tokens, score=True, **kw)
            nll = g.nll
            n_tok = np.array([len(t) for t in g.token_ids], dtype=np.int64)
        else:
            with steer(backend, sae, hp, edits, p.positions, keep_error=p.keep_error):
                g = generate_continuations(backend, prompt_list, p.max_new_tokens, **kw)
            nll, n_tok = continuation_nll(backend, g.prompt_ids, g.token_ids)
        X, valid = classifier.features(backend, g.texts, p.batch_size)
        return _Scored(g, classifier.predict_proba(X), valid, nll, n_tok)

    def run(prompt_list: list[str], edits: list[Edit] | None, what: str, decide=None) -> _Scored:
        """One set of generations: ``samples_per_prompt`` continuations of every prompt, rows
        sample by sample (every prompt's sample 0, then sample 1, ...). Row ``i`` of any two
        sets of the same prompts has the same prompt and random stream, so shares pair. With
        ``early_stop`` and ``decide(scored) -> reason | None`` the set runs in rounds of one
        sample per prompt and may end after a round; otherwise in one call, which gives the
        same rows as its rounds (sampling is drawn per row) at a fraction of the cost: each
        decoding step reads the whole model, whatever the rows."""
        rep.set_phase(what)
        if not (p.early_stop and decide is not None):
            out = score_set(prompt_list, edits, p.samples_per_prompt, 0)
        else:
            parts: list[_Scored] = []
            for r in range(p.samples_per_prompt):
                parts.append(score_set(prompt_list, edits, 1, r))
                out = _Scored.concat(parts)
                why = decide(out) if r + 1 < p.samples_per_prompt else None
                if why is not None:
                    out.stopped = why
                    break
        rep.advance()
        return out

    def skip(n_sets: int) -> None:
        """Sets planned but not run (a sweep stopped early): the total shrinks."""
        if n_sets > 0:
            rep.update(rep.done, rep.total - n_sets)

    fit_frame = None
    if fit_gens:
        # the classifier learns the text it judges: continuations the unsteered model writes
        # after the openings of training documents, labelled by their document
        fit_prompts, fit_y = [], []
        for c in range(len(names)):
            got = label_prompts(
                store, c, classifier.train_doc_ids, p.classifier_fit_generations,
                p.own_prompt_words, p.seed, fallback=False,
            )  # fmt: skip
            fit_prompts += got
            fit_y += [c] * len(got)
        rep.set_phase("classifier fit: continuations of training documents")
        g = generate_continuations(
            backend, fit_prompts, p.max_new_tokens, **{**gen_kw, "samples_per_prompt": 1}
        )
        X, valid = classifier.features(backend, g.texts, p.batch_size)
        y = np.asarray(fit_y, dtype=np.int64)
        classifier = classifier.with_generations(
            X[valid], y[valid], documents=p.classifier_fit == "both"
        )
        fit_frame = pd.DataFrame({
            "label": [names[c] for c in fit_y], "prompt": g.prompts, "text": g.texts,
            "used": valid,
        })  # fmt: skip
        rep.advance()

    base = run(prompts, None, "unsteered")

    # the classifier on unsteered continuations of each label's own prompts
    own_sets: dict[int, tuple[list[str], _Scored]] = {}
    for c in checked:
        own = label_prompts(
            store, c, classifier.test_doc_ids, p.own_label_prompts, p.own_prompt_words, p.seed,
            exclude=classifier.train_doc_ids if fit_gens else None,
        )  # fmt: skip
        if own:
            own_sets[c] = (own, run(own, None, f"classifier check: {names[c]} prompts"))
        else:
            skip(1)
    check = judge_generations(
        np.concatenate([np.full(len(s.gens), c) for c, (_, s) in own_sets.items()] or [[]]),
        np.concatenate([s.predicted for _, s in own_sets.values()] or [[]]),
        names, margin=p.judge_margin, heldout_recall=classifier.test_recall or None,
        heldout_docs=classifier.test_docs or None,
    )  # fmt: skip
    check_gens = pd.DataFrame({
        "prompt_label": [names[c] for c, (_, s) in own_sets.items() for _ in range(len(s.gens))],
        "prompt": [t for _, s in own_sets.values() for t in s.gens.prompts],
        "text": [t for _, s in own_sets.values() for t in s.gens.texts],
        "predicted": [names[i] if i >= 0 else None for _, s in own_sets.values() for i in s.predicted],
    })  # fmt: skip

    rows: list[dict[str, Any]] = []
    gen_frames: list[pd.DataFrame] = []

    def record(s: _Scored, pick, control: str, prompt_set: str, base_ppl: float | None,
               strength: float = float("nan"), edit: Edit | None = None,
               ref: _Scored | None = None) -> dict[str, Any]:  # fmt: skip
        """One row of the table; ``ref``: the unsteered set of the same prompts, whose share
        the row's ``lift`` is measured from (None for that set itself)."""
        c = names.index(pick["label"])
        m = s.metrics(c, base_ppl)
        n = len(s.gens)
        if ref is not None and len(ref.gens) >= n:
            # row i of a set and of its unsteered set: the same prompt and sampling seed
            lift = paired_lift(s.predicted == c, ref.predicted[:n] == c)
        else:
            lift = (float("nan"),) * 3
        m.update(zip(("lift", "lift_lo", "lift_hi"), lift, strict=True))
        rows.append({
            "latent": int(pick["latent"]), "label": pick["label"], "control": control,
            "strength": strength, "steered_latent": edit.latent if edit else -1,
            "edit_value": edit.value if edit else float("nan"), "mode": p.mode,
            "prompts": prompt_set, **m, "classifier_accuracy": classifier.accuracy,
            "classifier_valid": check.judged.get(pick["label"], False),
            "stopped": s.stopped,
        })  # fmt: skip
        gen_frames.append(pd.DataFrame({
            "set": len(rows) - 1, "latent": int(pick["latent"]), "label": pick["label"],
            "control": control, "strength": strength, "prompts": prompt_set,
            "prompt": s.gens.prompts, "text": s.gens.texts,
            "predicted": [names[i] if i >= 0 else None for i in s.predicted],
            "target_prob": s.proba[:, c], "n_tokens": s.n_tok, "nll": s.nll,
        }))  # fmt: skip
        return m

    def sweep(pick, control, latent, ratio, prompt_list, prompt_set, ref, base_ppl, strengths,
              stop):  # fmt: skip
        """One steered set per strength; returns ``[(strength, metrics)]`` in increasing
        strength. ``stop``: without ``early_stop``, strengths run in increasing order and the
        sweep ends after the first one above the fluency bound; with it, strongest first, each
        in rounds, and a strength ends after a round once it cannot be the best (see
        ``SteeringParams.early_stop``)."""
        max_act = float(pick["max_act"]) if np.isfinite(pick["max_act"]) else 1.0
        c = names.index(pick["label"])
        rounds = stop and p.early_stop
        best_full: list[float] = []  # shares of complete, fluent strengths

        def decide(s: _Scored) -> str | None:
            return early_stop_reason(
                int((s.predicted == c).sum()), len(s.gens), s.nll, s.n_tok, base_ppl,
                p.ppl_ratio_max, max(best_full) if best_full else None,
            )  # fmt: skip

        out = []
        order = sorted(strengths, reverse=rounds)
        for i, st in enumerate(order):
            e = _edit_for(p.mode, latent, st, max_act, ratio)
            what = f"{pick['label']}: {control} latent {latent}, strength {st:g}"
            scored = run(prompt_list, [e], what, decide if rounds else None)
            m = record(scored, pick, control, prompt_set, base_ppl, st, e, ref)
            out.append((st, m))
            if rounds and scored.stopped is None and m["ppl_ratio"] <= p.ppl_ratio_max:
                best_full.append(m["share"])
            if stop and not rounds and not m["ppl_ratio"] <= p.ppl_ratio_max:
                skip(len(strengths) - i - 1)
                break
        return sorted(out, key=lambda x: x[0])

    summary_latents = []
    for _, pick in picks.iterrows():
        j, c = int(pick["latent"]), names.index(pick["label"])
        base_ppl = base.metrics(c, None)["perplexity"]
        base_m = record(base, pick, "unsteered", "neutral", base_ppl)
        if "alpha0" in p.controls:
            identity = Edit(j, "add", 0.0)
            scored = run(prompts, [identity], f"{pick['label']}: alpha0 control latent {j}")
            record(scored, pick, "alpha0", "neutral", base_ppl, 0.0, identity, base)
        steer_ms = sweep(
            pick, "steer", j, 1.0, prompts, "neutral", base, base_ppl, p.strengths,
            p.stop_above_ppl,
        )  # fmt: skip
        ran = [st for st, _ in steer_ms]
        best = pick_best_strength(
            pd.DataFrame([{"strength": st, **m} for st, m in steer_ms]), p.ppl_ratio_max
        )
        if p.control_strengths == "best":
            ctrl = [float(best["strength"])] if best is not None else []
        else:
            ctrl = ran
        r = int(pick["random_latent"])
        rand_ms = []
        if "random" in p.controls:
            if r >= 0:
                rand_ms = sweep(
                    pick, "random", r, float(pick["random_ratio"]), prompts, "neutral", base,
                    base_ppl, ctrl, False,
                )  # fmt: skip
            skip(n_ctrl - (len(ctrl) if r >= 0 else 0))
        own_m, own_ms = None, []
        if "own_label" in p.controls:
            if c in own_sets:
                own, own_base = own_sets[c]
                own_ppl = own_base.metrics(c, None)["perplexity"]
                own_m = record(own_base, pick, "own_label", "own_label", own_ppl)
                own_ms = sweep(
                    pick, "own_label", j, 1.0, own, "own_label", own_base, own_ppl, ctrl, False
                )
            skip(n_ctrl - (len(ctrl) if c in own_sets else 0))
        lat = latent_summary(
            j, pick["label"], base_m, steer_ms, rand_ms, r, p.ppl_ratio_max,
            own_base_m=own_m, own_ms=own_ms,
        )  # fmt: skip
        lat["classifier_valid"] = check.judged.get(pick["label"], False)
        lat["classifier_note"] = check.reason(pick["label"])
        lat.update(check.recall_of(pick["label"]))
        summary_latents.append(lat)
    table = pd.DataFrame(rows)
    generations = pd.concat(gen_frames, ignore_index=True)
    neutral = np.bincount(base.predicted[base.predicted >= 0], minlength=len(names))
    clf = {
        **classifier.describe(),
        "generations": check.describe(),
        # what it calls unsteered continuations of the neutral prompts: no label should own them
        "neutral": {
            n: float(k / max(len(base.gens), 1)) for n, k in zip(names, neutral, strict=True)
        },
    }
    summary = {
        "hook_point": hp.name,
        "mode": p.mode,
        "positions": p.positions,
        "strengths": list(p.strengths),
        "n_prompts": len(prompts),
        "samples_per_prompt": p.samples_per_prompt,
        "early_stop": p.early_stop,
        "ppl_ratio_max": p.ppl_ratio_max,
        "classifier": clf,
        "latents": summary_latents,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return SteeringEval(
        table, generations, picks, vocab, clf, summary, check=check.table,
        check_generations=check_gens, fit_generations=fit_frame,
    )  # fmt: skip
