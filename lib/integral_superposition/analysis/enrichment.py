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
level's top set is already its strongest ``n`` tokens, so there both sets are one). The AUROC of a latent's activation as a score for label ``c`` over all tokens comes
from the per-(latent, label) log10 activation histogram of the scan (exact for the
zero/non-zero split, ties inside a bin counted half).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, hypergeom

from integral_superposition.analysis.scan import TopKSets

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


def encode_label_array(
    labels: Any, label_names: Sequence[str] | None = None, name: str = "labels_global"
) -> tuple[np.ndarray, list[str]]:
    """Labels (ids or names; array, list or Series) -> ``(int64 ids [N], names [C])``."""
    arr = labels.to_numpy() if isinstance(labels, pd.Series | pd.Index) else np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} has shape {arr.shape}: expected a 1-D array of labels")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: expected one label per token")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        # a missing label would otherwise become a class of its own named "nan" or "None"
        missing = pd.isna(arr) | (pd.Series(arr).astype(str).str.strip() == "").to_numpy()
        if missing.any():
            raise ValueError(
                f"{name}: {int(missing.sum())} of {arr.size} labels are missing (NaN, None or "
                f"empty), first at position {int(np.flatnonzero(missing)[0])}: expected a label "
                "for every entry (drop those rows or fill them in)"
            )
    if np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_):
        ids = arr.astype(np.int64)
        if ids.min() < 0:
            raise ValueError(f"{name}: label ids must be non-negative, found {int(ids.min())}")
        n = int(ids.max()) + 1
        names = list(label_names) if label_names is not None else [str(i) for i in range(n)]
        if len(names) < n:
            raise ValueError(
                f"label_names has {len(names)} names, but {name} uses ids up to {n - 1}"
            )
        return ids, [str(x) for x in names]
    if label_names is not None:
        names = [str(x) for x in label_names]
        index = {n: i for i, n in enumerate(names)}
        ids = np.array([index.get(str(v), -1) for v in arr], dtype=np.int64)
        if (ids < 0).any():
            bad = sorted({str(v) for v in arr[ids < 0]})[:5]
            raise ValueError(f"{name} has labels {bad} not in label_names={names}")
        return ids, names
    codes, uniques = pd.factorize(pd.Series(arr).astype(str), sort=True)
    return codes.astype(np.int64), [str(u) for u in uniques]


def _check_two_classes(counts: np.ndarray, names: Sequence[str], name: str) -> None:
    present = np.flatnonzero(counts > 0)
    if present.size < 2:
        only = names[int(present[0])] if present.size else None
        raise ValueError(
            f"{name} has a single class ({only!r}): enrichment needs at least two labels "
            "that occur among the tokens"
        )


def auroc_from_hist(
    label_hist: np.ndarray, label_counts: np.ndarray, block: int = 2048
) -> np.ndarray:
    """AUROC of each latent's activation as a score for each label, ``float64 [K, C]``.

    ``label_hist``: ``[K, C, n_bins]`` counts of firing activations on increasing bins;
    ``label_counts``: ``[C]`` tokens per label. Non-firing tokens form a bin below all others.
    """
    K, C, _ = label_hist.shape
    N = float(label_counts.sum())
    out = np.full((K, C), np.nan)
    for a in range(0, K, block):
        h = label_hist[a : a + block].astype(np.float64)
        zeros = label_counts[None, :] - h.sum(2)
        pos = np.concatenate([zeros[..., None], h], 2)  # [k, C, nb+1]
        neg = pos.sum(1, keepdims=True) - pos
        below = np.cumsum(neg, 2) - neg
        u = (pos * (below + 0.5 * neg)).sum(2)
        denom = label_counts * (N - label_counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[a : a + block] = np.where(denom > 0, u / denom, np.nan)
    return out


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
    _check_two_classes(counts, names, "labels_global")
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


def align_documents(
    doc_pairs: np.ndarray,
    doc_labels: Any,
    n_latents: int,
    label_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Check and align document pairs with document labels.

    Returns ``(pairs int64 [P, 2], index of each pair's document in doc_labels [P],
    label ids of the documents [D], label names [C])``; see :func:`document_enrichment`.
    """
    if isinstance(doc_labels, pd.DataFrame):
        if "doc_id" not in doc_labels:
            raise ValueError("doc_labels: expected a 'doc_id' column")
        col = "label_name" if "label_name" in doc_labels else "label"
        if col not in doc_labels:
            raise ValueError("doc_labels: expected a 'label' or 'label_name' column")
        doc_index = doc_labels["doc_id"].to_numpy(dtype=np.int64)
        values = doc_labels[col]
    elif isinstance(doc_labels, pd.Series):
        doc_index = doc_labels.index.to_numpy(dtype=np.int64)
        values = doc_labels
    else:
        raise TypeError(
            f"doc_labels={type(doc_labels).__name__}: expected a DataFrame (doc_id, label) or a "
            "Series indexed by doc_id"
        )
    if np.unique(doc_index).size != doc_index.size:
        raise ValueError("doc_labels: doc_id values must be unique (one label per document)")
    ids, names = encode_label_array(values, label_names, name="doc_labels")
    pairs = np.asarray(doc_pairs, dtype=np.int64).reshape(-1, 2)
    order = np.argsort(doc_index)
    sorted_docs = doc_index[order]
    pos = np.searchsorted(sorted_docs, pairs[:, 0])
    found = (pos < sorted_docs.size) & (
        sorted_docs[np.minimum(pos, sorted_docs.size - 1)] == pairs[:, 0]
    )
    if not found.all():
        missing = np.unique(pairs[~found, 0])
        raise ValueError(
            f"doc_labels has no label for {missing.size} document ids that the activations "
            f"contain (e.g. {missing[:5].tolist()}): labels and activations are not aligned"
        )
    if pairs.size and (pairs[:, 1].min() < 0 or pairs[:, 1].max() >= n_latents):
        raise ValueError(f"doc_pairs: latent ids must lie in [0, {n_latents})")
    return pairs, order[pos], ids, names


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
    _check_two_classes(counts, names, "doc_labels")
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


def top_set_counts(
    latents: np.ndarray,
    labels: np.ndarray,
    values: np.ndarray,
    n_latents: int,
    n_labels: int,
    n: int,
    tiebreak: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Label counts ``int64 [K, C]`` and sizes ``[K]`` of each latent's top set: its ``n``
    members with the largest ``values``. ``latents``, ``labels``, ``values``, ``tiebreak``
    (smaller first among equal values, e.g. doc ids): ``[P]``, one entry per member."""
    lat = np.asarray(latents, dtype=np.int64)
    lab = np.asarray(labels, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    tie = np.zeros(lat.size, np.int64) if tiebreak is None else np.asarray(tiebreak, np.int64)
    order = np.lexsort((tie, -v, lat))
    lat, lab = lat[order], lab[order]
    start = np.searchsorted(lat, lat, side="left")
    keep = (np.arange(lat.size) - start) < n
    counts = np.bincount(lat[keep] * n_labels + lab[keep], minlength=n_latents * n_labels).reshape(
        n_latents, n_labels
    )
    return counts, counts.sum(1)


def max_auroc(
    latents: np.ndarray,
    labels: np.ndarray,
    values: np.ndarray,
    label_counts: np.ndarray,
    n_latents: int,
) -> np.ndarray:
    """AUROC ``float64 [K, C]`` of each latent's per-document score for each label, from the
    documents where it is non-zero: ``latents``, ``labels``, ``values`` ``[P]`` (distinct
    (document, latent) pairs); every other document scores 0 (ties counted half).

    Mann-Whitney through ranks: the zeros of latent ``j`` share the average rank of the
    ``N - n_j`` lowest places, its ``n_j`` non-zero documents rank above them.
    """
    counts = np.asarray(label_counts, dtype=np.int64)
    C, N = counts.size, int(counts.sum())
    lat = np.asarray(latents, dtype=np.int64)
    lab = np.asarray(labels, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    order = np.lexsort((v, lat))
    lat, lab, v = lat[order], lab[order], v[order]
    n_j = np.bincount(lat, minlength=n_latents)
    start = np.concatenate([[0], np.cumsum(n_j)[:-1]])
    # average rank (1-based) of each pair among its latent's non-zero documents, ties averaged
    new = np.ones(lat.size, dtype=bool)
    new[1:] = (lat[1:] != lat[:-1]) | (v[1:] != v[:-1])
    grp = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    last = np.append(first[1:], lat.size) - 1
    avg = 0.5 * (first[grp] + last[grp]) - start[lat] + 1
    rank = (N - n_j[lat]) + avg
    rank_sum = np.bincount(lat * C + lab, weights=rank, minlength=n_latents * C).astype(float)
    rank_sum = rank_sum.reshape(-1, C)
    fired = np.bincount(lat * C + lab, minlength=n_latents * C).reshape(-1, C)
    zeros = counts[None, :] - fired  # documents of label c where latent j is 0
    rank_sum += zeros * (0.5 * (N - n_j + 1))[:, None]
    u = rank_sum - counts * (counts + 1) / 2
    denom = counts * (N - counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, u / denom, np.nan)


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
