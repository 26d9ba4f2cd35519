"""The steering runner: evaluate steering with an SAE (``steering.sweep.evaluate_steering``)
and publish it through :class:`~integral_superposition.outputs.OutputWriter`; read it back
with :func:`load_steering` (:class:`SteeringResult`); :func:`side_by_side` and the report's
:func:`steering_section`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from integral_superposition.outputs import Output, OutputWriter
from integral_superposition.pipelines.inputs import load_inputs
from integral_superposition.progress import ProgressFn
from integral_superposition.steering.plot import plot_sweep
from integral_superposition.steering.sweep import SteeringEval, SteeringParams, evaluate_steering
from integral_superposition.viz.templates import latent_list

log = logging.getLogger(__name__)

__all__ = [
    "SteeringResult",
    "load_steering",
    "run_steering_eval",
    "side_by_side",
    "steering_section",
]


# -- publishing and reading -------------------------------------------------------------------------
def run_steering_eval(
    sae_uri: Any,
    store_uri: Any,
    out_uri: str,
    params: SteeringParams | Mapping[str, Any] | None = None,
    *,
    backend,
    storage_options: Mapping[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
    allow_other_store: bool = False,
) -> dict[str, Any]:
    """Evaluate steering of the SAE at ``sae_uri`` (trained on the store at ``store_uri``)
    and publish the sweep to ``out_uri``; returns the manifest (``kind="steering"``). The
    store must be the SAE's training store (``check_training_store``), unless
    ``allow_other_store=True``.

    Files: ``sweep.parquet``, ``generations.parquet``, ``latents.parquet``,
    ``vocabulary.parquet``, ``classifier_check.parquet``, ``check_generations.parquet``,
    ``classifier_fit_generations.parquet`` (when the classifier was fitted on continuations),
    ``sweep.png``, ``sweep.svg``, ``summary.json``; the manifest is
    written last. ``sae_uri``/``store_uri`` may also be a loaded SAE / store. Inputs are
    checked before anything is written; on failure the files written so far are removed.
    """
    p = (
        params
        if isinstance(params, SteeringParams)
        else SteeringParams.model_validate(dict(params or {}))
    )
    if backend is None or not hasattr(backend, "generate"):
        raise TypeError(f"backend={backend!r}: expected a causal LM backend (backends.HFCausalLM)")
    sae, sae_info, store = load_inputs(sae_uri, store_uri, storage_options, allow_other_store)
    if str(out_uri).rstrip("/") in {
        str(sae_info["uri"] or "").rstrip("/"),
        *[u.rstrip("/") for u in store.uris],
    }:
        raise ValueError(f"out_uri={out_uri!r} is an input folder: expected a new location")
    # entering unpublishes an earlier evaluation there; a failure removes what was written
    # a user's file of one of these names is refused before the (long) evaluation
    with OutputWriter(out_uri, "steering", storage_options, names=STEERING_FILES) as out:
        ev = evaluate_steering(backend, sae, store, p, on_progress=on_progress)
        out.parquet("sweep.parquet", ev.table)
        out.parquet("generations.parquet", ev.generations)
        out.parquet("latents.parquet", ev.picks)
        out.parquet("vocabulary.parquet", ev.vocabulary)
        out.parquet("classifier_check.parquet", ev.check)
        out.parquet("check_generations.parquet", ev.check_generations)
        if ev.fit_generations is not None:
            out.parquet("classifier_fit_generations.parquet", ev.fit_generations)
        if ev.pilot is not None:
            out.parquet("pilot.parquet", ev.pilot)
        out.figure("sweep", ev.figure())
        out.json("summary.json", ev.summary)
        return out.publish(
            p,
            sae=sae_info,
            activations={"uris": list(store.uris), "content_hash": store.content_hash, "hook_point": store.hook_point},
            model=backend.describe() if hasattr(backend, "describe") else None,
            summary={k: ev.summary[k] for k in ("hook_point", "classifier", "latents")},
        )  # fmt: skip


STEERING_FILES = (
    "sweep.parquet",
    "generations.parquet",
    "latents.parquet",
    "vocabulary.parquet",
    "classifier_check.parquet",
    "check_generations.parquet",
    "classifier_fit_generations.parquet",
    "pilot.parquet",
    "sweep.png",
    "sweep.svg",
    "summary.json",
)
"""The files of a published steering evaluation."""


class SteeringResult(Output):
    """A published steering evaluation, read lazily: ``manifest``, ``summary`` and the tables
    ``sweep``, ``generations``, ``picks``, ``vocabulary``, ``check`` (the classifier on
    unsteered generations), ``check_generations`` and ``headline`` as DataFrames."""

    kind = "steering"

    @property
    def sweep(self) -> pd.DataFrame:
        return self.parquet("sweep.parquet")

    table = sweep

    @property
    def generations(self) -> pd.DataFrame:
        return self.parquet("generations.parquet")

    @property
    def picks(self) -> pd.DataFrame:
        return self.parquet("latents.parquet")

    @property
    def vocabulary(self) -> pd.DataFrame:
        return self.parquet("vocabulary.parquet")

    @property
    def check(self) -> pd.DataFrame:
        """The classifier on unsteered continuations of each label's own prompts, beside its
        recall on held-out documents (one row per label)."""
        return self.parquet("classifier_check.parquet")

    @property
    def check_generations(self) -> pd.DataFrame:
        return self.parquet("check_generations.parquet")

    @property
    def fit_generations(self) -> pd.DataFrame | None:
        """The continuations of training documents the classifier was fitted on (None when
        it was fitted on documents alone)."""
        if "classifier_fit_generations.parquet" not in self.manifest.get("files", {}):
            return None
        return self.parquet("classifier_fit_generations.parquet")

    @property
    def pilot(self) -> pd.DataFrame | None:
        """The pilot among each label's candidate latents (None when it ran none)."""
        if "pilot.parquet" not in self.manifest.get("files", {}):
            return None
        return self.parquet("pilot.parquet")

    @property
    def headline(self) -> pd.DataFrame:
        """One row per steered latent (``summary["latents"]``): ``latent, label, n,
        baseline_share(_lo, _hi), best_strength, best_share(_lo, _hi), best_ppl_ratio,
        best_lift(_lo, _hi), random_latent, random_share_at_best(_lo, _hi),
        random_lift_at_best(_lo, _hi), own_label_baseline_share, own_label_share_at_best(_lo,
        _hi), own_label_lift_at_best(_lo, _hi), classifier_valid, classifier_note,
        classifier_recall(_lo, _hi)`` (the classifier's accuracy on continuations of held-out
        documents of the label), and the second judge's (words only) ``baseline_text_share``,
        ``best_text_share(_lo, _hi)``, ``best_text_lift(_lo, _hi)`` and
        ``random_text_share_at_best(_lo, _hi)`` (None without it)
        (``best_*``, ``random_*`` and ``own_label_*_at_best`` are None when no strength stays
        fluent). A ``*_lift*`` is the share minus the unsteered share of the same prompts,
        with its 95% interval for paired continuations."""
        return pd.DataFrame(self.summary.get("latents", []))

    @property
    def summary(self) -> dict[str, Any]:
        return self.json("summary.json")

    def figure(self) -> Figure:
        """The sweep plot, redrawn from the table (the PNG/SVG are ``read('sweep.png')``)."""
        return plot_sweep(self.sweep, self.summary.get("ppl_ratio_max"))


def load_steering(uri: str, storage_options: Mapping[str, Any] | None = None) -> SteeringResult:
    """Open a published steering evaluation."""
    return SteeringResult(uri, storage_options)


def side_by_side(
    result: SteeringEval | SteeringResult | str,
    latent: int | None = None,
    strength: float | None = None,
    *,
    prompts: str = "neutral",
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Unsteered and steered continuations of the same prompts: ``prompt, unsteered, steered``.

    ``latent``: default the first steered latent. ``strength``: default the summary's best
    strength within the fluency bound (else the largest). ``prompts``: ``neutral`` or
    ``own_label``.
    """
    if isinstance(result, str):
        result = load_steering(result, storage_options)
    g = result.generations
    summ = {int(s["latent"]): s for s in result.summary.get("latents", [])}
    if latent is None:
        latent = int(g.loc[g["control"] == "steer", "latent"].iloc[0])
    if latent not in set(g["latent"].astype(int)):
        raise ValueError(
            f"latent={latent}: not steered in this evaluation (latents {sorted(summ)})"
        )
    steered_rows = g[
        (g["latent"] == latent)
        & (g["prompts"] == prompts)
        & g["strength"].notna()
        & g["control"].isin(["steer", "own_label"])
    ]
    if strength is None:
        best = summ.get(latent, {}).get("best_strength")
        strength = float(best) if best is not None else float(steered_rows["strength"].max())
    st = steered_rows[np.isclose(steered_rows["strength"], strength)]
    if st.empty:
        raise ValueError(
            f"strength={strength}: not in the sweep {sorted(steered_rows['strength'].unique())}"
        )
    base_control = "unsteered" if prompts == "neutral" else "own_label"
    base = g[
        (g["latent"] == latent)
        & (g["control"] == base_control)
        & g["strength"].isna()
        & (g["prompts"] == prompts)
    ]
    label = str(st["label"].iloc[0])
    return pd.DataFrame(
        {
            "prompt": st["prompt"].to_numpy(),
            "unsteered": base["text"].to_numpy()[: len(st)],
            f"steered ({latent} {label}, strength {strength:g})": st["text"].to_numpy(),
        }
    )


def _ci(lat: Mapping[str, Any], key: str) -> str:
    lo, hi = lat.get(f"{key}_lo"), lat.get(f"{key}_hi")
    return f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""


def _lift(lat: Mapping[str, Any], key: str) -> str:
    """`` (lift +0.12 [-0.02, 0.25])``: a share's difference from the unsteered share of the
    same prompts, with its interval (empty when not published)."""
    v = lat.get(key)
    return f" (lift {v:+.2f}{_ci(lat, key)})" if v is not None else ""


def _none(lat: Mapping[str, Any], key: str) -> str:
    """`` (0.85 no label)``: the share the classifier assigned to no label (empty when it
    cannot abstain)."""
    v = lat.get(key)
    return f" ({v:.2f} no label)" if v else ""


def _draws(lat: Mapping[str, Any]) -> str:
    """The random control's draws when it pooled several: ``" (1 of 3 draws; by draw 0.10,
    0.04, 0.06)"``, else ``""``."""
    shares = lat.get("random_draw_shares_at_best") or []
    if len(shares) < 2:
        return ""
    return f" (1 of {len(shares)} draws; by draw {', '.join(f'{x:.2f}' for x in shares)})"


def _latent_line(lat: Mapping[str, Any]) -> str:
    """One sentence per steered latent: unsteered share, the best fluent share and each
    control at that strength, each with its 95% interval and its lift over the unsteered
    share of the same prompts."""
    best = lat.get("best_strength")
    group = lat.get("members") or [lat["latent"]]
    who = (
        f"Latent {lat['latent']}" if len(group) == 1 else f"Latents {latent_list(group)}, together"
    )
    line = (
        f"{who} ({lat['label']}): share {lat['baseline_share']:.2f}"
        f"{_ci(lat, 'baseline_share')} unsteered" + _none(lat, "baseline_abstain")
    )
    if best is not None:
        line += (
            f", {lat['best_share']:.2f}{_ci(lat, 'best_share')}{_lift(lat, 'best_lift')}"
            f"{_none(lat, 'best_abstain')} at "
            f"strength {best:.3g}"
            + (
                ", refined between the grid's"
                if best in (lat.get("refined_strengths") or [])
                else ""
            )
            + f" (perplexity x{lat['best_ppl_ratio']:.2f})"
        )
        if lat.get("random_share_at_best") is not None:
            line += (
                f"; random latent{'s' if len(group) > 1 else ''} "
                f"{latent_list(lat.get('random_members') or [lat['random_latent']])}"
                + _draws(lat)
                + " at that strength: "
                f"{lat['random_share_at_best']:.2f}{_ci(lat, 'random_share_at_best')}"
                f"{_lift(lat, 'random_lift_at_best')}" + _none(lat, "random_abstain_at_best")
            )
        if lat.get("own_label_share_at_best") is not None:
            line += (
                f"; on its own label's prompts: {lat['own_label_share_at_best']:.2f}"
                f"{_ci(lat, 'own_label_share_at_best')}"
                f"{_lift(lat, 'own_label_lift_at_best')} against "
                f"{lat['own_label_baseline_share']:.2f} unsteered"
            )
        if lat.get("confirmed_share") is not None:
            ratio = lat.get("confirmed_ppl_ratio")
            line += (
                f"; that strength again on fresh samples: {lat['confirmed_share']:.2f}"
                f"{_ci(lat, 'confirmed_share')}{_lift(lat, 'confirmed_lift')}"
                + (f" (perplexity x{ratio:.2f})" if ratio is not None else "")
            )
    else:
        line += ", no strength within the fluency bound"
    line += "."
    if lat.get("best_text_share") is not None:
        line += (
            f" The text judge (words only) gives {lat['best_text_share']:.2f}"
            f"{_ci(lat, 'best_text_share')}{_lift(lat, 'best_text_lift')} at that strength"
        )
        if lat.get("random_text_share_at_best") is not None:
            line += (
                f" and {lat['random_text_share_at_best']:.2f}"
                f"{_ci(lat, 'random_text_share_at_best')} to the random control"
            )
        line += f", against {lat['baseline_text_share']:.2f} unsteered."
    if lat.get("classifier_recall") is not None:
        line += (
            f" The classifier labels {lat['classifier_recall']:.2f}"
            f"{_ci(lat, 'classifier_recall')} of unsteered continuations of held-out "
            f"{lat['label']} documents' openings {lat['label']}."
        )
    if lat.get("classifier_valid") is False:
        line += (
            " Not evidence: the classifier cannot judge generations toward this label ("
            f"{lat.get('classifier_note') or 'see the classifier check'})."
        )
    return line


def steering_section(
    result: SteeringEval | SteeringResult | str, storage_options: Mapping[str, Any] | None = None
):
    """A :class:`~integral_superposition.viz.report.ReportSection` with the sweep table, the
    plot and side-by-side generations of every steered latent."""
    from integral_superposition.viz.section import ReportSection

    if isinstance(result, str):
        result = load_steering(result, storage_options)
    s = result.summary
    clf = s.get("classifier", {})
    check = clf.get("generations") or {}
    lines = [
        f"Steering at {s.get('hook_point')} ({s.get('mode')}, positions {s.get('positions')}) over "
        f"{s.get('n_prompts')} neutral prompts x {s.get('samples_per_prompt', 1)} samples. "
        f"Shares are the fraction of continuations the label classifier assigns to the target "
        f"label, with 95% Wilson intervals"
        + (
            " (a continuation the classifier assigns to no label, 'none', is a miss)"
            if clf.get("abstain")
            else ""
        )
        + f". Label classifier (fitted on {clf.get('fitted_on', 'documents')}"
        + (
            f", and on {clf.get('n_none_generations')} continuations of topic-neutral openings "
            "as 'none'"
            if clf.get("abstain")
            else ", a forced choice among the labels"
        )
        + "): held-out accuracy "
        f"{clf.get('held_out_accuracy', float('nan')):.3f} on {clf.get('n_test_docs')} documents "
        f"(chance {clf.get('chance', float('nan')):.2f})."
    ]
    if clf.get("neutral"):
        lines.append(
            "On unsteered continuations of the neutral prompts it predicts: "
            + ", ".join(f"{k} {v:.2f}" for k, v in clf["neutral"].items())
            + "."
        )
    if check:
        recall = ", ".join(f"{k} {v:.2f}" for k, v in (check.get("recall") or {}).items())
        lines.append(
            "On unsteered continuations of each label's own prompts it predicts the prompt's "
            f"label for: {recall} (judged when at least chance + {check.get('margin', 0):.2f})."
            + (
                f" It predicts {check['dominant_label']} for most continuations whatever the "
                "prompt: it cannot judge generations."
                if check.get("dominant_label")
                else ""
            )
        )
    for lat in s.get("latents", []):
        lines.append(_latent_line(lat))
    cols = [
        "latent", "label", "control", "strength", "n", "share", "share_lo", "share_hi",
        "lift", "lift_lo", "lift_hi", "abstain", "vocab_mass", "perplexity", "ppl_ratio", "distinct2", "stopped", "refined", "classifier_valid",
    ]  # fmt: skip
    table = result.table[[c for c in cols if c in result.table.columns]].round(4)
    tables = [
        (
            "Strength sweep with controls (share: 95% interval share_lo..share_hi; lift: share "
            "minus the unsteered share of the same prompts, 95% interval lift_lo..lift_hi)",
            table,
        )
    ]
    try:
        check_table = result.check
    except FileNotFoundError:  # published before the classifier check existed
        check_table = None
    if check_table is not None and len(check_table):
        tables.append(
            (
                "Label classifier on unsteered continuations of each label's own prompts "
                "(to_*: share predicted as each label) beside its recall on held-out documents",
                check_table.round(3),
            )
        )
    gens = []
    for lat in s.get("latents", []):
        try:
            gens.append(side_by_side(result, int(lat["latent"])))
        except ValueError:
            continue
    frame = pd.concat(gens, ignore_index=True) if gens else None
    if frame is not None:  # one steered column per latent: merge them under one header
        steered = frame.filter(like="steered (").bfill(axis=1).iloc[:, 0]
        frame = pd.DataFrame(
            {"prompt": frame["prompt"], "unsteered": frame["unsteered"], "steered": steered}
        )
    return ReportSection(
        "Steering",
        text="\n\n".join(lines),
        tables=tables,
        figures=[("Effect against perplexity", result.figure())],
        generations=frame,
        anchor="steering",
    )
