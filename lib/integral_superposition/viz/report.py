"""The experiment report: one self-contained HTML page per run, and its markdown summary.

``build_report(out_uri, *sections, analysis=..., sae=..., config=...)`` assembles

- the run configuration (``config``, the SAE's training config and the activation source);
- the training curves (``history``, or a history table saved with the SAE);
- the metrics table, the density / L0 / decoder-geometry plots, the enrichment heatmap and
  the 2-D map of a published analysis, and the top latents per label with links to their
  dashboards;
- any further :class:`ReportSection` - merge results, steering generations, ... - given by
  the caller as generic pieces: text, pandas tables, matplotlib figures (or PNG bytes),
  side-by-side generations, or a trusted HTML fragment.

Images are embedded as ``data:`` PNGs and the page carries the same Content-Security-Policy
as the dashboards (no network, no scripts), so it opens offline and as a single file.
:func:`markdown_summary` renders the same summary as markdown with small embedded PNGs (for
Prefect markdown artifacts); :func:`summary_tables` gives its tables as DataFrames (for
table artifacts).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from markupsafe import Markup
from matplotlib.figure import Figure

from integral_superposition import storage
from integral_superposition.viz.figures import figure_bytes, png_data_uri
from integral_superposition.viz.headline import SWEEP_COLUMNS, headline_rows, split_mark, sweep_rows
from integral_superposition.viz.panels import CSS, _csp
from integral_superposition.viz.templates import (
    MAX_TOKEN_CHARS,
    MISSING,
    cut_markup,
    display_token,
    fmt,
    render,
    visible_text,
)

__all__ = [
    "REPORT_CSS",
    "ReportSection",
    "analysis_sections",
    "build_report",
    "headline_frame",
    "markdown_summary",
    "summary_tables",
]

FigureLike = Figure | bytes


@dataclass
class ReportSection:
    """A generic piece of the report, given by whoever produced the results.

    - ``text``: plain text (escaped); blank lines separate paragraphs.
    - ``tables``: DataFrames, or ``(caption, DataFrame)`` pairs (values are escaped).
    - ``figures``: matplotlib Figures or PNG bytes, or ``(caption, figure)`` pairs.
    - ``generations``: side-by-side text generations: a DataFrame or a list of dicts, one
      row per prompt and one column per condition (e.g. ``prompt, baseline, steered``).
      Texts are escaped and shown in aligned columns.
    - ``html_text``: a trusted HTML fragment inserted as is (the page's Content-Security-Policy
      still blocks scripts and network loads). Use ``text`` for anything a model generated.
    - ``links``: ``(text, href)`` pairs shown above the tables.
    - ``split``: which tokens the section's numbers were measured on (``held-out``,
      ``training``, ``all tokens``), shown beside its title.
    """

    title: str
    text: str = ""
    tables: Sequence[pd.DataFrame | tuple[str, pd.DataFrame]] = ()
    figures: Sequence[FigureLike | tuple[str, FigureLike]] = ()
    generations: pd.DataFrame | Sequence[Mapping[str, Any]] | None = None
    html_text: str | None = None
    anchor: str | None = None
    links: Sequence[tuple[str, str]] = ()
    split: str | None = None

    def _pairs(self, items) -> list[tuple[str, Any]]:
        return [it if isinstance(it, tuple) else ("", it) for it in items]

    @staticmethod
    def _png(fig: FigureLike) -> bytes:
        if isinstance(fig, bytes):
            return fig
        if not isinstance(fig, Figure):
            raise TypeError(
                f"figures: expected matplotlib Figures or PNG bytes, got {type(fig).__name__}"
            )
        return figure_bytes(fig, "png")

    def _generations_frame(self) -> pd.DataFrame | None:
        if self.generations is None:
            return None
        g = (
            self.generations
            if isinstance(self.generations, pd.DataFrame)
            else pd.DataFrame(list(self.generations))
        )
        return g

    def slug(self) -> str:
        return self.anchor or re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-") or "section"

    def view(self) -> dict[str, Any]:
        """What the ``section`` template shows (tables formatted, figures as ``data:`` PNGs)."""
        g = self._generations_frame()
        return {
            "anchor": self.slug(),
            "title": self.title,
            "split": self.split,
            "paragraphs": [p.strip() for p in re.split(r"\n\s*\n", self.text or "") if p.strip()],
            "html_text": None if self.html_text is None else Markup(self.html_text),
            "links": list(self.links),
            "tables": [table_view(df, caption) for caption, df in self._pairs(self.tables)],
            "figures": [
                {
                    "alt": caption or self.title,
                    "src": png_data_uri(self._png(fig)),
                    "caption": caption,
                }
                for caption, fig in self._pairs(self.figures)
            ],
            "generations": None
            if g is None or not len(g)
            else {
                "columns": [str(c) for c in g.columns],
                "rows": [list(r) for r in g.itertuples(index=False)],
            },
        }

    def to_html(self) -> str:
        return render("section.html.j2", s=self.view())

    def to_markdown(self, max_rows: int = 20, figure_width: int = 480) -> str:
        parts = [f"## {_md_escape(self.title)}"]
        if self.text:
            parts.append(_md_escape(self.text.strip()))
        for caption, df in self._pairs(self.tables):
            if caption:
                parts.append(f"**{_md_escape(caption)}**")
            parts.append(markdown_table(df, max_rows))
        for caption, fig in self._pairs(self.figures):
            png = small_png(self._png(fig), figure_width)
            parts.append(f"![{_md_escape(caption or self.title)}]({png_data_uri(png)})")
        g = self._generations_frame()
        if g is not None and len(g):
            parts.append(markdown_table(g, max_rows))
        return "\n\n".join(parts)


# -- small helpers -----------------------------------------------------------------------------
def _cell(v: Any) -> Any:
    """A table cell for the template: floats to 4 significant digits, missing as None."""
    if hasattr(v, "__html__"):
        return v
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, float | np.floating):
        return fmt(float(v), ".4g")
    if v is None or (np.isscalar(v) and pd.isna(v)):
        return None
    return v


def table_view(df: pd.DataFrame, caption: str = "", max_rows: int = 200) -> dict[str, Any]:
    """A DataFrame as the ``table`` macro shows it: the first ``max_rows`` rows, cells
    formatted (values stay text: the template escapes them)."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"tables: expected pandas DataFrames, got {type(df).__name__}")
    shown = df.head(max_rows)
    return {
        "caption": caption,
        "columns": [str(c) for c in shown.columns],
        "numeric": [
            pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t)
            for t in shown.dtypes
        ],
        "rows": [[_cell(v) for v in r] for r in shown.itertuples(index=False)],
        "more": max(0, len(df) - max_rows),
    }


def _md_escape(text: str) -> str:
    """Escape markdown and HTML metacharacters in plain text (invisible and bidi characters
    as visible ``⟨U+XXXX⟩`` marks)."""
    text = visible_text(str(text), keep="\n").replace("\\", "\\\\")
    for ch in "`*_[]<>|#":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", " ")


def markdown_table(df: pd.DataFrame, max_rows: int = 20) -> str:
    """A GitHub-style markdown table (cells escaped; floats to 4 significant digits)."""
    shown = df.head(max_rows)

    def cell(v: Any) -> str:
        if isinstance(v, float | np.floating):
            return MISSING if not np.isfinite(v) else f"{v:.4g}"
        if v is None or (np.isscalar(v) and pd.isna(v)):
            return MISSING
        return _md_escape(display_token(str(v)) if isinstance(v, str) else v)

    head = "| " + " | ".join(_md_escape(c) for c in shown.columns) + " |"
    sep = "| " + " | ".join("---" for _ in shown.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in r) + " |" for r in shown.itertuples(index=False)]
    more = [f"\n_{len(df) - max_rows} more rows_"] if len(df) > max_rows else []
    return "\n".join([head, sep, *rows]) + "".join(more)


def small_png(png: bytes, max_width: int = 480) -> bytes:
    """Downscale PNG bytes to at most ``max_width`` pixels wide (for markdown artifacts)."""
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    if img.width <= max_width:
        return png
    h = max(1, round(img.height * max_width / img.width))
    out = io.BytesIO()
    img.convert("RGB").resize((max_width, h), Image.LANCZOS).save(out, format="PNG", optimize=True)
    return out.getvalue()


def _relative_link(from_dir: str, target: str) -> str:
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
def _as_analysis(analysis: Any, storage_options):
    from integral_superposition.analysis.result import AnalysisResult, load_analysis

    if analysis is None or isinstance(analysis, AnalysisResult):
        return analysis
    return load_analysis(str(analysis), storage_options)


def summary_tables(
    analysis: Any, top_per_label: int = 10, storage_options=None
) -> dict[str, pd.DataFrame]:
    """The summary's tables: ``metrics`` (name, value) and ``top_latents`` (per label, the
    most significant latents with q, log odds, purity, AUROC, density and top tokens)."""
    a = _as_analysis(analysis, storage_options)
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
    """Per label, held-out accuracy and F1 of the sparse probes on the top ``ks`` latents, of
    the probe on ``ks[-1]`` random live latents and of the dense probe, with a mean row
    (None when the analysis has no probe table)."""
    t = analysis.table("probe")
    if t is None or not len(t):
        return None
    cols: dict[str, pd.Series] = {}
    by = t.set_index("label")
    picks = [("sae", k, f"k={k}") for k in ks] + [("random", ks[-1], f"random k={ks[-1]}")]
    for method, k, name in picks:
        r = by[(by["method"] == method) & (by["k"] == k)]
        cols[f"{name} acc"] = r["accuracy"]
        cols[f"{name} F1"] = r["f1"]
    d = by[by["method"] == "dense"]
    cols["dense acc"], cols["dense F1"] = d["accuracy"], d["f1"]
    n = by.groupby(level=0)["n_test"].first()
    out = pd.DataFrame(cols).reindex(n.index)
    out.insert(0, "test docs", n)
    out.loc["mean"] = out.mean(numeric_only=True)
    out.loc["mean", "test docs"] = float(n.iloc[0]) if n.nunique() == 1 else None
    return out.reset_index(names="label")


def _scalar(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.6g}") if np.isfinite(v) else None
    return v


def analysis_sections(
    analysis: Any, report_dir: str | None = None, top_per_label: int = 10, storage_options=None
) -> list[ReportSection]:
    """Report sections of a published analysis: metrics, distributions, enrichment heatmap,
    2-D map and the top latents per label (linked to their dashboards from ``report_dir``)."""
    a = _as_analysis(analysis, storage_options)
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
                    "Held-out document classification per label (one vs rest): logistic probes "
                    "on the k most enriched latents (each latent's maximum over the document), "
                    "on k random live latents, and on the raw activations (mean over the "
                    "document). Accuracy on the store's test split, F1 of the label."
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
                    "in every label (formatting or dataset artefacts); they are left out of "
                    "the top latents per label."
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
                f"Per label, the most significant non-generic latents at the {unit} level, one "
                "row per group of near-duplicate latents (decoder cosine and co-firing), led by "
                "its best member."
            )
        else:
            top, text = (
                tables["top_latents"],
                ("Per label, the most significant non-generic latents (token-level enrichment)."),
            )
        latent_cells = []
        for j in top["latent"].astype(int):
            page = a.dashboard_uri(int(j))
            href = _relative_link(report_dir, page) if page and report_dir else page
            latent_cells.append(Markup('<a href="{}">L{}</a>').format(href, j) if href else f"L{j}")
        columns = {
            "label": top["label"].astype(str),
            # object columns: pandas would turn the Markup cells into plain (escaped) str
            "latent": pd.Series(latent_cells, dtype=object),
            "q": [fmt(v, ".2e") for v in top["q"]],
            "log odds": [fmt(v, ".2f") for v in top["log_odds"]],
        }
        if "frac_in_set" in top:
            columns["in top set"] = [fmt(v, ".2f") for v in top["frac_in_set"]]
        else:
            columns["in top set"] = [
                f"{fmt(a_, 'd')}/{fmt(n, 'd')}"
                for a_, n in zip(top["in_set"], top["set_size"], strict=True)
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
                    _relative_link(report_dir, index) if report_dir else index,
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


def _sae_manifest(sae_uri: str, storage_options) -> tuple[dict[str, Any] | None, dict[str, Any]]:
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


def _sae_sections(
    sae_uri: str, manifest: Mapping[str, Any] | None, history: pd.DataFrame | None, storage_options
) -> list[ReportSection]:
    """The training curve (with the converged flag) and the SAE's full evaluation table."""
    out = []
    if history is None and manifest is not None:
        history = _find_history(sae_uri, manifest, storage_options)
    if history is not None and len(history):
        out.append(_training_section(history, manifest))
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


def _training_section(history: pd.DataFrame, manifest: Mapping[str, Any] | None) -> ReportSection:
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


def _find_history(
    sae_uri: str, manifest: Mapping[str, Any], storage_options
) -> pd.DataFrame | None:
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


def headline_frame(rows: Sequence[Any]) -> pd.DataFrame:
    """The headline rows as a table: ``group, result, value, control / reference, measured on``."""

    def value(r) -> str:
        if r.latent is None or r.group != "Latents":
            return r.shown
        extra = ", ".join(f"{k} {fmt(v, '.2e' if k == 'q' else '.3g')}" for k, v in r.extra.items())
        return f"L{r.latent} ({extra}): {r.tokens}"

    return pd.DataFrame(
        {
            "group": [r.group for r in rows],
            "result": [r.result for r in rows],
            "value": [value(r) for r in rows],
            "control / reference": [r.control_shown for r in rows],
            "measured on": [" ".join(x for x in (r.split or MISSING, r.detail) if x) for r in rows],
        }
    )


def _json_text(v: Any) -> str:
    return json.dumps(v, indent=2, sort_keys=True, default=str)


REPORT_CSS = CSS + (
    "figure{margin:10px 12px 10px 0;display:inline-block;vertical-align:top;max-width:49%}"
    "figure img{max-width:100%;border:1px solid var(--line)}"
    "figcaption{font-size:12px;color:var(--mut)}"
    "pre{background:#f6f7f9;padding:8px;font-size:12px;overflow:auto;max-height:360px}"
    ".gens td.gen{white-space:pre-wrap;max-width:420px;font-family:ui-monospace,Menlo,monospace;font-size:12px;unicode-bidi:isolate}"
    "table.dataframe td{font-variant-numeric:tabular-nums}caption{text-align:left;font-weight:600;padding:4px 0}"
    "table.headline,table.sweep{min-width:70%}table.sweep td.n{white-space:nowrap}table.headline tr.group th{background:#eef1f5;font-size:12px;text-transform:uppercase;letter-spacing:.04em}"
    "table.headline td.n{white-space:nowrap}table.headline .kv{margin-left:8px;font-variant-numeric:tabular-nums}"
    "table.headline .tok{color:var(--mut);font-size:12px}"
    ".mark{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;font-weight:500;vertical-align:1px}"
    ".mark.held{background:#dcfce7;color:#166534}.mark.train{background:#fef3c7;color:#92400e}"
    "nav ul{display:flex;flex-wrap:wrap;gap:2px 16px;list-style:none;padding:0;margin:6px 0 10px;font-size:13px}"
    "details{margin-top:24px;border-top:1px solid var(--line);padding-top:8px}summary{cursor:pointer;font-weight:600}"
)
"""The report's style sheet: the dashboards' plus figures, marks and the headline table."""


def build_report(
    out_uri: str,
    *sections: ReportSection,
    title: str | None = None,
    analysis: Any = None,
    sae: str | None = None,
    config: Mapping[str, Any] | None = None,
    history: pd.DataFrame | None = None,
    merge: str | None = None,
    steering: str | None = None,
    sweep: Sequence[Mapping[str, Any]] = (),
    top_per_label: int = 10,
    storage_options: Mapping[str, Any] | None = None,
    filename: str = "report.html",
) -> str:
    """Write the experiment report to ``out_uri/filename`` (plus a ``report`` manifest) and
    return the page's URI.

    The page leads with the headline table (:func:`~integral_superposition.viz.headline.headline_rows`),
    then the figures and detail tables, then ``sections``; the configurations come last,
    folded. ``analysis``: a published analysis (URI or
    :func:`~integral_superposition.analysis.load_analysis` result); ``sae``: the SAE folder
    (metrics, training curve, config); ``config``: the run configuration; ``merge`` /
    ``steering``: published merge and steering outputs for the headline's comparisons with
    their controls; ``sweep``: every SAE of a sweep (mappings with ``name``, ``sae`` and
    optional ``analysis``, ``merge``, ``href``), compared one row per SAE under the headline;
    ``sections``: further :class:`ReportSection` (merge, steering, ...).
    """
    for s in sections:
        if not isinstance(s, ReportSection):
            raise TypeError(f"sections: expected ReportSection objects, got {type(s).__name__}")
    for name, value in (("merge", merge), ("steering", steering), ("sae", sae)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name}={value!r}: expected the URI of a published output (a str)")
    if storage.exists(storage.join(out_uri, storage.MANIFEST_NAME), storage_options):
        kind = storage.read_json(storage.join(out_uri, storage.MANIFEST_NAME), storage_options).get(
            "kind"
        )
        if kind != "report":
            raise ValueError(
                f"out_uri={out_uri!r} holds a published {kind!r} output: write the report to its own folder"
            )
    a = _as_analysis(analysis, storage_options)
    configs: list[tuple[str, str]] = []
    if config:
        configs.append(("run configuration", _json_text(dict(config))))
    if a is not None:
        act = a.manifest.get("activations", {})
        model = a.manifest.get("model", {})
        configs.append(("activations", _json_text({
            "uris": act.get("uris"), "hook_point": act.get("hook_point"), "content_hash": act.get("content_hash"),
            "model": model.get("model_id"), "tokens analysed": a.summary.get("n_tokens"),
            "labels": a.summary.get("labels"),
        })))  # fmt: skip
        if a.manifest.get("config"):
            configs.append(("analysis parameters", _json_text(a.manifest.get("config"))))
    sae_uri = sae or (a.manifest.get("sae", {}).get("uri") if a is not None else None)
    std: list[ReportSection] = []
    sae_manifest = None
    if sae_uri:
        sae_manifest, cfg = _sae_manifest(str(sae_uri), storage_options)
        if cfg:
            configs.append(("SAE (cfg.json)", _json_text(cfg)))
        if sae_manifest is not None and sae_manifest.get("config"):
            configs.append(("SAE training config", _json_text(sae_manifest.get("config"))))
        std += _sae_sections(str(sae_uri), sae_manifest, history, storage_options)
    elif history is not None:
        std.append(_training_section(history, None))
    if a is not None:
        std += analysis_sections(a, out_uri, top_per_label)
    all_sections = std + list(sections)
    if not all_sections and not configs and sae_manifest is None:
        raise ValueError("nothing to report: give an analysis, an SAE, a config or sections")
    rows = headline_rows(sae_manifest, a, merge, steering, storage_options)
    for r in rows:
        if r.latent is not None and r.group == "Latents" and a is not None:
            page = a.dashboard_uri(r.latent)
            r.href = _relative_link(out_uri, page) if page else None
    sweep_view = sweep_rows(sweep, storage_options) if sweep else []
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    page_title = title or "Integral Superposition experiment report"
    page = render(
        "report.html.j2",
        title=page_title,
        csp=Markup(_csp(None)),
        css=Markup(REPORT_CSS),
        script=None,
        data_json=None,
        groups=[{"name": k, "rows": v} for k, v in groups.items()],
        sections=[s.view() for s in all_sections],
        configs=configs,
        sweep=sweep_view,
        sweep_columns=list(SWEEP_COLUMNS.values()),
        tokens_chars=4 * MAX_TOKEN_CHARS,
    ).encode()
    uri = storage.join(out_uri, filename)
    storage.write_bytes(uri, page, storage_options)
    storage.write_manifest(
        out_uri,
        "report",
        {"title": page_title, "sections": [s.title for s in all_sections]},
        {filename: storage.file_entry(uri, page)},
        storage_options,
        analysis=None
        if a is None
        else {"uri": a.uri, "content_hash": a.manifest.get("content_hash")},
        sae=sae_uri,
        merge=merge,
        steering=steering,
    )
    return uri


def markdown_summary(
    analysis: Any = None,
    *sections: ReportSection,
    title: str | None = None,
    figures: Sequence[str] = ("latent_map", "enrichment_heatmap"),
    top_per_label: int = 5,
    max_rows: int = 20,
    figure_width: int = 480,
    storage_options: Mapping[str, Any] | None = None,
    sae: str | None = None,
    merge: str | None = None,
    steering: str | None = None,
) -> str:
    """The run summary as markdown: the headline table (as in :func:`build_report`, from the
    analysis and the ``sae``, ``merge`` and ``steering`` outputs given), metrics, top latents
    per label, small embedded PNGs of the analysis ``figures`` (``data:`` URIs, at most
    ``figure_width`` pixels wide), then the given sections."""
    parts = [f"# {_md_escape(title or 'SAE analysis summary')}"]
    a = _as_analysis(analysis, storage_options)
    sae_uri = sae or (a.manifest.get("sae", {}).get("uri") if a is not None else None)
    sae_manifest = _sae_manifest(str(sae_uri), storage_options)[0] if sae_uri else None
    if a is not None or sae_manifest is not None:
        rows = headline_rows(sae_manifest, a, merge, steering, storage_options)
        parts.append("## Results\n\n" + markdown_table(headline_frame(rows), max_rows=100))
    if a is not None:
        t = summary_tables(a, top_per_label)
        parts.append("## Metrics\n\n" + markdown_table(t["metrics"], max_rows=50))
        if "top_latents" in t:
            parts.append(
                "## Top latents per label\n\n" + markdown_table(t["top_latents"], max_rows=max_rows)
            )
        if "probe" in t:
            parts.append("## Sparse probing\n\n" + markdown_table(t["probe"], max_rows=max_rows))
        if "generic_latents" in t:
            parts.append(
                "## Generic latents\n\n" + markdown_table(t["generic_latents"], max_rows=max_rows)
            )
        for name in figures:
            png = a.figure(name)
            if png is not None:
                parts.append(f"![{_md_escape(name)}]({png_data_uri(small_png(png, figure_width))})")
    parts += [s.to_markdown(max_rows, figure_width) for s in sections]
    return "\n\n".join(parts) + "\n"
