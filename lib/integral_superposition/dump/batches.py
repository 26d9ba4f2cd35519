"""Shuffled, resumable training batches of an ``ActivationStore``.

``BatchPlan`` is the deterministic block/buffer schedule (which rows each buffer of each
epoch holds, in which order); ``BatchIterator`` reads buffers ahead in a background thread
(``read_ahead``) and cuts them into batches. ``ActivationStore.iter_batches`` is the entry
point.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

if TYPE_CHECKING:
    from integral_superposition.dump.store import ActivationStore

T = TypeVar("T")


@dataclass
class Batch:
    """A training batch: activations ``[B, d]`` (or one per hook point) and global row ids ``[B]``."""

    acts: torch.Tensor | dict[str, torch.Tensor]
    index: np.ndarray


class BatchPlan:
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


class BatchIterator:
    """Yields batches from buffers that a background thread reads ahead (bounded queue)."""

    def __init__(
        self, store, plan: BatchPlan, names, n_batches, start_batch, prefetch, dtype, row_filter
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
