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

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from markupsafe import Markup

from integral_superposition.outputs import publish_folder
from integral_superposition.viz.activations_panel import HTMLPanel, top_activations_panel
from integral_superposition.viz.dashboard_data import DashboardData, PreparedDashboards
from integral_superposition.viz.figures import label_color
from integral_superposition.viz.safe_html import (
    CSS,
    N_SHADES,
    csp,
    esc,
    esc_cut,
    json_for_script,
    token_html,
)
from integral_superposition.viz.templates import (
    MAX_TOKEN_CHARS,
    MISSING,
    display_token,
    fmt,
    render,
    visible_text,
)

__all__ = [
    "CSS",
    "MAX_TOKEN_CHARS",
    "MISSING",
    "N_SHADES",
    "DashboardData",
    "HTMLPanel",
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


def latent_page_name(latent: int) -> str:
    """Path of latent ``latent``'s page relative to the dashboards folder."""
    return f"latents/{int(latent):05d}.html"


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


def _enrichment_view(prep: PreparedDashboards, j: int) -> dict[str, Any] | None:
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


def _lens_view(prep: PreparedDashboards, j: int) -> list[dict[str, Any]] | None:
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
    prep: PreparedDashboards, j: int, has_page: Callable[[int], bool] | None = None
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
        csp=Markup(csp(None)),
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
        csp=Markup(csp(INDEX_JS)),
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
    owned: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write ``index.html`` and ``latents/NNNNN.html`` (for ``latents``, default all) under
    ``out_uri``, replacing earlier dashboards there; returns ``{relative name: {size, sha256}}``.
    A folder holding any other file, or pages this project did not write (see
    :func:`~integral_superposition.outputs.publish_folder`; ``owned``: pages an enclosing
    output's manifest lists), is refused: it is not ours to replace."""
    K = data.n_latents
    pages = np.arange(K) if latents is None else np.unique(np.asarray(latents, dtype=np.int64))
    if pages.size and (pages.min() < 0 or pages.max() >= K):
        raise ValueError(f"latents: ids must lie in [0, {K})")
    page_set = np.zeros(K, bool)
    page_set[pages] = True

    def has_page(j: int) -> bool:
        return bool(page_set[j])

    prep = PreparedDashboards(data)
    files: dict[str, bytes] = {"index.html": render_index(data, has_page, links).encode("utf-8")}
    for j in pages.tolist():
        files[latent_page_name(j)] = render_latent_page(prep, j, has_page).encode("utf-8")
    return publish_folder(out_uri, files, storage_options, _DASHBOARD_FILE_RE, owned)


_DASHBOARD_FILE_RE = re.compile(r"^(index\.html|latents/\d{5,}\.html)$")
