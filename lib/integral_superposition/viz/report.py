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

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from markupsafe import Markup

from integral_superposition.outputs import OutputWriter
from integral_superposition.viz.figures import png_data_uri
from integral_superposition.viz.headline import headline_rows
from integral_superposition.viz.report_sections import (
    analysis_sections,
    as_analysis,
    load_sae_manifest,
    probe_table,
    relative_link,
    sae_sections,
    summary_tables,
    training_section,
)
from integral_superposition.viz.safe_html import CSS, csp
from integral_superposition.viz.section import FigureLike, ReportSection
from integral_superposition.viz.sweep_table import SWEEP_COLUMNS, sweep_rows
from integral_superposition.viz.tables import markdown_table, md_escape, small_png, table_view
from integral_superposition.viz.templates import MAX_TOKEN_CHARS, MISSING, fmt, render

__all__ = [
    "REPORT_CSS",
    "FigureLike",
    "ReportSection",
    "analysis_sections",
    "build_report",
    "headline_frame",
    "markdown_summary",
    "markdown_table",
    "probe_table",
    "small_png",
    "summary_tables",
    "table_view",
]


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
    # another kind of output there, or a user's file named like the page: refused up front
    OutputWriter(out_uri, "report", storage_options, names=[filename]).check()
    a = as_analysis(analysis, storage_options)
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
        sae_manifest, cfg = load_sae_manifest(str(sae_uri), storage_options)
        if cfg:
            configs.append(("SAE (cfg.json)", _json_text(cfg)))
        if sae_manifest is not None and sae_manifest.get("config"):
            configs.append(("SAE training config", _json_text(sae_manifest.get("config"))))
        std += sae_sections(str(sae_uri), sae_manifest, history, storage_options)
    elif history is not None:
        std.append(training_section(history, None))
    if a is not None:
        std += analysis_sections(a, out_uri, top_per_label)
    all_sections = std + list(sections)
    if not all_sections and not configs and sae_manifest is None:
        raise ValueError("nothing to report: give an analysis, an SAE, a config or sections")
    rows = headline_rows(sae_manifest, a, merge, steering, storage_options)
    for r in rows:
        if r.latent is not None and r.group == "Latents" and a is not None:
            page = a.dashboard_uri(r.latent)
            r.href = relative_link(out_uri, page) if page else None
    sweep_view = sweep_rows(sweep, storage_options) if sweep else []
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    page_title = title or "Integral Superposition experiment report"
    page = render(
        "report.html.j2",
        title=page_title,
        csp=Markup(csp(None)),
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
    # a user's file named like the page is refused, never replaced
    with OutputWriter(out_uri, "report", storage_options, names=[filename]) as out:
        uri = out.write(filename, page)
        out.publish(
            {"title": page_title, "sections": [s.title for s in all_sections]},
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
    parts = [f"# {md_escape(title or 'SAE analysis summary')}"]
    a = as_analysis(analysis, storage_options)
    sae_uri = sae or (a.manifest.get("sae", {}).get("uri") if a is not None else None)
    sae_manifest = load_sae_manifest(str(sae_uri), storage_options)[0] if sae_uri else None
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
                parts.append(f"![{md_escape(name)}]({png_data_uri(small_png(png, figure_width))})")
    parts += [s.to_markdown(max_rows, figure_width) for s in sections]
    return "\n\n".join(parts) + "\n"
