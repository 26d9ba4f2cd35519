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

Sources: anything :func:`integral_superposition.activations.as_activation_source` opens.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from integral_superposition import compute
from integral_superposition.activations import as_activation_source
from integral_superposition.analysis.select import (
    SelectBuffer,
    TorchSelectBuffer,
    max_sum_per_key,
    on_accelerator,
    quantile_samples,
    row_uniform,
)
from integral_superposition.progress import ProgressFn
from integral_superposition.sae.encode import (
    Codes,
    check_sae_source,
    default_chunk_tokens,
    encode_chunks,
    encode_device,
    sync_clock,
)
from integral_superposition.sae.metrics import LatentStats
from integral_superposition.sae.model import SparseAutoencoder

__all__ = ["HIST_LOG10_RANGE", "LatentScan", "TopKSets", "scan_latents"]

HIST_LOG10_RANGE = (-4.0, 4.0)
"""Range of the log10 activation histogram; values outside fall into the edge bins."""


@dataclass
class TopKSets:
    """The top-``n`` activating tokens of every latent (and quantile samples below them).

    Arrays are ``[K, n]`` and sorted by decreasing activation; slots beyond a latent's number
    of firing tokens hold ``value 0`` and ``row -1``. It also behaves like the seed's result:
    ``len(top) == K`` and ``top[j]`` is the set of row ids in latent ``j``'s top set.
    """

    values: np.ndarray
    """float32 ``[K, n]`` top activations."""
    rows: np.ndarray
    """int64 ``[K, n]`` global row ids (-1: empty slot)."""
    n_tokens: int
    """Number of tokens scanned (the population of every test)."""
    fire_count: np.ndarray
    """int64 ``[K]`` tokens where the latent fired (> 0)."""
    token_ids: np.ndarray | None = None
    """int64 ``[K, n]`` token id of each top row (-1: empty slot or unknown)."""
    doc_ids: np.ndarray | None = None
    """int64 ``[K, n]`` document id of each top row."""
    positions: np.ndarray | None = None
    """int64 ``[K, n]`` position of each top row in its document."""
    quantile_values: np.ndarray | None = None
    """float32 ``[K, n_bands, per_band]`` sampled activations per band (lowest band first)."""
    quantile_rows: np.ndarray | None = None
    """int64 ``[K, n_bands, per_band]`` their rows (-1: empty)."""
    quantile_edges: np.ndarray | None = None
    """float32 ``[K, n_bands + 1]`` activation at each band edge (quantiles of firing values)."""
    label_hist: np.ndarray | None = None
    """int64 ``[K, C, n_bins]`` firing activations per label on log10 bins (see ``hist_edges``)."""
    hist_edges: np.ndarray | None = None
    """float64 ``[n_bins + 1]`` log10 activation bin edges of ``label_hist``."""
    label_counts: np.ndarray | None = None
    """int64 ``[C]`` tokens per label in the scanned set."""
    label_names: list[str] | None = None
    row_index: np.ndarray | None = None
    """int64 ``[n_tokens]``: the global row ids scanned, when a mask selected a subset."""

    @property
    def n_latents(self) -> int:
        return int(self.values.shape[0])

    @property
    def n(self) -> int:
        return int(self.values.shape[1])

    @property
    def counts(self) -> np.ndarray:
        """int64 ``[K]``: filled slots per latent (``min(n, fire_count)``)."""
        return (self.rows >= 0).sum(1)

    def __len__(self) -> int:
        return self.n_latents

    def __getitem__(self, j: int) -> set[int]:
        r = self.rows[j]
        return set(r[r >= 0].tolist())

    def __iter__(self):
        return (self[j] for j in range(self.n_latents))

    def as_dict(self) -> dict[int, np.ndarray]:
        """The seed's ``{latent: top row ids}`` mapping."""
        return {j: r[r >= 0] for j, r in enumerate(self.rows)}


@dataclass
class LatentScan:
    """Everything :func:`scan_latents` collects in one pass."""

    top: TopKSets
    l0_counts: np.ndarray
    """int64 ``[K + 1]``: tokens with exactly ``j`` active latents."""
    act_sum: np.ndarray
    """float64 ``[K]`` sum of activations."""
    act_max: np.ndarray
    """float64 ``[K]`` maximum activation."""
    doc_pairs: np.ndarray | None = None
    """int64 ``[P, 2]`` distinct ``(doc_id, latent)`` with the latent's document max above the threshold."""
    doc_max: np.ndarray | None = None
    """float32 ``[P]``: the latent's maximum over the document, aligned with ``doc_pairs``."""
    doc_sum: np.ndarray | None = None
    """float64 ``[P]``: the sum of the latent's activations over the document's scanned tokens,
    aligned with ``doc_pairs`` (divided by the document's length: its mean activation)."""
    doc_threshold: float | None = None
    firing_rows: np.ndarray | None = None
    """int64 ``[F]`` rows of the sampled token firing matrix."""
    firing_latents: np.ndarray | None = None
    """int32 ``[F]`` latents of the sampled token firing matrix."""
    firing_rate: float = 1.0
    """Fraction of tokens (by row hash) kept in the firing sample."""
    metrics: LatentStats | None = None
    has_stats: bool = True
    """False when scanned with ``stats=False``: ``act_sum``, ``act_max``, ``l0_counts`` are empty."""
    timings: dict[str, float] | None = None
    """Seconds spent reading, encoding, selecting (folding into the buffers), on metrics,
    handing freed heap pages back to the OS (``heap``, CPU scans), and finishing."""


class _Accumulator:
    """Per-chunk folding of a chunk's active entries into the bounded buffers of
    :class:`LatentScan`.

    Firing counts and the top-``n`` filter (each latent's current ``n``-th best) run on the
    device that encoded the chunk, so a scan that keeps nothing else moves only the entries
    that can still enter a top set to the host. The other statistics work on all ``E`` active
    entries (``E`` is about ``L0 x B``, a few percent of the dense ``[B, K]`` code) in numpy:
    on CPU its gathers, bincounts and compares on 1-D arrays are several times faster than
    torch's.
    """

    def __init__(
        self,
        d_sae: int,
        n: int,
        reservoir: int,
        labels: np.ndarray | None,
        n_labels: int,
        hist_bins: int,
        doc_ids: np.ndarray | None,
        doc_threshold: float | None,
        firing_budget: int,
        seed: int,
        stats: bool = True,
        keep_rows: bool = False,
        device: torch.device | None = None,
    ):
        K = d_sae
        self.stats, self.keep_rows = stats, keep_rows
        self.K, self.n, self.seed = K, n, seed
        device = torch.device(device or "cpu")
        self.top: SelectBuffer = (
            TorchSelectBuffer(K, n, True, [np.int64], device=device)
            if on_accelerator(device)
            else SelectBuffer(K, n, True, [np.int64])
        )
        self.R = reservoir
        if reservoir:
            self.res = SelectBuffer(K, reservoir, False, [np.float32, np.int64])
        self.fire: torch.Tensor | None = None  # int64 [K] on the encoding device
        self.act_sum = np.zeros(K, dtype=np.float64)
        self.act_max = np.zeros(K, dtype=np.float32)
        self.l0 = np.zeros(K + 1, dtype=np.int64)
        self.labels, self.C, self.nb = labels, n_labels, hist_bins
        if labels is not None and hist_bins:
            self.hist = np.zeros(K * n_labels * hist_bins, dtype=np.int64)
            self.label_counts = np.zeros(n_labels, dtype=np.int64)
        self.doc_ids, self.doc_thr = doc_ids, doc_threshold
        # per chunk: distinct (doc, latent) keys, their max and sum (documents span chunks)
        self.doc_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.budget = firing_budget
        self.rate = 1.0
        self.f_rows: list[np.ndarray] = []
        self.f_lats: list[np.ndarray] = []
        self.f_nnz = 0
        self.n_tokens = 0
        self.scanned: list[np.ndarray] = []
        self.needs_entries = bool(
            stats
            or reservoir
            or (labels is not None and hist_bins)
            or (doc_ids is not None and doc_threshold is not None)
            or firing_budget
        )

    def update(self, rows: np.ndarray, codes: Codes) -> None:
        """Fold one chunk (global row ids ``rows [B]``, its active entries ``codes``)."""
        B, K = codes.n_rows, self.K
        self.n_tokens += B
        if self.keep_rows:  # only a masked scan needs its row ids (8 bytes a token)
            self.scanned.append(rows)
        jd, vd = codes.j, codes.v.float()
        if self.fire is None:
            self.fire = torch.zeros(K, dtype=torch.int64, device=jd.device)
        self.fire += torch.bincount(jd, minlength=K)
        # the buffer lives where the codes are: a device buffer's thresholds are on the device,
        # a host buffer's numpy thresholds are shared (merges update them in place)
        if isinstance(self.top, TorchSelectBuffer):
            keep = (vd > self.top.thr[jd]).nonzero().squeeze(1)
            rows_d = torch.from_numpy(rows).to(jd.device)
            self.top.add(jd[keep], vd[keep], [rows_d[codes.t[keep]]])
        else:
            keep = (vd > torch.from_numpy(self.top.thr)[jd]).nonzero().squeeze(1)
            t_keep = codes.t[keep].numpy()
            self.top.add(jd[keep].numpy(), vd[keep].numpy(), [rows[t_keep]])
        if not self.needs_entries:
            return

        t = codes.t.cpu().numpy()
        j = jd.cpu().numpy()
        v = vd.cpu().numpy()
        if self.stats:
            self.act_sum += np.bincount(j, weights=v, minlength=K)
            np.maximum.at(self.act_max, j, v)
            self.l0 += np.bincount(np.bincount(t, minlength=B), minlength=K + 1)

        u = None
        if self.R or self.budget:
            u = row_uniform(rows, self.seed).astype(np.float32)
        if self.R:
            # a latent's reservoir: its firing rows with the smallest row keys
            u_e = u[t]
            cand = self.res.candidates(j, u_e)
            self.res.add(j[cand], u_e[cand], [v[cand], rows[t[cand]]])

        if self.labels is not None and self.nb:
            lab = self.labels[rows].astype(np.int64)
            self.label_counts += np.bincount(lab, minlength=self.C)
            lo, hi = HIST_LOG10_RANGE
            b = np.floor((np.log10(v) - lo) * (self.nb / (hi - lo)))
            b = np.clip(b, 0, self.nb - 1).astype(np.int64)
            idx = (j * self.C + lab[t]) * self.nb + b
            np.add.at(self.hist, idx, 1)  # no [K x C x bins] temporary per chunk

        if self.doc_ids is not None and self.doc_thr is not None:
            # every entry: a document's sum needs them all; the threshold applies to the max
            d = np.asarray(self.doc_ids[rows], dtype=np.int64)
            self.doc_parts.append(max_sum_per_key(d[t] * K + j, v))

        if self.budget:
            sel = u[t] < self.rate
            self.f_rows.append(rows[t[sel]])
            self.f_lats.append(j[sel].astype(np.int32))
            self.f_nnz += int(sel.sum())
            while self.f_nnz > self.budget:
                self._halve_firing_rate()

    def _halve_firing_rate(self) -> None:
        """Keep only rows whose hash is below half the current rate (a nested sample)."""
        self.rate /= 2
        rows = np.concatenate(self.f_rows)
        lats = np.concatenate(self.f_lats)
        keep = row_uniform(rows, self.seed) < self.rate
        self.f_rows, self.f_lats = [rows[keep]], [lats[keep]]
        self.f_nnz = int(keep.sum())

    def finish(
        self,
        source,
        n_bands: int,
        per_band: int,
        label_names: list[str] | None,
    ) -> LatentScan:
        top_v, (top_r,) = self.top.result(0.0, [-1])
        empty = top_v <= 0
        top = TopKSets(
            values=top_v,
            rows=top_r,
            n_tokens=self.n_tokens,
            fire_count=(
                self.fire.cpu().numpy() if self.fire is not None else np.zeros(self.K, np.int64)
            ),
            label_names=label_names,
        )
        for name in ("token_ids", "doc_ids", "positions"):
            meta = getattr(source, name, None)
            if meta is not None:
                vals = np.asarray(meta)[np.maximum(top_r, 0)].astype(np.int64)
                vals[empty] = -1
                setattr(top, name, vals)
        if self.R and n_bands and per_band:
            res_k, (res_v, res_r) = self.res.result(2.0, [0.0, -1])
            qv, qr, qe = quantile_samples(res_v, res_r, res_k < 2.0, top_v[:, 0], n_bands, per_band)
            top.quantile_values, top.quantile_rows, top.quantile_edges = qv, qr, qe
        if self.labels is not None and self.nb:
            top.label_hist = self.hist.reshape(self.K, self.C, self.nb)
            top.hist_edges = np.linspace(*HIST_LOG10_RANGE, self.nb + 1)
            top.label_counts = self.label_counts
        if self.keep_rows:
            scanned = np.concatenate(self.scanned) if self.scanned else np.zeros(0, np.int64)
            if scanned.size != getattr(source, "n_tokens", -1):
                top.row_index = scanned
        scan = LatentScan(
            top=top,
            l0_counts=self.l0,
            act_sum=self.act_sum,
            act_max=self.act_max.astype(np.float64),
            has_stats=self.stats,
        )
        if self.doc_thr is not None and self.doc_ids is not None:
            parts = self.doc_parts or [
                (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float64))
            ]
            key, mx, sm = max_sum_per_key(*(np.concatenate(p) for p in zip(*parts, strict=True)))
            # a latent's max over a document exceeds the threshold iff one of its entries does
            above = mx > self.doc_thr
            key, mx, sm = key[above], mx[above], sm[above]
            scan.doc_pairs = np.stack([key // self.K, key % self.K], 1)
            scan.doc_max = mx
            scan.doc_sum = sm
            scan.doc_threshold = self.doc_thr
        if self.budget:
            scan.firing_rows = np.concatenate(self.f_rows) if self.f_rows else np.zeros(0, np.int64)
            scan.firing_latents = (
                np.concatenate(self.f_lats) if self.f_lats else np.zeros(0, np.int32)
            )
            scan.firing_rate = self.rate
        return scan


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
    acc = _Accumulator(
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
