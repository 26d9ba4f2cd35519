"""Everything the analysis says about latents and labels, from one scan: the enrichment at both
units, the unit it leads with, the shuffled-label control and the grouped top-latents table.

Units. A latent's token-level set is its top-``n`` tokens; its document-level set is the
documents where it fires on any token. Both are tested (one-sided Fisher, BH q, odds ratio,
AUROC: of the token activation at the token level, of the per-document maximum at the document
level). The analysis leads with the document level when documents are short (median length at
most ``lead_doc_tokens`` tokens, 64 by default: headlines, titles), where a latent's top tokens
say little about its document's label; otherwise with the token level.

Best latents. A label's best latent is significant *and* specific: among the positively
enriched, non-generic latents at the lead unit with q < ``best_q``, the one with the largest
top-set purity (the label's share of the latent's strongest ``top_n`` documents at the document
level, of its top ``n`` tokens at the token level), ties to the smaller q; when no latent
reaches ``best_q``, the significant ones (q < ``alpha``) in the same order. The smallest q
alone picks broad latents that fire on a large part of the corpus with modest purity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from integral_superposition.analysis import enrichment as enr
from integral_superposition.analysis.accumulate import LatentScan
from integral_superposition.analysis.control import control_summary, shuffled_label_control
from integral_superposition.analysis.jaccard_sparse import firing_matrix
from integral_superposition.analysis.redundancy import (
    redundancy_groups,
    top_latent_candidates,
    top_latents_table,
)

__all__ = ["LabelEnrichment", "label_enrichment"]


@dataclass
class LabelEnrichment:
    """The label side of an analysis (see :func:`label_enrichment`)."""

    table: pd.DataFrame
    """Tidy enrichment, one row per (latent, label, level); ``level`` is the unit."""
    latents: pd.DataFrame
    """One row per latent: best label and its statistics per unit, redundancy group."""
    top_latents: pd.DataFrame
    """Best latents per label at the lead unit, one row per group of near-duplicates."""
    control: pd.DataFrame | None
    """Shuffled-label control: one row per (level, seed)."""
    summary: dict[str, Any] = field(default_factory=dict)


def _doc_firing(doc_pairs: np.ndarray, n_latents: int) -> Any:
    """0/1 ``[n_docs, K]`` document firing matrix from ``(doc_id, latent)`` pairs."""
    docs, row = np.unique(doc_pairs[:, 0], return_inverse=True)
    return firing_matrix(row, doc_pairs[:, 1], n_latents, n_rows=docs.size)


def _best_latents(
    table: pd.DataFrame, level: str, generic: np.ndarray, alpha: float, best_q: float
) -> dict[str, int | None]:
    """Per label, the best latent at ``level`` (see the module docstring)."""
    t = top_latent_candidates(table, level, generic, alpha, best_q)
    first = t.drop_duplicates("label", keep="first").set_index("label")["latent"]
    labels = table["label"].astype(str).unique().tolist()
    return {c: (int(first[c]) if c in first.index else None) for c in labels}


def label_enrichment(
    scan: LatentScan,
    token_labels: np.ndarray,
    label_names: Sequence[str],
    *,
    W_dec: Any,
    generic: np.ndarray,
    doc_labels: pd.DataFrame | None = None,
    row_doc: np.ndarray | None = None,
    alpha: float = 0.05,
    control_seeds: int = 3,
    lead_doc_tokens: int = 64,
    redundancy_cosine: float = 0.7,
    redundancy_jaccard: float = 0.5,
    top_per_label: int = 10,
    purity_top_n: int = 50,
    best_q: float = 1e-6,
) -> LabelEnrichment:
    """Token- and document-level enrichment of ``scan``'s latents, the lead unit, the
    shuffled-label control and the grouped top-latents table.

    ``token_labels``: ``int [n_rows]`` label id of every stored row; ``generic``: ``bool [K]``
    generic latents (never a label's best latent); ``W_dec``: decoder ``[K, d]`` for the
    redundancy groups. ``doc_labels`` (``doc_id, label`` of the scanned documents) and
    ``row_doc`` (``int [n_rows]`` document of every stored row) enable the document level,
    which needs a scan with ``doc_threshold``. ``control_seeds=0`` skips the control.
    ``purity_top_n``: documents in a latent's top set for the document-level top-set purity;
    ``best_q``: the q a label's best latents must reach before purity ranks them.
    """
    top = scan.top
    K = top.n_latents
    generic = np.asarray(generic, dtype=bool)
    if generic.shape != (K,):
        raise ValueError(f"generic has shape {generic.shape}: expected ({K},), one per latent")
    tok = enr.fisher_enrichment(top, token_labels, label_names=label_names, alpha=alpha)
    frames = [tok]
    cols = [
        "latent", "best_label", "q", "log_odds", "purity", "top_purity", "top_n", "auroc",
        "significant",
    ]  # fmt: skip
    latents = enr.best_labels(tok)[cols]
    doc = None
    has_docs = scan.doc_pairs is not None and doc_labels is not None and row_doc is not None
    if has_docs:
        rows = top.row_index if top.row_index is not None else np.arange(top.n_tokens)
        scanned = np.unique(np.asarray(row_doc)[rows], return_inverse=True)
        lengths = np.bincount(scanned[1])
        doc_labels = doc_labels[doc_labels["doc_id"].isin(scanned[0])]
        doc = enr.document_enrichment(
            scan.doc_pairs, doc_labels, K, doc_max=scan.doc_max, label_names=label_names,
            alpha=alpha, top_n=purity_top_n,
        )  # fmt: skip
        frames.append(doc)
        dbest = enr.best_labels(doc)[cols].rename(
            columns={c: f"doc_{c}" for c in cols if c != "latent"}
        )
        latents = latents.merge(dbest, on="latent", how="left")
        median = float(np.median(lengths)) if lengths.size else 0.0
        lead = enr.lead_level(lengths, lead_doc_tokens)
    else:
        median, lead = None, "token"
    table = pd.concat(frames, ignore_index=True)
    table["level"] = table["level"].astype("category")

    # near-duplicates among the latents the top table can show, co-firing at the lead unit
    lead_table = doc if lead == "document" else tok
    cand = top_latent_candidates(lead_table, lead, alpha=alpha, best_q=best_q)
    # the latents each label's table can reach, with room for their duplicates
    cand = cand.groupby("label", observed=True).head(max(50, 5 * top_per_label))
    if lead == "document":
        firing = _doc_firing(scan.doc_pairs, K)
    elif scan.firing_rows is not None and scan.firing_rows.size:
        firing = firing_matrix(scan.firing_rows, scan.firing_latents, K)
    else:
        firing = None
    groups = redundancy_groups(
        W_dec, np.unique(cand["latent"].to_numpy()), firing=firing,
        cosine=redundancy_cosine, jaccard=redundancy_jaccard,
    )  # fmt: skip
    latents["redundancy_group"] = groups
    top_latents = top_latents_table(
        table, groups, lead, generic=generic, alpha=alpha, per_label=top_per_label, best_q=best_q
    )

    control = None
    if control_seeds and has_docs:
        control = shuffled_label_control(
            scan.doc_pairs, doc_labels, K, seeds=control_seeds, alpha=alpha,
            label_names=label_names, top=top, row_doc=row_doc,
        )  # fmt: skip

    summary: dict[str, Any] = {
        "lead_level": lead,
        "lead_rule": f"document when the median document has <= {lead_doc_tokens} tokens",
        "median_doc_tokens": median,
        "best_latents": _best_latents(table, lead, generic, alpha, best_q),
        "best_latents_level": lead,
        "best_latents_rule": (
            f"q < {best_q:g} (else q < {alpha:g}), non-generic, positively enriched; the "
            f"largest top-set purity (top {purity_top_n} documents at the document level, "
            "top tokens at the token level), ties to the smaller q"
        ),
        "purity_top_n": {"document": purity_top_n, "token": int(top.n)},
        "significant_latents_per_label": {},
        "n_significant_latents": 0,
        "significant_by_level": {},
        "redundancy": {
            "cosine": redundancy_cosine,
            "jaccard": redundancy_jaccard,
            "cofiring_unit": lead if firing is not None else None,
            "n_groups_in_top": len(top_latents),
            "n_latents_in_top": int(top_latents["group_size"].sum()) if len(top_latents) else 0,
        },
    }
    for level, t in table.groupby("level", observed=True):
        sig = t[t["significant"]]
        per_label = sig.groupby("label", observed=False)["latent"].nunique()
        entry = {
            "per_label": {str(k): int(v) for k, v in per_label.items()},
            "n_latents": int(sig["latent"].nunique()),
            "n_tests": int(t["fires"].sum()),
        }
        summary["significant_by_level"][str(level)] = entry
        if level == "token":  # the seed's keys, token level
            summary["significant_latents_per_label"] = entry["per_label"]
            summary["n_significant_latents"] = entry["n_latents"]
    if control is not None:
        summary["enrichment_control"] = control_summary(control, table)
    return LabelEnrichment(table, latents, top_latents, control, summary)
