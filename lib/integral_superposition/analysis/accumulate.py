"""The bounded per-latent buffers one latent scan folds its chunks into, and what they yield.

:class:`ScanAccumulator` takes each chunk's active SAE entries (``(row, latent, value)``, see
:class:`integral_superposition.sae.encode.Codes`) and keeps, in O(K x n) memory, the top-``n``
activations per latent, a row-hash reservoir of firing rows, firing counts, sums, maxima, the
L0 histogram and optionally the per-label histogram, the (document, latent) maxima and sums
and a sample of the firing matrix; :meth:`ScanAccumulator.finish` turns them into a
:class:`LatentScan` (with its :class:`TopKSets`). :func:`integral_superposition.analysis.scan.scan_latents`
runs the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from integral_superposition.analysis.select import (
    SelectBuffer,
    TorchSelectBuffer,
    max_sum_per_key,
    on_accelerator,
    quantile_samples,
    row_uniform,
)
from integral_superposition.sae.encode import Codes
from integral_superposition.sae.metrics import LatentStats

__all__ = ["HIST_LOG10_RANGE", "LatentScan", "ScanAccumulator", "TopKSets"]

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


class ScanAccumulator:
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
