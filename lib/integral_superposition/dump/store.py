"""``ActivationStore``: the reader that training and analysis consume.

A store is one published activation dump (or several, concatenated). It offers

- random access to token ranges (``read``) and index lists (``gather``);
- sequential chunks for analysis (``iter_chunks``);
- shuffled, resumable batches through a bounded buffer with background prefetch
  (``iter_batches``; the schedule and the reader thread live in ``dump.batches``);
- aligned token metadata: ``token_ids``, ``doc_ids``, ``positions``, ``labels``;
- a document-level train/test split shared by every consumer (``split_mask``).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from integral_superposition import storage
from integral_superposition.dump.batches import Batch, BatchIterator, BatchPlan, read_ahead
from integral_superposition.dump.shards import (
    REPAIR_HINT,
    TORCH_DTYPES,
    CorruptShardError,
    NonFiniteActivationsError,
    ShardReader,
    ShardRef,
    first_non_finite,
    verify_dump,
)
from integral_superposition.dump.tokens import read_docs, read_token_table, split_rows

__all__ = [
    "VERIFY_MODES",
    "ActivationStore",
    "Batch",
    "NonFiniteActivationsError",
    "first_non_finite",
    "verify_dump",
]

VERIFY_MODES = ("first-read", "off")
"""``ActivationStore(verify=...)``: hash every file on its first read, or not at all."""


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
        return read_token_table(self.manifests, self.shards, self.label_names, self._read_file)

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
        return read_docs(self.manifests, self.label_names, self._read_file)

    def split_mask(
        self, split: str = "train", test_fraction: float = 0.05, seed: int = 0
    ) -> np.ndarray:
        """Boolean row mask ``[n_tokens]`` of a document-level split: ``train``, ``test`` or
        ``all`` (:func:`~integral_superposition.dump.tokens.split_rows`)."""
        if split == "all":  # without reading the token tables
            return np.ones(self.n_tokens, dtype=bool)
        return split_rows(self.doc_ids, split, test_fraction, seed)

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
        plan = BatchPlan(
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
        plan = BatchPlan(
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
        yield from BatchIterator(
            self, plan, names, n_batches, start_batch, prefetch, dtype, row_filter
        )
