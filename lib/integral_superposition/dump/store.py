"""``ActivationStore``: the reader that training and analysis consume.

A store is one published activation dump (or several, concatenated). It offers

- random access to token ranges (``read``) and index lists (``gather``);
- sequential chunks for analysis (``iter_chunks``);
- shuffled, resumable batches through a bounded buffer with background prefetch
  (``iter_batches``);
- aligned token metadata: ``token_ids``, ``doc_ids``, ``positions``, ``labels``;
- a document-level train/test split shared by every consumer (``split_mask``).
"""

from __future__ import annotations

import functools
import io
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from integral_superposition import storage
from integral_superposition.dump.shards import (
    REPAIR_HINT,
    TORCH_DTYPES,
    CorruptShardError,
    ShardReader,
    files_intact,
)

T = TypeVar("T")


class NonFiniteActivationsError(ValueError):
    """The activations hold NaN or inf values (the message names the shard and row)."""


def first_non_finite(x: torch.Tensor) -> tuple[int, int] | None:
    """``(row, column)`` of the first NaN/inf of ``x`` ``[n, d]``, or ``None``.

    One reduction, in the tensor's own dtype, when everything is finite: ``aminmax``
    propagates NaN and finds +-inf (and, unlike a sum, cannot overflow); only when it is not
    finite is the element-wise test run. About 25 ms per 65536 x 640 chunk on a CPU core
    pair, in float32, bf16 or fp16 alike (``isfinite(x).all()`` takes 1 s there).
    """
    if x.numel() == 0:
        return None
    lo, hi = torch.aminmax(x)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return None
    bad = ~torch.isfinite(x)
    r, c = bad.nonzero()[0].tolist()
    return int(r), int(c)


VERIFY_MODES = ("first-read", "off")
"""``ActivationStore(verify=...)``: hash every file on its first read, or not at all."""


@dataclass(frozen=True)
class ShardRef:
    """One shard of a store: its tensor file, token table, size and global row offset."""

    root: str
    tensors: str
    tokens: str
    n_tokens: int
    offset: int
    store_index: int
    size: int | None = None
    sha256: str | None = None


@dataclass
class Batch:
    """A training batch: activations ``[B, d]`` (or one per hook point) and global row ids ``[B]``."""

    acts: torch.Tensor | dict[str, torch.Tensor]
    index: np.ndarray


def _doc_uniform(doc_ids: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic pseudo-uniform number in [0, 1) per document id (splitmix64)."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        z = doc_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def verify_dump(dir_uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when a published dump's every file has the manifest's size and SHA-256.

    Shards are checked as :class:`ActivationStore` checks them on first read (and remembered
    for this process, so a store opened afterwards does not hash them again).
    """
    if not storage.verify_output(dir_uri, storage_options):
        return False
    manifest = storage.read_manifest(dir_uri, storage_options)
    return files_intact(dir_uri, manifest.get("files", {}), storage_options)


class ActivationStore:
    """Read one or more published activation dumps as one token-indexed array.

    ``uris``: a dump directory URI, or a list of them (same ``d_model`` and hook points;
    document ids of later dumps are offset to stay unique, labels are mapped by name).

    ``verify``: ``"first-read"`` (default) checks each file against the manifest's SHA-256
    when this process first reads it (a shard: one streamed extra read of the file, once per
    process; token tables as they are loaded); ``"off"`` skips the hashes. Sizes, headers and
    shapes are always checked. A mismatch raises :class:`CorruptShardError`. The default
    comes from the ``ISUP_VERIFY_SHARDS`` environment variable when it is set.
    """

    def __init__(
        self,
        uris: str | Sequence[str],
        storage_options: Mapping[str, Any] | None = None,
        hook_point: str | None = None,
        verify: str | None = None,
    ):
        self.uris = [uris] if isinstance(uris, str) else list(uris)
        if not self.uris:
            raise ValueError("uris is empty: expected at least one activation dump")
        arg = "verify"
        if verify is None:
            arg, verify = "ISUP_VERIFY_SHARDS", os.environ.get("ISUP_VERIFY_SHARDS") or "first-read"
        if verify not in VERIFY_MODES:
            raise ValueError(f"{arg}={verify!r}: expected one of {list(VERIFY_MODES)}")
        self.verify = verify
        self.storage_options = dict(storage_options or {})
        self.manifests = [
            storage.read_manifest(u, self.storage_options, kind="activations") for u in self.uris
        ]
        first = self.manifests[0]
        for u, m in zip(self.uris[1:], self.manifests[1:], strict=True):
            if m["d_model"] != first["d_model"]:
                raise ValueError(
                    f"dump {u!r} has d_model={m['d_model']}, but {self.uris[0]!r} has {first['d_model']}"
                )
        names = [h["name"] for h in first["hook_points"]]
        common = [
            n
            for n in names
            if all(n in [h["name"] for h in m["hook_points"]] for m in self.manifests)
        ]
        if not common:
            raise ValueError(f"the dumps {self.uris} share no hook point")
        self.hook_point_names = common
        self.hook_point = self._check_hook(hook_point) if hook_point is not None else common[0]
        self.d_model = int(first["d_model"])
        self.storage_dtype = first["dtype"]
        self.dtype = TORCH_DTYPES[self.storage_dtype]
        label_names: list[str] = []
        for m in self.manifests:
            for n in m["labels"]["names"]:
                if n not in label_names:
                    label_names.append(n)
        self.label_names = (
            label_names if len(self.manifests) > 1 else list(first["labels"]["names"])
        )
        self.shards: list[ShardRef] = []
        offset = 0
        for si, (u, m) in enumerate(zip(self.uris, self.manifests, strict=True)):
            for s in m["shards"]:
                entry = {**m.get("files", {}).get(s["tensors"], {}), **s}
                self.shards.append(
                    ShardRef(
                        u,
                        s["tensors"],
                        s["tokens"],
                        int(s["n_tokens"]),
                        offset,
                        si,
                        int(entry["size"]) if "size" in entry else None,
                        entry.get("sha256"),
                    )
                )
                offset += int(s["n_tokens"])
        self.n_tokens = offset
        self._starts = np.array([s.offset for s in self.shards] + [offset], dtype=np.int64)
        self._readers: dict[int, ShardReader] = {}
        self._lock = threading.Lock()

    # -- identity ---------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        """The (first) dump's manifest."""
        return self.manifests[0]

    @property
    def content_hash(self) -> str:
        """Hash of the dumps' content hashes (one store, one identity)."""
        if len(self.manifests) == 1:
            return self.manifests[0]["content_hash"]
        return storage.sha256_bytes("|".join(m["content_hash"] for m in self.manifests).encode())

    @property
    def n_docs(self) -> int:
        return int(sum(m["n_docs"] for m in self.manifests))

    @property
    def model_info(self) -> dict[str, Any]:
        return self.manifests[0]["model"]

    def hook_info(self, name: str | None = None) -> dict[str, Any]:
        name = self._check_hook(name or self.hook_point)
        return next(h for h in self.manifests[0]["hook_points"] if h["name"] == name)

    def norm_stats(self, name: str | None = None) -> dict[str, float]:
        return self.manifests[0]["norm_stats"][self._check_hook(name or self.hook_point)]

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return f"ActivationStore({self.uris!r}, hook_point={self.hook_point!r}, n_tokens={self.n_tokens}, d_model={self.d_model}, dtype={self.storage_dtype})"

    def _check_hook(self, name: str) -> str:
        if name not in self.hook_point_names:
            raise ValueError(
                f"hook_point={name!r}: not in this store; available: {self.hook_point_names}"
            )
        return name

    def locate(self, row: int) -> str:
        """``shard file, row`` of a global store row, for error messages."""
        i = int(np.searchsorted(self._starts, row, side="right")) - 1
        if 0 <= i < len(self.shards) and 0 <= row < self.n_tokens:
            sh = self.shards[i]
            return (
                f"shard {storage.join(sh.root, sh.tensors)} row {row - sh.offset} (store row {row})"
            )
        return f"store row {row}"

    def check_finite(
        self, rows: np.ndarray, x: torch.Tensor, hook_point: str | None = None
    ) -> None:
        """Raise :class:`NonFiniteActivationsError` naming the shard and row when the
        activations ``x`` ``[n, d]`` read for store rows ``rows`` ``[n]`` hold NaN or inf."""
        bad = first_non_finite(x)
        if bad is None:
            return
        r, c = bad
        raise NonFiniteActivationsError(
            f"activations at hook point {hook_point or self.hook_point!r} contain NaN or inf "
            f"values: first at {self.locate(int(rows[r]))} (value {float(x[r, c])} in column "
            f"{c}); the dump that wrote this store produced them: fix the model or the data "
            "and dump again"
        )

    # -- token metadata ---------------------------------------------------------------------
    def _read_file(self, store_index: int, name: str) -> bytes:
        """A (small) file of dump ``store_index``, checked against its manifest entry."""
        uri = storage.join(self.uris[store_index], name)
        data = storage.read_bytes(uri, self.storage_options)
        entry = self.manifests[store_index].get("files", {}).get(name)
        if entry is None:
            return data
        if len(data) != int(entry["size"]):
            raise CorruptShardError(
                f"file {uri} is damaged: expected {entry['size']} bytes (from the dump's "
                f"manifest), found {len(data)} bytes; {REPAIR_HINT}"
            )
        if self.verify == "first-read" and storage.sha256_bytes(data) != entry["sha256"]:
            raise CorruptShardError(
                f"file {uri} is damaged: its content differs from the dump's manifest although "
                f"its size ({len(data)} bytes) matches; {REPAIR_HINT}"
            )
        return data

    @functools.cached_property
    def _token_table(self) -> dict[str, np.ndarray]:
        cols: dict[str, list[np.ndarray]] = {
            "token_id": [],
            "doc_id": [],
            "position": [],
            "label": [],
        }
        doc_offset, store_index = 0, -1
        label_maps = [
            np.array([self.label_names.index(n) for n in m["labels"]["names"]], dtype=np.int32)
            for m in self.manifests
        ]
        for shard in self.shards:
            if shard.store_index != store_index:
                if store_index >= 0:
                    doc_offset += int(self.manifests[store_index]["doc_id_end"])
                store_index = shard.store_index
            t = pq.read_table(io.BytesIO(self._read_file(shard.store_index, shard.tokens)))
            cols["token_id"].append(t.column("token_id").to_numpy().astype(np.int32))
            cols["doc_id"].append(t.column("doc_id").to_numpy().astype(np.int64) + doc_offset)
            cols["position"].append(t.column("position").to_numpy().astype(np.int32))
            cols["label"].append(label_maps[store_index][t.column("label").to_numpy()])
        return {
            k: (np.concatenate(v) if v else np.zeros(0, dtype=np.int64)) for k, v in cols.items()
        }

    @property
    def token_ids(self) -> np.ndarray:
        """Token id per stored row, ``int32[n_tokens]``."""
        return self._token_table["token_id"]

    @property
    def doc_ids(self) -> np.ndarray:
        """Document id per stored row, ``int64[n_tokens]``."""
        return self._token_table["doc_id"]

    @property
    def positions(self) -> np.ndarray:
        """Position of each row inside its document's token sequence, ``int32[n_tokens]``."""
        return self._token_table["position"]

    @property
    def labels(self) -> np.ndarray:
        """Label id per stored row (index into ``label_names``), ``int32[n_tokens]``."""
        return self._token_table["label"]

    @functools.cached_property
    def docs(self) -> pd.DataFrame:
        """One row per document: ``doc_id``, ``text``, ``label`` (id), ``label_name``, ``n_tokens``."""
        frames = []
        doc_offset = 0
        for i, m in enumerate(self.manifests):
            df = pd.read_parquet(io.BytesIO(self._read_file(i, m["docs_file"])))
            df["doc_id"] = df["doc_id"].astype(np.int64) + doc_offset
            df["label"] = [self.label_names.index(n) for n in df["label_name"]]
            frames.append(df)
            doc_offset += int(m["doc_id_end"])
        return pd.concat(frames, ignore_index=True)

    def split_mask(
        self, split: str = "train", test_fraction: float = 0.05, seed: int = 0
    ) -> np.ndarray:
        """Boolean row mask of a document-level split: ``train``, ``test`` or ``all``."""
        if split == "all":
            return np.ones(self.n_tokens, dtype=bool)
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: expected 'train', 'test' or 'all'")
        if not 0 < test_fraction < 1:
            raise ValueError(
                f"test_fraction={test_fraction}: expected a fraction strictly between 0 and 1"
            )
        is_test = _doc_uniform(self.doc_ids, seed) < test_fraction
        return is_test if split == "test" else ~is_test

    # -- activations ------------------------------------------------------------------------
    def _reader(self, i: int) -> ShardReader:
        """The reader of shard ``i``, opened (size, header and shapes checked; its SHA-256
        too with ``verify="first-read"``, once per process) on first use."""
        r = self._readers.get(i)
        if r is not None:
            return r
        s = self.shards[i]
        # opened outside the store's lock: hashing one shard does not stall readers of others
        r = ShardReader(
            storage.join(s.root, s.tensors),
            self.storage_options,
            size=s.size,
            sha256=s.sha256,
            verify=self.verify == "first-read",
        )
        for name in self.hook_point_names:
            r.check_shape(name, s.n_tokens, self.d_model)
        with self._lock:
            return self._readers.setdefault(i, r)

    def read(self, start: int, stop: int, hook_point: str | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` as ``[stop-start, d_model]`` in the storage dtype."""
        name = self._check_hook(hook_point or self.hook_point)
        parts = [self._reader(i).read(name, a, b) for i, a, b, _ in self._pieces(start, stop)]
        if not parts:
            return torch.empty((0, self.d_model), dtype=self.dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def read_into(self, start: int, stop: int, out: torch.Tensor, hook_point: str | None = None):
        """Copy rows ``[start, stop)`` into ``out`` ``[stop-start, d_model]`` (any float dtype)."""
        name = self._check_hook(hook_point or self.hook_point)
        pieces = self._pieces(start, stop)
        if out.shape != (stop - start, self.d_model):
            raise ValueError(
                f"out has shape {tuple(out.shape)}: expected {(stop - start, self.d_model)}"
            )
        for i, a, b, at in pieces:
            self._reader(i).read_into(name, a, b, out[at : at + b - a])

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """``(shard, first row, stop row, offset in the range)`` of the non-empty shard pieces
        of rows ``[start, stop)``; raises ``IndexError`` when the range is out of bounds."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(
                f"rows [{start}, {stop}) out of range: the store has {self.n_tokens} tokens"
            )
        pieces = []
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            s = self.shards[i]
            a, b = pos - s.offset, min(stop, s.offset + s.n_tokens) - s.offset
            if b > a:
                pieces.append((i, a, b, pos - start))
            pos = s.offset + b
            i += 1
        return pieces

    def gather(
        self,
        indices: np.ndarray | Sequence[int],
        hook_point: str | None = None,
        check_finite: bool = True,
    ) -> torch.Tensor:
        """Rows at ``indices`` (any order) as ``[len(indices), d_model]``; NaN/inf values raise
        :class:`NonFiniteActivationsError` unless ``check_finite=False``."""
        name = self._check_hook(hook_point or self.hook_point)
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_tokens):
            raise IndexError(f"indices out of range [0, {self.n_tokens})")
        out = torch.empty((idx.size, self.d_model), dtype=self.dtype)
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        for i in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == i)
            out[torch.from_numpy(sel)] = self._reader(int(i)).read_rows(
                name, idx[sel] - self.shards[i].offset
            )
        if check_finite:
            self.check_finite(idx, out, name)
        return out

    def iter_chunks(
        self,
        chunk_tokens: int = 65536,
        hook_point: str | None = None,
        mask: np.ndarray | None = None,
        dtype: torch.dtype | None = torch.float32,
        prefetch: int = 0,
        check_finite: bool = True,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Sequential ``(row ids [n], activations [n, d])`` chunks, optionally only rows in ``mask``;
        ``dtype=None`` keeps the storage dtype (no conversion on the host). ``prefetch > 0``
        reads up to that many chunks ahead in a background thread (while a device computes).
        A chunk with NaN/inf values raises :class:`NonFiniteActivationsError` naming the
        shard and row (one reduction per chunk) unless ``check_finite=False``."""
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens}: expected a positive number")
        name = self._check_hook(hook_point or self.hook_point)

        def chunks() -> Iterator[tuple[np.ndarray, torch.Tensor]]:
            for a in range(0, self.n_tokens, chunk_tokens):
                b = min(self.n_tokens, a + chunk_tokens)
                rows = np.arange(a, b)
                if mask is not None:
                    keep = mask[a:b]
                    if not keep.any():
                        continue
                    x, rows = self.read(a, b, name)[torch.from_numpy(keep)], rows[keep]
                else:
                    x = self.read(a, b, name)
                if dtype is not None:
                    x = x.to(dtype)
                if check_finite:
                    self.check_finite(rows, x, name)
                yield rows, x

        if prefetch > 0:
            yield from read_ahead(chunks, prefetch)
        else:
            yield from chunks()

    def batches_per_epoch(
        self,
        batch_size: int,
        split: str = "train",
        test_fraction: float = 0.05,
        split_seed: int = 0,
        buffer_tokens: int = 1 << 18,
        block_tokens: int = 4096,
    ) -> int:
        """Number of batches one epoch of :meth:`iter_batches` yields (computed from metadata)."""
        plan = _BatchPlan(
            self, batch_size, split, test_fraction, split_seed, buffer_tokens, block_tokens, 0
        )
        return sum(plan.batches_in(0, b) for b in range(plan.n_buffers))

    def iter_batches(
        self,
        batch_size: int,
        *,
        hook_points: Sequence[str] | None = None,
        split: str = "train",
        test_fraction: float = 0.05,
        split_seed: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        n_batches: int | None = None,
        epochs: float | None = 1.0,
        start_batch: int = 0,
        buffer_tokens: int = 1 << 18,
        block_tokens: int = 4096,
        prefetch: int = 2,
        dtype: torch.dtype = torch.float32,
        row_filter=None,
        part: tuple[int, int] | None = None,
    ) -> Iterator[Batch]:
        """Shuffled batches of ``batch_size`` rows, resumable at ``start_batch``.

        Rows are read as blocks of ``block_tokens`` consecutive rows; each epoch visits the
        blocks in a seeded random order, ``buffer_tokens`` rows at a time, and shuffles rows
        inside each buffer. A background thread reads up to ``prefetch`` buffers ahead. A
        buffer's rows that do not fill a whole batch are dropped. The sequence depends only on
        the seeds and the metadata, so batch ``n`` is the same whether the run started at 0
        or resumed at ``n``. ``row_filter(rows [n], acts [n, d]) -> bool[n]`` drops rows
        (e.g. outliers) before batching; it must be deterministic.

        ``part=(start, stop)``: only rows ``start:stop`` of every batch (one data-parallel
        rank's part), and only those are copied out of the shards into the buffer: the batches
        are the same whatever the partition, and the buffer holds ``stop - start`` rows per
        batch instead of ``batch_size``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive number of rows")
        if part is not None:
            if not (
                isinstance(part, tuple) and len(part) == 2 and 0 <= part[0] <= part[1] <= batch_size
            ):
                raise ValueError(
                    f"part={part!r}: expected (start, stop) with 0 <= start <= stop <= batch_size={batch_size}"
                )
            if row_filter is not None:
                raise ValueError(
                    "part: cannot be combined with row_filter (batches depend on the filter)"
                )
        names = [self._check_hook(h) for h in (hook_points or [self.hook_point])]
        plan = _BatchPlan(
            self,
            batch_size,
            split,
            test_fraction,
            split_seed,
            buffer_tokens,
            block_tokens,
            seed,
            shuffle,
            part,
        )
        per_epoch = (
            sum(plan.batches_in(0, b) for b in range(plan.n_buffers))
            if row_filter is None
            else None
        )
        if n_batches is None:
            if epochs is None:
                raise ValueError("give n_batches or epochs")
            if per_epoch is None:
                raise ValueError(
                    "with row_filter, give n_batches (the epoch length is not known in advance)"
                )
            n_batches = int(epochs * per_epoch)
        if plan.total_rows == 0:
            raise ValueError(f"the {split!r} split of {self!r} has no tokens")
        if per_epoch == 0:
            raise ValueError(
                f"batch_size={batch_size}: larger than every buffer of the {split!r} split ({plan.total_rows} tokens); use a smaller batch"
            )
        yield from _PrefetchIterator(
            self, plan, names, n_batches, start_batch, prefetch, dtype, row_filter
        )


class _BatchPlan:
    """Deterministic block/buffer schedule of :meth:`ActivationStore.iter_batches`."""

    def __init__(
        self,
        store: ActivationStore,
        batch_size: int,
        split: str,
        test_fraction: float,
        split_seed: int,
        buffer_tokens: int,
        block_tokens: int,
        seed: int,
        shuffle: bool = True,
        part: tuple[int, int] | None = None,
    ):
        if block_tokens < 1 or buffer_tokens < 1:
            raise ValueError("block_tokens and buffer_tokens must be positive")
        self.store, self.batch_size, self.seed, self.shuffle = store, batch_size, seed, shuffle
        self.part = part
        """Rows ``start:stop`` of every batch only (None: whole batches)."""
        self.part_rows = batch_size if part is None else part[1] - part[0]
        self.mask = store.split_mask(split, test_fraction, split_seed)
        n = store.n_tokens
        self.block_starts = np.arange(0, n, block_tokens, dtype=np.int64)
        self.block_ends = np.minimum(self.block_starts + block_tokens, n)
        csum = np.concatenate([[0], np.cumsum(self.mask)])
        self.block_rows = csum[self.block_ends] - csum[self.block_starts]
        self.total_rows = int(self.block_rows.sum())
        self.blocks_per_buffer = max(1, -(-max(buffer_tokens, batch_size) // block_tokens))
        self.n_buffers = max(1, -(-len(self.block_starts) // self.blocks_per_buffer))
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if self.shuffle:
                self._orders = {
                    epoch: np.random.default_rng([self.seed, epoch]).permutation(
                        len(self.block_starts)
                    )
                }
            else:
                self._orders = {epoch: np.arange(len(self.block_starts))}
        return self._orders[epoch]

    def blocks_in(self, epoch: int, buf: int) -> np.ndarray:
        o = self.order(epoch)
        return o[buf * self.blocks_per_buffer : (buf + 1) * self.blocks_per_buffer]

    def batches_in(self, epoch: int, buf: int) -> int:
        return int(self.block_rows[self.blocks_in(epoch, buf)].sum()) // self.batch_size

    def load(
        self, epoch: int, buf: int, names: list[str], dtype: torch.dtype, row_filter
    ) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        """Read one buffer: its row ids and activations, shuffled."""
        blocks = self.blocks_in(epoch, buf)
        rows_parts = []
        for b in blocks:
            a, e = int(self.block_starts[b]), int(self.block_ends[b])
            rows_parts.append(np.arange(a, e)[self.mask[a:e]])
        rows = np.concatenate(rows_parts) if rows_parts else np.zeros(0, dtype=np.int64)
        # The buffer is allocated once and filled in place, already shuffled: each block is
        # read through one reused scratch block (converted on the way), its kept rows are
        # selected into a second one and scattered to their shuffled positions. No per-block
        # temporaries and no second, shuffled copy of the buffer: a long run's reader thread
        # does not fragment its malloc arena, so memory stays flat in the number of tokens.
        perm = self._row_order(epoch, buf, rows.size) if row_filter is None else None
        dest = np.arange(rows.size)  # where each row of the unshuffled buffer goes
        if perm is not None:
            dest[perm] = dest.copy()
        wanted = None  # with ``part``: the unshuffled rows that land in this rank's part
        n_out = rows.size
        if self.part is not None:
            lo, hi = self.part
            nb = rows.size // self.batch_size
            batch, offset = np.divmod(dest, self.batch_size)
            wanted = (batch < nb) & (offset >= lo) & (offset < hi)
            dest = batch * (hi - lo) + (offset - lo)  # position among the part's rows
            n_out = nb * (hi - lo)
        acts = {n: torch.empty((n_out, self.store.d_model), dtype=dtype) for n in names}
        width = int((self.block_ends - self.block_starts).max()) if blocks.size else 0
        scratch = torch.empty((width, self.store.d_model), dtype=dtype)
        picked = torch.empty((width, self.store.d_model), dtype=dtype)
        pos = 0
        for b, part in zip(blocks, rows_parts, strict=True):
            if not part.size:
                continue
            a, e = int(self.block_starts[b]), int(self.block_ends[b])
            idx, to_np = part - a, dest[pos : pos + part.size]
            if wanted is not None:
                w = wanted[pos : pos + part.size]
                idx, to_np = idx[w], to_np[w]
            pos += part.size
            if not idx.size:
                continue  # none of this block's rows is in the part: not read
            to = torch.from_numpy(to_np)
            keep = None if idx.size == e - a else torch.from_numpy(idx)
            for n in names:
                self.store.read_into(a, e, scratch[: e - a], n)
                src = scratch[: e - a]
                if keep is not None:
                    src = torch.index_select(src, 0, keep, out=picked[: idx.size])
                acts[n].index_copy_(0, to, src)
        rows = rows[perm] if perm is not None else rows
        if self.part is not None:
            lo, hi = self.part
            nb = rows.size // self.batch_size
            rows = rows[: nb * self.batch_size].reshape(nb, self.batch_size)[:, lo:hi].reshape(-1)
        if row_filter is not None:
            keep_rows = np.asarray(row_filter(rows, acts[names[0]]), dtype=bool)
            rows = rows[keep_rows]
            acts = {n: a[torch.from_numpy(keep_rows)] for n, a in acts.items()}
            p2 = self._row_order(epoch, buf, rows.size)
            if p2 is not None:
                rows = rows[p2]
                p2_t = torch.from_numpy(p2)
                acts = {n: a[p2_t] for n, a in acts.items()}
        return rows, acts

    def _row_order(self, epoch: int, buf: int, n: int) -> np.ndarray | None:
        """The seeded shuffle of a buffer's ``n`` rows (None without shuffling)."""
        if not self.shuffle:
            return None
        return np.random.default_rng([self.seed, epoch, buf, 1]).permutation(n)


def read_ahead(items: Callable[[], Iterator[T]], depth: int) -> Iterator[T]:
    """Yield the values of ``items()``, which a background thread produces up to ``depth``
    ahead (a bounded queue). Its exceptions re-raise here; closing this generator (or leaving
    the loop) stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items():
                if not put((None, x)):
                    return
            put((done, None))
        except BaseException as e:  # surfaced in the consumer
            put((e, None))

    thread = threading.Thread(target=produce, daemon=True, name="isup-prefetch")
    thread.start()
    try:
        while True:
            err, x = q.get()
            if err is done:
                return
            if err is not None:
                raise err
            yield x
    finally:
        stop.set()
        while True:  # unblock the producer
            try:
                q.get_nowait()
            except queue.Empty:
                break
        thread.join(timeout=5)


class _PrefetchIterator:
    """Yields batches from buffers that a background thread reads ahead (bounded queue)."""

    def __init__(
        self, store, plan: _BatchPlan, names, n_batches, start_batch, prefetch, dtype, row_filter
    ):
        self.plan, self.names, self.n_batches, self.dtype, self.row_filter = (
            plan,
            names,
            n_batches,
            dtype,
            row_filter,
        )
        self.start_batch = start_batch
        self.prefetch = prefetch

    def _schedule(self) -> Iterator[tuple[int, int, int]]:
        """``(epoch, buffer, batches to skip in it)`` from ``start_batch`` on."""
        skip = self.start_batch
        epoch = 0
        while True:
            for buf in range(self.plan.n_buffers):
                if self.row_filter is None:
                    nb = self.plan.batches_in(epoch, buf)
                    if skip >= nb:
                        skip -= nb
                        continue
                yield epoch, buf, skip
                skip = 0
            epoch += 1

    def _buffers(self) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor], int]]:
        """``(rows, activations, batches to skip)`` of each buffer from ``start_batch`` on."""
        skip_left = self.start_batch if self.row_filter is not None else 0
        for epoch, buf, skip in self._schedule():
            rows, acts = self.plan.load(epoch, buf, self.names, self.dtype, self.row_filter)
            if self.plan.part is not None:  # no row filter: the plan knows the count
                nb = self.plan.batches_in(epoch, buf)
            else:
                nb = rows.size // self.plan.batch_size
            if skip_left:
                if skip_left >= nb:
                    skip_left -= nb
                    continue
                skip, skip_left = skip_left, 0
            yield rows, acts, skip, nb

    def __iter__(self) -> Iterator[Batch]:
        if self.n_batches <= self.start_batch:
            return
        emitted = self.start_batch
        bs = self.plan.part_rows  # rows per batch (of the part)
        buffers = read_ahead(self._buffers, self.prefetch)
        try:
            for rows, acts, skip, nb in buffers:
                for j in range(skip, nb):
                    sl = slice(j * bs, (j + 1) * bs)
                    a = {n: t[sl] for n, t in acts.items()}
                    yield Batch(a[self.names[0]] if len(self.names) == 1 else a, rows[sl])
                    emitted += 1
                    if emitted >= self.n_batches:
                        return
        finally:
            buffers.close()
