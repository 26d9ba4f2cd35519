"""What every page of the project shares: the one escaping of user-provided strings, JSON
for inline scripts, the Content-Security-Policy (no network, scripts only by hash) and the
base style sheet."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from typing import Any

import numpy as np
from markupsafe import escape

from integral_superposition.viz.templates import (
    MAX_TOKEN_CHARS,
    cut_markup,
    token_markup,
    visible_text,
)

__all__ = ["CSS", "N_SHADES", "csp", "esc", "esc_cut", "json_for_script", "token_html"]

N_SHADES = 10
"""Shades of the activation colour scale (CSS classes ``a1`` .. ``a10``)."""


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


def csp(script: str | None) -> str:
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
