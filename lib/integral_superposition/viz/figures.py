"""Matplotlib figures without pyplot: no global state, no windows, safe in worker threads.

Figures are built as ``matplotlib.figure.Figure`` objects (rendered by the Agg canvas) and
either returned to the caller or written to an fsspec URI. Nothing here calls ``plt.show``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Mapping
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from integral_superposition import storage

__all__ = [
    "LABEL_COLORS",
    "close_figure",
    "figure_bytes",
    "label_color",
    "new_figure",
    "png_data_uri",
    "save_figure",
]

LABEL_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#3182bd",
)
"""Colours of labels (by label id, cycling)."""


def label_color(i: int) -> str:
    return LABEL_COLORS[int(i) % len(LABEL_COLORS)]


def new_figure(figsize: tuple[float, float] = (6.4, 4.2), dpi: int = 100, **kwargs: Any) -> Figure:
    """A Figure attached to an Agg canvas (renders to PNG/SVG; never opens a window)."""
    fig = Figure(figsize=figsize, dpi=dpi, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def figure_bytes(fig: Figure, fmt: str = "png", dpi: int | None = None) -> bytes:
    """Render ``fig`` as ``png`` or ``svg`` bytes (SVG without a timestamp, so it is reproducible)."""
    if fmt not in ("png", "svg"):
        raise ValueError(f"fmt={fmt!r}: expected 'png' or 'svg'")
    if fig.canvas is None or not hasattr(fig.canvas, "print_figure"):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    meta = {"Date": None} if fmt == "svg" else {"Software": None}
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", metadata=meta)
    return buf.getvalue()


def save_figure(
    fig: Figure,
    uri_base: str,
    formats: Iterable[str] = ("png", "svg"),
    storage_options: Mapping[str, Any] | None = None,
    dpi: int | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write ``fig`` to ``uri_base + '.' + fmt`` for each format (atomically); returns ``{fmt: uri}``.

    An existing file there is refused (``FileExistsError`` naming it, before anything is
    written) unless ``overwrite=True``: a figure file carries no record of who wrote it."""
    formats = list(formats)
    uris = {fmt: f"{uri_base}.{fmt}" for fmt in formats}
    if not overwrite:
        for uri in uris.values():
            if storage.exists(uri, storage_options):
                raise FileExistsError(
                    f"uri_base={uri_base!r}: {uri!r} exists; pass overwrite=True to replace it, "
                    "or choose another name (nothing was written)"
                )
    for fmt, uri in uris.items():
        storage.write_bytes(uri, figure_bytes(fig, fmt, dpi), storage_options)
    return uris


def png_data_uri(fig_or_png: Figure | bytes, dpi: int | None = None) -> str:
    """``data:image/png;base64,...`` for embedding a figure in HTML or markdown."""
    data = fig_or_png if isinstance(fig_or_png, bytes) else figure_bytes(fig_or_png, "png", dpi)
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def close_figure(fig: Figure) -> None:
    """Release a figure's memory (figures made here are not registered with pyplot)."""
    fig.clear()
