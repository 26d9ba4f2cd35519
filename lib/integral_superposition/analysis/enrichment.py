"""Label enrichment of latents: multi-class one-sided Fisher exact tests, vectorised.

For latent ``j`` and label ``c`` the 2x2 table is

    =================  ===============  =====================
    .                  label c          other labels
    in j's set         a                b = n_j - a
    not in j's set     N_c - a          N - N_c - b
    =================  ===============  =====================

where ``j``'s set is its top-``n`` tokens (token level) or the documents where its maximum
passes a threshold (document level), ``N`` the population and ``N_c`` the population with
label ``c``. The one-sided (enrichment) Fisher p-value is the hypergeometric tail
``P(X >= a)``, ``X ~ Hypergeom(N, N_c, n_j)`` (``scipy.stats.hypergeom.sf``), computed for
all ``K x C`` pairs at once. Benjamini-Hochberg q-values (``scipy.stats.false_discovery_control``)
are taken over every testable pair (latents with an empty set are reported, with p = q = 1,
but are not counted as tests).

Odds ratios are Haldane-corrected (0.5 added to each cell), so they are finite for empty
cells. Two purities describe how specific a latent is: ``purity`` is the largest label share
of its whole set (at the document level: every document where it fires), ``top_purity`` the
share of label ``c`` among the ``top_n`` members where it fires most strongly (the token
level's top set is already its strongest ``n`` tokens, so there both sets are one). The AUROC
of a latent's activation as a score for label ``c`` and the top-set counts come from
:mod:`integral_superposition.analysis.ranks`; label encoding and document alignment from
:mod:`integral_superposition.analysis.label_ids`. Both are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, hypergeom

from integral_superposition.analysis.accumulate import TopKSets
from integral_superposition.analysis.label_ids import (
    align_documents,
    check_two_classes,
    encode_label_array,
)
from integral_superposition.analysis.ranks import auroc_from_hist, max_auroc, top_set_counts

__all__ = [
    "align_documents",
    "auroc_from_hist",
    "best_labels",
    "document_enrichment",
    "encode_label_array",
    "enrichment_matrix",
    "fisher_enrichment",
    "fisher_pq",
    "fisher_table",
    "lead_level",
    "max_auroc",
    "top_set_counts",
]


def fisher_pq(
    in_set: np.ndarray, set_size: np.ndarray, label_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Fisher p-values and BH q-values ``[K, C]`` of the 2x2 tables given by
    ``in_set [K, C]``, ``set_size [K]`` and ``label_counts [C]``; latents with an empty set
    get p = q = 1 and are not counted as tests."""
    a = np.asarray(in_set, dtype=np.int64)
    n = np.asarray(set_size, dtype=np.int64)[:, None]
    Nc = np.asarray(label_counts, dtype=np.int64)[None, :]
    N = int(Nc.sum())
    p = np.ones(a.shape)
    need = (a > 0) & (n > 0)  # P(X >= 0) = 1
    if need.any():
        # tables repeat (top sets share one size; labels few): each distinct (a, n, c) once,
        # found through one int64 key per table
        aa, nn = a[need], np.broadcast_to(n, a.shape)[need]
        cc = np.broadcast_to(np.arange(Nc.shape[1]), a.shape)[need]
        base = int(nn.max()) + 1
        key = (aa * base + nn) * Nc.shape[1] + cc
        _, first, inv = np.unique(key, return_index=True, return_inverse=True)
        sf = hypergeom.sf(aa[first] - 1, N, Nc[0, cc[first]], nn[first])
        p[need] = sf[inv.ravel()]
    p = np.clip(p, 0.0, 1.0)
    testable = np.broadcast_to(n > 0, a.shape)
    q = np.ones(a.shape)
    if testable.any():
        q[testable] = false_discovery_control(p[testable], method="bh")
    return p, q


def fisher_table(
    in_set: np.ndarray,
    set_size: np.ndarray,
    label_counts: np.ndarray,
    label_names: Sequence[str],
    *,
    level: str = "token",
    auroc: np.ndarray | None = None,
    alpha: float = 0.05,
    top_in: np.ndarray | None = None,
    top_size: np.ndarray | None = None,
) -> pd.DataFrame:
    """The tidy enrichment table from counts: ``in_set [K, C]`` (set members with label c),
    ``set_size [K]``, ``label_counts [C]``. One row per (latent, label).

    ``top_in [K, C]`` / ``top_size [K]``: label counts and size of each latent's top set (its
    strongest members) for ``top_purity``; default: the whole set (``in_set``, ``set_size``).
    """
    a = np.asarray(in_set, dtype=np.int64)
    K, C = a.shape
    n = np.asarray(set_size, dtype=np.int64)[:, None]
    Nc = np.asarray(label_counts, dtype=np.int64)[None, :]
    N = int(label_counts.sum())
    p, q = fisher_pq(a, n[:, 0], Nc[0])
    b = n - a
    c = Nc - a
    d = N - Nc - b
    odds = ((a + 0.5) * (d + 0.5)) / ((b + 0.5) * (c + 0.5))
    log_odds = np.log(odds)
    se = np.sqrt(1 / (a + 0.5) + 1 / (b + 0.5) + 1 / (c + 0.5) + 1 / (d + 0.5))
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(n > 0, a / np.maximum(n, 1), np.nan)
    base = Nc / max(N, 1)
    fires = np.broadcast_to(n > 0, (K, C))
    odds = np.where(fires, odds, np.nan)
    log_odds = np.where(fires, log_odds, np.nan)
    se = np.where(fires, se, np.nan)
    purity = np.nanmax(np.where(fires, frac, -np.inf), axis=1)
    purity = np.where(n[:, 0] > 0, purity, np.nan)
    top_in = a if top_in is None else np.asarray(top_in, dtype=np.int64)
    top_size = n[:, 0] if top_size is None else np.asarray(top_size, dtype=np.int64)
    if top_in.shape != (K, C) or top_size.shape != (K,):
        raise ValueError(
            f"top_in {top_in.shape} and top_size {top_size.shape}: expected ({K}, {C}) and "
            f"({K},), like in_set and set_size"
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        top_purity = np.where(
            top_size[:, None] > 0, top_in / np.maximum(top_size, 1)[:, None], np.nan
        )
    cat = pd.Categorical.from_codes(np.tile(np.arange(C), K), categories=list(label_names))
    table = pd.DataFrame(
        {
            "latent": np.repeat(np.arange(K, dtype=np.int64), C),
            "label": cat,
            "label_id": np.tile(np.arange(C, dtype=np.int64), K),
            "level": level,
            "set_size": np.repeat(n[:, 0], C),
            "in_set": a.ravel(),
            "label_total": np.tile(Nc[0], K),
            "population": N,
            "frac_in_set": frac.ravel(),
            "base_rate": np.tile(base[0], K),
            "lift": (frac / base).ravel(),
            "odds_ratio": odds.ravel(),
            "log_odds": log_odds.ravel(),
            "log_odds_se": se.ravel(),
            "p": p.ravel(),
            "q": q.ravel(),
            "significant": (q < alpha).ravel() & fires.ravel(),
            "purity": np.repeat(purity, C),
            "top_n": np.repeat(top_size, C),
            "top_purity": top_purity.ravel(),
            "auroc": (auroc if auroc is not None else np.full((K, C), np.nan)).ravel(),
            "fires": fires.ravel(),
        }
    )
    table["level"] = table["level"].astype("category")
    return table


def _top_rows_and_latents(top_sets: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Flatten any accepted top-set form to ``(latent ids, row ids, K)``."""
    if isinstance(top_sets, TopKSets):
        K = top_sets.n_latents
        lat = np.repeat(np.arange(K), top_sets.n)
        rows = top_sets.rows.ravel()
        ok = rows >= 0
        return lat[ok], rows[ok], K
    if isinstance(top_sets, Mapping):
        keys = [int(k) for k in top_sets]
        if any(k < 0 for k in keys):
            raise ValueError("top_sets: latent keys must be non-negative")
        K = max(keys) + 1 if keys else 0
        items = [
            (int(k), np.asarray(list(v) if isinstance(v, set) else v, dtype=np.int64))
            for k, v in top_sets.items()
        ]
    elif isinstance(top_sets, Sequence):
        K = len(top_sets)
        items = [
            (j, np.asarray(sorted(v) if isinstance(v, set) else v, dtype=np.int64).ravel())
            for j, v in enumerate(top_sets)
        ]
    else:
        raise TypeError(
            f"top_sets={type(top_sets).__name__}: expected TopKSets, a list of sets/arrays or a "
            "{latent: row ids} mapping"
        )
    if not items:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), K
    lat = np.concatenate([np.full(v.size, k, dtype=np.int64) for k, v in items])
    rows = np.concatenate([v for _, v in items])
    return lat, rows, K


def fisher_enrichment(
    top_sets: Any,
    labels_global: Any,
    *,
    label_names: Sequence[str] | None = None,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Token-level enrichment of each latent's top set for each label (the seed's call, multi-class).

    ``top_sets``: a :class:`TopKSets` (from :func:`topk_sets_per_latent`), the seed's list of
    row-id sets, or a ``{latent: row ids}`` mapping. ``labels_global``: one label (id or
    name) per token, aligned with the rows the top sets index. Returns the tidy table
    (one row per latent x label): ``latent, label, label_id, level, set_size, in_set,
    label_total, population, frac_in_set, base_rate, lift, odds_ratio, log_odds,
    log_odds_se, p, q, significant, purity, top_n, top_purity, auroc, fires``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}: expected a significance level in (0, 1)")
    if label_names is None and isinstance(top_sets, TopKSets):
        label_names = top_sets.label_names
    ids, names = encode_label_array(labels_global, label_names)
    lat, rows, K = _top_rows_and_latents(top_sets)
    population = ids
    if isinstance(top_sets, TopKSets):
        if top_sets.row_index is not None:
            if ids.size <= int(top_sets.row_index.max(initial=0)):
                raise ValueError(
                    f"labels_global has {ids.size} labels, but the top sets index rows up to "
                    f"{int(top_sets.row_index.max())}: expected one label per stored token"
                )
            population = ids[top_sets.row_index]
        elif ids.size != top_sets.n_tokens:
            raise ValueError(
                f"labels_global has {ids.size} labels, but the top sets were computed over "
                f"{top_sets.n_tokens} tokens: expected one label per scanned token, in row order"
            )
    if rows.size and (rows.min() < 0 or rows.max() >= ids.size):
        raise ValueError(
            f"top_sets index rows up to {int(rows.max())}, but labels_global has only {ids.size} "
            "labels: labels and activations are not aligned"
        )
    C = len(names)
    counts = np.bincount(population, minlength=C)
    check_two_classes(counts, names, "labels_global")
    in_set = np.bincount(lat * C + ids[rows], minlength=K * C).reshape(K, C)
    set_size = in_set.sum(1)
    auroc = None
    if (
        isinstance(top_sets, TopKSets)
        and top_sets.label_hist is not None
        and top_sets.label_hist.shape[1] == C
    ):
        auroc = auroc_from_hist(top_sets.label_hist, top_sets.label_counts)
    return fisher_table(in_set, set_size, counts, names, level="token", auroc=auroc, alpha=alpha)


def document_enrichment(
    doc_pairs: np.ndarray,
    doc_labels: Any,
    n_latents: int,
    *,
    doc_max: np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
    alpha: float = 0.05,
    top_n: int = 50,
) -> pd.DataFrame:
    """Document-level enrichment: latent ``j``'s set is the documents where it fires.

    ``doc_pairs``: int ``[P, 2]`` distinct ``(doc_id, latent)`` pairs (from
    :func:`~integral_superposition.analysis.scan.scan_latents` with ``doc_threshold``);
    ``doc_labels``: the documents and their labels - a DataFrame with ``doc_id`` and
    ``label`` (or ``label_name``) columns, or a Series indexed by doc id. The population is
    every document in ``doc_labels``. The AUROC column scores each document by the latent's
    maximum over it (``doc_max [P]``, aligned with ``doc_pairs``; 0 for documents outside
    the pairs); without ``doc_max`` it is the AUROC of the firing indicator.

    ``top_purity`` is the share of each label among the latent's ``top_n`` documents with the
    largest maximum (``top_n`` column: fewer when it fires in fewer documents; ties go to the
    smaller doc id); without ``doc_max`` the top set is every document where it fires.
    """
    if isinstance(top_n, bool) or not isinstance(top_n, int | np.integer) or top_n < 1:
        raise ValueError(f"top_n={top_n!r}: expected a positive number of documents")
    pairs, doc_of_pair, ids, names = align_documents(doc_pairs, doc_labels, n_latents, label_names)
    C = len(names)
    counts = np.bincount(ids, minlength=C)
    check_two_classes(counts, names, "doc_labels")
    lab = ids[doc_of_pair]
    in_set = np.bincount(pairs[:, 1] * C + lab, minlength=n_latents * C).reshape(n_latents, C)
    set_size = in_set.sum(1)
    if doc_max is not None:
        doc_max = np.asarray(doc_max, dtype=np.float64).ravel()
        if doc_max.shape != (pairs.shape[0],):
            raise ValueError(
                f"doc_max has shape {doc_max.shape}: expected ({pairs.shape[0]},), one value "
                "per (doc_id, latent) pair"
            )
        auroc = max_auroc(pairs[:, 1], lab, doc_max, counts, n_latents)
        top_in, top_size = top_set_counts(
            pairs[:, 1], lab, doc_max, n_latents, C, top_n, pairs[:, 0]
        )
    else:
        top_in = top_size = None
        N = counts.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            tpr = in_set / counts[None, :]
            fpr = (set_size[:, None] - in_set) / (N - counts)[None, :]
        auroc = 0.5 * (1 + tpr - fpr)
    return fisher_table(
        in_set, set_size, counts, names, level="document", auroc=auroc, alpha=alpha,
        top_in=top_in, top_size=top_size,
    )  # fmt: skip


def lead_level(doc_lengths: np.ndarray, max_median_tokens: int = 64) -> str:
    """The unit an analysis leads with: ``"document"`` when the median document (length in
    tokens, ``doc_lengths [D]``) has at most ``max_median_tokens`` tokens, else ``"token"``.

    In short documents (headlines, titles) a latent's top tokens say little about the
    document's label while whether it fires anywhere in the document says more; in long ones
    the token level is the finer and better-powered view.
    """
    lengths = np.asarray(doc_lengths)
    if lengths.size == 0:
        return "token"
    return "document" if float(np.median(lengths)) <= max_median_tokens else "token"


def enrichment_matrix(table: pd.DataFrame, value: str = "log_odds") -> pd.DataFrame:
    """Pivot a tidy enrichment table to ``[latent, label]`` (e.g. for heatmaps)."""
    return table.pivot(index="latent", columns="label", values=value)


def best_labels(table: pd.DataFrame) -> pd.DataFrame:
    """Per latent, the label with the smallest q (ties: largest log odds).

    Columns: ``latent, level, best_label, best_label_id, q, p, log_odds, frac_in_set, purity,
    top_purity, top_n, auroc, set_size, significant`` (``top_purity``: of the best label) (``level``: the unit, ``token`` or ``document``). Latents with an empty set get ``best_label`` NaN.
    """
    t = table.sort_values(["latent", "q", "log_odds"], ascending=[True, True, False])
    best = t.drop_duplicates("latent", keep="first").set_index("latent")
    out = pd.DataFrame(
        {
            "level": best["level"].astype(str),
            "best_label": best["label"].astype(object).where(best["fires"], None),
            "best_label_id": best["label_id"].where(best["fires"], -1),
            "q": best["q"],
            "p": best["p"],
            "log_odds": best["log_odds"],
            "frac_in_set": best["frac_in_set"],
            "purity": best["purity"],
            "top_purity": best["top_purity"],
            "top_n": best["top_n"],
            "auroc": best["auroc"],
            "set_size": best["set_size"],
            "significant": best["significant"],
        }
    )
    return out.reset_index()
