"""Streaming per-latent top-``n`` selection: the bounded buffers a scan folds chunks into.

:class:`SelectBuffer` keeps, for each of ``K`` latents, the ``n`` largest (or smallest) keys
seen so far with their payloads (row ids, values), in memory O(K x n) whatever the number of
streamed entries; :class:`TorchSelectBuffer` does the same on a torch device. ``row_uniform``
gives the deterministic per-row keys of the uniform reservoirs, and :func:`quantile_samples`
draws evenly spaced samples from each latent's reservoir.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "SelectBuffer",
    "TorchSelectBuffer",
    "max_per_key",
    "max_sum_per_key",
    "on_accelerator",
    "quantile_samples",
    "row_uniform",
]


def row_uniform(rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """A deterministic pseudo-uniform number in [0, 1) per row id (splitmix64), ``float64[n]``."""
    with np.errstate(over="ignore"):  # modular uint64 arithmetic is the point
        z = rows.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 7)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class SelectBuffer:
    """Per-latent selection of the ``n`` largest (or smallest) keys among streamed entries,
    with payloads; memory O(K x n + pool).

    Entries are filtered against each latent's current ``n``-th best key (a gather and a
    compare), survivors wait in a pool, and the pool is merged only when it holds more than
    ``limit`` entries: one sort of ``(latent, key)`` packed into an int64, then each
    latent's first ``n``. Once the buffers are full few entries pass the filter (about
    ``n x B / tokens seen`` per latent and chunk), so merges are rare and most chunks cost
    only the filter. This class keeps its arrays in host numpy (its sort of packed keys is
    the fastest on a CPU); :class:`TorchSelectBuffer` keeps them on a torch device.
    """

    def __init__(
        self, K: int, n: int, largest: bool, payload_dtypes: Sequence[Any], limit: int | None = None
    ):
        self.K, self.n, self.largest = K, n, largest
        self.limit = int(limit or max(K * n, 1 << 20))
        # keys are > 0 (activations, largest) or in [0, 1) (row hashes, smallest)
        self.thr = self._full(K, 0.0 if largest else 2.0, np.float32)
        self.packed = self._full(0, 0, np.int64)  # sorted (latent, key) of the kept entries
        self.pay = [self._full(0, 0, dt) for dt in payload_dtypes]
        self.pool: list[tuple[Any, Any, list[Any]]] = []
        self.pool_size = 0

    # -- the array operations (overridden by TorchSelectBuffer) --------------------------------
    def _full(self, shape: Any, value: float, dtype: Any) -> np.ndarray:
        return np.full(shape, value, dtype=dtype)

    def _cat(self, parts: list) -> np.ndarray:
        return np.concatenate(parts)

    def _arange(self, n: int) -> np.ndarray:
        return np.arange(n)

    def _bincount(self, j: np.ndarray) -> np.ndarray:
        return np.bincount(j, minlength=self.K)

    def _float_bits(self, key: np.ndarray) -> np.ndarray:
        """int64 bit patterns of float32 ``key``."""
        return key.astype(np.float32, copy=False).view(np.int32).astype(np.int64)

    def _bits_float(self, bits: np.ndarray) -> np.ndarray:
        """float32 values of int64 bit patterns (the inverse of :meth:`_float_bits`)."""
        return bits.astype(np.int32).view(np.float32)

    def _stable_sort(self, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(sorted packed, permutation)``; ties keep their positions."""
        spare = self._spare_bits()
        if packed.size >= 1 << spare:
            order = np.argsort(packed, kind="stable")
            return packed[order], order
        # positions in the spare low bits make the keys unique: a plain sort of one uint64
        # array is several times faster than an argsort
        s = np.sort(
            (packed.astype(np.uint64) << np.uint64(spare)) | np.arange(packed.size, dtype=np.uint64)
        )
        order = (s & np.uint64((1 << spare) - 1)).astype(np.int64)
        return packed[order], order

    def _host(self, a: Any) -> np.ndarray:
        return a

    # -- selection ----------------------------------------------------------------------------
    def candidates(self, j, key):
        """Mask ``bool [E]`` of the entries ``(j [E], key [E])`` that can enter a buffer."""
        return key > self.thr[j] if self.largest else key < self.thr[j]

    def add(self, j, key, payloads: Sequence[Any]) -> None:
        if len(j):
            self.pool.append((j, key, list(payloads)))
            self.pool_size += len(j)
            if self.pool_size > self.limit:
                self.merge()

    def _packed(self, j, key):
        """int64 ``(latent, key)`` sort keys: non-negative float32 keys order like their bits."""
        bits = self._float_bits(key)
        if self.largest:
            bits = 0x7FFFFFFF - bits
        return (j << 31) | bits

    def _unpacked(self, packed):
        """``(latent int64, key float32)`` of packed sort keys (the inverse of :meth:`_packed`)."""
        bits = packed & 0x7FFFFFFF
        if self.largest:
            bits = 0x7FFFFFFF - bits
        return packed >> 31, self._bits_float(bits)

    def _first_n(self, packed_sorted):
        """Mask of the first ``n`` entries of each latent in a ``(latent, key)``-sorted array."""
        j = packed_sorted >> 31
        counts = self._bincount(j)
        return (self._arange(len(j)) - (counts.cumsum(0) - counts)[j]) < self.n

    def _spare_bits(self) -> int:
        """Low bits left in a packed key (31 key bits above, the latent above them)."""
        return 64 - 31 - max(1, int(self.K - 1).bit_length())

    def merge(self) -> None:
        """Fold the pool into the kept entries, in groups small enough for the fast sort."""
        room = max(1, (1 << self._spare_bits()) - self.K * self.n)
        while self.pool:
            size, take = 0, 0
            while take < len(self.pool) and (take == 0 or size + len(self.pool[take][0]) <= room):
                size += len(self.pool[take][0])
                take += 1
            group, self.pool = self.pool[:take], self.pool[take:]
            self._merge(group)
        self.pool_size = 0

    def _merge(self, group: list) -> None:
        # the kept entries first, so that ties keep the earlier rows, then the group in order
        packed = self._cat([self.packed] + [self._packed(p[0], p[1]) for p in group])
        pay = [self._cat([b] + [p[2][i] for p in group]) for i, b in enumerate(self.pay)]
        packed, order = self._stable_sort(packed)
        keep = self._first_n(packed)
        order = order[keep]
        self.packed = packed[keep]
        self.pay = [p[order] for p in pay]
        j, key = self._unpacked(self.packed)
        counts = self._bincount(j)
        full = counts >= self.n
        last = counts.cumsum(0) - 1
        self.thr[full] = key[last[full]]

    def result(self, fill_key: float, fills: Sequence[float]) -> tuple[np.ndarray, list]:
        """``(keys [K, n], payloads [K, n])`` as numpy, best first; empty slots hold the fills."""
        self.merge()
        j, key = self._unpacked(self.packed)
        counts = self._bincount(j)
        rank = self._arange(len(j)) - (counts.cumsum(0) - counts)[j]
        keys = self._full((self.K, self.n), fill_key, np.float32)
        keys[j, rank] = key
        out = []
        for p, f in zip(self.pay, fills, strict=True):
            block = self._full((self.K, self.n), f, p.dtype)
            block[j, rank] = p
            out.append(self._host(block))
        return self._host(keys), out


_TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
}


def on_accelerator(device: torch.device) -> bool:
    """Whether a scan encoding on ``device`` keeps its top-n selection there and reads chunks
    ahead in a thread (accelerators: yes; on a CPU the numpy buffer's sorts are faster than
    torch's, and the encode already uses every core)."""
    return device.type != "cpu"


class TorchSelectBuffer(SelectBuffer):
    """:class:`SelectBuffer` with its arrays, pool and merges on a torch ``device``: on a GPU
    the filter, the sorts and the thresholds never leave it, and only the result comes back."""

    def __init__(self, K, n, largest, payload_dtypes, limit=None, device="cpu"):
        self.device = torch.device(device)
        super().__init__(K, n, largest, payload_dtypes, limit)

    def _full(self, shape, value, dtype):
        if not isinstance(dtype, torch.dtype):
            dtype = _TORCH_DTYPES[np.dtype(dtype)]
        return torch.full(
            shape if isinstance(shape, tuple) else (shape,), value, dtype=dtype, device=self.device
        )

    def _cat(self, parts):
        return torch.cat(parts)

    def _arange(self, n):
        return torch.arange(n, device=self.device)

    def _bincount(self, j):
        return torch.bincount(j, minlength=self.K)

    def _float_bits(self, key):
        return key.float().view(torch.int32).to(torch.int64)

    def _bits_float(self, bits):
        return bits.to(torch.int32).view(torch.float32)

    def _stable_sort(self, packed):
        return torch.sort(packed, stable=True)

    def _host(self, a):
        return a.cpu().numpy()


def quantile_samples(
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


def max_per_key(key: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct ``key [E]`` and the maximum of ``values [E]`` for each."""
    if key.size == 0:
        return key.astype(np.int64), values.astype(np.float32)
    order = np.lexsort((values, key))
    k = key[order]
    last = np.ones(k.size, dtype=bool)
    last[:-1] = k[1:] != k[:-1]
    return k[last].astype(np.int64), values[order][last].astype(np.float32)


def max_sum_per_key(
    key: np.ndarray, values: np.ndarray, sums: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct ``key [E]``, the maximum of ``values [E]`` (float32) and the sum of
    ``sums [E]`` (float64; default ``values``) for each."""
    if key.size == 0:
        return key.astype(np.int64), values.astype(np.float32), np.zeros(0, np.float64)
    order = np.argsort(key, kind="stable")
    k = key[order]
    first = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    v = values[order]
    s = (values if sums is None else sums)[order].astype(np.float64)
    return (
        k[first].astype(np.int64),
        np.maximum.reduceat(v, first).astype(np.float32),
        np.add.reduceat(s, first),
    )
