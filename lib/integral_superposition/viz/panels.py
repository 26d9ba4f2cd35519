"""Feature dashboards: one self-contained HTML page per latent and an index page.

A latent's page shows its top and quantile-band examples (context tokens shaded by the
latent's activation, values in tooltips), the activation histogram (inline SVG, stacked by
label), the logit-lens tokens, its enrichment row, density and co-activation neighbours.
The index lists every latent and sorts / filters them by label, q-value, density, cluster.

Safety and offline use:

- every page is static HTML rendered here; every user-provided string (token, label, name,
  title, text) goes through one escaping, :func:`esc` (control and bidi characters are shown
  as visible ``⟨U+200F⟩`` marks and isolated); tokens longer than ``MAX_TOKEN_CHARS`` are
  cut, the whole token in a tooltip;
- the index embeds its data as ``<script type="application/json">`` with ``<``, ``>``,
  ``&``, U+2028 and U+2029 escaped, read by one inline script;
- a Content-Security-Policy allows no network or file loads (``default-src 'none'``), only
  the page's own script (by hash), inline styles and ``data:`` images; nothing is fetched,
  so pages open from ``file://``, from object storage or from an artifact.

Pages are rendered in memory, written to a local staging folder and published in one step
(renamed into place locally, one recursive upload to object stores).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from markupsafe import Markup, escape

from integral_superposition.analysis.jaccard_sparse import Neighbours
from integral_superposition.analysis.logit_lens import LogitLens
from integral_superposition.analysis.scan import TopKSets
from integral_superposition.analysis.top_tokens import Examples
from integral_superposition.outputs import publish_folder
from integral_superposition.viz.figures import label_color
from integral_superposition.viz.templates import (
    MAX_TOKEN_CHARS,
    MISSING,
    cut_markup,
    display_token,
    fmt,
    render,
    token_markup,
    visible_text,
)

__all__ = [
    "MAX_TOKEN_CHARS",
    "MISSING",
    "DashboardData",
    "display_token",
    "esc",
    "esc_cut",
    "json_for_script",
    "latent_page_name",
    "render_index",
    "render_latent_page",
    "token_html",
    "top_activations_panel",
    "visible_text",
    "write_dashboards",
]

N_SHADES = 10


def latent_page_name(latent: int) -> str:
    """Path of latent ``latent``'s page relative to the dashboards folder."""
    return f"latents/{int(latent):05d}.html"


# -- escaping ----------------------------------------------------------------------------------
def esc(text: Any) -> str:
    """The one escaping of every user-provided string shown in HTML (labels, experiment and
    run names, titles, texts, tokens), for text and attribute context: HTML-escaped, with
    invisible and bidi characters as visible ``⟨U+XXXX⟩`` marks (newlines and tabs kept).
    The same as printing ``text`` in a template."""
    return str(escape(visible_text(str(text))))


def esc_cut(text: Any, max_chars: int) -> str:
    """:func:`esc` of ``text`` cut to ``max_chars`` characters plus ``…``, with the whole
    (escaped) text in a ``title`` tooltip; short texts are :func:`esc` alone."""
    return str(cut_markup(text, max_chars))


def token_html(token: str, max_chars: int = MAX_TOKEN_CHARS) -> str:
    """A token for a page (:func:`display_token`), cut after ``max_chars`` characters of the
    token with the whole token in a tooltip (the templates' ``token`` filter)."""
    return str(token_markup(token, max_chars))


def json_for_script(obj: Any) -> str:
    """JSON safe to place inside ``<script type="application/json">``: ``<``, ``>``, ``&``,
    U+2028 and U+2029 are written as ``\\uXXXX`` escapes (NaN/inf become null)."""
    text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, rep in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(ch, rep)
    return text


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def _csp(script: str | None) -> str:
    src = "'none'"
    if script is not None:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        src = f"'sha256-{digest}'"
    return (
        f"default-src 'none'; script-src {src}; style-src 'unsafe-inline'; img-src data:; "
        "font-src 'none'; connect-src 'none'; form-action 'none'; base-uri 'none'"
    )


CSS = (
    """
:root{--fg:#1d2329;--mut:#66707a;--line:#e3e6ea;--acc:#c2410c}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);margin:0;padding:16px 22px;max-width:1200px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 6px;border-bottom:1px solid var(--line);padding-bottom:3px}
a{color:#1d4ed8;text-decoration:none}a:hover{text-decoration:underline}
.mut{color:var(--mut)}.nav{margin-bottom:8px;font-size:13px}.nav a{margin-right:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:6px 16px;margin:8px 0}
.kv{font-size:13px}.kv b{display:block;font-size:11px;color:var(--mut);font-weight:500;text-transform:uppercase}
table{border-collapse:collapse;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{font-weight:600;background:#f6f7f9}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.sig td{background:#fff7ed}.pill{display:inline-block;padding:0 6px;border-radius:9px;color:#fff;font-size:12px}
.ex{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;white-space:pre-wrap;word-break:break-word;padding:2px 0;border-bottom:1px dotted var(--line)}
.ex .v{display:inline-block;width:64px;color:var(--mut);text-align:right;margin-right:10px}
.ex span{unicode-bidi:isolate;border-radius:3px;padding:1px 0}
.ex .v{unicode-bidi:normal}.ex .h{outline:1.5px solid #7c2d12;outline-offset:0}
"""
    + "".join(
        f".a{i}{{background:rgba(234,88,12,{i / N_SHADES:.2f})}}" for i in range(1, N_SHADES + 1)
    )
    + """
.cols{display:flex;flex-wrap:wrap;gap:28px}.cols>div{min-width:260px}
.tok{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre;unicode-bidi:isolate}
.cut{cursor:help;text-decoration:underline dotted}
.lens td.tok{background:#f3f4f6}.band{margin:10px 0 2px;font-size:13px;color:var(--mut)}
svg text{font:10px system-ui,sans-serif;fill:#555}
"""
)


# -- data --------------------------------------------------------------------------------------
@dataclass
class DashboardData:
    """Everything the pages show, for all ``K`` latents (built once, rendered per latent)."""

    title: str
    label_names: list[str]
    table: pd.DataFrame
    """Per-latent table indexed 0..K-1 (from ``run_analysis``: statistics, best label, ...)."""
    examples: Examples
    token_text: Mapping[int, str]
    quantile_edges: np.ndarray | None = None
    hist: np.ndarray | None = None
    """int ``[K, C, n_bins]`` firing activations per label on log10 bins."""
    hist_edges: np.ndarray | None = None
    enrichment: pd.DataFrame | None = None
    neighbours: Neighbours | None = None
    lens: LogitLens | None = None

    @classmethod
    def build(
        cls,
        *,
        table: pd.DataFrame,
        examples: Examples,
        token_text: Mapping[int, str],
        top: TopKSets | None = None,
        enrichment: pd.DataFrame | None = None,
        neighbours: Neighbours | None = None,
        lens: LogitLens | None = None,
        label_names: Sequence[str] | None = None,
        title: str = "SAE latents",
    ) -> DashboardData:
        t = table.set_index("latent", drop=False).sort_index()
        if not np.array_equal(t.index.to_numpy(), np.arange(len(t))):
            raise ValueError("table: expected one row per latent 0..K-1")
        return cls(
            title=title,
            label_names=list(
                label_names or (top.label_names if top is not None and top.label_names else [])
            ),
            table=t,
            examples=examples,
            token_text=token_text,
            quantile_edges=None if top is None else top.quantile_edges,
            hist=None if top is None else top.label_hist,
            hist_edges=None if top is None else top.hist_edges,
            enrichment=enrichment,
            neighbours=neighbours,
            lens=lens,
        )

    @property
    def n_latents(self) -> int:
        return len(self.table)


class _Prepared:
    """Vectorised pre-rendering shared by all pages: each example's HTML line, grouped by latent."""

    def __init__(self, data: DashboardData):
        self.data = data
        K = data.n_latents
        ex = data.examples
        ids = np.array(sorted(int(i) for i in data.token_text), dtype=np.int64)
        shown = [token_markup(data.token_text[int(i)]) for i in ids]
        self.tok_html = {int(i): h for i, h in zip(ids, shown, strict=True)}
        # plain str: numpy's string concatenation below must not re-escape the markup around
        vocab_html = np.array(["", *map(str, shown)], dtype=object)
        if ids.size:
            pos = np.searchsorted(ids, ex.token_ids).clip(0, ids.size - 1)
            known = (ex.token_ids >= 0) & (ids[pos] == ex.token_ids)
            pos = np.where(known, pos + 1, 0)
        else:
            known = np.zeros(ex.token_ids.shape, dtype=bool)
            pos = np.zeros(ex.token_ids.shape, dtype=np.int64)
        fallback = (ex.token_ids >= 0) & ~known
        text = vocab_html[pos]
        if fallback.any():
            ids_txt = ex.token_ids[fallback].astype(str).astype(object)
            text[fallback] = "&lt;" + ids_txt + "&gt;"
        vmax = np.asarray(data.table["max_act"], dtype=np.float64)[ex.latents]
        ratio = np.where(vmax[:, None] > 0, ex.acts / np.maximum(vmax[:, None], 1e-30), 0.0)
        level = np.clip(np.ceil(ratio * N_SHADES - 1e-9), 0, N_SHADES).astype(np.int64)
        level[ex.acts <= 0] = 0
        # Compact markup (pages for thousands of latents): unquoted attributes where valid,
        # no class or tooltip on tokens where the latent is silent.
        shade = [""] + [f" class=a{i}" for i in range(1, N_SHADES + 1)]
        hit = [" class=h"] + [f' class="a{i} h"' for i in range(1, N_SHADES + 1)]
        cls = np.array(shade, dtype=object)[level]
        cls[:, ex.center] = np.array(hit, dtype=object)[level[:, ex.center]]
        vals = np.char.mod("%.3g", ex.acts.astype(np.float64)).astype(object)
        tip = np.where(ex.acts > 0, " title=" + vals, "").astype(object)
        spans = "<span" + cls + tip + ">" + text + "</span>"
        spans[ex.window_rows < 0] = ""
        head = np.char.mod("%.3g", ex.values.astype(np.float64)).astype(object)
        lines = [
            '<div class="ex"><span class="v">' + h + "</span>" + "".join(r) + "</div>"
            for h, r in zip(head, spans, strict=True)
        ]
        order = np.lexsort((ex.rank, ex.kind, ex.latents))
        # pre-rendered rows of escaped tokens and numbers: inserted into the pages as markup
        self.lines = np.array([Markup(line) for line in lines], dtype=object)[order]
        self.kind = ex.kind[order]
        starts = np.searchsorted(ex.latents[order], np.arange(K + 1))
        self.starts = starts
        self.enrich = self._enrichment_rows(data)
        self.neighbours = self._neighbour_lists(data)

    def _enrichment_rows(self, data: DashboardData) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        if data.enrichment is None:
            return out
        K, C = data.n_latents, len(data.label_names)
        levels = sorted(data.enrichment["level"].unique(), key=lambda lv: (lv != "token", str(lv)))
        for level in levels:
            t = data.enrichment[data.enrichment["level"] == level].sort_values(
                ["latent", "label_id"]
            )
            if len(t) != K * C:
                continue
            out[str(level)] = {
                c: t[c].to_numpy().reshape(K, C)
                for c in (
                    "frac_in_set",
                    "base_rate",
                    "log_odds",
                    "q",
                    "auroc",
                    "in_set",
                    "set_size",
                    "significant",
                )
            }
        return out

    def _neighbour_lists(self, data: DashboardData) -> list[list[tuple[int, float]]] | None:
        nb = data.neighbours
        if nb is None:
            return None
        return [
            [(int(i), float(jc)) for i, jc in zip(idx[idx >= 0], jac[idx >= 0], strict=True)]
            for idx, jac in zip(nb.index, nb.jaccard, strict=True)
        ]


# -- latent page -------------------------------------------------------------------------------
def _hist_view(data: DashboardData, j: int) -> dict[str, Any] | None:
    """The activation histogram as SVG rectangles stacked by label (None: no histogram)."""
    if data.hist is None or data.hist_edges is None:
        return None
    h = data.hist[j]  # [C, nb]
    tot = h.sum(0)
    nz = np.flatnonzero(tot)
    if nz.size == 0:
        return {"never": True}
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    h, tot = h[:, lo:hi], tot[lo:hi]
    W, H, pad = 420, 120, 18
    bw = (W - 2) / h.shape[1]
    top = float(tot.max())
    # one page holds hundreds of bars: drawn here as markup (numbers, colours and the
    # labels' escaped names), the rest of the page by the template
    names = [esc(n) for n in data.label_names]
    rects = []
    for b in range(h.shape[1]):
        y = float(H)
        for c in np.flatnonzero(h[:, b]):
            hh = H * float(h[c, b]) / top
            y -= hh
            name = names[c] if c < len(names) else str(c)
            rects.append(
                f'<rect x="{1 + b * bw:.1f}" y="{y:.1f}" width="{max(bw - 0.6, 0.6):.1f}" '
                f'height="{hh:.1f}" fill="{label_color(c)}"><title>{name}: {int(h[c, b])}</title></rect>'
            )
    e = data.hist_edges
    return {
        "never": False,
        "W": W,
        "H": H,
        "pad": pad,
        "rects": Markup("".join(rects)),
        "lo": float(10 ** e[lo]),
        "hi": float(10 ** e[hi]),
        "total": int(tot.sum()),
        "legend": [(n, label_color(c)) for c, n in enumerate(data.label_names)],
    }


def _enrichment_view(prep: _Prepared, j: int) -> dict[str, Any] | None:
    """Latent ``j``'s enrichment row per label, one block of cells per level."""
    data = prep.data
    if not prep.enrich:
        return None
    levels = list(prep.enrich)
    rows = []
    for c, name in enumerate(data.label_names):
        cells = []
        for lv in levels:
            e = prep.enrich[lv]
            cells.append(
                {
                    "in_set": int(e["in_set"][j, c]),
                    "set_size": int(e["set_size"][j, c]),
                    **{k: float(e[k][j, c]) for k in ("base_rate", "log_odds", "q", "auroc")},
                }
            )
        sig = any(bool(prep.enrich[lv]["significant"][j, c]) for lv in levels)
        rows.append({"label": name, "sig": sig, "cells": cells})
    return {"levels": levels, "rows": rows}


def _lens_view(prep: _Prepared, j: int) -> list[dict[str, Any]] | None:
    """The promoted and suppressed tokens of latent ``j`` (None: no logit lens; []: not this
    latent)."""
    lens = prep.data.lens
    if lens is None:
        return None
    pos = np.searchsorted(lens.latents, j)
    if pos >= lens.latents.size or lens.latents[pos] != j:
        return []
    return [
        {
            "title": title,
            "rows": [
                (prep.tok_html.get(int(t), f"<{int(t)}>"), float(v))
                for t, v in zip(ids, vals, strict=True)
            ],
        }
        for title, ids, vals in (
            ("promoted", lens.promoted_ids[pos], lens.promoted_logits[pos]),
            ("suppressed", lens.suppressed_ids[pos], lens.suppressed_logits[pos]),
        )
    ]


def render_latent_page(
    prep: _Prepared, j: int, has_page: Callable[[int], bool] | None = None
) -> str:
    """The HTML of latent ``j``'s dashboard."""
    data = prep.data
    K = data.n_latents
    row = data.table.iloc[j]
    dead = bool(row.get("dead", False))
    kv: list[tuple[str, Any]] = [
        ("density", fmt(float(row["density"]), ".3e")),
        ("fires on", f"{int(row['fire_count'])} tokens"),
        ("max activation", fmt(float(row["max_act"]), ".4g")),
        ("mean when active", fmt(float(row.get("mean_when_active", float("nan"))), ".4g")),
    ]
    if "best_label" in row and isinstance(row["best_label"], str):
        kv.append(("best label (token)", f"{row['best_label']} (q {fmt(float(row['q']), '.2e')})"))
    if "doc_best_label" in row and isinstance(row["doc_best_label"], str):
        kv.append(
            (
                "best label (document)",
                f"{row['doc_best_label']} (q {fmt(float(row['doc_q']), '.2e')})",
            )
        )
    if bool(row.get("generic", False)):
        token = display_token(str(row.get("generic_token", "")))
        share = float(row.get("generic_token_share", float("nan")))
        kv.append(
            (
                "generic (artefact)",
                f"{token} in {fmt(100 * share, '.0f')}% of top contexts, in every label",
            )
        )
    if "decoder_norm" in row:
        kv.append(("decoder norm", fmt(float(row["decoder_norm"]), ".3f")))
    if "max_decoder_cos" in row:
        partner = int(row["max_cos_partner"])
        cos = fmt(float(row["max_decoder_cos"]), ".3f")
        kv.append(
            (
                "max decoder cos",
                Markup('{} <a href="{:05d}.html">L{}</a>').format(cos, partner, partner)
                if partner >= 0
                else cos,
            )
        )
    if "cluster" in row and pd.notna(row["cluster"]):
        kv.append(("cluster", str(row["cluster"])))
    a, b = int(prep.starts[j]), int(prep.starts[j + 1])
    lines, kinds = prep.lines[a:b], prep.kind[a:b]
    bands = []
    if data.quantile_edges is not None:
        edges = data.quantile_edges[j]
        nb = edges.size - 1
        for band in range(nb - 1, -1, -1):
            sel = lines[kinds == band][::-1]  # highest first, like the top examples
            if sel.size:
                bands.append(
                    {
                        "lo": int(100 * band / nb),
                        "hi": int(100 * (band + 1) / nb),
                        "lo_value": float(edges[band]),
                        "hi_value": float(edges[band + 1]),
                        "lines": list(sel),
                    }
                )
    nav = [("../index.html", "index")]
    for step, name in ((-1, "previous"), (1, "next")):
        k = j + step
        while 0 <= k < K and has_page is not None and not has_page(k):
            k += step
        if 0 <= k < K:
            nav.append((f"{k:05d}.html", f"{name} (L{k})"))
    return render(
        "latent.html.j2",
        title=f"Latent {j}",
        csp=Markup(_csp(None)),
        css=Markup(CSS),
        script=None,
        data_json=None,
        nav=nav,
        j=j,
        dead=dead,
        data_title=data.title,
        kv=kv,
        top_lines=list(lines[kinds < 0]),
        bands=bands,
        hist=_hist_view(data, j),
        enrichment=_enrichment_view(prep, j),
        lens=_lens_view(prep, j),
        neighbours=None if prep.neighbours is None else prep.neighbours[j],
    )


# -- index -------------------------------------------------------------------------------------
INDEX_JS = r"""
(function(){
var D=JSON.parse(document.getElementById('data').textContent);
var tbody=document.getElementById('rows');var rows=Array.prototype.slice.call(tbody.children);
var n=rows.length,order=[],i;for(i=0;i<n;i++)order.push(i);
var sortKey='latent',asc=true;
function val(k,i){var v=D.cols[k][i];return v===null?NaN:v;}
function cmp(a,b){var x=val(sortKey,a),y=val(sortKey,b);
 if(typeof x==='string'||typeof y==='string'){x=String(x===null?'':x);y=String(y===null?'':y);return asc?x.localeCompare(y):y.localeCompare(x);}
 var nx=isNaN(x),ny=isNaN(y);if(nx&&ny)return a-b;if(nx)return 1;if(ny)return -1;return asc?(x-y)||(a-b):(y-x)||(a-b);}
function apply(){
 var lab=document.getElementById('f-label').value,qmax=parseFloat(document.getElementById('f-q').value),
 dmin=parseFloat(document.getElementById('f-dmin').value),dmax=parseFloat(document.getElementById('f-dmax').value),
 cl=document.getElementById('f-cluster').value.trim(),txt=document.getElementById('f-text').value.toLowerCase(),
 alive=document.getElementById('f-alive').checked,shown=0;
 for(var i=0;i<n;i++){var ok=true;
  if(lab!==''){ok=String(D.cols.label[i])===lab;}
  if(ok&&!isNaN(qmax)){var q=D.cols.q[i];ok=q!==null&&q<=qmax;}
  if(ok&&!isNaN(dmin))ok=D.cols.density[i]>=dmin;
  if(ok&&!isNaN(dmax))ok=D.cols.density[i]<=dmax;
  if(ok&&cl!=='')ok=String(D.cols.cluster[i])===cl;
  if(ok&&alive)ok=!D.cols.dead[i];
  if(ok&&txt!=='')ok=(String(D.cols.latent[i])+' '+D.cols.tokens[i]).toLowerCase().indexOf(txt)>=0;
  rows[i].hidden=!ok;if(ok)shown++;}
 document.getElementById('count').textContent=shown+' of '+n+' latents';}
function sortBy(k){if(sortKey===k)asc=!asc;else{sortKey=k;asc=(k==='latent'||k==='q'||k==='label');}
 order.sort(cmp);var f=document.createDocumentFragment();for(var i=0;i<n;i++)f.appendChild(rows[order[i]]);tbody.appendChild(f);
 var ths=document.querySelectorAll('[data-k]');for(var t=0;t<ths.length;t++){ths[t].className=ths[t].getAttribute('data-k')===sortKey?(asc?'asc':'desc'):'';}}
var ths=document.querySelectorAll('[data-k]');
for(var t=0;t<ths.length;t++){ths[t].addEventListener('click',(function(k){return function(){sortBy(k);};})(ths[t].getAttribute('data-k')));}
var ins=document.querySelectorAll('.filters input,.filters select');
for(var m=0;m<ins.length;m++){ins[m].addEventListener('input',apply);ins[m].addEventListener('change',apply);}
apply();document.body.setAttribute('data-ready','1');
})();
"""


def render_index(
    data: DashboardData,
    has_page: Callable[[int], bool] | None = None,
    links: Sequence[tuple[str, str]] = (),
) -> str:
    """The index page: one row per latent, sortable and filterable."""
    t = data.table
    K = len(t)
    names = data.label_names
    label_index = {n: i for i, n in enumerate(names)}
    best = t["best_label"].tolist() if "best_label" in t else [None] * K
    label_ids = [label_index.get(b, -1) if isinstance(b, str) else -1 for b in best]
    cluster = t["cluster"].tolist() if "cluster" in t else [None] * K

    def col(name: str) -> list:
        return t[name].astype(float).tolist() if name in t else [None] * K

    tokens_plain = t["top_tokens"].astype(str).tolist() if "top_tokens" in t else [""] * K
    cols = {
        "latent": t["latent"].astype(int).tolist(),
        "label": label_ids,
        "q": col("q"),
        "log_odds": col("log_odds"),
        "purity": col("purity"),
        "density": col("density"),
        "max_act": col("max_act"),
        "cluster": [
            None
            if c is None or (isinstance(c, float) and math.isnan(c))
            else (int(c) if isinstance(c, int | np.integer) else str(c))
            for c in cluster
        ],
        "dead": [bool(x) for x in (t["dead"] if "dead" in t else [False] * K)],
        "tokens": tokens_plain,
    }
    promoted = t["promoted_tokens"].astype(str).tolist() if "promoted_tokens" in t else None
    # the numeric cells of every row, formatted at once (numbers need no escaping)
    numbers = [
        Markup(
            f"<span class=n>{fmt(q, '.2e')}</span><span class=n>{fmt(lo, '.2f')}</span>"
            f"<span class=n>{fmt(pu, '.2f')}</span><span class=n>{fmt(de, '.2e')}</span>"
            f"<span class=n>{fmt(ma, '.3g')}</span>"
        )
        for q, lo, pu, de, ma in zip(
            cols["q"], cols["log_odds"], cols["purity"], cols["density"], cols["max_act"],
            strict=True,
        )
    ]  # fmt: skip
    rows = [
        {
            "latent": cols["latent"][i],
            "page": latent_page_name(cols["latent"][i])
            if has_page is None or has_page(cols["latent"][i])
            else None,
            "label": names[label_ids[i]] if label_ids[i] >= 0 else None,
            "numbers": numbers[i],
            "cluster": cols["cluster"][i],
            "dead": cols["dead"][i],
            "tokens": tokens_plain[i],
            "promoted": None if promoted is None else promoted[i],
        }
        for i in range(K)
    ]
    header = [("latent", "latent"), ("label", "best label"), ("q", "q"), ("log_odds", "log odds"),
              ("purity", "purity"), ("density", "density"), ("max_act", "max act"),
              ("cluster", "cluster"), ("tokens", "top tokens")]  # fmt: skip
    widths = ["64px", "130px", "80px", "78px", "66px", "80px", "74px", "70px", "minmax(0,1fr)"]
    widths += ["minmax(0,1fr)"] if promoted is not None else []
    return render(
        "index.html.j2",
        title=data.title,
        csp=Markup(_csp(INDEX_JS)),
        css=Markup(CSS),
        script=Markup(INDEX_JS),
        data_json=Markup(json_for_script({"labels": names, "cols": cols})),
        data_title=data.title,
        n_latents=K,
        n_dead=sum(cols["dead"]),
        links=list(links),
        label_names=names,
        header=header,
        widths=" ".join(widths),
        rows=rows,
        promoted=promoted is not None,
        tokens_chars=4 * MAX_TOKEN_CHARS,
    )


# -- writing -----------------------------------------------------------------------------------
def write_dashboards(
    out_uri: str,
    data: DashboardData,
    latents: Sequence[int] | np.ndarray | None = None,
    storage_options: Mapping[str, Any] | None = None,
    links: Sequence[tuple[str, str]] = (),
) -> dict[str, dict[str, Any]]:
    """Write ``index.html`` and ``latents/NNNNN.html`` (for ``latents``, default all) under
    ``out_uri``, replacing earlier dashboards there; returns ``{relative name: {size, sha256}}``.
    A folder holding any other file is refused (it is not ours to replace)."""
    K = data.n_latents
    pages = np.arange(K) if latents is None else np.unique(np.asarray(latents, dtype=np.int64))
    if pages.size and (pages.min() < 0 or pages.max() >= K):
        raise ValueError(f"latents: ids must lie in [0, {K})")
    page_set = np.zeros(K, bool)
    page_set[pages] = True

    def has_page(j: int) -> bool:
        return bool(page_set[j])

    prep = _Prepared(data)
    files: dict[str, bytes] = {"index.html": render_index(data, has_page, links).encode("utf-8")}
    for j in pages.tolist():
        files[latent_page_name(j)] = render_latent_page(prep, j, has_page).encode("utf-8")
    return publish_folder(out_uri, files, storage_options, _DASHBOARD_FILE_RE)


_DASHBOARD_FILE_RE = re.compile(r"^(index\.html|latents/\d{5,}\.html)$")


# -- the seed's panel --------------------------------------------------------------------------
class HTMLPanel(str):
    """An HTML fragment that notebooks render (``_repr_html_``)."""

    def _repr_html_(self) -> str:
        return str(self)


@torch.no_grad()
def top_activations_panel(
    latent_j: int,
    act_files: Any,
    sae,
    tokenizer=None,
    device: str | torch.device | None = None,
    top_titles: int = 12,
    max_tokens_per_title: int = 64,
    min_alpha: float = 0.0,
) -> HTMLPanel:
    """HTML panel of the documents where latent ``latent_j`` reaches its highest maxima, every
    token shaded by the latent's activation (the seed's panel; returns HTML, displays nothing).

    ``act_files``: an :class:`~integral_superposition.dump.ActivationStore` or store URI(s).
    """
    from integral_superposition.activations import as_activation_source
    from integral_superposition.analysis.top_tokens import decode_tokens, tokenizer_for
    from integral_superposition.sae.encode import check_sae_source, encode_chunks

    src = as_activation_source(act_files)
    check_sae_source(sae, src)
    if not 0 <= latent_j < sae.d_sae:
        raise ValueError(f"latent_j={latent_j}: expected 0..{sae.d_sae - 1}")
    if src.doc_ids is None or src.token_ids is None:
        raise ValueError("act_files: the panel needs token and document ids (an ActivationStore)")
    z = np.zeros(src.n_tokens, dtype=np.float32)
    for rows, _x, codes, _ in encode_chunks(sae, src, device, chunk_tokens=8192):
        z[rows] = codes[:, latent_j].cpu().numpy()
    doc = np.asarray(src.doc_ids)
    uniq, inv = np.unique(doc, return_inverse=True)
    dmax = np.full(uniq.size, -np.inf)
    np.maximum.at(dmax, inv, z)
    best = np.argsort(-dmax, kind="stable")[:top_titles]
    tok = tokenizer if tokenizer is not None else tokenizer_for(src)
    blocks = []
    vmax = float(z.max()) if z.size else 0.0
    for d in best:
        rows = np.flatnonzero(inv == d)[:max_tokens_per_title]
        text = decode_tokens(tok, np.asarray(src.token_ids)[rows])
        tokens = []
        for r in rows:
            v = float(z[r])
            level = (
                0
                if v <= min_alpha or vmax <= 0
                else int(np.clip(np.ceil(v / vmax * N_SHADES), 0, N_SHADES))
            )
            tokens.append((text.get(int(src.token_ids[r]), ""), level, v))
        blocks.append({"value": float(dmax[d]), "tokens": tokens})
    return HTMLPanel(render("panel.html.j2", css=Markup(CSS), latent=latent_j, blocks=blocks))
