"""The report's sections built from published outputs: the analysis (metrics, figures,
probing, generic and top latents per label) and the SAE (training curve, evaluation), and the
summary tables of an analysis."""

from __future__ import annotations

import io
import os
import posixpath
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from markupsafe import Markup

from integral_superposition import storage
from integral_superposition.viz.headline import split_mark
from integral_superposition.viz.section import ReportSection
from integral_superposition.viz.templates import (
    MAX_TOKEN_CHARS,
    MISSING,
    cut_markup,
    display_token,
    fmt,
)

__all__ = [
    "analysis_sections",
    "as_analysis",
    "find_history",
    "load_sae_manifest",
    "probe_table",
    "relative_link",
    "sae_sections",
    "summary_tables",
    "training_section",
]


def relative_link(from_dir: str, target: str) -> str:
    """A link from a page in ``from_dir`` to ``target``: relative when both are local or on the
    same object-store bucket, else the target's URI."""
    if storage.is_local(from_dir) and storage.is_local(target):
        return os.path.relpath(storage.get_fs(target)[1], storage.get_fs(from_dir)[1]).replace(
            os.sep, "/"
        )
    if "://" in from_dir and "://" in target:
        p1, r1 = from_dir.split("://", 1)
        p2, r2 = target.split("://", 1)
        if p1 == p2 and r1.split("/", 1)[0] == r2.split("/", 1)[0]:
            return posixpath.relpath(r2, r1)
    return target


# -- sections from published outputs -----------------------------------------------------------
def as_analysis(analysis: Any, storage_options):
    from integral_superposition.analysis.result import AnalysisResult, load_analysis

    if analysis is None or isinstance(analysis, AnalysisResult):
        return analysis
    return load_analysis(str(analysis), storage_options)


def summary_tables(
    analysis: Any, top_per_label: int = 10, storage_options=None
) -> dict[str, pd.DataFrame]:
    """The summary's tables: ``metrics`` (name, value) and ``top_latents`` (per label, the
    most significant latents with q, log odds, purity, AUROC, density and top tokens)."""
    a = as_analysis(analysis, storage_options)
    s = a.summary
    metrics = dict(s.get("metrics", {}))
    metrics.update(
        {
            "latents": s.get("n_latents"),
            "dead latents": s.get("n_dead"),
            "tokens for the dead count": s.get("dead_tokens"),
            "latents enriched (q<alpha)": s.get("n_significant_latents"),
            "median L0": (s.get("l0") or {}).get("median"),
            "tokens analysed": s.get("n_tokens"),
        }
    )
    mt = pd.DataFrame({"metric": list(metrics), "value": [_scalar(v) for v in metrics.values()]})
    out = {"metrics": mt}
    enr = a.enrichment
    lat = a.latents
    generic = lat["generic"].to_numpy(dtype=bool) if "generic" in lat else None
    if generic is not None and generic.any():
        g = lat.loc[generic]
        cols = ["latent", "generic_token", "generic_token_share", "generic_min_label_fraction"]
        cols = [c for c in cols if c in g] + [
            c for c in ("best_label", "density", "top_tokens") if c in g
        ]
        out["generic_latents"] = g[cols].reset_index(drop=True)
    probe = probe_table(a)
    if probe is not None:
        out["probe"] = probe
    if enr is not None and len(enr):
        tok = enr[(enr["level"] == "token") & enr["significant"] & (enr["log_odds"] > 0)]
        if generic is not None:  # a label's best latents are topical ones
            tok = tok[~generic[tok["latent"].to_numpy()]]
        tok = tok.sort_values(["label_id", "q", "log_odds"], ascending=[True, True, False])
        top = tok.groupby("label_id", observed=True).head(top_per_label)
        cols = ["latent", "top_tokens", "density"] + (
            ["promoted_tokens"] if "promoted_tokens" in lat else []
        )
        top = top.merge(lat[cols], on="latent", how="left")
        out["top_latents"] = top[
            ["label", "latent", "q", "log_odds", "frac_in_set", "auroc", "density", "top_tokens"]
            + (["promoted_tokens"] if "promoted_tokens" in top else [])
        ].reset_index(drop=True)
    return out


def probe_table(analysis: Any, ks: tuple[int, int] = (1, 10)) -> pd.DataFrame | None:
    """Per label, held-out accuracy (with its 95% Wilson interval) and F1 of the sparse probes
    on the top ``ks`` latents, of the probe on ``ks[-1]`` random live latents and of the dense
    probe, with a mean row (None when the analysis has no probe table)."""
    from integral_superposition.analysis.probe import mean_over_labels, wilson_interval

    t = analysis.table("probe")
    if t is None or not len(t):
        return None
    cols: dict[str, pd.Series] = {}
    means = mean_over_labels(t)
    mean_row: dict[str, Any] = {}
    by = t.set_index("label")
    picks = [("sae", k, f"k={k}") for k in ks] + [("random", ks[-1], f"random k={ks[-1]}")]
    for method, k, name in [*picks, ("dense", None, "dense")]:  # dense: k is the raw width
        pick = (by["method"] == method) & (by["k"] == k if k is not None else True)
        r = by[pick]
        # accuracy = correct / n_test exactly, so the count comes back from the two
        ci = [
            wilson_interval(round(a * n), int(n))
            for a, n in zip(r["accuracy"], r["n_test"], strict=True)
        ]
        cols[f"{name} acc"] = r["accuracy"]
        cols[f"{name} acc 95% CI"] = pd.Series([_interval(*c) for c in ci], index=r.index)
        cols[f"{name} F1"] = r["f1"]
        m = means[(means["method"] == method) & (means["k"] == k if k is not None else True)]
        if len(m):
            mean_row[f"{name} acc 95% CI"] = _interval(
                m["accuracy_low"].iloc[0], m["accuracy_high"].iloc[0]
            )
    n = by.groupby(level=0)["n_test"].first()
    out = pd.DataFrame(cols).reindex(n.index)
    out.insert(0, "test docs", n)
    out.loc["mean"] = out.mean(numeric_only=True)
    out.loc["mean", "test docs"] = float(n.iloc[0]) if n.nunique() == 1 else None
    for col, text in mean_row.items():
        out.loc["mean", col] = text
    return out.reset_index(names="label")


def _interval(low: float, high: float) -> str:
    """A 95% interval as table text: ``0.812-0.901``."""
    return f"{low:.3f}-{high:.3f}"


def _scalar(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.6g}") if np.isfinite(v) else None
    return v


def analysis_sections(
    analysis: Any, report_dir: str | None = None, top_per_label: int = 10, storage_options=None
) -> list[ReportSection]:
    """Report sections of a published analysis: metrics, distributions, enrichment heatmap,
    2-D map and the top latents per label (linked to their dashboards from ``report_dir``)."""
    a = as_analysis(analysis, storage_options)
    tables = summary_tables(a, top_per_label)
    split = split_mark(a.summary.get("split"))
    sections = []
    figs = [(cap, a.figure(name)) for cap, name in (
        ("Latent density (log10)", "density_hist"), ("Active latents per token", "l0_hist"),
        ("Decoder geometry", "decoder_geometry"))]  # fmt: skip
    sections.append(
        ReportSection("Latent statistics", figures=[(c, f) for c, f in figs if f is not None])
    )
    if a.figure("enrichment_heatmap") is not None:
        sections.append(
            ReportSection(
                "Label enrichment",
                figures=[
                    ("latent x label log odds; dots: q < alpha", a.figure("enrichment_heatmap"))
                ],
            )
        )
    maps = [
        (c, a.figure(n))
        for c, n in (
            ("2-D map by most enriched label", "latent_map"),
            ("2-D map by cluster", "latent_map_clusters"),
            ("Co-activation", "coactivation_heatmap"),
        )
    ]
    sections.append(ReportSection("Latent map", figures=[(c, f) for c, f in maps if f is not None]))
    sections.append(
        ReportSection(
            "Metrics",
            text="Every metric of the analysis, on the analysed tokens.",
            tables=[tables["metrics"]],
            anchor="metrics",
            split=split,
        )
    )
    if "probe" in tables:
        sections.append(
            ReportSection(
                "Sparse probing",
                text=(
                    "Held-out document classification per label (one vs rest, class-balanced, "
                    "as SAEBench): logistic probes on the k latents with the largest difference "
                    "of class means on the training documents, on k random live latents, and "
                    "on the raw activations; every feature is the mean over the document. "
                    "Accuracy on the balanced documents of the store's test split (chance 0.5) "
                    "with its 95% Wilson interval (the mean row's counts every label's test "
                    "documents), F1 of the label."
                ),
                tables=[tables["probe"]],
                anchor="sparse-probing",
                split="held-out",
            )
        )
    if "generic_latents" in tables:
        sections.append(
            ReportSection(
                "Generic latents",
                text=(
                    "Latents whose top contexts are dominated by one token that is frequent "
                    "in every label and that fire on that token in every label alike "
                    "(formatting or dataset artefacts); they are left out of the top latents "
                    "per label."
                ),
                tables=[tables["generic_latents"]],
                anchor="generic-latents",
            )
        )
    grouped = a.top_latents
    has_grouped = grouped is not None and len(grouped) > 0
    if has_grouped or "top_latents" in tables:
        if has_grouped:
            top = grouped.merge(
                a.latents[["latent", "density", "top_tokens"]], on="latent", how="left"
            )
            unit = str(top["unit"].iloc[0]) if "unit" in top else "token"
            text = (
                f"Per label, the best non-generic latents at the {unit} level, one row per "
                "group of near-duplicate latents (decoder cosine and co-firing), led by its "
                "best member."
            )
            if "top_purity" in top:
                best_q = (a.manifest.get("config") or {}).get("best_q")
                text += (
                    " Best means significant and specific: latents with q below "
                    f"{fmt(best_q, '.0e')} first, by top-set purity (the label's share of the "
                    f"latent's N strongest {unit}s, N in the column), ties to the smaller q; "
                    "'in set' counts every "
                    f"{unit} where the latent fires."
                )
        else:
            top, text = (
                tables["top_latents"],
                ("Per label, the most significant non-generic latents (token-level enrichment)."),
            )
        latent_cells = []
        for j in top["latent"].astype(int):
            page = a.dashboard_uri(int(j))
            href = relative_link(report_dir, page) if page and report_dir else page
            latent_cells.append(Markup('<a href="{}">L{}</a>').format(href, j) if href else f"L{j}")
        columns = {
            "label": top["label"].astype(str),
            # object columns: pandas would turn the Markup cells into plain (escaped) str
            "latent": pd.Series(latent_cells, dtype=object),
            "q": [fmt(v, ".2e") for v in top["q"]],
            "log odds": [fmt(v, ".2f") for v in top["log_odds"]],
        }
        if "frac_in_set" in top:
            columns["in set"] = [fmt(v, ".2f") for v in top["frac_in_set"]]
        else:
            columns["in set"] = [
                f"{fmt(a_, 'd')}/{fmt(n, 'd')}"
                for a_, n in zip(top["in_set"], top["set_size"], strict=True)
            ]
        if "top_purity" in top:
            columns["top-set purity (N)"] = [
                f"{fmt(v, '.2f')} ({fmt(n, 'd')})"
                for v, n in zip(top["top_purity"], top["top_n"], strict=True)
            ]
        columns["AUROC"] = [fmt(v, ".3f") for v in top["auroc"]]
        if "group_size" in top:
            columns["near-duplicates"] = [
                "" if int(g) <= 1 else ", ".join(f"L{int(m)}" for m in list(ms)[1:])
                for g, ms in zip(top["group_size"], top["members"], strict=True)
            ]
        columns["density"] = [fmt(v, ".2e") for v in top["density"]]
        columns["top tokens"] = pd.Series(
            [
                Markup('<span class="tok">{}</span>').format(
                    cut_markup(display_token(str(t)), 4 * MAX_TOKEN_CHARS)
                )
                for t in top["top_tokens"]
            ],
            dtype=object,
        )
        shown = pd.DataFrame(columns)
        index = a.dashboard_uri()
        links = (
            [
                (
                    "all latents (dashboard index)",
                    relative_link(report_dir, index) if report_dir else index,
                )
            ]
            if index
            else []
        )
        sections.append(
            ReportSection(
                "Top latents per label",
                text=text,
                tables=[shown],
                links=links,
                anchor="top-latents",
                split=split,
            )
        )
    return sections


def load_sae_manifest(
    sae_uri: str, storage_options
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The SAE's manifest (None for a folder without ours) and its SAELens ``cfg.json``."""
    from integral_superposition.sae import read_sae_manifest

    try:
        m = read_sae_manifest(sae_uri, storage_options)
    except (FileNotFoundError, ValueError):
        m = None
    cfg_uri = storage.join(sae_uri, "cfg.json")
    cfg = (
        storage.read_json(cfg_uri, storage_options)
        if storage.exists(cfg_uri, storage_options)
        else {}
    )
    return m, cfg


def sae_sections(
    sae_uri: str, manifest: Mapping[str, Any] | None, history: pd.DataFrame | None, storage_options
) -> list[ReportSection]:
    """The training curve (with the converged flag) and the SAE's full evaluation table."""
    out = []
    if history is None and manifest is not None:
        history = find_history(sae_uri, manifest, storage_options)
    if history is not None and len(history):
        out.append(training_section(history, manifest))
    metrics = (manifest or {}).get("metrics") or {}
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, dict | list) and k != "split"}
    if scalars:
        split = split_mark(metrics.get("split")) if "fvu" in metrics else "training"
        out.append(
            ReportSection(
                "SAE evaluation",
                text="Every metric the SAE was published with (train_* on training batches).",
                tables=[
                    pd.DataFrame(
                        {"metric": list(scalars), "value": [_text(v) for v in scalars.values()]}
                    )
                ],
                anchor="sae-metrics",
                split=split,
            )
        )
    return out


def _text(v: Any) -> str:
    """A metric value as text: numbers to 6 significant digits, missing as ``-``."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return fmt(float(v), ".6g")
    return MISSING if v is None else str(v)


def training_section(history: pd.DataFrame, manifest: Mapping[str, Any] | None) -> ReportSection:
    from integral_superposition.viz.distributions import training_curves

    m = manifest or {}
    converged = m.get("converged", (m.get("metrics") or {}).get("converged"))
    flag = (
        "convergence not recorded"
        if converged is None
        else ("converged" if bool(converged) else "not converged")
    )
    text = f"Training: {flag}."
    if m.get("converged_rule"):
        text += f" Converged means: {m['converged_rule']}."
    shown = [c for c in ("loss", "fvu", "l0", "dead_frac", "lr") if c in history]
    return ReportSection(
        f"Training curve ({flag})",
        text=text,
        figures=[(f"training curve ({flag})", training_curves(history, columns=shown or None))],
        anchor="training",
        split="training",
    )


def find_history(sae_uri: str, manifest: Mapping[str, Any], storage_options) -> pd.DataFrame | None:
    """A training history table published with the SAE (``*history*``/``*log*``/``*curve*``
    as Parquet, CSV or JSON lines), or a ``history``/``training_curve`` list in its manifest."""
    for key in ("history", "training_curve"):
        if isinstance(manifest.get(key), list) and manifest[key]:
            return pd.DataFrame(manifest[key])
    for name in sorted(manifest.get("files", {})):
        base = posixpath.basename(name).lower()
        if not re.search(r"(history|log|curve)", base):
            continue
        data = storage.read_bytes(storage.join(sae_uri, name), storage_options)
        if base.endswith(".parquet"):
            return pd.read_parquet(io.BytesIO(data))
        if base.endswith(".csv"):
            return pd.read_csv(io.BytesIO(data))
        if base.endswith((".jsonl", ".ndjson")):
            return pd.read_json(io.BytesIO(data), lines=True)
    return None
