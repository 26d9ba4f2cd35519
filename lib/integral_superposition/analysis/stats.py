"""Per-latent statistics and their distributions.

The streaming counts (firing, sums, maxima, L0) come from
:class:`integral_superposition.sae.metrics.LatentStats` - the same pass that gives the SAE
metrics - or from a :class:`~integral_superposition.analysis.scan.LatentScan`; this module
turns them into a per-latent table and adds the decoder geometry (row norms and each row's
largest cosine with another row, computed in blocks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.sparse import coo_matrix

from integral_superposition.analysis.accumulate import LatentScan
from integral_superposition.sae.metrics import DENSE_THRESHOLD, DENSE_THRESHOLD_LOOSE, LatentStats

__all__ = [
    "compute_activation_stats",
    "decoder_geometry",
    "document_codes",
    "l0_distribution",
    "label_mean_codes",
    "latent_table",
    "log10_density_hist",
    "mean_pool_by_title",
    "stats_from_scan",
    "trim_outliers",
]

DENSITY_EPS = 1e-10


def stats_from_scan(scan: LatentScan) -> LatentStats:
    """The scan's metrics when it computed them, else a :class:`LatentStats` from its counts
    (without the reconstruction terms: EV is NaN)."""
    if scan.metrics is not None:
        return scan.metrics
    if not scan.has_stats:
        raise ValueError("this scan ran with stats=False: rerun scan_latents with stats=True")
    K = scan.top.n_latents
    return LatentStats(
        d_sae=K,
        n_tokens=scan.top.n_tokens,
        fire_count=scan.top.fire_count.copy(),
        act_sum=scan.act_sum.copy(),
        act_max=scan.act_max.copy(),
        l0_counts=scan.l0_counts.copy(),
    )


@torch.no_grad()
def decoder_geometry(
    W_dec: torch.Tensor | np.ndarray, block: int = 2048
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoder row norms, each row's max cosine with another row, and that row's index.

    ``W_dec``: ``[K, d]`` -> ``(norms [K], max_cos [K], partner [K])``. Memory O(block x K).
    """
    W = torch.as_tensor(W_dec).detach().float()
    K = W.shape[0]
    norms = W.norm(dim=1)
    unit = W / norms.clamp_min(1e-12)[:, None]
    max_cos = torch.empty(K)
    partner = torch.empty(K, dtype=torch.long)
    for a in range(0, K, block):
        b = min(K, a + block)
        cos = unit[a:b] @ unit.T
        cos[torch.arange(b - a), torch.arange(a, b)] = -2.0
        v, i = cos.max(1)
        max_cos[a:b], partner[a:b] = v.cpu(), i.cpu()
    if K == 1:
        max_cos[:] = float("nan")
        partner[:] = -1
    return norms.cpu().numpy(), max_cos.numpy(), partner.numpy()


def latent_table(stats: LatentStats | LatentScan, W_dec: Any = None) -> pd.DataFrame:
    """One row per latent: ``latent, fire_count, density, log10_density, dead, dense,
    mean_act, mean_when_active, max_act`` and, with ``W_dec [K, d]``, ``decoder_norm,
    max_decoder_cos, max_cos_partner``. Dead latents are kept (``dead = True``)."""
    if isinstance(stats, LatentScan):
        stats = stats_from_scan(stats)
    K = stats.d_sae
    fire = np.asarray(stats.fire_count, dtype=np.int64)
    dens = stats.density
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_active = np.where(fire > 0, stats.act_sum / np.maximum(fire, 1), 0.0)
    table = pd.DataFrame(
        {
            "latent": np.arange(K, dtype=np.int64),
            "fire_count": fire,
            "density": dens,
            "log10_density": np.log10(dens + DENSITY_EPS),
            "dead": fire == 0,
            "dense": dens > DENSE_THRESHOLD,
            "dense_001": dens > DENSE_THRESHOLD_LOOSE,
            "mean_act": stats.mean_act,
            "mean_when_active": mean_active,
            "max_act": np.asarray(stats.act_max, dtype=np.float64),
        }
    )
    if W_dec is not None:
        norms, max_cos, partner = decoder_geometry(W_dec)
        if norms.shape[0] != K:
            raise ValueError(
                f"W_dec has {norms.shape[0]} rows, but the statistics cover {K} latents"
            )
        table["decoder_norm"] = norms
        table["max_decoder_cos"] = max_cos
        table["max_cos_partner"] = partner
    return table


def log10_density_hist(
    density: np.ndarray, bins: int = 50, lo: float = -10.0
) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of ``log10(density + 1e-10)`` on ``[lo, 0]``: ``(counts [bins], edges [bins+1])``.

    Dead latents land in the first bin (log10(1e-10) = -10).
    """
    # a latent firing on every token sits at log10(1 + 1e-10) > 0: keep it in the last bin
    logd = np.minimum(np.log10(np.asarray(density) + DENSITY_EPS), 0.0)
    return np.histogram(logd, bins=bins, range=(lo, 0.0))


def l0_distribution(l0_counts: np.ndarray) -> dict[str, Any]:
    """Summary of the per-token L0 distribution from ``l0_counts[j]`` = tokens with ``j`` active
    latents: ``mean, median, p10, p90, max, zero_frac`` and the trimmed ``counts``."""
    c = np.asarray(l0_counts, dtype=np.int64)
    n = int(c.sum())
    if n == 0:
        raise ValueError("l0_counts is empty: no tokens were scanned")
    cdf = np.cumsum(c) / n
    nz = np.flatnonzero(c)
    last = int(nz[-1]) if nz.size else 0

    def quantile(p: float) -> int:
        return int(np.searchsorted(cdf, p))

    return {
        "mean": float((c * np.arange(c.size)).sum() / n),
        "median": quantile(0.5),
        "p10": quantile(0.1),
        "p90": quantile(0.9),
        "max": last,
        "zero_frac": float(c[0] / n),
        "counts": c[: last + 1].tolist(),
    }


@torch.no_grad()
def document_codes(
    sae,
    store,
    reduce: str = "mean",
    mask: np.ndarray | None = None,
    chunk_tokens: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each document's latent code, pooled over its tokens: ``(doc_ids [D], codes [D, K])``.

    ``reduce`` is ``"mean"`` (the seed's title-level codes) or ``"max"``. One streaming pass;
    memory is the ``[D, K]`` result.
    """
    from integral_superposition.activations import as_activation_source
    from integral_superposition.sae.encode import check_sae_source, encode_chunks, encode_device

    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce={reduce!r}: expected 'mean' or 'max'")
    src = as_activation_source(store)
    check_sae_source(sae, src)
    if getattr(src, "doc_ids", None) is None:
        raise ValueError("store: document codes need document ids (an ActivationStore)")
    doc_all = np.asarray(src.doc_ids)
    rows_used = doc_all if mask is None else doc_all[mask]
    docs, inv_all = np.unique(rows_used, return_inverse=True)
    slot = np.full(src.n_tokens, -1, dtype=np.int64)
    slot[np.flatnonzero(mask) if mask is not None else np.arange(src.n_tokens)] = inv_all
    dev = encode_device(sae, device)
    out = torch.zeros((docs.size, sae.d_sae), device=dev)
    for rows, _x, z, _ in encode_chunks(sae, src, dev, chunk_tokens=chunk_tokens, mask=mask):
        idx = torch.from_numpy(slot[rows]).to(dev)
        if reduce == "mean":
            out.index_add_(0, idx, z)
        else:
            out.scatter_reduce_(0, idx[:, None].expand_as(z), z, "amax", include_self=True)
    if reduce == "mean":
        out /= torch.from_numpy(np.bincount(inv_all, minlength=docs.size)).to(dev)[:, None]
    return docs, out.cpu().numpy()


@torch.no_grad()
def label_mean_codes(
    sae,
    store,
    mask: np.ndarray | None = None,
    chunk_tokens: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each label's mean document code: the mean, over the label's documents, of each
    document's code averaged over its tokens (the rows of ``mask``; all rows when None).

    Returns ``(codes [n_labels, K] float64, n_docs [n_labels])``; a label without a document
    has a row of NaN. One streaming pass; memory is ``[n_labels, K]`` whatever the number of
    documents (each row enters with weight one over its document's row count).
    """
    from integral_superposition.activations import as_activation_source
    from integral_superposition.sae.encode import check_sae_source, encode_chunks, encode_device

    src = as_activation_source(store)
    check_sae_source(sae, src)
    if any(getattr(src, a, None) is None for a in ("doc_ids", "labels", "label_names")):
        raise ValueError(
            "store: label mean codes need document ids and labels (an ActivationStore)"
        )
    n_labels = len(src.label_names)
    doc_all = np.asarray(src.doc_ids, dtype=np.int64)
    lab_all = np.asarray(src.labels, dtype=np.int64)
    used = np.ones(doc_all.size, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if used.shape != doc_all.shape:
        raise ValueError(f"mask has shape {used.shape}: expected ({doc_all.size},), one per row")
    docs, inv, per_doc = np.unique(doc_all[used], return_inverse=True, return_counts=True)
    doc_label = np.zeros(docs.size, dtype=np.int64)
    doc_label[inv] = lab_all[used]
    n_docs = np.bincount(doc_label, minlength=n_labels)
    weight = np.zeros(doc_all.size)
    weight[used] = 1.0 / per_doc[inv]
    dev = encode_device(sae, device)
    # each chunk's sums on the device in float32 (every device has it), the total in float64
    total = torch.zeros((n_labels, sae.d_sae), dtype=torch.float64)
    for rows, _x, z, _ in encode_chunks(sae, src, dev, chunk_tokens=chunk_tokens, mask=mask):
        w = torch.from_numpy(weight[rows]).to(dev, torch.float32)
        idx = torch.from_numpy(lab_all[rows]).to(dev)
        part = torch.zeros((n_labels, sae.d_sae), dtype=torch.float32, device=dev)
        total += part.index_add_(0, idx, z.float() * w[:, None]).cpu().double()
    codes = total.numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        codes = codes / n_docs[:, None]
    return codes, n_docs


# -- the seed's helpers, vectorised ------------------------------------------------------------
def mean_pool_by_title(z: np.ndarray, title_idx: np.ndarray) -> np.ndarray:
    """Mean of ``z [N, K]`` over the tokens of each title: ``[n_titles, K]`` in sorted title order."""
    z = np.asarray(z)
    title_idx = np.asarray(title_idx)
    if title_idx.shape != (z.shape[0],):
        raise ValueError(
            f"title_idx has shape {title_idx.shape}, expected ({z.shape[0]},) - one per row of z"
        )
    _, inv, counts = np.unique(title_idx, return_inverse=True, return_counts=True)
    pool = coo_matrix(
        (1.0 / counts[inv], (inv, np.arange(inv.size))), shape=(counts.size, inv.size)
    ).tocsr()
    return np.asarray(pool @ z, dtype=np.float32)


def trim_outliers(X2: np.ndarray, p: float = 99.0) -> np.ndarray:
    """Rows of ``X2 [N, 2]`` within the ``p``-th percentile of distance to the centroid."""
    if len(X2) == 0:
        return X2
    d = np.linalg.norm(X2 - X2.mean(axis=0), axis=1)
    return X2[d <= np.percentile(d, p)]


def compute_activation_stats(z_vals: np.ndarray, min_activation: float = 0.0) -> dict[str, float]:
    """Basic statistics of one latent's activations ``[N]``."""
    z_vals = np.asarray(z_vals)
    active = z_vals > min_activation
    n_active = int(active.sum())
    return {
        "total_activations": int(z_vals.size),
        "active_count": n_active,
        "sparsity": 1.0 - n_active / max(1, z_vals.size),
        "mean_activation": float(z_vals.mean()),
        "mean_active": float(z_vals[active].mean()) if n_active else 0.0,
        "max_activation": float(z_vals.max()),
        "std_activation": float(z_vals.std()),
    }
