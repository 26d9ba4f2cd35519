"""Heatmaps: latent x label enrichment, latent co-activation, merge matrices, activations.

Every function returns a ``matplotlib.figure.Figure``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import sparse

from integral_superposition.viz.figures import new_figure

__all__ = [
    "activation_heatmap",
    "coactivation_heatmap",
    "enrichment_heatmap",
    "merge_matrix_heatmap",
    "select_enriched_latents",
]


def select_enriched_latents(table: pd.DataFrame, per_label: int = 5) -> np.ndarray:
    """The ``per_label`` most significant latents of each label (smallest q, then largest
    log odds), without repeats, grouped by label."""
    t = table[table["fires"]].sort_values(
        ["label_id", "q", "log_odds"], ascending=[True, True, False]
    )
    t = t[t["log_odds"] > 0]
    picked = t.groupby("label_id", observed=True).head(per_label)["latent"].to_numpy()
    _, first = np.unique(picked, return_index=True)
    return picked[np.sort(first)]


def enrichment_heatmap(
    table: pd.DataFrame,
    latents: Sequence[int] | None = None,
    per_label: int = 5,
    alpha: float = 0.05,
    value: str = "log_odds",
    title: str | None = None,
    vmax: float | None = None,
) -> Figure:
    """Latent x label heatmap of ``value`` (log odds by default) from a tidy enrichment table
    of one level; cells with q < ``alpha`` are marked with a dot. ``latents`` defaults to
    the ``per_label`` most enriched latents of each label."""
    if "level" in table and table["level"].nunique() > 1:
        raise ValueError(
            "table mixes enrichment levels: select one (e.g. table[table.level == 'token'])"
        )
    lat = np.asarray(select_enriched_latents(table, per_label) if latents is None else latents)
    labels = (
        list(table["label"].cat.categories)
        if hasattr(table["label"], "cat")
        else sorted(table["label"].unique())
    )
    fig = new_figure((1.2 + 0.75 * len(labels), 1.4 + 0.22 * max(1, lat.size)))
    ax = fig.add_subplot()
    if lat.size == 0:
        ax.text(0.5, 0.5, "no enriched latents", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    sub = table[table["latent"].isin(lat)]
    M = sub.pivot(index="latent", columns="label", values=value).reindex(index=lat, columns=labels)
    Q = sub.pivot(index="latent", columns="label", values="q").reindex(index=lat, columns=labels)
    vals = M.to_numpy(dtype=np.float64)
    if vmax is not None:
        lim = float(vmax)
    else:
        lim = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
    lim = max(lim, 1e-6)
    im = ax.imshow(vals, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    sig = np.argwhere(Q.to_numpy(dtype=np.float64) < alpha)
    if sig.size:
        ax.scatter(sig[:, 1], sig[:, 0], s=10, c="black", marker="o", label=f"q < {alpha:g}")
        ax.legend(
            loc="upper right",
            bbox_to_anchor=(1.0, -0.02 - 0.4 / max(1, lat.size)),
            fontsize=7,
            frameon=False,
        )
    ax.set_xticks(range(len(labels)), [str(x) for x in labels], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(lat.size), [f"L{j}" for j in lat], fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, label=value.replace("_", " "))
    ax.set_title(title or f"Label enrichment ({value.replace('_', ' ')})", fontsize=10)
    fig.tight_layout()
    return fig


def coactivation_heatmap(
    J: np.ndarray, latents: Sequence[int], title: str = "Co-activation (Jaccard)"
) -> Figure:
    """Heatmap of a dense Jaccard matrix ``J [m, m]`` between the given latents."""
    J = np.asarray(J, dtype=np.float64)
    lat = np.asarray(latents)
    if J.shape != (lat.size, lat.size):
        raise ValueError(
            f"J has shape {J.shape}, expected ({lat.size}, {lat.size}) for the latents given"
        )
    size = 1.8 + 0.2 * lat.size
    fig = new_figure((size + 1.0, size))
    ax = fig.add_subplot()
    im = ax.imshow(
        J, cmap="viridis", vmin=0, vmax=max(1e-6, float(J.max())), interpolation="nearest"
    )
    ticks = [f"L{j}" for j in lat]
    fs = 7 if lat.size <= 40 else 5
    ax.set_xticks(range(lat.size), ticks, rotation=90, fontsize=fs)
    ax.set_yticks(range(lat.size), ticks, fontsize=fs)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="Jaccard")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def merge_matrix_heatmap(
    M,
    merged_axis: int = 0,
    max_latents: int = 400,
    title: str = "Merge matrix",
) -> Figure:
    """Heatmap of a merge matrix (dense or scipy sparse): weights of the original latents in
    each merged one. ``merged_axis=0`` for ``[K_merged, K]``; ``merged_axis=1`` for the seed's
    ``merge_matrix_from_labels`` orientation ``[K, K_merged]``. Original latents are ordered
    by their merged latent so clusters appear as blocks; at most ``max_latents`` are shown."""
    if merged_axis not in (0, 1):
        raise ValueError(f"merged_axis={merged_axis}: expected 0 (rows are merged latents) or 1")
    row_label, col_label = "merged latent", "original latent"
    A = M.toarray() if sparse.issparse(M) else np.asarray(M, dtype=np.float64)
    if A.ndim != 2:
        raise ValueError(f"M has shape {A.shape}: expected a 2-D merge matrix")
    if merged_axis == 1:
        A = A.T
    owner = np.argmax(np.abs(A), axis=0)
    order = np.lexsort((np.arange(A.shape[1]), owner))[:max_latents]
    rows = np.unique(owner[order])
    sub = A[np.ix_(rows, order)]
    fig = new_figure((7.0, 1.5 + min(6.0, 0.03 * rows.size + 2)))
    ax = fig.add_subplot()
    lim = max(1e-9, float(np.abs(sub).max()))
    cmap = "Greys" if sub.min() >= 0 else "RdBu_r"
    im = ax.imshow(
        sub,
        aspect="auto",
        cmap=cmap,
        vmin=0 if sub.min() >= 0 else -lim,
        vmax=lim,
        interpolation="nearest",
    )
    ax.set_xlabel(f"{col_label} (sorted by {row_label}; {order.size} of {A.shape[1]})")
    ax.set_ylabel(f"{row_label} ({rows.size} of {A.shape[0]})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def activation_heatmap(
    activations: np.ndarray,
    token_labels: Sequence[str] | None = None,
    latent_labels: Sequence[str] | None = None,
    figsize: tuple = (12, 8),
    top_k: int = 50,
) -> Figure:
    """The seed's heatmap of the ``top_k`` largest entries of ``activations [N, K]``: the rows and
    columns holding them, sorted by value."""
    A = np.asarray(activations)
    k = min(top_k, A.size)
    flat = np.argpartition(A.ravel(), -k)[-k:]
    r, c = np.unravel_index(flat, A.shape)
    order = np.argsort(-A[r, c])
    rows = list(dict.fromkeys(r[order].tolist()))
    cols = list(dict.fromkeys(c[order].tolist()))
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    im = ax.imshow(A[np.ix_(rows, cols)], aspect="auto", cmap="YlOrRd", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="activation")
    ax.set_title(f"Top-{k} latent activations")
    ax.set_xlabel("latents")
    ax.set_ylabel("tokens")
    if latent_labels is not None:
        ax.set_xticks(
            range(len(cols)),
            [latent_labels[i] if i < len(latent_labels) else f"L{i}" for i in cols],
            rotation=45,
            ha="right",
        )
    if token_labels is not None:
        ax.set_yticks(
            range(len(rows)), [token_labels[i] if i < len(token_labels) else f"T{i}" for i in rows]
        )
    fig.tight_layout()
    return fig
