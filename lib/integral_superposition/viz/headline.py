"""The report's answer: one table of the numbers a reader looks for first, each marked with
the tokens it was measured on.

:func:`headline_rows` gathers, from whatever was published (an absent number shows ``-``):

- the SAE: FVU, L0, dead latents (with the tokens they never fired on), CE recovered,
  delta CE and KL - from the SAE's own held-out evaluation, else the analysis, else the
  merge's evaluation of the original SAE;
- per label, the best non-generic latent: q, top-set purity (with its N), document AUROC
  and top tokens;
- sparse probing: mean held-out accuracy at k = 1 and k = 10 (with its 95% interval) against
  the dense probe;
- merge: FVU, CE recovered and enrichment retention of the merged SAE against its
  random-partition control;
- steering: per steered latent, the best classifier share within the perplexity bound (with
  its 95% interval when published) against the random-latent control, each with its lift
  over the unsteered share of the same prompts (a control's share alone cannot tell "the edit
  does nothing" from "the classifier's floor").
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from integral_superposition import storage
from integral_superposition.viz.templates import MISSING, fmt, latent_list

__all__ = [
    "HeadlineRow",
    "headline_rows",
    "read_merge_tables",
    "read_steering_summary",
    "split_mark",
]

HELD_OUT, TRAINING, ALL = "held-out", "training", "all tokens"


def split_mark(split: str | None) -> str | None:
    """How a store split reads on the page: ``test`` -> held-out, ``train`` -> training,
    ``all`` -> all tokens (training included)."""
    return {"test": HELD_OUT, "train": TRAINING, "all": ALL}.get(str(split))


@dataclass
class HeadlineRow:
    """One number of the headline table."""

    group: str
    """The row group: ``SAE``, ``Latents``, ``Sparse probing``, ``Merge``, ``Steering``."""
    result: str
    value: Any = None
    """A number (formatted with ``spec``), a string, or None (shown as ``-``)."""
    spec: str = ".4g"
    control: Any = None
    """The number it is compared with (a control or a reference), None when there is none."""
    control_name: str = ""
    split: str | None = None
    """``held-out``, ``training`` or ``all tokens`` (None: not known)."""
    detail: str = ""
    """What the number was measured on (token or document counts, the prompt set)."""
    interval: tuple[float, float] | None = None
    """A 95% interval of ``value``."""
    control_interval: tuple[float, float] | None = None
    """A 95% interval of ``control``."""
    control_lift: float | None = None
    """The control's difference from its reference without the intervention (a steering
    control's share minus the unsteered share), shown beside it; None when not measured."""
    control_lift_interval: tuple[float, float] | None = None
    """A 95% interval of ``control_lift``."""
    latent: int | None = None
    """The latent the row is about (linked to its dashboard)."""
    href: str | None = None
    """The link to the latent's dashboard."""
    tokens: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def _with_interval(self, value: Any, interval: tuple[float, float] | None) -> str:
        if isinstance(value, str):
            return value
        text = fmt(value, self.spec)
        if interval is not None and text != MISSING:
            lo, hi = (fmt(v, self.spec) for v in interval)
            text += f" [{lo}, {hi}]"
        return text

    @property
    def shown(self) -> str:
        """The value as text (``-`` when missing), with its interval."""
        return self._with_interval(self.value, self.interval)

    @property
    def control_shown(self) -> str:
        """The control as ``name: value [interval]`` (``-`` when there is none)."""
        if self.control is None and not self.control_name:
            return MISSING
        value = self._with_interval(self.control, self.control_interval)
        if self.control_lift is not None:
            lift = fmt(self.control_lift, "+" + self.spec)
            if self.control_lift_interval is not None:
                lo, hi = (fmt(v, self.spec) for v in self.control_lift_interval)
                lift += f" [{lo}, {hi}]"
            value += f", lift {lift}"
        return f"{self.control_name}: {value}" if self.control_name else value


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _sae_metrics(
    sae_manifest: Mapping[str, Any] | None, analysis, merge_eval: pd.DataFrame | None
) -> list[HeadlineRow]:
    m = dict((sae_manifest or {}).get("metrics") or {})
    evaluated = "fvu" in m or "l0" in m
    split = split_mark(m.get("split", "test")) if evaluated else TRAINING
    key = "" if evaluated else "train_"
    tokens = m.get("n_tokens") if evaluated else m.get("train_tokens")
    a_sum = analysis.summary if analysis is not None else {}
    a_met = a_sum.get("metrics") or {}
    a_split = split_mark(a_sum.get("split"))
    orig = None
    if merge_eval is not None and "sae" in merge_eval and (merge_eval["sae"] == "original").any():
        orig = merge_eval[merge_eval["sae"] == "original"].iloc[0].to_dict()

    def pick(name: str) -> tuple[float | None, str | None, str]:
        """The first of: the SAE's evaluation, the analysis, the merge's reference row."""
        v = _num(m.get(key + name))
        if v is not None:
            return v, split, _tokens(tokens)
        v = _num(a_met.get(name))
        if v is not None:
            return v, a_split, _tokens(a_sum.get("n_tokens"))
        v = _num(orig.get(name)) if orig is not None else None
        if v is not None:
            return v, HELD_OUT, "merge evaluation" + _tokens(orig.get("n_tokens"), ", ")
        return None, split if m else a_split, ""

    rows = []
    for name, label, spec in (
        ("fvu", "FVU", ".4f"),
        ("l0", "L0 (active latents per token)", ".1f"),
    ):
        v, s, d = pick(name)
        rows.append(HeadlineRow("SAE", label, v, spec, split=s, detail=d))
    # every count of dead latents at hand; the one over the most tokens is shown (a latent
    # silent on 100,000 tokens may fire on the next 90,000)
    counts: list[tuple[float, float, str | None]] = []
    if _num(m.get("dead_frac")) is not None:
        dead_split = split
        if (_num(m.get("dead_tokens")) or 0) > (_num(m.get("n_tokens")) or float("inf")):
            dead_split = ALL  # a small split is topped up with rows outside it
        counts.append((_num(m["dead_frac"]), _num(m.get("dead_tokens")) or 0, dead_split))
    if a_sum.get("n_dead") is not None and a_sum.get("n_latents"):
        n = a_sum["n_dead"] / a_sum["n_latents"]
        counts.append((n, _num(a_sum.get("dead_tokens")) or 0, a_split))
    if orig is not None and _num(orig.get("dead_frac")) is not None:
        counts.append((_num(orig["dead_frac"]), _num(orig.get("dead_tokens")) or 0, HELD_OUT))
    dead, dead_tokens, dead_split = None, None, split
    if counts:
        dead, dead_tokens, dead_split = max(counts, key=lambda c: c[1])  # first on ties
        dead_tokens = dead_tokens or None
    rows.append(
        HeadlineRow(
            "SAE",
            "dead latents",
            None if dead is None else f"{100 * dead:.2f}%",
            split=dead_split,
            detail="" if dead_tokens is None else f"never fired on {int(dead_tokens):,} tokens",
        )
    )
    for name, label in (
        ("ce_recovered", "CE loss recovered"),
        ("delta_ce", "delta CE (nats per token)"),
        ("kl", "KL to the clean model (nats per token)"),
    ):
        v, s, d = pick(name)
        rows.append(HeadlineRow("SAE", label, v, ".4f", split=s, detail=d))
    if m.get("refit_applied") is not None:
        rows.append(
            HeadlineRow(
                "SAE",
                "FVU after the decoder refit",
                _num(m.get("refit_fvu_after")),
                ".4f",
                control=_num(m.get("refit_fvu_before")),
                control_name="before the refit",
                split=HELD_OUT,
                detail=("kept" if m["refit_applied"] else "discarded: no better")
                + _tokens(m.get("refit_tokens"), ", fit on "),
            )
        )
    elif m.get("refit_skipped"):
        rows.append(
            HeadlineRow("SAE", "decoder refit", f"skipped: {m['refit_skipped']}", split=HELD_OUT)
        )
    converged = (sae_manifest or {}).get("converged", m.get("converged"))
    if converged is not None:
        changes = [
            f"{name} {100 * v:+.1f}%"
            for name, key in (("FVU", "converged_fvu_change"), ("L0", "converged_l0_change"))
            if (v := _num(m.get(key))) is not None
        ]
        rows.append(
            HeadlineRow(
                "SAE",
                "training",
                "converged" if bool(converged) else "not converged",
                split=TRAINING,
                detail=", ".join(
                    x
                    for x in (
                        _tokens(m.get("train_tokens")),
                        ("smoothed change before the LR decay: " + ", ".join(changes))
                        if changes
                        else "",
                    )
                    if x
                ),
            )
        )
    return rows


def _tokens(n: Any, prefix: str = "") -> str:
    v = _num(n)
    return "" if v is None else f"{prefix}{int(v):,} tokens"


def _control(analysis, level: str) -> pd.DataFrame | None:
    """The shuffled-label control's rows at ``level`` (None when not published)."""
    c = analysis.table("enrichment_control")
    if c is None or not len(c):
        return None
    c = c[c["level"].astype(str) == level]
    return c if len(c) else None


def _best_latents(analysis) -> list[HeadlineRow]:
    """Per label, the best non-generic latent at the analysis's lead level (token or
    document), beside the shuffled-label control: the smallest q any latent reached when the
    document labels were permuted."""
    if analysis is None:
        return []
    s = analysis.summary
    best = s.get("best_latents") or {}
    enr = analysis.enrichment
    if not best or enr is None or not len(enr):
        return []
    level = str(s.get("best_latents_level", "token"))
    lat = analysis.latents.set_index("latent")
    lead = enr[enr["level"].astype(str) == level].set_index(["latent", "label"])
    doc = enr[enr["level"].astype(str) == "document"].set_index(["latent", "label"])
    control = _control(analysis, level)
    shuffled_q = None if control is None else _num(control["min_q"].min())
    n_seeds = 0 if control is None else int(control["seed"].nunique())
    control_name = f"shuffled labels ({n_seeds} seeds), smallest q" if control is not None else ""
    split = split_mark(s.get("split"))
    rows = []
    observed = int((enr["level"].astype(str) == level).mul(enr["significant"]).sum())
    rows.append(
        HeadlineRow(
            "Latents",
            f"significant latent-label pairs ({level} level)",
            observed,
            ".3g",
            control=None if control is None else _num(control["n_significant"].mean()),
            control_name="" if control is None else f"shuffled labels, mean of {n_seeds} seeds",
            split=split,
            detail=f"q < {(analysis.manifest.get('config') or {}).get('alpha', 0.05)}",
        )
    )
    for label, j in best.items():
        if j is None:
            rows.append(
                HeadlineRow(
                    "Latents",
                    f"best latent: {label}",
                    "no significant non-generic latent",
                    split=split,
                    control=shuffled_q,
                    control_name=control_name,
                    spec=".2e",
                )
            )
            continue
        j = int(j)
        t = lead.loc[(j, label)] if (j, label) in lead.index else None
        purity, purity_on = _purity(t, level)
        d = doc.loc[(j, label)] if (j, label) in doc.index else None
        rows.append(
            HeadlineRow(
                "Latents",
                f"best latent: {label}",
                latent=j,
                split=split,
                spec=".2e",
                control=shuffled_q,
                control_name=control_name,
                tokens=str(lat.at[j, "top_tokens"]) if "top_tokens" in lat else "",
                extra={
                    "q": None if t is None else _num(t["q"]),
                    "purity": purity,
                    "doc AUROC": None if d is None else _num(d["auroc"]),
                },
                detail=f"{level} level" + purity_on + _tokens(s.get("n_tokens"), ", "),
            )
        )
    return rows


def _purity(t: pd.Series | None, level: str) -> tuple[float | None, str]:
    """The latent's top-set purity for the label and what it was measured on (the whole
    set's largest label share for analyses published without a top-set purity)."""
    if t is None:
        return None, ""
    if "top_purity" in t and _num(t["top_n"]) is not None:
        unit = "documents" if level == "document" else "tokens"
        return _num(t["top_purity"]), f", purity of its {int(t['top_n'])} strongest {unit}"
    return _num(t["purity"]), ", purity of its whole set"


def _probe(analysis) -> list[HeadlineRow]:
    if analysis is None:
        return []
    from integral_superposition.analysis.probe import mean_over_labels

    t = analysis.table("probe")
    means = mean_over_labels(t) if t is not None and len(t) else None
    rows = []
    for k in (1, 10):
        value = dense = interval = dense_interval = None
        detail = ""
        if t is not None and len(t):
            sel = t[(t["method"] == "sae") & (t["k"] == k)]
            den = t[t["method"] == "dense"]
            value = _num(sel["accuracy"].mean()) if len(sel) else None
            dense = _num(den["accuracy"].mean()) if len(den) else None
            interval = _mean_interval(means, "sae", k)
            dense_interval = _mean_interval(means, "dense", None)
            if "n_test" in t and len(sel):
                lo, hi = int(sel["n_test"].min()), int(sel["n_test"].max())
                n = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
                detail = f"{n} held-out documents per label, mean over labels"
        rows.append(
            HeadlineRow(
                "Sparse probing",
                f"accuracy, top {k} latent{'s' if k > 1 else ''}",
                value,
                ".3f",
                control=dense,
                control_name="dense probe",
                split=HELD_OUT if t is not None else None,
                detail=detail,
                interval=interval,
                control_interval=dense_interval,
            )
        )
    return rows


def _mean_interval(means: pd.DataFrame | None, method: str, k: int | None):
    """The 95% interval of a probe's mean accuracy over labels (``k=None``: any k)."""
    if means is None:
        return None
    m = means[(means["method"] == method) & ((means["k"] == k) if k is not None else True)]
    return (float(m["accuracy_low"].iloc[0]), float(m["accuracy_high"].iloc[0])) if len(m) else None


def _read_table(uri: str, name: str, storage_options) -> pd.DataFrame | None:
    path = storage.join(uri, name)
    if not storage.exists(path, storage_options):
        return None
    return pd.read_parquet(io.BytesIO(storage.read_bytes(path, storage_options)))


def read_merge_tables(
    merge_uri: str | None, storage_options=None
) -> tuple[pd.DataFrame | None, pd.DataFrame | None, dict[str, Any]]:
    """The merge's ``merge_eval`` and ``merge_sweep`` tables and its manifest (None, None, {}
    without a merge)."""
    if not merge_uri:
        return None, None, {}
    manifest = storage.read_manifest(merge_uri, storage_options)
    return (
        _read_table(merge_uri, "merge_eval.parquet", storage_options),
        _read_table(merge_uri, "merge_sweep.parquet", storage_options),
        manifest,
    )


def _merge(ev: pd.DataFrame | None, sweep: pd.DataFrame | None, manifest) -> list[HeadlineRow]:
    if ev is None or "sae" not in ev or not (ev["sae"] == "merged").any():
        return []
    merged = ev[ev["sae"] == "merged"].iloc[0]
    k_after = int(merged["n_latents"]) if _num(merged.get("n_latents")) is not None else None
    orig = ev[ev["sae"] == "original"]
    k_before = int(orig["n_latents"].iloc[0]) if len(orig) and "n_latents" in orig else None
    rand, at = None, None
    if sweep is not None and "partition" in sweep and k_after is not None:
        r = sweep[sweep["partition"] == "random"]
        if len(r):
            i = int(np.argmin(np.abs(r["k_prime"].to_numpy() - k_after)))
            rand, at = r.iloc[i], int(r["k_prime"].iloc[i])
    split = split_mark((manifest.get("config") or {}).get("eval_split", "test"))
    name = "random partition" + ("" if at is None or at == k_after else f" at K'={at}")
    detail = f"{k_before} -> {k_after} latents" if k_before and k_after else ""
    rows = []
    for col, label in (
        ("fvu", "merged FVU"),
        ("ce_recovered", "merged CE loss recovered"),
        ("enrichment_retention", "enrichment retained"),
    ):
        rows.append(
            HeadlineRow(
                "Merge",
                label,
                _num(merged.get(col)),
                ".4f",
                control=None if rand is None else _num(rand.get(col)),
                control_name="random partition" if rand is None else name,
                split=split,
                detail=detail,
            )
        )
    return rows


def _interval(lat: Mapping[str, Any], name: str) -> tuple[float, float] | None:
    for lo_key, hi_key in ((f"{name}_ci_low", f"{name}_ci_high"), (f"{name}_lo", f"{name}_hi")):
        lo, hi = _num(lat.get(lo_key)), _num(lat.get(hi_key))
        if lo is not None and hi is not None:
            return lo, hi
    ci = lat.get(f"{name}_ci")
    if isinstance(ci, list | tuple) and len(ci) == 2 and None not in ci:
        return float(ci[0]), float(ci[1])
    return None


def _lift_text(lat: Mapping[str, Any], key: str) -> str:
    """``", lift +0.19 [0.02, 0.34]"`` from ``lat[key]`` and its interval, or ``""``."""
    lift = _num(lat.get(key))
    if lift is None:
        return ""
    ci = _interval(lat, key)
    return f", lift {lift:+.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _steering(summary: Mapping[str, Any] | None) -> list[HeadlineRow]:
    if not summary:
        return []
    bound = _num(summary.get("ppl_ratio_max")) or 2.0
    judge = ((summary.get("classifier") or {}).get("generations") or {}).get("can_judge")
    rows = []
    for lat in summary.get("latents") or []:
        detail = (
            f"generations from {summary['n_prompts']} neutral prompts"
            if summary.get("n_prompts")
            else "generations from neutral prompts"
        )
        if _num(lat.get("n")) is not None:
            detail += f", {int(lat['n'])} per strength"
        base = _num(lat.get("baseline_share"))
        if base is not None:
            detail += f"; unsteered {base:.2f}"
            none = _num(lat.get("baseline_abstain"))
            if none:  # an abstaining classifier: the share of unsteered text of no label
                detail += f" ({none:.2f} no label)"
            detail += _lift_text(lat, "best_lift")
        conf = _num(lat.get("confirmed_share"))
        if conf is not None:  # the best strength again, on samples its choice never saw
            ci = _interval(lat, "confirmed_share")
            detail += f"; on fresh samples {conf:.2f}" + (
                f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            )
            ratio = _num(lat.get("confirmed_ppl_ratio"))
            if ratio is not None:
                detail += f" at perplexity x{ratio:.2f}"
        text = _num(lat.get("best_text_share"))
        if text is not None:  # the second judge, which reads the words alone
            detail += f"; text judge {text:.2f}"
            rand_text = _num(lat.get("random_text_share_at_best"))
            if rand_text is not None:
                detail += f" (random {rand_text:.2f})"
        own = _num(lat.get("own_label_share_at_best"))
        if own is not None:
            detail += f"; on its own label's prompts {own:.2f}"
            own_base = _num(lat.get("own_label_baseline_share"))
            if own_base is not None:
                detail += f" against {own_base:.2f} unsteered"
            detail += _lift_text(lat, "own_label_lift_at_best")
        if judge is False:
            detail += "; the classifier failed its check on unsteered generations"
        elif lat.get("classifier_valid") is False:
            detail += "; the classifier cannot judge this label" + (
                f" ({lat['classifier_note']})" if lat.get("classifier_note") else ""
            )
        group = lat.get("members") or []
        steered = (
            latent_list(group, "+", "L", limit=4) if len(group) > 1 else f"L{lat.get('latent')}"
        )
        rand = lat.get("random_members") or [lat.get("random_latent", "")]
        n_draws = len(lat.get("random_draws") or [])
        rows.append(
            HeadlineRow(
                "Steering",
                f"share of '{lat.get('label')}' steering {steered} at <= {bound:g}x perplexity",
                _num(lat.get("best_share")),
                ".2f",
                interval=_interval(lat, "best_share"),
                control=_num(lat.get("random_share_at_best")),
                control_interval=_interval(lat, "random_share_at_best"),
                control_lift=_num(lat.get("random_lift_at_best")),
                control_lift_interval=_interval(lat, "random_lift_at_best"),
                control_name=(
                    f"random latent{'s' if len(rand) > 1 else ''} " + latent_list(rand, limit=4)
                ).strip()
                + (
                    f" and {n_draws - 1} more draw{'s' if n_draws > 2 else ''}"
                    if n_draws > 1
                    else ""
                ),
                latent=None if lat.get("latent") is None else int(lat["latent"]),
                split=HELD_OUT,
                detail=detail,
            )
        )
    return rows


def read_steering_summary(steering_uri: str | None, storage_options=None) -> dict[str, Any]:
    """The steering output's ``summary.json`` (its manifest's summary when absent)."""
    if not steering_uri:
        return {}
    path = storage.join(steering_uri, "summary.json")
    if storage.exists(path, storage_options):
        return dict(storage.read_json(path, storage_options))
    return dict(storage.read_manifest(steering_uri, storage_options).get("summary") or {})


def headline_rows(
    sae_manifest: Mapping[str, Any] | None = None,
    analysis=None,
    merge: str | None = None,
    steering: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[HeadlineRow]:
    """The headline table's rows, group by group (see the module docstring). ``analysis``: a
    loaded :class:`~integral_superposition.analysis.result.AnalysisResult`; ``merge`` and
    ``steering``: URIs of published merge and steering outputs."""
    ev, sweep, merge_manifest = read_merge_tables(merge, storage_options)
    rows = _sae_metrics(sae_manifest, analysis, ev)
    rows += _best_latents(analysis)
    rows += _probe(analysis)
    rows += _merge(ev, sweep, merge_manifest)
    rows += _steering(read_steering_summary(steering, storage_options))
    return rows
