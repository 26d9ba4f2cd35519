"""One generic piece of the report (:class:`ReportSection`): text, tables, figures,
generations or a trusted HTML fragment, rendered to HTML and to markdown."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from markupsafe import Markup
from matplotlib.figure import Figure

from integral_superposition.viz.figures import figure_bytes, png_data_uri
from integral_superposition.viz.tables import markdown_table, md_escape, small_png, table_view
from integral_superposition.viz.templates import render

__all__ = ["FigureLike", "ReportSection"]

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
        parts = [f"## {md_escape(self.title)}"]
        if self.text:
            parts.append(md_escape(self.text.strip()))
        for caption, df in self._pairs(self.tables):
            if caption:
                parts.append(f"**{md_escape(caption)}**")
            parts.append(markdown_table(df, max_rows))
        for caption, fig in self._pairs(self.figures):
            png = small_png(self._png(fig), figure_width)
            parts.append(f"![{md_escape(caption or self.title)}]({png_data_uri(png)})")
        g = self._generations_frame()
        if g is not None and len(g):
            parts.append(markdown_table(g, max_rows))
        return "\n\n".join(parts)
