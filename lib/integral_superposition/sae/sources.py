"""Where SAE training reads its batches from: a protocol and the two built-in sources.

A training source (:class:`TrainingSource`) yields ``({hook point: [B, d] float32}, row ids)``
batches from any step on, knows how many steps the run has and can sample rows for the
data-dependent initialisation. :class:`StoreSource` reads an ``ActivationStore`` (deterministic,
resumable at any step); :class:`IterableSource` re-cuts tensors or an iterable of tensors into
``batch_size`` rows. :func:`open_source` picks one for whatever the caller passed. Another
source (model forward passes through a shuffle buffer, one rank's slice of a store) plugs
into the training loop by providing the same members.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from integral_superposition.config import SAEConfig
from integral_superposition.sae.schedule import total_steps

BLOCK_TOKENS = 4096
"""Rows a store reads contiguously before the shuffle buffer mixes them."""


@runtime_checkable
class TrainingSource(Protocol):
    """What the training loop needs from a stream of activations."""

    hooks: list[str]
    """Hook points the batches carry (one per trained hook point, in order)."""
    d_model: int
    """Width of the activations."""
    total: int | None
    """Optimiser steps of the whole run (None: unknown, the stream decides; no LR decay)."""
    resumable: bool
    """Whether :meth:`batches` can restart at any step (checkpoints need it)."""

    def describe(self) -> dict[str, Any]:
        """JSON-safe identity of the data (part of the checkpoint fingerprint and manifest)."""
        ...

    def locate(self, row: int) -> str:
        """Where row ``row`` of a batch's row ids lives, for error messages."""
        ...

    def check_finite(self) -> None:
        """Raise ``NonFiniteActivationsError`` before training when the data holds NaN/inf."""
        ...

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """Up to ``n`` training rows per hook point, float32 ``[n, d]`` (initialisation)."""
        ...

    def batches(self, start: int) -> Iterator[tuple[dict[str, torch.Tensor], Any]]:
        """``({hook: [B, d] float32}, row ids [B] or None)`` for steps ``start, start + 1, ...``."""
        ...


class StoreSource:
    """Batches from an :class:`ActivationStore`: deterministic, resumable at any step."""

    resumable = True

    def __init__(self, store, hooks: list[str], cfg: SAEConfig):
        self.store = store
        self.hooks = hooks
        self.cfg = cfg
        self.d_model = int(store.d_model)
        if store.n_tokens == 0:
            raise ValueError(f"the activation store {store.uris} is empty (0 tokens)")
        n_train = int(store.split_mask("train", cfg.test_fraction, 0).sum())
        if n_train < cfg.batch_size:
            raise ValueError(
                f"batch_size={cfg.batch_size}: the store's train split has only {n_train} tokens "
                f"({store.n_tokens} in all, test_fraction={cfg.test_fraction}); use a smaller batch"
            )
        self.per_epoch = store.batches_per_epoch(
            cfg.batch_size, "train", cfg.test_fraction, 0, self._buffer(), BLOCK_TOKENS
        )
        self.total = total_steps(cfg, self.per_epoch)

    def _buffer(self) -> int:
        return max(self.cfg.shuffle_buffer_tokens, self.cfg.batch_size)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "store",
            "content_hash": self.store.content_hash,
            "uris": list(self.store.uris),
            "hooks": self.hooks,
            "n_tokens": int(self.store.n_tokens),
        }

    def locate(self, row: int) -> str:
        """``shard file, row`` of a global store row, for error messages."""
        return self.store.locate(row)

    def check_finite(self) -> None:
        """Fail before training when a hook point's norm statistics show NaN/inf values."""
        for h in self.hooks:
            ns = self.store.norm_stats(h)
            vals = [ns.get(k) for k in ("mean", "max", "min")]
            if all(v is not None and math.isfinite(v) for v in vals):
                continue
            for _ in self.store.iter_chunks(1 << 16, hook_point=h, dtype=None):
                pass  # the store raises NonFiniteActivationsError at the first bad row

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """Up to ``n`` evenly spaced training rows per hook point, float32 ``[n, d]``."""
        rows = np.flatnonzero(self.store.split_mask("train", self.cfg.test_fraction, 0))
        if rows.size > n:
            rows = rows[np.linspace(0, rows.size - 1, n).round().astype(np.int64)]
        return {h: self.store.gather(rows, h).float() for h in self.hooks}

    def batches(
        self, start: int, part: tuple[int, int] | None = None
    ) -> Iterator[tuple[dict[str, torch.Tensor], Any]]:
        """Batches from step ``start``; ``part=(start, stop)``: only those rows of each batch,
        the only rows then read from the store (a data-parallel rank's part)."""
        it = self.store.iter_batches(
            self.cfg.batch_size,
            hook_points=self.hooks,
            split="train",
            test_fraction=self.cfg.test_fraction,
            split_seed=0,
            seed=self.cfg.seed,
            n_batches=self.total,
            start_batch=start,
            buffer_tokens=self._buffer(),
            block_tokens=BLOCK_TOKENS,
            part=part,
        )
        for b in it:
            acts = b.acts if isinstance(b.acts, dict) else {self.hooks[0]: b.acts}
            yield acts, b.index


class IterableSource:
    """Batches re-cut to ``batch_size`` rows from tensors: a ``[N, d]`` tensor, a sequence or
    re-iterable of ``[n, d]`` (or ``[B, T, d]``) tensors, a callable returning such an
    iterator, or a one-shot iterator (one pass; no LR decay unless ``train_tokens`` is set)."""

    def __init__(self, obj: Any, hook: str, cfg: SAEConfig):
        self.hooks = [hook]
        self.cfg = cfg
        if isinstance(obj, torch.Tensor | np.ndarray):
            obj = [obj]
        if callable(obj) and not hasattr(obj, "__iter__"):
            self._factory: Callable[[], Iterator[Any]] = obj
            self.reiterable = True
        elif isinstance(obj, Iterable) and iter(obj) is not obj:
            self._factory = lambda: iter(obj)
            self.reiterable = True
        elif isinstance(obj, Iterator):
            self._factory = lambda: obj
            self.reiterable = False
        else:
            raise TypeError(
                f"shard_iterator: expected an ActivationStore, a dump URI, tensors or an iterable of "
                f"[n, d] tensors, got {type(obj).__name__}"
            )
        self._peek: list[torch.Tensor] = []
        self._peek_iter: Iterator[Any] | None = None
        self.resumable = self.reiterable
        first = self._first_tensor()
        self.d_model = int(first.shape[-1])
        bs = cfg.batch_size
        if self.reiterable:
            n_rows = sum(int(as_rows(t).shape[0]) for t in self._factory())
            if n_rows == 0:
                raise ValueError("shard_iterator yields no activation rows (it is empty)")
            self.per_epoch = -(-n_rows // bs)
            self.n_rows = n_rows
        else:
            self.per_epoch = None
            self.n_rows = None
        if cfg.train_tokens is not None:
            self.total: int | None = max(1, cfg.train_tokens // bs)
        elif self.per_epoch is not None:
            self.total = max(1, int(cfg.epochs * self.per_epoch))
        else:
            self.total = None

    def _first_tensor(self) -> torch.Tensor:
        it = self._factory()
        for item in it:
            t = as_rows(item)
            if t.shape[0]:
                if not self.reiterable:  # keep what we consumed of a one-shot iterator
                    self._peek = [t]
                    self._peek_iter = it
                return t
        raise ValueError("shard_iterator yields no activation rows (it is empty)")

    def describe(self) -> dict[str, Any]:
        return {"kind": "iterable", "n_rows": self.n_rows, "d_model": self.d_model}

    def check_finite(self) -> None:  # checked batch by batch
        return None

    def locate(self, row: int) -> str:
        return f"input row {row} (counting rows from the start of the stream)"

    def _rows(self) -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            if self._peek_iter is not None:
                yield from self._peek
                it, self._peek, self._peek_iter = self._peek_iter, [], None
            else:
                if epoch > 0 and not self.reiterable:
                    return
                it = self._factory()
            for item in it:
                t = as_rows(item)
                if t.shape[-1] != self.d_model:
                    raise ValueError(
                        f"shard_iterator: a tensor has last dimension {t.shape[-1]}, expected d_model={self.d_model}"
                    )
                yield t
            epoch += 1
            yield None  # epoch boundary: the last partial batch is emitted

    def batches(self, start: int) -> Iterator[tuple[dict[str, torch.Tensor], Any]]:
        bs = self.cfg.batch_size
        pending: list[torch.Tensor] = []
        n_pending = 0
        step = 0
        row0 = 0
        for t in self._rows():
            if self.total is not None and step >= self.total:
                return
            if t is not None:
                pending.append(t)
                n_pending += t.shape[0]
            while n_pending >= bs or (t is None and n_pending > 0):
                cat = torch.cat(pending) if len(pending) > 1 else pending[0]
                take = min(bs, n_pending)
                batch, rest = cat[:take], cat[take:]
                pending, n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
                if step >= start:
                    yield {self.hooks[0]: batch.float()}, np.arange(row0, row0 + take)
                row0 += take
                step += 1
                if self.total is not None and step >= self.total:
                    return

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """Up to ``n`` rows from the start of the stream (a one-shot iterator: what was peeked)."""
        parts, got = [], 0
        items = self._factory() if self.reiterable else iter(self._peek)
        for item in items:
            t = as_rows(item)[: n - got]
            parts.append(t)
            got += t.shape[0]
            if got >= n:
                break
        x = torch.cat(parts).float() if parts else torch.empty(0, self.d_model)
        return {self.hooks[0]: x}


def as_rows(item: Any) -> torch.Tensor:
    """``[n, d]`` rows of one item of an iterable (tensor, array or ``Batch``)."""
    if hasattr(item, "acts") and hasattr(item, "index"):
        item = item.acts
    if isinstance(item, tuple | list) and item and isinstance(item[0], torch.Tensor):
        item = item[0]
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"shard_iterator yielded {type(item).__name__}: expected [n, d] tensors")
    if item.dim() < 2:
        raise ValueError(
            f"shard_iterator yielded a tensor of shape {tuple(item.shape)}: expected [n, d]"
        )
    return item.reshape(-1, item.shape[-1])


def open_source(obj: Any, cfgs: list[SAEConfig], storage_options=None):
    """A data source over a store, dump URI(s) or tensors, for the hook points of ``cfgs``."""
    from integral_superposition.dump.store import ActivationStore
    from integral_superposition.sae.online import OnlineActivations, OnlineSource

    store = None
    if isinstance(obj, OnlineActivations):
        return OnlineSource(obj, cfgs)
    if isinstance(obj, ActivationStore):
        store = obj
    elif isinstance(obj, str | os.PathLike) or (
        isinstance(obj, Sequence) and obj and all(isinstance(u, str | os.PathLike) for u in obj)
    ):
        from integral_superposition.activations import as_activation_source

        # dump URIs, or the seed's .npy / .safetensors shard files
        src = as_activation_source(obj, storage_options)
        if isinstance(src, ActivationStore):
            store = src
        else:
            if any(c.hook_point for c in cfgs if c.hook_point not in (None, "input")):
                raise ValueError(
                    "cfg.hook_point: activation files carry no hook points; leave hook_point unset"
                )
            chunk = max(cfgs[0].batch_size, 1 << 14)
            return IterableSource(lambda: (x for _, x in src.iter_chunks(chunk)), "input", cfgs[0])
    elif isinstance(obj, Sequence) and obj and all(isinstance(s, ActivationStore) for s in obj):
        uris = [u for s in obj for u in s.uris]
        store = ActivationStore(uris, obj[0].storage_options)
    if store is not None:
        hooks: list[str] = []
        for c in cfgs:
            h = store._check_hook(c.hook_point) if c.hook_point else store.hook_point
            if h not in hooks:
                hooks.append(h)
        return StoreSource(store, hooks, cfgs[0])
    if any(c.hook_point for c in cfgs if c.hook_point not in (None, "input")):
        raise ValueError("cfg.hook_point: tensors carry no hook points; leave hook_point unset")
    return IterableSource(obj, "input", cfgs[0])


class RankSlice:
    """Rank ``rank``'s contiguous part of every batch of ``source`` (data-parallel training).

    The global batches, and so the data order, are the wrapped source's whatever the number
    of ranks: batch ``n`` is cut by :func:`~integral_superposition.distributed.shard_range`,
    and the ranks' parts concatenated in rank order give back a single process's batch. A
    checkpoint therefore resumes under any world size. A store source copies only the rank's
    rows out of the shards; other sources yield whole batches, cut here. ``sample`` (initialisation) is the
    whole source's, identical on every rank.
    """

    def __init__(self, source: TrainingSource, rank: int, world_size: int):
        from integral_superposition.distributed import shard_range

        shard_range(0, rank, world_size)  # checks rank and world_size
        self.source, self.rank, self.world_size = source, rank, world_size
        self.hooks = source.hooks
        self.d_model = source.d_model
        self.total = source.total
        self.resumable = source.resumable

    def describe(self) -> dict[str, Any]:
        return self.source.describe()  # the data, not its partition: any world size resumes

    def locate(self, row: int) -> str:
        return self.source.locate(row)

    def check_finite(self) -> None:
        self.source.check_finite()

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        return self.source.sample(n)

    def batches(self, start: int) -> Iterator[tuple[dict[str, torch.Tensor], Any]]:
        from integral_superposition.distributed import shard_range

        if isinstance(self.source, StoreSource):  # the store reads this rank's rows only
            part = shard_range(self.source.cfg.batch_size, self.rank, self.world_size)
            yield from self.source.batches(start, part)
            return
        for acts, index in self.source.batches(start):
            n = next(iter(acts.values())).shape[0]
            a, b = shard_range(n, self.rank, self.world_size)
            yield {h: x[a:b] for h, x in acts.items()}, (None if index is None else index[a:b])
