"""One streaming pass of an SAE over stored activations, collecting everything the analysis needs.

For every chunk ``x [B, d]`` the SAE is run once (``z = sae.encode(x)``, ``[B, K]``) and the
chunk is folded into fixed-size per-latent buffers, so memory is O(K x n) whatever the
number of tokens:

- the top-``n`` activations per latent with their row ids (per-chunk ``torch.topk`` merged
  into a running buffer);
- a uniform reservoir of firing rows per latent (each row gets a hash-derived key; a latent
  keeps the rows with the smallest keys among those where it fires), from which the
  quantile samples are drawn;
- firing counts, activation sums and maxima, and the L0 histogram;
- optionally a histogram of activations per (latent, label) on log10 bins (AUROC, dashboards),
  the (document, latent) pairs where a latent's maximum over the document passes a threshold
  (document-level enrichment), a bounded sample of the token firing matrix (co-activation
  Jaccard), and the SAE metrics of :func:`integral_superposition.sae.metrics.latent_stats`.

Sources: an :class:`~integral_superposition.dump.ActivationStore`, a store URI or list of
URIs, ``.npy`` files (the seed's shards), or an in-memory ``[N, d]`` array.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from integral_superposition.sae.metrics import LatentStats
from integral_superposition.sae.model import SparseAutoencoder

ProgressFn = Callable[[int, int], None]

HIST_LOG10_RANGE = (-4.0, 4.0)
"""Range of the log10 activation histogram; values outside fall into the edge bins."""

CHUNK_ELEMENTS = 1 << 24
"""Default chunk size in latent activations (``B x K``): 64 MiB of float32 per chunk."""


# -- activation sources ------------------------------------------------------------------------
class ArraySource:
    """Activations ``[N, d]`` held in memory or in ``.npy`` files.

    It offers the part of the :class:`ActivationStore` interface the analysis reads
    (``n_tokens``, ``d_model``, ``iter_chunks``, ``gather`` and the per-row metadata
    ``token_ids``, ``doc_ids``, ``positions``, ``labels``, each ``[N]`` or ``None``).
    Documents must be runs of consecutive rows, as in a dump.
    """

    uris: list[str]

    def __init__(
        self,
        parts: Sequence[np.ndarray | torch.Tensor],
        uris: Sequence[str] = (),
        *,
        token_ids: np.ndarray | None = None,
        doc_ids: np.ndarray | None = None,
        positions: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        label_names: Sequence[str] | None = None,
    ):
        self.parts = []
        for i, p in enumerate(parts):
            if p.ndim != 2:
                raise ValueError(
                    f"activations part {i} has shape {tuple(p.shape)}: expected [n, d]"
                )
            self.parts.append(p)
        if not self.parts:
            raise ValueError("no activations given: expected at least one [n, d] array")
        dims = {int(p.shape[1]) for p in self.parts}
        if len(dims) != 1:
            raise ValueError(f"activation parts have different widths {sorted(dims)}")
        self.d_model = dims.pop()
        sizes = [int(p.shape[0]) for p in self.parts]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_tokens = int(self._starts[-1])
        self.uris = list(uris) or ["<memory>"]
        self.content_hash = None
        for name, meta in (
            ("token_ids", token_ids),
            ("doc_ids", doc_ids),
            ("positions", positions),
            ("labels", labels),
        ):
            if meta is not None:
                meta = np.asarray(meta)
                if meta.shape != (self.n_tokens,):
                    raise ValueError(
                        f"{name} has shape {meta.shape}: expected ({self.n_tokens},), one per row"
                    )
            setattr(self, name, meta)
        self.label_names = list(label_names) if label_names is not None else None

    @staticmethod
    def _tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            return a.float()
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a copy: memmaps are read-only

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as float32 ``[stop - start, d]``."""
        out = []
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            a = pos - self._starts[i]
            b = min(stop, self._starts[i + 1]) - self._starts[i]
            out.append(self._tensor(self.parts[i][a:b]))
            pos = int(self._starts[i] + b)
            i += 1
        return torch.cat(out) if len(out) != 1 else out[0]

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """Rows at ``indices`` as float32 ``[len(indices), d]``."""
        idx = np.asarray(indices, dtype=np.int64)
        out = torch.empty((idx.size, self.d_model), dtype=torch.float32)
        part = np.searchsorted(self._starts, idx, side="right") - 1
        for i in np.unique(part):
            sel = np.flatnonzero(part == i)
            # sorted unique reads keep memory-mapped parts sequential
            uniq, inv = np.unique(idx[sel] - self._starts[i], return_inverse=True)
            out[torch.from_numpy(sel)] = self._tensor(self.parts[int(i)][uniq])[
                torch.from_numpy(inv)
            ]
        return out

    def iter_chunks(self, chunk_tokens: int, mask: np.ndarray | None = None, **_: Any):
        for a in range(0, self.n_tokens, chunk_tokens):
            b = min(self.n_tokens, a + chunk_tokens)
            rows = np.arange(a, b)
            x = self.read(a, b)
            if mask is not None:
                keep = mask[a:b]
                if not keep.any():
                    continue
                x, rows = x[torch.from_numpy(keep)], rows[keep]
            yield rows, x


def _load_npy(uri: str, storage_options: Mapping[str, Any] | None) -> np.ndarray:
    from integral_superposition import storage

    if storage.is_local(uri):
        return np.load(storage.get_fs(uri)[1], mmap_mode="r")
    return np.load(io.BytesIO(storage.read_bytes(uri, storage_options)))


def as_activation_source(obj: Any, storage_options: Mapping[str, Any] | None = None):
    """An :class:`ActivationStore`, a store URI (or list), ``.npy`` paths, or an ``[N, d]`` array
    -> an object with ``n_tokens``, ``d_model``, ``iter_chunks`` and ``gather``."""
    from integral_superposition.dump.store import ActivationStore

    if isinstance(obj, ActivationStore | ArraySource):
        return obj
    if isinstance(obj, np.ndarray | torch.Tensor):
        return ArraySource([obj])
    if isinstance(obj, str):
        obj = [obj]
    if isinstance(obj, Sequence) and obj and all(isinstance(u, str) for u in obj):
        if all(u.endswith(".npy") for u in obj):
            return ArraySource([_load_npy(u, storage_options) for u in obj], uris=obj)
        return ActivationStore(list(obj), storage_options=storage_options)
    raise TypeError(
        f"act_files={type(obj).__name__}: expected an ActivationStore, a store URI or list of URIs, "
        ".npy shard paths, or an [n_tokens, d_model] array"
    )


def row_uniform(rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """A deterministic pseudo-uniform number in [0, 1) per row id (splitmix64), ``float64[n]``."""
    with np.errstate(over="ignore"):  # modular uint64 arithmetic is the point
        z = rows.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 7)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def resolve_device(device: str | torch.device | None, sae: SparseAutoencoder) -> torch.device:
    """``None`` -> the SAE's device; ``"auto"`` -> CUDA when available, else CPU."""
    if device is None:
        return sae.W_enc.device
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sae_on(sae: SparseAutoencoder, device: torch.device) -> SparseAutoencoder:
    """The SAE on ``device`` in eval mode (a copy when it lives elsewhere; the caller's is untouched)."""
    if sae.W_enc.device != device:
        sae = copy.deepcopy(sae).to(device)
    return sae.eval()


def check_sae_source(sae: SparseAutoencoder, source) -> None:
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"sae: expected a SparseAutoencoder, got {type(sae).__name__}")
    if int(source.d_model) != int(sae.d_in):
        raise ValueError(
            f"sae.d_in={sae.d_in} does not match the activations' d_model={source.d_model} "
            f"({getattr(source, 'uris', '')}): the SAE was trained on another model or hook point"
        )


def default_chunk_tokens(d_sae: int) -> int:
    return int(max(256, min(65536, CHUNK_ELEMENTS // max(1, d_sae))))


# -- results -----------------------------------------------------------------------------------
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


class _Accumulator:
    """Per-chunk folding of ``z [B, K]`` into the bounded buffers of :class:`LatentScan`."""

    def __init__(
        self,
        d_sae: int,
        n: int,
        device: torch.device,
        reservoir: int,
        labels: np.ndarray | None,
        n_labels: int,
        hist_bins: int,
        doc_ids: np.ndarray | None,
        doc_threshold: float | None,
        firing_budget: int,
        seed: int,
        stats: bool = True,
    ):
        K = d_sae
        self.stats = stats
        self.K, self.n, self.dev, self.seed = K, n, device, seed
        self.top_v = torch.full((K, n), -1.0, device=device)
        self.top_r = torch.full((K, n), -1, dtype=torch.long, device=device)
        self.R = reservoir
        if reservoir:
            self.res_k = torch.full((K, reservoir), 2.0, device=device)
            self.res_v = torch.zeros((K, reservoir), device=device)
            self.res_r = torch.full((K, reservoir), -1, dtype=torch.long, device=device)
        self.fire = torch.zeros(K, dtype=torch.long, device=device)
        self.act_sum = torch.zeros(K, dtype=torch.float64, device=device)
        self.act_max = torch.zeros(K, device=device)
        self.l0 = torch.zeros(K + 1, dtype=torch.long, device=device)
        self.labels, self.C, self.nb = labels, n_labels, hist_bins
        if labels is not None and hist_bins:
            self.hist = torch.zeros(K * n_labels * hist_bins, dtype=torch.long, device=device)
            self.label_counts = np.zeros(n_labels, dtype=np.int64)
        self.doc_ids, self.doc_thr = doc_ids, doc_threshold
        self.doc_parts: list[np.ndarray] = []
        self.budget = firing_budget
        self.rate = 1.0
        self.f_rows: list[np.ndarray] = []
        self.f_lats: list[np.ndarray] = []
        self.f_nnz = 0
        self.n_tokens = 0
        self.scanned: list[np.ndarray] = []

    @torch.no_grad()
    def update(self, rows: np.ndarray, z: torch.Tensor) -> None:
        B = z.shape[0]
        self.n_tokens += B
        self.scanned.append(rows)
        rows_t = torch.from_numpy(rows).to(self.dev)
        active = z > 0
        # float reductions along dim 0 are several times faster than bool/float64 ones on CPU
        act_f = active.to(z.dtype)
        self.fire += act_f.sum(0).round().long()
        if self.stats:
            self.act_sum += z.sum(0).double()
            self.act_max = torch.maximum(self.act_max, z.amax(0))
            self.l0 += torch.bincount(act_f.sum(1).round().long(), minlength=self.K + 1)

        # Only entries above a latent's current n-th best can enter its top set.
        thr = self.top_v.amin(1).clamp_min(0.0)
        t_idx, j_idx = (z > thr).nonzero(as_tuple=True)
        if t_idx.numel():
            self.top_v, (self.top_r,) = _merge_candidates(
                self.top_v, [self.top_r], j_idx, z[t_idx, j_idx], [rows_t[t_idx]], largest=True
            )

        u = None
        if self.R:
            u = torch.from_numpy(row_uniform(rows, self.seed)).to(self.dev)
            # a latent's reservoir: its firing rows with the smallest row keys
            cand = active & (u.float()[:, None] < self.res_k.amax(1))
            t_idx, j_idx = cand.nonzero(as_tuple=True)
            if t_idx.numel():
                self.res_k, (self.res_v, self.res_r) = _merge_candidates(
                    self.res_k,
                    [self.res_v, self.res_r],
                    j_idx,
                    u.float()[t_idx],
                    [z[t_idx, j_idx], rows_t[t_idx]],
                    largest=False,
                )

        need_nz = (self.labels is not None and self.nb) or self.budget
        if need_nz:
            t_idx, j_idx = active.nonzero(as_tuple=True)
        if self.labels is not None and self.nb:
            lab = torch.from_numpy(self.labels[rows].astype(np.int64)).to(self.dev)
            self.label_counts += np.bincount(self.labels[rows], minlength=self.C)
            lo, hi = HIST_LOG10_RANGE
            b = ((torch.log10(z[t_idx, j_idx]) - lo) * (self.nb / (hi - lo))).floor()
            b = b.clamp_(0, self.nb - 1).long()
            idx = (j_idx * self.C + lab[t_idx]) * self.nb + b
            self.hist.index_add_(0, idx, torch.ones_like(idx))

        if self.doc_ids is not None and self.doc_thr is not None:
            d = self.doc_ids[rows]
            starts = np.flatnonzero(np.diff(d, prepend=d[0] - 1))
            lengths = np.diff(np.append(starts, d.size))
            dmax = torch.segment_reduce(
                z, "max", lengths=torch.from_numpy(lengths).to(self.dev), axis=0
            )
            di, lj = (dmax > self.doc_thr).nonzero(as_tuple=True)
            pairs = np.stack([d[starts][di.cpu().numpy()], lj.cpu().numpy()], 1)
            self.doc_parts.append(pairs.astype(np.int64))

        if self.budget:
            if u is None:
                u = torch.from_numpy(row_uniform(rows, self.seed)).to(self.dev)
            sel = u[t_idx] < self.rate
            self.f_rows.append(rows_t[t_idx[sel]].cpu().numpy())
            self.f_lats.append(j_idx[sel].to(torch.int32).cpu().numpy())
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
        order = torch.argsort(self.top_v, dim=1, descending=True, stable=True)
        top_v = self.top_v.gather(1, order).cpu().numpy()
        top_r = self.top_r.gather(1, order).cpu().numpy()
        empty = top_v <= 0
        top_v[empty] = 0.0
        top_r[empty] = -1
        top = TopKSets(
            values=top_v.astype(np.float32),
            rows=top_r.astype(np.int64),
            n_tokens=self.n_tokens,
            fire_count=self.fire.cpu().numpy().astype(np.int64),
            label_names=label_names,
        )
        for name in ("token_ids", "doc_ids", "positions"):
            meta = getattr(source, name, None)
            if meta is not None:
                vals = np.asarray(meta)[np.maximum(top_r, 0)].astype(np.int64)
                vals[empty] = -1
                setattr(top, name, vals)
        if self.R and n_bands and per_band:
            qv, qr, qe = _quantile_samples(
                self.res_v.cpu().numpy(),
                self.res_r.cpu().numpy(),
                (self.res_k < 2.0).cpu().numpy(),
                top_v[:, 0],
                n_bands,
                per_band,
            )
            top.quantile_values, top.quantile_rows, top.quantile_edges = qv, qr, qe
        if self.labels is not None and self.nb:
            top.label_hist = self.hist.view(self.K, self.C, self.nb).cpu().numpy()
            top.hist_edges = np.linspace(*HIST_LOG10_RANGE, self.nb + 1)
            top.label_counts = self.label_counts
        scanned = np.concatenate(self.scanned) if self.scanned else np.zeros(0, np.int64)
        if scanned.size != getattr(source, "n_tokens", -1):
            top.row_index = scanned
        scan = LatentScan(
            top=top,
            l0_counts=self.l0.cpu().numpy(),
            act_sum=self.act_sum.cpu().numpy(),
            act_max=self.act_max.cpu().numpy().astype(np.float64),
            has_stats=self.stats,
        )
        if self.doc_thr is not None and self.doc_ids is not None:
            pairs = np.concatenate(self.doc_parts) if self.doc_parts else np.zeros((0, 2), np.int64)
            scan.doc_pairs = np.unique(pairs, axis=0)
            scan.doc_threshold = self.doc_thr
        if self.budget:
            scan.firing_rows = np.concatenate(self.f_rows) if self.f_rows else np.zeros(0, np.int64)
            scan.firing_latents = (
                np.concatenate(self.f_lats) if self.f_lats else np.zeros(0, np.int32)
            )
            scan.firing_rate = self.rate
        return scan


def _group_order(latent: torch.Tensor, K: int) -> torch.Tensor:
    """A stable permutation grouping ``latent [c]`` by value. On CPU numpy's radix sort of
    16-bit keys is about 100x faster than ``torch.argsort``."""
    if latent.device.type == "cpu" and K <= 1 << 16:
        keys = latent.numpy().astype(np.uint16)
        return torch.from_numpy(np.argsort(keys, kind="stable"))
    return torch.argsort(latent, stable=True)


def _merge_candidates(
    buf_key: torch.Tensor,
    buf_payload: list[torch.Tensor],
    latent: torch.Tensor,
    key: torch.Tensor,
    payload: list[torch.Tensor],
    largest: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Merge candidate entries ``(latent [c], key [c], payloads [c])`` into per-latent buffers
    ``[K, n]`` that keep the ``n`` largest (or smallest) keys.

    Candidates are laid out as a ``[K, c_max]`` block (c_max = most candidates of one latent,
    capped near ``n``), so one ``topk`` over ``[K, n + c_max]`` merges every latent at once.
    """
    K, n = buf_key.shape
    counts = torch.bincount(latent, minlength=K)
    c_max = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    if c_max > 4 * n:
        # a wide block would dominate: keep only each latent's n best candidates (two sorts)
        by_key = torch.argsort(key, descending=largest, stable=True)
        order = by_key[_group_order(latent[by_key], K)]
    else:
        order = _group_order(latent, K)
    lat = latent[order]
    rank = torch.arange(lat.numel(), device=lat.device) - starts[lat]
    if c_max > 4 * n:
        keep = rank < n
        order, lat, rank = order[keep], lat[keep], rank[keep]
        c_max = n
    fill = -torch.inf if largest else torch.inf
    block = torch.full((K, c_max), fill, dtype=buf_key.dtype, device=buf_key.device)
    block[lat, rank] = key[order].to(buf_key.dtype)
    keys = torch.cat([buf_key, block], 1)
    # unsorted: sorting costs about 5x the selection; buffers are sorted once, at the end
    sel = keys.topk(n, dim=1, largest=largest, sorted=False)
    out = []
    for buf, pay in zip(buf_payload, payload, strict=True):
        pb = torch.zeros((K, c_max), dtype=buf.dtype, device=buf.device)
        pb[lat, rank] = pay[order].to(buf.dtype)
        out.append(torch.cat([buf, pb], 1).gather(1, sel.indices))
    return sel.values, out


def _quantile_samples(
    res_v: np.ndarray,
    res_r: np.ndarray,
    valid: np.ndarray,
    vmax: np.ndarray,
    n_bands: int,
    per_band: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split each latent's reservoir ``[K, R]`` into ``n_bands`` equal-count bands of its sorted
    values and take ``per_band`` evenly spaced samples from each (lowest band first)."""
    K = res_v.shape[0]
    v = np.where(valid, res_v, np.inf)
    order = np.argsort(v, axis=1, kind="stable")
    v = np.take_along_axis(v, order, 1)
    r = np.take_along_axis(np.where(valid, res_r, -1), order, 1)
    c = valid.sum(1)  # [K]
    b = np.arange(n_bands + 1)
    bounds = (b[None, :] * c[:, None]) // n_bands  # [K, n_bands + 1]
    lo, hi = bounds[:, :-1, None], bounds[:, 1:, None]  # [K, nb, 1]
    width = hi - lo
    i = np.arange(per_band)[None, None, :]
    pos = np.where(width >= per_band, lo + (i * width) // per_band, lo + i)
    ok = i < width
    pos = np.minimum(pos, max(0, v.shape[1] - 1))
    kk = np.arange(K)[:, None, None]
    qv = np.where(ok, v[kk, pos], 0.0).astype(np.float32)
    qr = np.where(ok, r[kk, pos], -1).astype(np.int64)
    edge_pos = np.minimum(bounds, np.maximum(c[:, None] - 1, 0))
    edges = v[np.arange(K)[:, None], edge_pos]
    edges[:, -1] = vmax
    edges = np.where(c[:, None] > 0, edges, 0.0).astype(np.float32)
    return qv, qr, edges


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
    dev = resolve_device(device, sae)
    model = sae_on(sae, dev)
    if reservoir is None:
        reservoir = max(64, 4 * n_bands * per_band) if n_bands else 0
    acc = _Accumulator(
        sae.d_sae,
        n_top,
        dev,
        int(reservoir),
        labels,
        C,
        int(hist_bins),
        None if doc_ids is None else np.asarray(doc_ids),
        doc_threshold,
        int(firing_budget),
        seed,
        stats=stats or metrics,
    )
    stats = LatentStats(sae.d_sae) if metrics else None
    chunk = int(chunk_tokens or default_chunk_tokens(sae.d_sae))
    if chunk < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: expected a positive number of tokens")
    total = -(-src.n_tokens // chunk)
    for rows, x in src.iter_chunks(chunk, mask=mask):
        x = x.to(dev, non_blocking=True)
        z = model.encode(x).float()
        acc.update(rows, z)
        if stats is not None:
            stats.update(x, z, model.decode(z))
        done = min(total, int(rows[-1]) // chunk + 1)
        if on_progress is not None:
            on_progress(done, total)
    if acc.n_tokens == 0:
        raise ValueError("the selected token set is empty: nothing to scan")
    scan = acc.finish(src, n_bands, per_band, list(label_names) if label_names else None)
    scan.metrics = stats
    return scan
