"""Redundancy grouping of the top latents: near-duplicates share one row of the table.

SAEs often split one feature over several latents (eight "oil" latents, four "Iran" latents),
which fills a per-label list of the best latents with copies. Two latents are near-duplicates
when their decoder directions point the same way (cosine at least ``cosine``) or they fire on
nearly the same rows (co-firing Jaccard at least ``jaccard``, over tokens or documents); the
groups are the connected components of that graph (``scipy.sparse.csgraph``). A merge's
clusters can stand in for these groups: :func:`top_latents_table` takes any ``[K]`` group
labelling.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from integral_superposition.analysis.jaccard_sparse import jaccard_dense

__all__ = ["redundancy_groups", "top_latent_candidates", "top_latents_table"]


def redundancy_groups(
    W_dec: Any,
    latents: np.ndarray | None = None,
    *,
    firing: sp.spmatrix | None = None,
    cosine: float = 0.7,
    jaccard: float = 0.5,
) -> np.ndarray:
    """Group ids ``int64 [K]`` of near-duplicate latents among ``latents`` (default: all).

    ``W_dec``: decoder ``[K, d]`` (rows are latent directions; a tensor or array).
    ``firing``: optional 0/1 firing matrix ``[n_rows, K]`` (tokens or documents) for the
    co-firing Jaccard. Latents outside ``latents`` are singletons. Group ids are the smallest
    latent id of each group, so they are stable under relabelling of the others.
    """
    W = np.asarray(W_dec.detach().cpu() if hasattr(W_dec, "detach") else W_dec, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"W_dec has shape {W.shape}: expected [n_latents, d_model]")
    K = W.shape[0]
    if not -1 <= cosine <= 1:
        raise ValueError(f"cosine={cosine}: expected a threshold in [-1, 1]")
    if not 0 < jaccard <= 1:
        raise ValueError(f"jaccard={jaccard}: expected a threshold in (0, 1]")
    sel = np.arange(K) if latents is None else np.unique(np.asarray(latents, dtype=np.int64))
    if sel.size and (sel.min() < 0 or sel.max() >= K):
        raise ValueError(f"latents: ids must lie in [0, {K}), got {sel.min()}..{sel.max()}")
    groups = np.arange(K, dtype=np.int64)
    if sel.size < 2:
        return groups
    U = W[sel] / np.maximum(np.linalg.norm(W[sel], axis=1, keepdims=True), 1e-12)
    close = cosine <= U @ U.T
    if firing is not None:
        if firing.shape[1] != K:
            raise ValueError(f"firing has {firing.shape[1]} columns: expected {K}, one per latent")
        J = jaccard_dense(sp.csc_matrix(firing)[:, sel])
        close |= jaccard <= J
    np.fill_diagonal(close, False)
    _, comp = connected_components(sp.csr_matrix(close), directed=False)
    first = np.full(comp.max() + 1, K, dtype=np.int64)
    np.minimum.at(first, comp, sel)
    groups[sel] = first[comp]
    return groups


def top_latent_candidates(
    enrichment: pd.DataFrame,
    level: str,
    generic: np.ndarray | None = None,
    alpha: float = 0.05,
    best_q: float | None = None,
) -> pd.DataFrame:
    """The significant (q < ``alpha``), positively enriched, non-generic (latent, label) rows of
    the tidy enrichment table at ``level`` (``"document"`` or ``"token"``), best first.

    Best means significant *and* specific: with ``best_q``, the rows with q < ``best_q`` come
    first, by top-set purity (``top_purity``, largest first), then the others in the same
    order; ties go to the smaller q, then the larger log odds. Without ``best_q`` (or a
    ``top_purity`` column) the order is by q alone: the smallest q tends to belong to broad
    latents that fire on a large part of the corpus with modest purity."""
    t = enrichment[enrichment["level"].astype(str) == level]
    if t.empty:
        raise ValueError(
            f"level={level!r}: the enrichment table has no rows at that unit "
            f"(it has {sorted(enrichment['level'].astype(str).unique())})"
        )
    t = t[t["fires"] & (t["q"] < alpha) & (t["log_odds"] > 0)]
    if generic is not None:
        generic = np.asarray(generic, dtype=bool)
        t = t[~generic[t["latent"].to_numpy()]]
    if best_q is None or "top_purity" not in t:
        return t.sort_values(["q", "log_odds"], ascending=[True, False], kind="stable")
    if not 0 < best_q < 1:
        raise ValueError(f"best_q={best_q!r}: expected a q-value threshold in (0, 1)")
    key = t.assign(_weak=~(t["q"] < best_q), _purity=t["top_purity"].fillna(-1.0))
    key = key.sort_values(
        ["_weak", "_purity", "q", "log_odds"], ascending=[True, False, True, False], kind="stable"
    )
    return key.drop(columns=["_weak", "_purity"])


def top_latents_table(
    enrichment: pd.DataFrame,
    groups: np.ndarray,
    level: str,
    *,
    generic: np.ndarray | None = None,
    alpha: float = 0.05,
    per_label: int = 10,
    grouping: str = "redundancy",
    best_q: float | None = None,
) -> pd.DataFrame:
    """The best latents per label at one unit, one row per group of near-duplicates.

    ``groups``: ``int [K]`` group of each latent (:func:`redundancy_groups`, or a merge's
    cluster labels). Within a label, the latents of a group collapse into one row led by
    its best member, in the order of :func:`top_latent_candidates` (``best_q``). Columns:
    ``label, rank, unit, latent`` (the group's best member), ``group, group_size`` (members
    enriched for this label), ``members`` (their ids, best first), ``q, odds_ratio,
    log_odds, auroc, in_set, set_size`` (members of the label in the latent's whole set, its
    size), ``top_purity, top_n`` (share of the label among its ``top_n`` strongest members),
    ``grouping``. At most ``per_label`` rows per label.
    """
    groups = np.asarray(groups, dtype=np.int64)
    n_latents = int(enrichment["latent"].max()) + 1 if len(enrichment) else 0
    if groups.shape != (n_latents,):
        raise ValueError(
            f"groups has {groups.size} entries, but the enrichment table has {n_latents} "
            "latents: expected one group per latent"
        )
    cand = top_latent_candidates(enrichment, level, generic, alpha, best_q)
    cand = cand.assign(group=groups[cand["latent"].to_numpy()])
    rows = []
    for label, g in cand.groupby("label", observed=True, sort=False):
        # groups in order of their best member (the input is sorted best first)
        for rank, (gid, members) in enumerate(g.groupby("group", sort=False), start=1):
            if rank > per_label:
                break
            head = members.iloc[0]
            rows.append(
                {
                    "label": str(label),
                    "rank": rank,
                    "unit": level,
                    "latent": int(head["latent"]),
                    "group": int(gid),
                    "group_size": len(members),
                    "members": [int(m) for m in members["latent"]],
                    "q": float(head["q"]),
                    "odds_ratio": float(head["odds_ratio"]),
                    "log_odds": float(head["log_odds"]),
                    "auroc": float(head["auroc"]),
                    "in_set": int(head["in_set"]),
                    "set_size": int(head["set_size"]),
                    "top_purity": float(head.get("top_purity", np.nan)),
                    "top_n": int(head.get("top_n", head["set_size"])),
                    "grouping": grouping,
                }
            )
    cols = [
        "label", "rank", "unit", "latent", "group", "group_size", "members", "q",
        "odds_ratio", "log_odds", "auroc", "in_set", "set_size", "top_purity", "top_n",
        "grouping",
    ]  # fmt: skip
    out = pd.DataFrame(rows, columns=cols)
    order = {str(c): i for i, c in enumerate(enrichment["label"].astype(str).unique())}
    return (
        out.sort_values(["label", "rank"], key=lambda s: s.map(order) if s.name == "label" else s)
        .reset_index(drop=True)
        .astype(
            {
                "rank": np.int64,
                "latent": np.int64,
                "group": np.int64,
                "group_size": np.int64,
                "top_n": np.int64,
            }
        )
    )
