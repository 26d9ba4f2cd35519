"""Generic latents: latents whose top contexts are dominated by one token that is frequent in
every label (a formatting or dataset artefact such as a news agency tag), so their label
enrichment says nothing about the labels' topics.

Topical latents often peak on a frequent token too: the topic of a headline is carried on its
punctuation, numbers and function words ("." at the end of a business headline, "0" in a
sports score). What sets an artefact apart is that it fires on its token in every label alike.
With a token firing sample (:func:`token_fire_rates`), a latent is generic only when it does:
its firing rate on the dominant token in the label where that rate is lowest is at least
``rate_ratio`` of the rate in the label where it is highest.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["generic_latents", "token_fire_rates", "token_label_doc_fraction"]


def token_label_doc_fraction(
    tokens: np.ndarray,
    token_ids: np.ndarray,
    doc_ids: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
) -> np.ndarray:
    """Fraction of each label's documents that contain each of ``tokens``: ``[len(tokens), C]``.

    ``token_ids``, ``doc_ids``, ``labels``: aligned per-row arrays ``[N]`` (a document whose
    rows carry several labels counts once for each).
    """
    tokens = np.unique(np.asarray(tokens, dtype=np.int64))
    token_ids = np.asarray(token_ids, dtype=np.int64)
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    docs_per_label = np.zeros(n_labels, dtype=np.int64)
    dl = np.unique(np.stack([doc_ids, labels], 1), axis=0)
    np.add.at(docs_per_label, dl[:, 1], 1)
    out = np.zeros((tokens.size, n_labels), dtype=np.float64)
    sel = np.isin(token_ids, tokens)
    if sel.any():
        tdl = np.unique(np.stack([token_ids[sel], doc_ids[sel], labels[sel]], 1), axis=0)
        np.add.at(out, (np.searchsorted(tokens, tdl[:, 0]), tdl[:, 2]), 1.0)
    return out / np.maximum(docs_per_label, 1)[None, :]


def token_fire_rates(
    latent_tokens: np.ndarray,
    firing_rows: np.ndarray,
    firing_latents: np.ndarray,
    sample_rows: np.ndarray,
    token_ids: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
) -> np.ndarray:
    """Per latent, how often it fires on its token in each label: ``float64 [K, C]``.

    ``latent_tokens``: ``int [K]`` the token of each latent (-1: none, a NaN row).
    ``firing_rows``, ``firing_latents``: ``[F]`` the (row, latent) entries of a token firing
    sample; ``sample_rows``: ``[S]`` every row of that sample (firing or not). ``token_ids``,
    ``labels``: per stored row ``[N]``. Entry ``[j, c]`` is the fraction of the sampled rows of
    label ``c`` holding token ``latent_tokens[j]`` on which latent ``j`` fires (NaN when the
    sample has no such row).
    """
    tokens = np.asarray(latent_tokens, dtype=np.int64)
    token_ids = np.asarray(token_ids, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    K, C = tokens.size, n_labels
    out = np.full((K, C), np.nan)
    wanted = np.unique(tokens[tokens >= 0])
    if wanted.size == 0:
        return out
    srows = np.asarray(sample_rows, dtype=np.int64)
    srows = srows[np.isin(token_ids[srows], wanted)]
    # occurrences of each wanted token per label in the sample
    occ = np.zeros((wanted.size, C), dtype=np.int64)
    np.add.at(occ, (np.searchsorted(wanted, token_ids[srows]), labels[srows]), 1)
    fr = np.asarray(firing_rows, dtype=np.int64)
    fl = np.asarray(firing_latents, dtype=np.int64)
    own = (tokens[fl] >= 0) & (token_ids[fr] == tokens[fl])  # fires on its own token
    hits = np.zeros((K, C), dtype=np.int64)
    np.add.at(hits, (fl[own], labels[fr[own]]), 1)
    has = tokens >= 0
    denom = occ[np.searchsorted(wanted, tokens[has])]
    with np.errstate(invalid="ignore", divide="ignore"):
        out[has] = np.where(denom > 0, hits[has] / np.maximum(denom, 1), np.nan)
    return out


def generic_latents(
    top_token_ids: np.ndarray,
    token_ids: np.ndarray,
    doc_ids: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    *,
    token_share: float = 0.5,
    label_doc_fraction: float = 0.1,
    fire_rates: np.ndarray | None = None,
    rate_ratio: float = 0.5,
) -> pd.DataFrame:
    """Flag latents whose top contexts are dominated by a token spread across all labels.

    ``top_token_ids``: ``int [K, n]`` token at each latent's top activations (-1: empty slot,
    as ``TopKSets.token_ids``). ``token_ids``, ``doc_ids``, ``labels``: the analysed rows
    ``[N]``. A latent is generic when one token makes up at least ``token_share`` of its top
    contexts, that token occurs in at least ``label_doc_fraction`` of the documents of
    every label and - when ``fire_rates`` (``[K, C]``, :func:`token_fire_rates` of each latent's
    dominant token) is given - the latent fires on that token in every label alike: its
    lowest per-label rate is at least ``rate_ratio`` times its highest. A latent that fires on
    a frequent token in one label's documents only is topical, not generic.

    Returns one row per latent: ``latent, generic, generic_token_id`` (the dominant token, -1
    when none), ``generic_token_share`` (its share of the top contexts),
    ``generic_min_label_fraction`` (its smallest per-label document fraction; NaN below
    ``token_share``) and ``generic_rate_ratio`` (lowest over highest per-label firing rate
    on the token; NaN without ``fire_rates`` or sampled firing on it, where the token rule
    alone decides).
    """
    if not 0 < token_share <= 1:
        raise ValueError(f"token_share={token_share!r}: expected a fraction in (0, 1]")
    if not 0 <= label_doc_fraction <= 1:
        raise ValueError(
            f"label_doc_fraction={label_doc_fraction!r}: expected a fraction in [0, 1]"
        )
    if not 0 <= rate_ratio <= 1:
        raise ValueError(f"rate_ratio={rate_ratio!r}: expected a fraction in [0, 1]")
    top = np.asarray(top_token_ids, dtype=np.int64)
    if top.ndim != 2:
        raise ValueError(f"top_token_ids has shape {top.shape}: expected [n_latents, n_top]")
    K = top.shape[0]
    if fire_rates is not None and np.shape(fire_rates) != (K, n_labels):
        raise ValueError(
            f"fire_rates has shape {np.shape(fire_rates)}: expected ({K}, {n_labels}), one rate "
            "per latent and label"
        )
    dominant = np.full(K, -1, dtype=np.int64)
    share = np.zeros(K, dtype=np.float64)
    for j in range(K):
        row = top[j][top[j] >= 0]
        if row.size:
            vals, counts = np.unique(row, return_counts=True)
            i = int(np.argmax(counts))
            dominant[j], share[j] = vals[i], counts[i] / row.size
    cand = (dominant >= 0) & (share >= token_share)
    min_frac = np.full(K, np.nan)  # only computed for candidates
    if cand.any():
        tokens = np.unique(dominant[cand])
        frac = token_label_doc_fraction(tokens, token_ids, doc_ids, labels, n_labels)
        min_frac[cand] = frac[np.searchsorted(tokens, dominant[cand])].min(axis=1)
    generic = cand & (np.nan_to_num(min_frac, nan=-1.0) >= label_doc_fraction)
    ratio = np.full(K, np.nan)
    if fire_rates is not None:
        r = np.asarray(fire_rates, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            hi = np.nanmax(np.where(np.isnan(r), -np.inf, r), axis=1)
            lo = np.nanmin(np.where(np.isnan(r), np.inf, r), axis=1)
            ratio = np.where(hi > 0, lo / np.where(hi > 0, hi, 1.0), np.nan)
        ratio[~np.isfinite(ratio)] = np.nan
        generic &= ~(ratio < rate_ratio)  # no sampled firing on the token: the token rule
    return pd.DataFrame(
        {
            "latent": np.arange(K),
            "generic": generic,
            "generic_token_id": dominant,
            "generic_token_share": share,
            "generic_min_label_fraction": min_frac,
            "generic_rate_ratio": ratio,
        }
    )
