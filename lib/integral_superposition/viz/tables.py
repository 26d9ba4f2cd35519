"""Report tables and text: DataFrames as the templates show them and as markdown, and small
PNGs for markdown artifacts."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd

from integral_superposition.viz.templates import MISSING, display_token, fmt, visible_text

__all__ = ["markdown_table", "md_escape", "small_png", "table_view"]


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


def md_escape(text: str) -> str:
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
        return md_escape(display_token(str(v)) if isinstance(v, str) else v)

    head = "| " + " | ".join(md_escape(c) for c in shown.columns) + " |"
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
