"""Distribution plots of an SAE: latent density, L0, decoder geometry, training curves.

Each function returns a ``matplotlib.figure.Figure``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from integral_superposition.analysis.stats import log10_density_hist
from integral_superposition.sae.metrics import DENSE_THRESHOLD, DENSE_THRESHOLD_LOOSE
from integral_superposition.viz.figures import new_figure

__all__ = ["decoder_geometry_figure", "density_histogram", "l0_histogram", "training_curves"]


def density_histogram(density: np.ndarray, bins: int = 50, title: str | None = None) -> Figure:
    """Histogram of ``log10(density + 1e-10)`` over latents ``[K]``, dead latents counted at -10."""
    density = np.asarray(density, dtype=np.float64)
    counts, edges = log10_density_hist(density, bins=bins)
    fig = new_figure((6.4, 3.6))
    ax = fig.add_subplot()
    ax.bar(
        edges[:-1],
        counts,
        width=np.diff(edges),
        align="edge",
        color="#4c72b0",
        edgecolor="white",
        linewidth=0.3,
    )
    for thr, style in ((DENSE_THRESHOLD, "--"), (DENSE_THRESHOLD_LOOSE, ":")):
        ax.axvline(
            np.log10(thr), color="#c44e52", linestyle=style, linewidth=1, label=f"density {thr:g}"
        )
    dead = int((density == 0).sum())
    ax.set_xlabel("log10(firing density + 1e-10)")
    ax.set_ylabel("latents")
    ax.set_title(title or f"Latent density ({density.size} latents, {dead} dead)")
    ax.legend(frameon=False, fontsize=8)
    return fig


def l0_histogram(l0_counts: np.ndarray, title: str | None = None) -> Figure:
    """Histogram of active latents per token from ``l0_counts[j]`` = tokens with ``j`` active."""
    c = np.asarray(l0_counts, dtype=np.float64)
    nz = np.flatnonzero(c)
    last = int(nz[-1]) + 1 if nz.size else 1
    c = c[:last]
    n = c.sum()
    mean = float((c * np.arange(c.size)).sum() / max(n, 1))
    fig = new_figure((6.4, 3.6))
    ax = fig.add_subplot()
    if last > 200:  # bin wide distributions
        width = int(np.ceil(last / 100))
        pad = (-c.size) % width
        binned = np.pad(c, (0, pad)).reshape(-1, width).sum(1)
        ax.bar(
            np.arange(binned.size) * width,
            binned / max(n, 1),
            width=width,
            align="edge",
            color="#55a868",
        )
    else:
        ax.bar(np.arange(c.size), c / max(n, 1), width=1.0, color="#55a868")
    ax.axvline(mean, color="black", linewidth=1, linestyle="--", label=f"mean L0 = {mean:.1f}")
    ax.set_xlabel("active latents per token (L0)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(title or "L0 distribution")
    ax.legend(frameon=False, fontsize=8)
    return fig


def decoder_geometry_figure(table: pd.DataFrame) -> Figure:
    """Two panels: decoder row norms and each row's max cosine with another row (from
    :func:`~integral_superposition.analysis.stats.latent_table`)."""
    fig = new_figure((9.0, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    if "decoder_norm" in table:
        v = table["decoder_norm"].to_numpy(dtype=np.float64)
        lo, hi = float(v.min()), float(v.max())
        if hi - lo < 1e-3 * max(abs(hi), 1e-12):  # unit-norm decoders: one spike, not 50 empty bins
            lo, hi = lo - 0.05 * max(abs(lo), 1e-3), hi + 0.05 * max(abs(hi), 1e-3)
        ax1.hist(v, bins=50, range=(lo, hi), color="#8172b2")
    ax1.set_xlabel("decoder row norm")
    ax1.set_ylabel("latents")
    ax1.set_title("Decoder norms")
    if "max_decoder_cos" in table:
        v = table["max_decoder_cos"].to_numpy()
        ax2.hist(v[np.isfinite(v)], bins=50, range=(-1, 1), color="#ccb974")
    ax2.set_xlabel("max cosine with another decoder row")
    ax2.set_title("Decoder redundancy")
    fig.tight_layout()
    return fig


def training_curves(
    history: pd.DataFrame,
    x: str | None = None,
    columns: Sequence[str] | None = None,
    title: str = "Training curves",
) -> Figure:
    """One panel per metric column of a training history (e.g. ``loss``, ``fvu``, ``l0``,
    ``dead_frac``) against ``x`` (default ``step``, ``tokens`` or the row number). Metrics
    that span more than two decades are drawn on a log scale."""
    if not isinstance(history, pd.DataFrame) or history.empty:
        raise ValueError("history: expected a non-empty DataFrame of training metrics")
    if x is None:
        x = next((c for c in ("step", "tokens", "n_tokens", "batch") if c in history), None)
    xs = history[x].to_numpy() if x else np.arange(len(history))
    numeric = [c for c in history.columns if c != x and pd.api.types.is_numeric_dtype(history[c])]
    cols = [c for c in (columns or numeric) if c in history][:8]
    if not cols:
        raise ValueError(
            f"history has no numeric metric columns (columns: {list(history.columns)})"
        )
    ncol = min(4, len(cols))
    nrow = -(-len(cols) // ncol)
    fig = new_figure((3.2 * ncol, 2.6 * nrow))
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    for ax, col in zip(axes, cols, strict=False):
        y = history[col].to_numpy(dtype=np.float64)
        ok = np.isfinite(y)
        ax.plot(xs[ok], y[ok], linewidth=1.2, color="#4c72b0")
        pos = y[ok & (y > 0)]
        if pos.size > 1 and pos.max() / pos.min() > 100 and (y[ok] > 0).all():
            ax.set_yscale("log")
        ax.set_title(col, fontsize=9)
        ax.set_xlabel(x or "record", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(cols) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
