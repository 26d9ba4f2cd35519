"""Shuffled-label control of the label enrichment: how many tests pass with no signal.

Each seed permutes the documents' labels (the documents themselves, their tokens and where
every latent fires stay as they are) and reruns the Fisher tests of
:mod:`integral_superposition.analysis.enrichment` on the same firing counts: only the label
side of each 2x2 table changes, so a control costs a few bincounts and one BH pass per seed.
With the labels shuffled, no latent should pass ``q < alpha``: a count well above 0 means the
tests are miscalibrated (e.g. tokens of one document are not independent), and the smallest
q per seed shows how far from significance the null stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from integral_superposition.analysis.accumulate import TopKSets
from integral_superposition.analysis.enrichment import fisher_pq
from integral_superposition.analysis.label_ids import align_documents

__all__ = ["control_summary", "shuffled_label_control"]


def _seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int | np.integer):
        if seeds < 1:
            raise ValueError(f"seeds={seeds}: expected a positive number of shuffles")
        return list(range(int(seeds)))
    out = [int(s) for s in seeds]
    if not out:
        raise ValueError("seeds: expected at least one seed")
    return out


def _row(level: str, seed: int, p: np.ndarray, q: np.ndarray, tested: np.ndarray, alpha: float):
    qt = q[np.broadcast_to(tested[:, None], q.shape)]
    return {
        "level": level,
        "seed": seed,
        "n_tests": int(qt.size),
        "n_significant": int((qt < alpha).sum()),
        "min_q": float(qt.min()) if qt.size else float("nan"),
        "min_p": float(p[np.broadcast_to(tested[:, None], p.shape)].min()) if qt.size else np.nan,
        "alpha": alpha,
    }


def shuffled_label_control(
    doc_pairs: np.ndarray,
    doc_labels: Any,
    n_latents: int,
    *,
    seeds: int | Sequence[int] = 3,
    alpha: float = 0.05,
    label_names: Sequence[str] | None = None,
    top: TopKSets | None = None,
    row_doc: np.ndarray | None = None,
) -> pd.DataFrame:
    """The enrichment rerun with the document labels permuted, once per seed.

    ``doc_pairs`` (int ``[P, 2]`` distinct ``(doc_id, latent)``) and ``doc_labels`` (DataFrame
    ``doc_id, label`` or a Series by doc id) as in
    :func:`~integral_superposition.analysis.enrichment.document_enrichment`. With ``top`` (the
    scan's top sets) and ``row_doc`` (``int [n_rows]``: the document of each stored row) the
    token level is controlled too: a token's label is its document's shuffled label.
    ``seeds``: a number of shuffles (seeds 0..n-1) or the seeds themselves.

    Returns one row per (level, seed): ``level, seed, n_tests, n_significant`` (tests at
    ``q < alpha``), ``min_q, min_p, alpha``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}: expected a significance level in (0, 1)")
    seeds = _seeds(seeds)
    pairs, doc_of_pair, ids, names = align_documents(doc_pairs, doc_labels, n_latents, label_names)
    C = len(names)
    D = ids.size
    set_size = np.bincount(pairs[:, 1], minlength=n_latents)
    tok = None
    if top is not None:
        if row_doc is None:
            raise ValueError("row_doc: required with top (the document id of every stored row)")
        doc_index = (
            doc_labels["doc_id"].to_numpy(dtype=np.int64)
            if isinstance(doc_labels, pd.DataFrame)
            else doc_labels.index.to_numpy(dtype=np.int64)
        )
        row_doc = np.asarray(row_doc, dtype=np.int64)
        population = top.row_index if top.row_index is not None else np.arange(top.n_tokens)
        if population.size and int(population.max()) >= row_doc.size:
            raise ValueError(
                f"row_doc has {row_doc.size} rows, but the top sets index rows up to "
                f"{int(population.max())}: expected the document of every stored row"
            )
        order = np.argsort(doc_index)
        where = np.searchsorted(doc_index[order], row_doc[population])
        where = np.minimum(where, D - 1)
        if not (doc_index[order][where] == row_doc[population]).all():
            raise ValueError("doc_labels: some scanned rows belong to documents without a label")
        pop_doc = order[where]  # [N] index into doc_labels of each scanned row
        pos_of_row = np.full(row_doc.size, -1, dtype=np.int64)
        pos_of_row[population] = np.arange(population.size)
        lat = np.repeat(np.arange(top.n_latents), top.n)
        rows = top.rows.ravel()
        ok = rows >= 0
        top_doc = pop_doc[pos_of_row[rows[ok]]]
        tok = (lat[ok], top_doc, pop_doc, top.counts)
    out = []
    for seed in seeds:
        shuffled = ids[np.random.default_rng(seed).permutation(D)]
        counts = np.bincount(shuffled, minlength=C)
        lab = shuffled[doc_of_pair]
        in_set = np.bincount(pairs[:, 1] * C + lab, minlength=n_latents * C).reshape(-1, C)
        p, q = fisher_pq(in_set, set_size, counts)
        out.append(_row("document", seed, p, q, set_size > 0, alpha))
        if tok is not None:
            t_lat, t_doc, p_doc, t_size = tok
            t_counts = np.bincount(shuffled[p_doc], minlength=C)
            t_in = np.bincount(t_lat * C + shuffled[t_doc], minlength=top.n_latents * C)
            p, q = fisher_pq(t_in.reshape(-1, C), t_size, t_counts)
            out.append(_row("token", seed, p, q, t_size > 0, alpha))
    return pd.DataFrame(out)


def control_summary(control: pd.DataFrame, observed: pd.DataFrame | None = None) -> dict:
    """Per level: the shuffled runs' significant counts and smallest q (one entry per seed),
    next to the observed count of the real labels (from the enrichment table ``observed``)."""
    out: dict[str, Any] = {}
    for level, g in control.groupby("level", sort=False):
        entry: dict[str, Any] = {
            "seeds": [int(s) for s in g["seed"]],
            "n_tests": int(g["n_tests"].iloc[0]),
            "n_significant": [int(v) for v in g["n_significant"]],
            "min_q": [float(v) for v in g["min_q"]],
            "alpha": float(g["alpha"].iloc[0]),
        }
        if observed is not None and "level" in observed:
            obs = observed[(observed["level"].astype(str) == level) & observed["fires"]]
            entry["observed_significant"] = int((obs["q"] < entry["alpha"]).sum())
        out[str(level)] = entry
    return out
