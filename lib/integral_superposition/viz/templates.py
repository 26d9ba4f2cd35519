"""The Jinja2 environment every HTML page is rendered with.

Templates are package data (``viz/templates/*.html.j2``), found through the installed
package (``jinja2.PackageLoader``), so a wheel renders the same pages as a checkout.

Safety is the environment's, not each template's:

- ``autoescape=True``: every ``{{ value }}`` is HTML-escaped unless it is ``Markup``;
- ``finalize`` writes invisible and reordering characters (control, bidi, zero-width,
  U+2028/9) of every printed string as visible ``⟨U+XXXX⟩`` marks, and prints ``None`` and
  NaN as :data:`MISSING` (``-``), so a template cannot forget either;
- ``StrictUndefined``: a misspelt name fails the render instead of printing nothing.

Filters: ``token`` (a model token: newlines as arrows, cut after ``MAX_TOKEN_CHARS`` with the
whole token in a tooltip), ``cut(n)`` (any text cut after ``n`` characters, tooltip),
``num(spec)`` (a number formatted with ``spec``, ``-`` when missing), ``visible`` (the marks
alone, e.g. for an attribute built from several values).
"""

from __future__ import annotations

import math
import unicodedata
from functools import cache
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup, escape

__all__ = [
    "MAX_TOKEN_CHARS",
    "MISSING",
    "TEMPLATE_DIR",
    "display_token",
    "environment",
    "fmt",
    "latent_list",
    "render",
    "template_names",
    "token_markup",
    "visible_text",
]

TEMPLATE_DIR = "templates"
"""Folder of the templates inside the ``integral_superposition.viz`` package."""

MISSING = "-"
"""How every page and table shows a missing, None or NaN value."""

MAX_TOKEN_CHARS = 40
"""Tokens longer than this are cut on the pages, the whole token in a tooltip."""

_VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}
# control, format (bidi marks and overrides, zero-width), line and paragraph separators,
# surrogates and private use: characters that would reorder, hide or break the page's text
_INVISIBLE = ("Cc", "Cf", "Zl", "Zp", "Cs", "Co")


def visible_text(text: str, keep: str = "\n\t") -> str:
    """``text`` with every invisible or reordering character (control, format, separator,
    surrogate, private use) written as a visible ``⟨U+XXXX⟩`` mark; characters in ``keep``
    stay as they are."""
    if text.isprintable():  # no control, format, separator, surrogate or private-use character
        return text
    return "".join(
        f"⟨U+{ord(ch):04X}⟩" if ch not in keep and unicodedata.category(ch) in _INVISIBLE else ch
        for ch in text
    )


def display_token(text: str) -> str:
    """A token as it should read on a page: newlines/tabs as arrows, control, format and
    separator characters (bidi marks, zero-width, U+2028/9) as visible ``⟨U+XXXX⟩``."""
    if text == "":
        return "∅"
    if text.isprintable():
        return text
    return visible_text("".join(_VISIBLE.get(ch, ch) for ch in text), keep="")


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float | np.floating):  # numpy's float64 included
        return not math.isfinite(v)
    return False


def latent_list(latents, sep: str = ", ", prefix: str = "", limit: int = 8) -> str:
    """``latents`` as text: the first ``limit`` named (each after ``prefix``), the rest counted
    (``"L1+L2+... (256 latents)"``), so a large steered group stays one short line."""
    names = [f"{prefix}{j}" for j in latents]
    if len(names) <= limit:
        return sep.join(names)
    return f"{sep.join(names[:limit])}{sep}... ({len(names)} latents)"


def fmt(v: Any, spec: str = ".4g") -> str:
    """``v`` formatted with ``spec``; :data:`MISSING` for None, NaN, inf or pandas' NA."""
    if _missing(v):
        return MISSING
    if not isinstance(v, int | float | np.number):
        import pandas as pd

        try:
            if pd.isna(v):
                return MISSING
        except (TypeError, ValueError):
            pass
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def cut_markup(text: Any, max_chars: int) -> Markup:
    """Escaped ``text`` (visible marks) cut to ``max_chars`` characters plus ``…``, the whole
    text in a ``title`` tooltip; short texts are escaped alone."""
    text = str(text)
    if len(text) <= max_chars:
        return escape(visible_text(text))
    return Markup('<span class=cut title="{}">{}…</span>').format(
        visible_text(text), visible_text(text[:max_chars])
    )


def token_markup(token: str, max_chars: int = MAX_TOKEN_CHARS) -> Markup:
    """A model token for a page (:func:`display_token`), cut after ``max_chars`` characters
    with the whole token in a tooltip."""
    token = str(token)
    if len(token) <= max_chars:
        return escape(display_token(token))
    return Markup('<span class=cut title="{}">{}…</span>').format(
        display_token(token), display_token(token[:max_chars])
    )


def _finalize(value: Any) -> Any:
    if hasattr(value, "__html__"):
        return value
    if _missing(value):
        return MISSING
    if isinstance(value, str):
        return visible_text(value)
    return value


@cache
def environment() -> jinja2.Environment:
    """The one Jinja2 environment of the package's pages (autoescaped, strict)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("integral_superposition.viz", TEMPLATE_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["token"] = token_markup
    env.filters["cut"] = cut_markup
    env.filters["num"] = fmt
    env.filters["visible"] = lambda v: visible_text(str(v))
    return env


def render(name: str, **context: Any) -> str:
    """Render template ``name`` (e.g. ``"report.html.j2"``) with ``context``."""
    return environment().get_template(name).render(**context)


def template_names() -> list[str]:
    """Every template the package ships."""
    return sorted(environment().list_templates(extensions=["j2"]))
