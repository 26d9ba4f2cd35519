"""Scores of a steering sweep, computed from predictions and likelihoods alone (no model).

- :func:`wilson_interval`: the 95% Wilson score interval of a share ``k / n`` (scipy);
- :func:`paired_lift`: a set's share minus its unsteered set's share on the same prompts and
  sampling seeds, with Newcombe's interval for paired proportions;
- :func:`set_metrics`: the metrics of one set of generations (share with its interval,
  classifier probability, vocabulary mass, perplexity and its ratio, distinct bigrams);
  :func:`text_metrics`: the same set's share and lift under the second judge (words only);
- :func:`pick_best_strength`: the strength that moves the share most within the fluency bound;
  :func:`latent_summary` reports it per steered latent with the random control beside it;
- :func:`judge_generations`: can the label classifier judge free-text generations at all?
  Decided on unsteered continuations of each label's own prompts (see the function).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "GenerationCheck",
    "confirmed_summary",
    "early_stop_reason",
    "judge_generations",
    "latent_summary",
    "lift_over",
    "log_perplexity_interval",
    "paired_lift",
    "pick_best_strength",
    "pilot_choice",
    "set_metrics",
    "text_metrics",
    "wilson_interval",
]


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``k / n`` (``(nan, nan)`` when ``n == 0``).

    The Wilson interval keeps its coverage near the nominal level for small ``n`` and shares
    near 0 or 1, where the normal approximation collapses to a zero-width interval.
    """
    from scipy.stats import binomtest

    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"k={k}, n={n}: expected 0 <= k <= n")
    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def paired_lift(
    hits: np.ndarray, base_hits: np.ndarray, confidence: float = 0.95
) -> tuple[float, float, float]:
    """The lift of a set's share over its unsteered set's: ``(lift, lo, hi)`` with ``lift =
    share - unsteered share`` and its 95% interval (``nan`` when ``n == 0``).

    ``hits bool [n]`` and ``base_hits bool [n]``: whether each continuation is the target,
    row ``i`` of both generated from the same prompt with the same sampling seed, so the two
    shares are paired. The interval is Newcombe's (1998, method 10) for a difference of
    paired proportions: the Wilson intervals of both shares, combined with the continuity-
    corrected correlation of the pairs (``phi``; 0 when a margin is empty). It stays within [-1, 1] and, unlike the
    Wald interval, keeps its coverage at shares near 0 or 1.
    """
    a = np.asarray(hits, dtype=bool)
    b = np.asarray(base_hits, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"hits {a.shape} and base_hits {b.shape}: expected one flag per paired continuation"
        )
    n = int(a.size)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    both, only_a = int((a & b).sum()), int((a & ~b).sum())
    only_b, neither = int((~a & b).sum()), int((~a & ~b).sum())
    k1, k2 = both + only_a, both + only_b
    p1, p2 = k1 / n, k2 / n
    l1, u1 = wilson_interval(k1, n, confidence)
    l2, u2 = wilson_interval(k2, n, confidence)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    # Newcombe's continuity-corrected correlation: a small positive one counts as none
    cross = cross - n / 2 if cross > n / 2 else min(cross, 0)
    phi = cross / math.sqrt(margins) if margins > 0 else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    hi = d + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return d, max(lo, -1.0), min(hi, 1.0)


def _distinct2(token_ids: Sequence[Sequence[int]]) -> float:
    pairs = [(a, b) for ids in token_ids for a, b in itertools.pairwise(ids)]
    return len(set(pairs)) / len(pairs) if pairs else float("nan")


def set_metrics(
    predicted: np.ndarray,
    proba: np.ndarray,
    nll: np.ndarray,
    n_tokens: np.ndarray,
    token_ids: Sequence[Sequence[int]],
    label: int,
    base_ppl: float | None,
    vocab_mass: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of one set of ``n`` generations scored for target label ``label``.

    ``predicted [n]``: the classifier's label per generation (-1: nothing to classify, -2:
    ``none``, the classifier abstained; both count as not the target); ``proba [n, C (+1)]``;
    ``nll [n]`` / ``n_tokens [n]``: summed negative log-likelihood and token count of each
    continuation under the unsteered model; ``vocab_mass [n, C]`` (optional). ``share`` is
    ``hits / n`` with its 95% Wilson interval ``share_lo``..``share_hi``; ``abstain`` the share
    assigned to no label, ``empty`` the count with nothing to classify.
    """
    n = int(predicted.shape[0])
    valid = predicted != -1
    hits = int((predicted == label).sum())
    lo, hi = wilson_interval(hits, n)
    total = float(n_tokens.sum())
    ppl = float(math.exp(nll.sum() / total)) if total > 0 else float("nan")
    return {
        "n": n,
        "hits": hits,
        "share": hits / n if n else float("nan"),
        "share_lo": lo,
        "share_hi": hi,
        "prob": float(proba[valid, label].mean()) if valid.any() else float("nan"),
        "vocab_mass": float(vocab_mass[:, label].mean())
        if vocab_mass is not None
        else float("nan"),
        "perplexity": ppl,
        "ppl_ratio": ppl / base_ppl if base_ppl else float("nan"),
        "distinct2": _distinct2(token_ids),
        "mean_tokens": float(n_tokens.mean()) if n else float("nan"),
        "empty": int((~valid).sum()),
        "abstain": float((predicted == -2).mean()) if n else float("nan"),
    }


def lift_over(
    predicted: np.ndarray, label: int, ref_predicted: np.ndarray | None
) -> tuple[float, float, float]:
    """:func:`paired_lift` of the hits on ``label`` in ``predicted [n]`` over the first ``n``
    rows of ``ref_predicted``: the labels of the unsteered set of the same prompts and
    sampling draws (row ``i`` of both: the same prompt and seed). nan x 3 without one, or
    when it has fewer rows."""
    hit = np.asarray(predicted) == label
    n = int(hit.size)
    if ref_predicted is None or len(ref_predicted) < n:
        return (float("nan"),) * 3
    return paired_lift(hit, np.asarray(ref_predicted)[:n] == label)


def text_metrics(
    predicted: np.ndarray, label: int, ref_predicted: np.ndarray | None = None
) -> dict[str, float]:
    """The second judge's metrics of one set for target label ``label``: ``text_share`` with
    its 95% Wilson interval (``_lo``, ``_hi``) from ``predicted [n]`` (label codes as
    :func:`set_metrics` reads them), and ``text_lift`` (``_lo``, ``_hi``): :func:`lift_over`
    the same judge's labels of the unsteered set of the same prompts (nan without one)."""
    hit = np.asarray(predicted) == label
    n = int(hit.size)
    lo, hi = wilson_interval(int(hit.sum()), n)
    lift = lift_over(predicted, label, ref_predicted)
    return {
        "text_share": float(hit.mean()) if n else float("nan"),
        "text_share_lo": lo,
        "text_share_hi": hi,
        **dict(zip(("text_lift", "text_lift_lo", "text_lift_hi"), lift, strict=True)),
    }


def log_perplexity_interval(
    nll: np.ndarray, n_tokens: np.ndarray, z: float = 1.96
) -> tuple[float, float]:
    """95% interval of the log perplexity ``sum(nll) / sum(n_tokens)`` of a set of
    continuations (``nll [n]`` summed per continuation, ``n_tokens [n]``): the ratio
    estimator's delta-method interval over continuations. ``(-inf, inf)`` with fewer than
    two scored continuations."""
    nll = np.asarray(nll, dtype=np.float64)
    n_tokens = np.asarray(n_tokens, dtype=np.float64)
    tot = float(n_tokens.sum())
    n = int((n_tokens > 0).sum())
    if n < 2 or tot <= 0:
        return -math.inf, math.inf
    mean = float(nll.sum()) / tot
    resid = nll - mean * n_tokens
    se = math.sqrt(float((resid**2).sum()) * n / (n - 1)) / tot
    return mean - z * se, mean + z * se


def early_stop_reason(
    hits: int,
    n: int,
    nll: np.ndarray,
    n_tokens: np.ndarray,
    base_ppl: float | None,
    ppl_ratio_max: float,
    best_share: float | None,
) -> str | None:
    """Whether a strength's set, ``n`` continuations so far (``hits`` of them the target),
    can end early: ``"perplexity"`` when the 95% lower bound of its perplexity exceeds
    ``ppl_ratio_max`` x ``base_ppl`` (it is not fluent), ``"cannot win"`` when the 95% upper
    bound of its share is below ``best_share`` (a share it must reach to be the best, e.g. the
    95% lower bound of the share of a strength sure to be fluent), else None."""
    if base_ppl and math.isfinite(base_ppl) and base_ppl > 0:
        lower, _ = log_perplexity_interval(nll, n_tokens)
        if lower > math.log(ppl_ratio_max * base_ppl):
            return "perplexity"
    if best_share is not None and n > 0 and wilson_interval(hits, n)[1] < best_share:
        return "cannot win"
    return None


def pick_best_strength(sweep: pd.DataFrame, ppl_ratio_max: float) -> pd.Series | None:
    """The row of ``sweep`` (one target latent's steered sets: ``strength, share,
    ppl_ratio``) with the highest share among those whose perplexity stays within
    ``ppl_ratio_max`` x unsteered; ties go to the smaller strength. None when no strength is
    fluent enough. With a ``stopped`` column, a set that ended early is never the best: its
    share rests on fewer continuations."""
    if "stopped" in sweep.columns:
        sweep = sweep[sweep["stopped"].isna()]
    fluent = sweep[np.isfinite(sweep["ppl_ratio"]) & (sweep["ppl_ratio"] <= ppl_ratio_max)]
    if fluent.empty:
        return None
    order = fluent.sort_values(["share", "strength"], ascending=[False, True], kind="stable")
    return order.iloc[0]


def pilot_choice(pilot: pd.DataFrame, per_label: int, ppl_ratio_max: float) -> pd.DataFrame:
    """The latents a pilot picks: per label, the ``per_label`` candidates with the highest
    share at a strength within ``ppl_ratio_max`` x unsteered perplexity (ties, and candidates
    with no fluent strength, in ``rank`` order). ``pilot``: one row per candidate and pilot
    strength (``label, latent, rank, strength, share, ppl_ratio``). Returns ``label, latent,
    rank, pilot_share, pilot_strength`` (share and strength None when no strength was
    fluent)."""
    fluent = pilot[np.isfinite(pilot["ppl_ratio"]) & (pilot["ppl_ratio"] <= ppl_ratio_max)]
    best = (
        fluent.sort_values(["share", "strength"], ascending=[False, True], kind="stable")
        .drop_duplicates(["label", "latent"])
        .set_index(["label", "latent"])
    )
    rows = []
    for (label, latent), g in pilot.groupby(["label", "latent"], sort=False):
        hit = best.loc[(label, latent)] if (label, latent) in best.index else None
        rows.append({
            "label": label, "latent": int(latent), "rank": int(g["rank"].iloc[0]),
            "pilot_share": float(hit["share"]) if hit is not None else None,
            "pilot_strength": float(hit["strength"]) if hit is not None else None,
        })  # fmt: skip
    out = pd.DataFrame(rows, columns=["label", "latent", "rank", "pilot_share", "pilot_strength"])
    key = out["pilot_share"].astype(float).fillna(-1.0)
    out = out.assign(_k=key).sort_values(["_k", "rank"], ascending=[False, True], kind="stable")
    out = out.groupby("label", sort=False).head(per_label).drop(columns="_k")
    return out.sort_values(["label", "rank"], kind="stable").reset_index(drop=True)


@dataclass
class GenerationCheck:
    """The label classifier on unsteered continuations of each label's own prompts."""

    table: pd.DataFrame
    """One row per prompt label: ``label, n, recall, recall_lo, recall_hi,
    heldout_docs, heldout_recall`` and ``to_<label>`` (share of the continuations predicted
    as each label; ``to_none``: assigned to no label, when the classifier can abstain)."""
    chance: float
    margin: float
    dominant_label: str | None
    """A label (or ``none``: abstentions) that takes most predictions on the prompts of every
    label (the classifier then cannot tell generations apart), else None."""
    judged: dict[str, bool]
    """Per label: True when the classifier can judge generations toward it."""

    @property
    def can_judge(self) -> bool:
        """True when every checked label can be judged."""
        return bool(self.judged) and all(self.judged.values())

    def reason(self, label: str) -> str | None:
        """Why generations toward ``label`` cannot be judged (None when they can)."""
        if self.judged.get(label, False):
            return None
        if self.dominant_label == "none":
            return (
                "the classifier assigns most continuations to no label whatever the prompt's label"
            )
        if self.dominant_label is not None:
            return (
                f"the classifier predicts {self.dominant_label} for most continuations "
                "whatever the prompt's label"
            )
        row = (
            self.table.set_index("label").loc[label] if label in set(self.table["label"]) else None
        )
        if row is None:
            return f"no continuation of a {label} prompt was checked"
        return (
            f"on unsteered continuations of {label} prompts it predicts {label} for "
            f"{row['recall']:.2f} of them (n={int(row['n'])}), not above chance "
            f"{self.chance:.2f} + margin {self.margin:.2f}"
        )

    def recall_of(self, label: str) -> dict[str, float | None]:
        """The classifier's accuracy on unsteered continuations of ``label``'s own prompts:
        ``classifier_recall`` with its 95% interval (None when not checked)."""
        t = self.table.set_index("label") if len(self.table) else None
        if t is None or label not in t.index:
            return {
                "classifier_recall": None,
                "classifier_recall_lo": None,
                "classifier_recall_hi": None,
            }
        r = t.loc[label]
        return {
            "classifier_recall": float(r["recall"]),
            "classifier_recall_lo": float(r["recall_lo"]),
            "classifier_recall_hi": float(r["recall_hi"]),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "chance": self.chance,
            "margin": self.margin,
            "dominant_label": self.dominant_label,
            "judged": dict(self.judged),
            "can_judge": self.can_judge,
            "recall": dict(zip(self.table["label"], self.table["recall"], strict=True)),
        }


def judge_generations(
    prompt_labels: Sequence[int],
    predicted: Sequence[int],
    label_names: Sequence[str],
    *,
    margin: float = 0.2,
    heldout_recall: Sequence[float] | None = None,
    heldout_docs: Sequence[int] | None = None,
    abstain: bool = False,
) -> GenerationCheck:
    """Can the classifier judge generations? ``prompt_labels [n]``: the label of the prompt
    each unsteered continuation was generated from; ``predicted [n]``: the classifier's label
    for it (-1: nothing to classify; -2: ``none``, it abstained).

    A label ``L`` can be judged when, on continuations of ``L``'s own prompts, the classifier
    predicts ``L`` at least ``chance + margin`` of the time (``chance = 1 / C`` over the
    labels; an abstention is a miss, so abstaining never helps), and no label - nor ``none`` -
    takes most predictions (over half) on the prompts of every checked label: a classifier
    that predicts one label whatever the text, or abstains on it all, measures nothing.
    ``heldout_recall`` / ``heldout_docs``: per-label recall on held-out documents, shown
    beside it. ``abstain``: the classifier can abstain (a ``to_none`` column is added).
    """
    names = list(label_names)
    C = len(names)
    if C < 2:
        raise ValueError(f"label_names={names}: expected two or more labels")
    pl = np.asarray(prompt_labels, dtype=np.int64)
    pr = np.asarray(predicted, dtype=np.int64)
    if pl.shape != pr.shape:
        raise ValueError(
            f"prompt_labels has {pl.size} entries but predicted has {pr.size}: expected one each"
        )
    chance = 1.0 / C
    rows = []
    majority: list[int] = []
    for c in sorted(set(pl.tolist())):
        p = pr[pl == c]
        n = int(p.size)
        hits = int((p == c).sum())
        lo, hi = wilson_interval(hits, n)
        shares = {f"to_{names[j]}": float((p == j).mean()) for j in range(C)}
        if abstain:
            shares["to_none"] = float((p == -2).mean())
        # index C: abstentions, a possible majority of their own
        counts = np.bincount(np.where(p == -2, C, p)[p != -1], minlength=C + 1)
        majority.append(int(counts.argmax()) if counts.max() * 2 > n else -1)
        rows.append({
            "label": names[c], "n": n, "recall": hits / n, "recall_lo": lo, "recall_hi": hi,
            "heldout_docs": int(heldout_docs[c]) if heldout_docs is not None else -1,
            "heldout_recall": float(heldout_recall[c]) if heldout_recall is not None else float("nan"),
            **shares,
        })  # fmt: skip
    columns = ["label", "n", "recall", "recall_lo", "recall_hi", "heldout_docs", "heldout_recall"]
    to = [f"to_{name}" for name in names] + (["to_none"] if abstain else [])
    table = pd.DataFrame(rows, columns=columns + to)
    dominant = None
    if len(majority) >= 2 and majority[0] >= 0 and len(set(majority)) == 1:
        dominant = [*names, "none"][majority[0]]
    judged = {r["label"]: bool(dominant is None and r["recall"] >= chance + margin) for r in rows}
    return GenerationCheck(table, chance, margin, dominant, judged)


def _at(ms: dict[float, dict[str, Any]], strength: float | None, prefix: str) -> dict[str, Any]:
    """``{prefix}_share_at_best(_lo, _hi)`` and ``{prefix}_lift_at_best(_lo, _hi)``, and the
    second judge's ``{prefix}_text_share_at_best`` and ``{prefix}_text_lift_at_best`` (each
    with ``_lo``, ``_hi``): the metrics of the set run at ``strength`` (None when it did not
    run, or without the judge)."""
    m = ms.get(strength) if strength is not None else None
    out = {}
    for what in ("share", "lift", "text_share", "text_lift"):
        for end in ("", "_lo", "_hi"):
            out[f"{prefix}_{what}_at_best{end}"] = _finite(m.get(what + end)) if m else None
    out[f"{prefix}_abstain_at_best"] = _finite(m.get("abstain")) if m else None
    return out


def _finite(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def confirmed_summary(
    m: Mapping[str, Any] | None, base_m: Mapping[str, Any] | None, first: int, samples: int
) -> dict[str, Any]:
    """The ``confirmed_*`` fields of a latent's summary: its best strength run again on fresh
    sample indices (``first .. first + samples - 1`` of every prompt, metrics ``m``) against
    the unsteered model on the same indices (``base_m``); None where no strength was fluent.
    The best strength is the maximum of several noisy shares, so its own share leans high;
    the confirmation's does not."""
    get = (lambda k: _finite(m.get(k))) if m is not None else (lambda k: None)
    return {
        "confirmed_share": get("share"), "confirmed_share_lo": get("share_lo"),
        "confirmed_share_hi": get("share_hi"), "confirmed_lift": get("lift"),
        "confirmed_lift_lo": get("lift_lo"), "confirmed_lift_hi": get("lift_hi"),
        "confirmed_ppl_ratio": get("ppl_ratio"), "confirmed_abstain": get("abstain"),
        "confirmed_text_share": get("text_share"),
        "confirmed_baseline_share": _finite(base_m["share"]) if base_m is not None else None,
        "confirm_samples": [first, first + samples - 1],
    }  # fmt: skip


def _shift(m: Mapping[str, Any], base_m: Mapping[str, Any]) -> float:
    """How far a control's share moved: its lift over the unsteered share of the same samples,
    else its distance to ``base_m``'s share."""
    lift = m.get("lift")
    if lift is not None and np.isfinite(lift):
        return abs(float(lift))
    return abs(m["share"] - base_m["share"])


def latent_summary(
    j: int,
    label: str,
    base_m: dict[str, Any],
    steer_ms: Sequence[tuple[float, dict[str, Any]]],
    rand_ms: Sequence[tuple[float, dict[str, Any]]],
    r: int,
    ppl_ratio_max: float,
    *,
    own_base_m: dict[str, Any] | None = None,
    own_ms: Sequence[tuple[float, dict[str, Any]]] = (),
    stopped: Mapping[float, str | None] | None = None,
) -> dict[str, Any]:
    """Summary of steered latent ``j``: the unsteered metrics ``base_m``, the strength that
    moves the share most within the fluency bound among ``steer_ms`` (``[(strength,
    metrics)]``), with 95% intervals, and each control at that strength: random latent ``r``
    (``rand_ms``) and the latent on its own label's prompts (``own_ms``, against their
    unsteered set ``own_base_m``). Every share at the best strength comes with its lift over
    the unsteered share of the same prompts (``*_lift_at_best``, ``best_lift``; the paired
    difference with its 95% interval, :func:`paired_lift`), so a control's share can be read
    against what unsteered text already scores, and the share assigned to no label
    (``baseline_abstain``, ``best_abstain``, ``*_abstain_at_best``; None when the metrics
    have none). ``stopped``: why a strength ended early (it is
    then not a candidate for the best)."""
    tab = pd.DataFrame([{"strength": st, **m} for st, m in steer_ms])
    if stopped is not None:
        tab["stopped"] = [stopped.get(st) for st, _ in steer_ms]
    best = pick_best_strength(tab, ppl_ratio_max)
    at = float(best["strength"]) if best is not None else None
    get = (lambda k: _finite(best.get(k))) if best is not None else (lambda k: None)
    return {
        "latent": j, "label": label, "n": base_m["n"], "baseline_share": base_m["share"],
        "baseline_share_lo": base_m["share_lo"], "baseline_share_hi": base_m["share_hi"],
        "baseline_vocab_mass": base_m["vocab_mass"], "baseline_perplexity": base_m["perplexity"],
        "baseline_abstain": _finite(base_m.get("abstain")), "best_abstain": get("abstain"),
        "best_strength": at,
        "best_share": get("share"), "best_share_lo": get("share_lo"),
        "best_share_hi": get("share_hi"),
        "best_lift": get("lift"), "best_lift_lo": get("lift_lo"), "best_lift_hi": get("lift_hi"),
        "best_vocab_mass": get("vocab_mass"), "best_ppl_ratio": get("ppl_ratio"),
        "baseline_text_share": _finite(base_m.get("text_share")),
        "best_text_share": get("text_share"), "best_text_share_lo": get("text_share_lo"),
        "best_text_share_hi": get("text_share_hi"), "best_text_lift": get("text_lift"),
        "best_text_lift_lo": get("text_lift_lo"), "best_text_lift_hi": get("text_lift_hi"),
        "max_share": float(tab["share"].max()),
        "strengths_run": [float(x) for x in tab["strength"]],
        "random_latent": r,
        **_at(dict(rand_ms), at, "random"),
        "random_max_shift": max((_shift(m, base_m) for _, m in rand_ms), default=None),
        "own_label_baseline_share": own_base_m["share"] if own_base_m else None,
        **_at(dict(own_ms), at, "own_label"),
    }  # fmt: skip
