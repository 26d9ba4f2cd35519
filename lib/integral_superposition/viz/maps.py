"""2-D maps of latents and documents. Every function returns a ``matplotlib.figure.Figure``;
write it with :func:`integral_superposition.viz.figures.save_figure` (PNG and SVG)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from integral_superposition.analysis.stats import trim_outliers
from integral_superposition.viz.figures import label_color, new_figure
from integral_superposition.viz.heatmaps import activation_heatmap

__all__ = ["activation_heatmap", "latent_map", "latents_labels_map", "titles_map"]

_GREY = "#c8c8c8"


def latent_map(
    coords: np.ndarray,
    *,
    best_label: Sequence | np.ndarray | None = None,
    q: np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
    clusters: np.ndarray | None = None,
    dead: np.ndarray | None = None,
    alpha: float = 0.05,
    annotate: Sequence[int] | None = None,
    title: str = "SAE latents",
    figsize: tuple[float, float] = (7.5, 6.0),
) -> Figure:
    """Scatter of latents at ``coords [K, 2]``.

    Coloured either by their most enriched label (``best_label`` names, ``q`` its q-value:
    significant latents (q < ``alpha``) are coloured with opacity growing with -log10 q,
    the others grey), or by ``clusters`` (``int[K]``). ``dead`` latents are drawn as small
    crosses. ``annotate`` lists latent ids to label with their number.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords has shape {coords.shape}: expected [n_latents, 2]")
    K = coords.shape[0]
    dead = np.zeros(K, bool) if dead is None else np.asarray(dead, bool)
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    alive = ~dead
    handles: list[Line2D] = []
    if clusters is not None:
        clusters = np.asarray(clusters)
        uniq, inv = np.unique(clusters, return_inverse=True)
        colors = np.array([label_color(i) for i in range(uniq.size)])[inv]
        ax.scatter(
            coords[alive, 0], coords[alive, 1], s=9, c=colors[alive], alpha=0.8, linewidths=0
        )
        if uniq.size <= 16:
            handles = [
                Line2D([], [], marker="o", linestyle="", color=label_color(i), label=f"cluster {u}")
                for i, u in enumerate(uniq)
            ]
    elif best_label is not None:
        best = np.asarray(best_label, dtype=object)
        qv = np.ones(K) if q is None else np.nan_to_num(np.asarray(q, dtype=np.float64), nan=1.0)
        names = (
            list(label_names)
            if label_names is not None
            else sorted({b for b in best if b is not None and b == b})
        )
        index = {n: i for i, n in enumerate(names)}
        sig = alive & (qv < alpha) & np.array([b in index for b in best])
        rest = alive & ~sig
        ax.scatter(coords[rest, 0], coords[rest, 1], s=7, c=_GREY, alpha=0.6, linewidths=0)
        if sig.any():
            strength = np.clip(-np.log10(np.maximum(qv[sig], 1e-300)) / 10.0, 0.0, 1.0)
            rgba = np.zeros((int(sig.sum()), 4))
            from matplotlib.colors import to_rgba

            rgba[:, :3] = [to_rgba(label_color(index[b]))[:3] for b in best[sig]]
            rgba[:, 3] = 0.25 + 0.75 * strength
            ax.scatter(coords[sig, 0], coords[sig, 1], s=14, c=rgba, linewidths=0)
        handles = [
            Line2D([], [], marker="o", linestyle="", color=label_color(i), label=n)
            for i, n in enumerate(names)
        ] + [
            Line2D([], [], marker="o", linestyle="", color=_GREY, label=f"no label at q<{alpha:g}")
        ]
    else:
        ax.scatter(coords[alive, 0], coords[alive, 1], s=8, c="#4c72b0", alpha=0.7, linewidths=0)
    if dead.any():
        ax.scatter(coords[dead, 0], coords[dead, 1], s=10, marker="x", c="#999999", linewidths=0.6)
        handles.append(
            Line2D(
                [], [], marker="x", linestyle="", color="#999999", label=f"dead ({int(dead.sum())})"
            )
        )
    for j in annotate or ():
        ax.annotate(str(j), coords[j], fontsize=7, xytext=(3, 3), textcoords="offset points")
    if handles:
        ax.legend(handles=handles, fontsize=7, frameon=False, loc="best", markerscale=1.2)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def titles_map(
    Z_titles: np.ndarray,
    y: np.ndarray,
    reducer,
    trim_p: float = 95.0,
    figsize: tuple = (8, 6),
    label_names: Sequence[str] | None = None,
) -> Figure:
    """Documents (``Z_titles [N, K]`` pooled latent codes) in 2-D, coloured by label ``y [N]``
    (any number of classes). ``reducer`` must be fitted. Points beyond the ``trim_p``
    percentile of distance to the centre are left out."""
    X2 = np.asarray(reducer.transform(Z_titles))
    y = np.asarray(y)
    d = np.linalg.norm(X2 - X2.mean(0), axis=1)
    keep = d <= np.percentile(d, trim_p)
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    for i, lab in enumerate(np.unique(y)):
        m = keep & (y == lab)
        name = (
            label_names[int(lab)]
            if label_names is not None and np.issubdtype(y.dtype, np.integer)
            else str(lab)
        )
        ax.scatter(
            X2[m, 0], X2[m, 1], s=10, alpha=0.7, color=label_color(i), label=name, linewidths=0
        )
    ax.set_title("Documents in SAE latent space (2-D)")
    ax.set_xlabel("dimension 1")
    ax.set_ylabel("dimension 2")
    ax.legend(fontsize=8, frameon=False)
    return fig


def latents_labels_map(
    reducer,
    Z_titles: np.ndarray,
    medoids: np.ndarray,
    labels_text: Sequence[str],
    is_sport: np.ndarray | None = None,
    alpha_bg: float = 0.2,
    figsize: tuple = (10, 8),
) -> Figure:
    """Selected latents placed in the documents' 2-D map, with text labels.

    Latent ``j`` is drawn at the centroid of the documents' 2-D positions weighted by its
    (non-negative) code in each document, i.e. where the documents it fires on live.
    ``is_sport`` (the seed's name) highlights a boolean subset of the latents.
    """
    Z = np.asarray(Z_titles, dtype=np.float64)
    med = np.asarray(medoids, dtype=np.int64)
    if len(labels_text) != med.size:
        raise ValueError(f"labels_text has {len(labels_text)} entries for {med.size} medoids")
    X2 = np.asarray(reducer.transform(Z)) if Z.shape[0] else np.zeros((0, 2))
    bg = trim_outliers(X2, p=95.0)
    w = np.clip(Z[:, med], 0, None) if Z.shape[0] else np.zeros((0, med.size))
    total = w.sum(0)
    pts = np.where(
        total[:, None] > 0,
        (w.T @ X2) / np.maximum(total, 1e-30)[:, None],
        X2.mean(0) if len(X2) else 0.0,
    )
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    if len(bg):
        ax.scatter(bg[:, 0], bg[:, 1], s=8, alpha=alpha_bg, c="lightgray", label="documents")
    hi = np.zeros(med.size, bool) if is_sport is None else np.asarray(is_sport, bool)
    ax.scatter(
        pts[~hi, 0], pts[~hi, 1], s=90, c="#4c72b0", marker="D", edgecolors="black", label="latents"
    )
    if hi.any():
        ax.scatter(
            pts[hi, 0],
            pts[hi, 1],
            s=90,
            c="#c44e52",
            marker="D",
            edgecolors="black",
            label="highlighted latents",
        )
    for (px, py), text in zip(pts, labels_text, strict=True):
        ax.annotate(
            str(text), (px, py), xytext=(5, 5), textcoords="offset points", fontsize=8,
            bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "alpha": 0.7},
        )  # fmt: skip
    ax.set_title("Latents in the documents' 2-D space")
    ax.legend(fontsize=8, frameon=False)
    return fig
