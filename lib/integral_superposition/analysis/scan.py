"""One streaming pass of an SAE over stored activations, collecting everything the analysis needs.

For every chunk ``x [B, d]`` the SAE is run once (:class:`SparseEncoder`: only the active
entries of ``z = sae.encode(x)`` ``[B, K]``, as ``(row, latent, value)``) and those entries are
folded into fixed-size per-latent buffers, so memory is O(K x n) whatever the number of tokens:

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

Sources: an :class:`~integral_superposition.dump.ActivationStore`, a store URI or list of
URIs, ``.npy`` or ``.safetensors`` files (the seed's shards, or a dump's own shard files), or
an in-memory ``[N, d]`` array.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from integral_superposition import compute
from integral_superposition.dump.store import NonFiniteActivationsError, first_non_finite
from integral_superposition.progress import ProgressFn
from integral_superposition.sae.metrics import LatentStats
from integral_superposition.sae.model import SparseAutoencoder

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
        self.check_finite(idx, out)
        return out

    def locate(self, row: int) -> str:
        """``part, row`` of a global row, for error messages."""
        i = int(np.searchsorted(self._starts, row, side="right")) - 1
        name = self.uris[i] if len(self.uris) == len(self.parts) else f"part {i}"
        return f"{name} row {row - int(self._starts[i])} (row {row})"

    def check_finite(self, rows: np.ndarray, x: torch.Tensor) -> None:
        """:class:`NonFiniteActivationsError` naming the part and row of the first NaN/inf."""
        bad = first_non_finite(x)
        if bad is not None:
            r, c = bad
            raise NonFiniteActivationsError(
                f"activations contain NaN or inf values: first at {self.locate(int(rows[r]))} "
                f"(value {float(x[r, c])} in column {c})"
            )

    def iter_chunks(
        self,
        chunk_tokens: int,
        mask: np.ndarray | None = None,
        check_finite: bool = True,
        **_: Any,
    ):
        for a in range(0, self.n_tokens, chunk_tokens):
            b = min(self.n_tokens, a + chunk_tokens)
            rows = np.arange(a, b)
            x = self.read(a, b)
            if mask is not None:
                keep = mask[a:b]
                if not keep.any():
                    continue
                x, rows = x[torch.from_numpy(keep)], rows[keep]
            if check_finite:
                self.check_finite(rows, x)
            yield rows, x


def _load_npy(uri: str, storage_options: Mapping[str, Any] | None) -> np.ndarray:
    from integral_superposition import storage

    if storage.is_local(uri):
        return np.load(storage.get_fs(uri)[1], mmap_mode="r")
    return np.load(io.BytesIO(storage.read_bytes(uri, storage_options)))


class _StoreRows:
    """Rows ``[start, stop)`` of a store as a lazy ``[n, d]`` array part of an
    :class:`ArraySource` (slices and index arrays are read through the store, checked)."""

    ndim = 2

    def __init__(self, store, start: int, stop: int):
        self.store, self.start, self.stop = store, start, stop
        self.shape = (stop - start, store.d_model)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, slice):
            a, b, _ = key.indices(self.shape[0])
            return self.store.read(self.start + a, self.start + b)
        return self.store.gather(self.start + np.asarray(key, dtype=np.int64))


class _SafetensorsPart:
    """The one 2-D tensor of a standalone ``.safetensors`` file as a lazy ``[n, d]`` part."""

    ndim = 2

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None):
        from safetensors import safe_open
        from safetensors.torch import load as st_load

        from integral_superposition import storage

        if storage.is_local(uri):
            handle = safe_open(storage.get_fs(uri)[1], framework="pt")
            names = list(handle.keys())
            self._get = lambda name: handle.get_slice(name)
            shapes = {n: tuple(handle.get_slice(n).get_shape()) for n in names}
        else:
            tensors = st_load(storage.read_bytes(uri, storage_options))
            names = list(tensors)
            self._get = tensors.__getitem__
            shapes = {n: tuple(t.shape) for n, t in tensors.items()}
        two_d = [n for n in names if len(shapes[n]) == 2]
        if len(two_d) != 1:
            raise ValueError(
                f"act_files: {uri!r} holds tensors {shapes}; expected exactly one [n_tokens, "
                f"d_model] tensor (or a shard of an activation dump, next to its manifest.json)"
            )
        self.name = two_d[0]
        self.shape = shapes[self.name]

    def __getitem__(self, key: Any) -> torch.Tensor:
        part = self._get(self.name)
        if isinstance(key, slice):
            start, stop, _ = key.indices(self.shape[0])
            return part[start:stop]
        idx = np.asarray(key, dtype=np.int64)
        if idx.size == 0:
            return torch.empty(0, self.shape[1])
        lo, hi = int(idx.min()), int(idx.max()) + 1  # one contiguous read, then pick rows
        return part[lo:hi][torch.from_numpy(idx - lo)]


def _dump_of_shard(uri: str, storage_options: Mapping[str, Any] | None):
    """``(dump root, shard index)`` when ``uri`` is a tensor shard of an activation dump."""
    from integral_superposition import storage

    root, _, name = uri.rstrip("/").rpartition("/")
    if not root or not storage.exists(storage.join(root, "manifest.json"), storage_options):
        return None
    manifest = storage.read_json(storage.join(root, "manifest.json"), storage_options)
    if manifest.get("kind") != "activations":
        return None
    names = [s["tensors"] for s in manifest.get("shards", [])]
    return (root, names.index(name)) if name in names else None


def open_activation_files(
    uris: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> Any:
    """The seed's ``act_files``: a list of ``.npy`` or ``.safetensors`` files (local or remote).

    The shard files of one dump, all of them in order, open as that dump's
    :class:`ActivationStore` (token ids, documents, labels, shuffled training batches). Shards
    of dumps chosen otherwise (a subset, several dumps) read their rows through those stores,
    with the per-row token ids, documents, positions and labels. Other files (``.npy`` arrays,
    a ``.safetensors`` file holding one ``[n, d]`` tensor) become an :class:`ArraySource`.
    """
    from integral_superposition.dump.store import ActivationStore

    uris = [str(u) for u in uris]
    bad = [u for u in uris if not u.endswith((".npy", ".safetensors"))]
    if bad:
        raise ValueError(
            f"act_files={bad[:3]!r}: expected .npy or .safetensors files (or only dump "
            f"directories, not a mix)"
        )
    shards = [
        _dump_of_shard(u, storage_options) if u.endswith(".safetensors") else None for u in uris
    ]
    if shards and all(s is not None for s in shards):
        roots = list(dict.fromkeys(s[0] for s in shards))
        stores = {r: ActivationStore(r, storage_options) for r in roots}
        only = stores[roots[0]]
        if len(roots) == 1 and [s[1] for s in shards] == list(range(len(only.shards))):
            return only
        parts, meta = [], {"token_ids": [], "doc_ids": [], "positions": [], "labels": []}
        label_names = only.label_names
        for root, i in shards:
            store, ref = stores[root], stores[root].shards[i]
            if store.label_names != label_names:
                raise ValueError(
                    f"act_files: the dumps {roots} have different labels; pass their "
                    f"directories as one ActivationStore instead"
                )
            rows = slice(ref.offset, ref.offset + ref.n_tokens)
            parts.append(_StoreRows(store, rows.start, rows.stop))
            for k in meta:
                meta[k].append(np.asarray(getattr(store, k))[rows])
        doc_ids = meta.pop("doc_ids")
        # documents stay distinct across dumps: offset each dump's ids past the previous ones
        offset, base = 0, {}
        for r in roots:
            base[r] = offset
            offset += int(np.asarray(stores[r].doc_ids).max(initial=-1)) + 1
        docs = np.concatenate(
            [d + base[root] for d, (root, _) in zip(doc_ids, shards, strict=True)]
        )
        return ArraySource(
            parts,
            uris,
            doc_ids=docs,
            label_names=label_names,
            **{k: np.concatenate(v) for k, v in meta.items()},
        )
    parts = [
        _load_npy(u, storage_options)
        if u.endswith(".npy")
        else _SafetensorsPart(u, storage_options)
        for u in uris
    ]
    return ArraySource(parts, uris)


def as_activation_source(obj: Any, storage_options: Mapping[str, Any] | None = None):
    """An :class:`ActivationStore`, a store URI (or list), ``.npy`` / ``.safetensors`` paths
    (:func:`open_activation_files`), or an ``[N, d]`` array -> an object with ``n_tokens``,
    ``d_model``, ``iter_chunks`` and ``gather``."""
    import os

    from integral_superposition.dump.store import ActivationStore

    if isinstance(obj, ActivationStore | ArraySource):
        return obj
    if isinstance(obj, np.ndarray | torch.Tensor):
        return ArraySource([obj])
    if isinstance(obj, str | os.PathLike):
        obj = [obj]
    if isinstance(obj, Sequence) and obj and all(isinstance(u, str | os.PathLike) for u in obj):
        uris = [os.fspath(u) for u in obj]
        if any(u.endswith((".npy", ".safetensors")) for u in uris):
            return open_activation_files(uris, storage_options)
        return ActivationStore(uris, storage_options=storage_options)
    raise TypeError(
        f"act_files={type(obj).__name__}: expected an ActivationStore, a store URI or list of URIs, "
        ".npy or .safetensors shard paths, or an [n_tokens, d_model] array"
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
    """``None`` -> the SAE's device; ``"auto"`` -> CUDA when available, else CPU
    (:func:`integral_superposition.compute.resolve_device`)."""
    if device is None:
        return sae.W_enc.device
    return compute.resolve_device(device)


def sae_on(sae: SparseAutoencoder, device: torch.device) -> SparseAutoencoder:
    """The SAE on ``device`` in eval mode (a copy when it lives elsewhere; the caller's is untouched)."""
    if sae.W_enc.device != device:
        sae = copy.deepcopy(sae).to(device)
    return sae.eval()


def encode_dtype_for(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The encoder matmul dtype: float32 or bfloat16 (``"auto"`` picks by the hardware of
    ``device``, as :func:`integral_superposition.compute.resolve_dtype`; fp16 is not used).

    Raises ``ValueError`` naming ``encode_dtype`` for anything else.
    """
    if compute.parse_dtype(dtype, "encode_dtype") == torch.float16:
        raise ValueError(f"encode_dtype={dtype!r}: expected 'auto', 'float32' or 'bfloat16'")
    dt = compute.resolve_dtype(dtype, device, arg="encode_dtype")
    # auto on a GPU without bf16 gives fp16, whose range the pre-activations can exceed
    return torch.float32 if dt == torch.float16 else dt


@dataclass
class Codes:
    """The active entries of one chunk's latents ``z [B, K]`` in coordinate form."""

    n_rows: int
    """``B``, the chunk's rows."""
    t: torch.Tensor
    """int64 ``[E]`` row of each entry (0..B-1)."""
    j: torch.Tensor
    """int64 ``[E]`` latent of each entry."""
    v: torch.Tensor
    """float32 ``[E]`` its activation (> 0)."""
    x_hat: torch.Tensor | None = None
    """float32 ``[B, d]`` reconstruction, when asked for."""


class SparseEncoder:
    """``x [B, d] -> Codes``: the SAE's inference-time encode, returning only active entries.

    TopK codes come straight from the per-row ``topk`` (no dense ``[B, K]`` code is built);
    ReLU/JumpReLU/BatchTopK entries from one mask over the pre-activations. ``dtype="bfloat16"``
    runs the encoder matmul on bf16 copies of ``x`` and ``W_enc`` (fp32 bias and activation):
    several times faster on CPUs with AVX512-BF16 or AMX and on GPUs, at bf16 precision of
    the pre-activations (ranks can swap between near-equal activations).
    """

    def __init__(self, sae: SparseAutoencoder, dtype: str | torch.dtype = "float32"):
        dtype = encode_dtype_for(dtype, sae.W_enc.device)
        self.sae, self.dtype = sae, dtype
        self.W = sae.W_enc.detach().to(dtype).contiguous()
        self.b_enc = sae.b_enc.detach().float()
        self.b_dec = sae.b_dec.detach().float()
        # merged SAEs aggregate member codes: their latents only exist after a dense encode;
        # groupmax ranks within groups and a skip connection decodes from x as well
        self.dense_only = (
            sae.merge_index is not None or sae.architecture == "groupmax" or sae.W_skip is not None
        )

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) @ W_enc + b_enc`` in float32 ``[B, d_pre]`` (matmul in ``self.dtype``)."""
        # any float input: the subtraction promotes to float32 in one pass (no separate copy)
        xc = torch.sub(x, self.b_dec).to(self.dtype)
        # matmul, then the bias: the same rounding as SparseAutoencoder.encode
        return (xc @ self.W).float().add_(self.b_enc)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, reconstruct: bool = False) -> Codes:
        sae, B = self.sae, x.shape[0]
        if self.dense_only:
            z = sae.encode(x.float()).float()
            t, j = (z > 0).nonzero(as_tuple=True)
            x_hat = sae.decode(z, x.float()).float() if reconstruct else None
            return Codes(B, t, j, z[t, j], x_hat)
        pre = self.pre_activations(x)
        if sae.architecture == "topk":
            top = pre.topk(sae.top_k, dim=-1, sorted=False)
            vals = top.values.relu_()
            x_hat = sae.decode_sparse(vals, top.indices).float() if reconstruct else None
            keep = (vals > 0).view(-1).nonzero().squeeze(1)
            t = torch.arange(B, device=x.device).repeat_interleave(sae.top_k)[keep]
            return Codes(B, t, top.indices.view(-1)[keep], vals.view(-1)[keep], x_hat)
        thr = 0.0 if sae.architecture == "relu" else sae.threshold.detach().float()
        x_hat = None
        if reconstruct:
            z = pre * (pre > thr).to(pre.dtype)
            x_hat = sae.decode(z).float()
        # z > 0 exactly where pre exceeds both the threshold and 0
        t, j = (pre > (thr.clamp_min(0.0) if torch.is_tensor(thr) else thr)).nonzero(as_tuple=True)
        return Codes(B, t, j, pre[t, j], x_hat)


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
    doc_max: np.ndarray | None = None
    """float32 ``[P]``: the latent's maximum over the document, aligned with ``doc_pairs``."""
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


def _max_per_key(key: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct ``key [E]`` and the maximum of ``values [E]`` for each."""
    if key.size == 0:
        return key.astype(np.int64), values.astype(np.float32)
    order = np.lexsort((values, key))
    k = key[order]
    last = np.ones(k.size, dtype=bool)
    last[:-1] = k[1:] != k[:-1]
    return k[last].astype(np.int64), values[order][last].astype(np.float32)


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
        self.top: _SelectBuffer = (
            _TorchSelectBuffer(K, n, True, [np.int64], device=device)
            if _on_accelerator(device)
            else _SelectBuffer(K, n, True, [np.int64])
        )
        self.R = reservoir
        if reservoir:
            self.res = _SelectBuffer(K, reservoir, False, [np.float32, np.int64])
        self.fire: torch.Tensor | None = None  # int64 [K] on the encoding device
        self.act_sum = np.zeros(K, dtype=np.float64)
        self.act_max = np.zeros(K, dtype=np.float32)
        self.l0 = np.zeros(K + 1, dtype=np.int64)
        self.labels, self.C, self.nb = labels, n_labels, hist_bins
        if labels is not None and hist_bins:
            self.hist = np.zeros(K * n_labels * hist_bins, dtype=np.int64)
            self.label_counts = np.zeros(n_labels, dtype=np.int64)
        self.doc_ids, self.doc_thr = doc_ids, doc_threshold
        self.doc_parts: list[np.ndarray] = []
        self.doc_max_parts: list[np.ndarray] = []
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
        if isinstance(self.top, _TorchSelectBuffer):
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
            # a latent's max over a document exceeds the threshold iff one of its entries does
            above = v > self.doc_thr
            d = np.asarray(self.doc_ids[rows], dtype=np.int64)
            key, mx = _max_per_key(d[t[above]] * K + j[above], v[above])
            self.doc_parts.append(np.stack([key // K, key % K], 1))
            self.doc_max_parts.append(mx)

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
            qv, qr, qe = _quantile_samples(
                res_v, res_r, res_k < 2.0, top_v[:, 0], n_bands, per_band
            )
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
            pairs = np.concatenate(self.doc_parts) if self.doc_parts else np.zeros((0, 2), np.int64)
            vals = (
                np.concatenate(self.doc_max_parts)
                if self.doc_max_parts
                else np.zeros(0, np.float32)
            )
            key, mx = _max_per_key(pairs[:, 0] * self.K + pairs[:, 1], vals)
            scan.doc_pairs = np.stack([key // self.K, key % self.K], 1)
            scan.doc_max = mx
            scan.doc_threshold = self.doc_thr
        if self.budget:
            scan.firing_rows = np.concatenate(self.f_rows) if self.f_rows else np.zeros(0, np.int64)
            scan.firing_latents = (
                np.concatenate(self.f_lats) if self.f_lats else np.zeros(0, np.int32)
            )
            scan.firing_rate = self.rate
        return scan


class _SelectBuffer:
    """Per-latent selection of the ``n`` largest (or smallest) keys among streamed entries,
    with payloads; memory O(K x n + pool).

    Entries are filtered against each latent's current ``n``-th best key (a gather and a
    compare), survivors wait in a pool, and the pool is merged only when it holds more than
    ``limit`` entries: one sort of ``(latent, key)`` packed into an int64, then each
    latent's first ``n``. Once the buffers are full few entries pass the filter (about
    ``n x B / tokens seen`` per latent and chunk), so merges are rare and most chunks cost
    only the filter. This class keeps its arrays in host numpy (its sort of packed keys is
    the fastest on a CPU); :class:`_TorchSelectBuffer` keeps them on a torch device.
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

    # -- the array operations (overridden by _TorchSelectBuffer) --------------------------------
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


def _on_accelerator(device: torch.device) -> bool:
    """Whether a scan encoding on ``device`` keeps its top-n selection there and reads chunks
    ahead in a thread (accelerators: yes; on a CPU the numpy buffer's sorts are faster than
    torch's, and the encode already uses every core)."""
    return device.type != "cpu"


class _TorchSelectBuffer(_SelectBuffer):
    """:class:`_SelectBuffer` with its arrays, pool and merges on a torch ``device``: on a GPU
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
    dev = resolve_device(device, sae)
    model = sae_on(sae, dev)
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
    encoder = SparseEncoder(model, encode_dtype)
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
    clock = time.perf_counter()
    # chunks arrive in the storage dtype (the encoder converts them on the device); while an
    # accelerator encodes one chunk, a thread reads the next
    ahead = 2 if _on_accelerator(dev) else 0
    trim_skip = 0
    for rows, x in src.iter_chunks(chunk, mask=mask, dtype=None, prefetch=ahead):
        x = x.to(dev, non_blocking=True)
        t0 = _sync(dev)
        codes = encoder(x, reconstruct=stats is not None)
        t1 = _sync(dev)
        acc.update(rows, codes)
        t2 = _sync(dev)
        if stats is not None:
            stats.update_reconstruction(x, codes.x_hat)
        t3 = _sync(dev)
        del codes, x
        if not _on_accelerator(dev):
            if trim_skip > 0:
                trim_skip -= 1
            else:
                _release_free_heap()
                # at most ~2% of the chunk's work: a slow trim (a big heap) spaces out the next
                trim_skip = int((time.perf_counter() - t3) / max(0.02 * (t3 - t0), 1e-6))
        t4 = time.perf_counter()
        timings["read"] += t0 - clock
        timings["encode"] += t1 - t0
        timings["select"] += t2 - t1
        timings["metrics"] += t3 - t2
        timings["heap"] += t4 - t3
        clock = t4
        done = min(total, int(rows[-1]) // chunk + 1)
        if on_progress is not None:
            on_progress(done, total)
        clock += time.perf_counter() - t4  # the callback's time is not the scan's
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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` with another C library."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS.

    glibc serves blocks below its mmap threshold from the heap, and the threshold grows to the
    largest block freed so far (up to 32 MiB), so a CPU scan's chunk-sized temporaries and
    selection pools end up there. Their freed pages stay resident, more of them the more chunks
    a scan runs. Trimming once per chunk (about 2 ms) keeps the peak flat in the token count.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _sync(dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()
