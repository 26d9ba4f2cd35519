"""One streaming pass of an SAE over stored activations, collecting everything the analysis needs.

For every chunk ``x [B, d]`` the SAE is run once (:func:`integral_superposition.sae.encode.encode_chunks`
with sparse codes: only the active entries of ``z = sae.encode(x)`` ``[B, K]``, as
``(row, latent, value)``) and those entries are folded into fixed-size per-latent buffers
(:mod:`integral_superposition.analysis.select`), so memory is O(K x n) whatever the number of
tokens:

- the top-``n`` activations per latent with their row ids (entries above each latent's
  running ``n``-th best value, merged into the buffer in rare batched sorts);
- a uniform reservoir of firing rows per latent (each row gets a hash-derived key; a latent
  keeps the rows with the smallest keys among those where it fires), from which the
  quantile samples are drawn;
- firing counts, activation sums and maxima, and the L0 histogram;
- optionally a histogram of activations per (latent, label) on log10 bins (AUROC, dashboards),
  the (document, latent) pairs where a latent's maximum over the document passes a threshold
  (document-level enrichment), a bounded sample of the token firing matrix (co-activation
  Jaccard), and the SAE metrics of :class:`integral_superposition.sae.metrics.LatentStats`.

Sources: anything :func:`integral_superposition.activations.as_activation_source` opens. The
buffers and the result types live in :mod:`integral_superposition.analysis.accumulate` (and are
re-exported here); this module runs the loop.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from integral_superposition import compute
from integral_superposition.activations import as_activation_source
from integral_superposition.analysis.accumulate import (
    HIST_LOG10_RANGE,
    LatentScan,
    ScanAccumulator,
    TopKSets,
)
from integral_superposition.analysis.select import on_accelerator
from integral_superposition.progress import ProgressFn
from integral_superposition.sae.encode import (
    check_sae_source,
    default_chunk_tokens,
    encode_chunks,
    encode_device,
    sync_clock,
)
from integral_superposition.sae.metrics import LatentStats
from integral_superposition.sae.model import SparseAutoencoder

__all__ = ["HIST_LOG10_RANGE", "LatentScan", "ScanAccumulator", "TopKSets", "scan_latents"]


@torch.no_grad()
def scan_latents(
    sae: SparseAutoencoder,
    source: Any,
    *,
    n_top: int = 20,
    n_bands: int = 0,
    per_band: int = 5,
    reservoir: int | None = None,
    labels: np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
    hist_bins: int = 0,
    doc_threshold: float | None = None,
    firing_budget: int = 0,
    metrics: bool = False,
    stats: bool = True,
    mask: np.ndarray | None = None,
    chunk_tokens: int | None = None,
    device: str | torch.device | None = None,
    encode_dtype: str | torch.dtype = "float32",
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
) -> LatentScan:
    """Run ``sae`` once over ``source`` (``[N, d]`` activations) and fold every chunk into
    bounded per-latent buffers.

    - ``n_top``: top activations kept per latent (``[K, n_top]``).
    - ``n_bands``/``per_band``: quantile samples (``[K, n_bands, per_band]``) drawn from a
      uniform reservoir of ``reservoir`` firing rows per latent.
    - ``labels`` (``int[N]``, default the store's), ``hist_bins``: per-(latent, label)
      histogram of log10 activations (``[K, C, hist_bins]``).
    - ``doc_threshold``: collect ``(doc_id, latent)`` pairs where the latent's maximum over
      the document exceeds it (documents must be runs of consecutive rows, as in a dump).
    - ``firing_budget``: keep a row-hash sample of the token firing matrix with at most this
      many non-zeros (the sampling rate halves whenever the budget is exceeded).
    - ``metrics``: also accumulate :class:`~integral_superposition.sae.metrics.LatentStats`
      (needs a decode per chunk).
    - ``stats``: accumulate activation sums, maxima and the L0 histogram (firing counts are
      always kept); ``metrics`` implies it.
    - ``mask``: ``bool[N]`` rows to scan (e.g. ``store.split_mask("test")``).
    - ``encode_dtype``: ``"float32"`` (exact), ``"bfloat16"`` (the encoder matmul in bf16,
      see :class:`SparseEncoder`) or ``"auto"`` (bf16 where the hardware has native bf16).
    """
    src = as_activation_source(source, storage_options)
    check_sae_source(sae, src)
    if not isinstance(n_top, int) or n_top < 1:
        raise ValueError(f"n_top={n_top!r}: expected a positive number of examples per latent")
    n_scan = int(mask.sum()) if mask is not None else src.n_tokens
    if mask is not None and (mask.dtype != bool or mask.shape != (src.n_tokens,)):
        raise ValueError(
            f"mask: expected bool[{src.n_tokens}] (one flag per stored token), got "
            f"{mask.dtype}{list(mask.shape)}"
        )
    if n_top > n_scan:
        raise ValueError(
            f"n_top={n_top}: more top examples per latent than the {n_scan} tokens scanned"
        )
    if labels is None and hist_bins:
        labels = getattr(src, "labels", None)
    C = 0
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (src.n_tokens,):
            raise ValueError(
                f"labels has shape {labels.shape}, but the activations have {src.n_tokens} tokens: "
                "expected one label id per stored token"
            )
        if labels.size and labels.min() < 0:
            raise ValueError("labels: expected non-negative label ids")
        C = int(labels.max()) + 1 if labels.size else 0
        if label_names is None:
            label_names = getattr(src, "label_names", None) or [str(c) for c in range(C)]
        C = max(C, len(label_names))
    doc_ids = getattr(src, "doc_ids", None) if doc_threshold is not None else None
    dev = encode_device(sae, device)
    if reservoir is None:
        reservoir = max(64, 4 * n_bands * per_band) if n_bands else 0
    acc = ScanAccumulator(
        sae.d_sae,
        n_top,
        int(reservoir),
        labels,
        C,
        int(hist_bins),
        None if doc_ids is None else np.asarray(doc_ids),
        doc_threshold,
        int(firing_budget),
        seed,
        stats=stats or metrics,
        keep_rows=mask is not None,
        device=dev,
    )
    stats = LatentStats(sae.d_sae) if metrics else None
    chunk = int(chunk_tokens or default_chunk_tokens(sae.d_sae))
    if chunk < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: expected a positive number of tokens")
    # a chunk's dense codes and their selection buffers (float32 [chunk, d_sae], about twice)
    # and its activations must fit where the encode runs
    rows = min(chunk, src.n_tokens)
    compute.check_memory(
        rows * (2 * sae.d_sae + 2 * src.d_model) * 4,
        dev,
        f"chunk_tokens={chunk} with d_sae={sae.d_sae} (chunks of {rows} tokens)",
    )
    total = -(-src.n_tokens // chunk)
    timings = {"read": 0.0, "encode": 0.0, "select": 0.0, "metrics": 0.0, "heap": 0.0}
    trim_skip, t_last = 0, time.perf_counter()
    # while an accelerator encodes one chunk, a thread reads the next
    for rows, x, codes, x_hat in encode_chunks(
        sae, src, dev, encode_dtype, chunk_tokens=chunk, mask=mask, sparse=True,
        reconstruct=stats is not None, prefetch=2 if on_accelerator(dev) else 0,
        timings=timings,
    ):  # fmt: skip
        t1 = time.perf_counter()
        acc.update(rows, codes)
        t2 = sync_clock(dev)
        if stats is not None:
            stats.update_reconstruction(x, x_hat)
        t3 = sync_clock(dev)
        del codes, x, x_hat
        if not on_accelerator(dev):
            if trim_skip > 0:
                trim_skip -= 1
            else:
                compute.release_free_heap()
                # at most ~2% of the chunk's work: a slow trim (a big heap) spaces out the next
                trim_skip = int((time.perf_counter() - t3) / max(0.02 * (t3 - t_last), 1e-6))
        t4 = time.perf_counter()
        timings["select"] += t2 - t1
        timings["metrics"] += t3 - t2
        timings["heap"] += t4 - t3
        if on_progress is not None:
            on_progress(min(total, int(rows[-1]) // chunk + 1), total)
        t_last = time.perf_counter()
    if acc.n_tokens == 0:
        raise ValueError("the selected token set is empty: nothing to scan")
    t0 = time.perf_counter()
    scan = acc.finish(src, n_bands, per_band, list(label_names) if label_names else None)
    timings["finish"] = time.perf_counter() - t0
    if stats is not None:
        stats.n_tokens = acc.n_tokens
        stats.fire_count = scan.top.fire_count.copy()
        stats.act_sum, stats.act_max = scan.act_sum.copy(), scan.act_max.copy()
        stats.l0_counts = scan.l0_counts.astype(np.int64)
    scan.metrics = stats
    scan.timings = timings
    return scan
