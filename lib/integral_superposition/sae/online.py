"""Online SAE training: activations straight from the model's forward passes, no store.

:class:`OnlineActivations` names what to run (a dataset, a model backend, a dump config);
passed to :func:`~integral_superposition.sae.train_saes` in place of a store, it becomes an
:class:`OnlineSource`, which feeds the training loop as EleutherAI's sparsify does. At
100M-1B tokens a store is terabytes; online training keeps one shuffle buffer instead.

Data order. Documents are split as a store splits them (the same document-level hash of the
doc id, split seed 0, ``test_fraction``), so held-out documents never reach training. Each
epoch visits the training documents in a seeded random order, cut into *windows* of at least
``shuffle_buffer_tokens`` stored tokens. A window's documents run through the model (sorted
by length, to minimise padding); their rows fill one buffer, which is shuffled (seeded) and
cut into ``batch_size`` batches; rows that do not fill a whole batch are dropped, as a
store's buffers drop them. The sequence depends only on the seed and the token counts, so a
resumed run recomputes only the window it stopped in and skips every document before it.

Memory is flat in the number of tokens: one buffer (``[~shuffle_buffer_tokens, d_model]``
float32 per hook point), one forward batch, and with ``write_store`` the shard being written.

``write_store=True`` writes the activations into an ordinary store at ``store_uri`` as they
are computed (one shard per window of the first epoch, then the held-out documents): it
verifies and reads like a dump of the same documents, with rows grouped by window. Without
it, ``store_uri`` receives a bounded sample (the held-out documents first, then training
documents, up to ``sample_tokens``) that evaluation and analysis read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from integral_superposition import storage
from integral_superposition.config import DumpConfig, SAEConfig
from integral_superposition.data.datasets import validate_frame
from integral_superposition.dump.activations import (
    describe_dump,
    dump_layer_activations,
    resolve_hook_points,
    resolve_labels,
)
from integral_superposition.dump.capture import capture_batches
from integral_superposition.dump.layout import reusable_shards
from integral_superposition.dump.plan import TokenMask, count_tokens, forward_order, plan_shards
from integral_superposition.dump.shards import TORCH_DTYPES
from integral_superposition.dump.store import ActivationStore
from integral_superposition.dump.tokens import doc_uniform
from integral_superposition.dump.writer import ShardWriter, publish_dump
from integral_superposition.sae.schedule import total_steps

log = logging.getLogger(__name__)

__all__ = ["OnlineActivations", "OnlineSource", "sample_documents"]

SAMPLE_TOKENS = 65536
"""Default size, in stored tokens, of the bounded sample an online run leaves for analysis."""


@dataclass
class OnlineActivations:
    """What online training computes activations from: ``df[text_col]`` through ``backend``
    at ``dump``'s hook points, tokenised and masked as a dump with ``dump`` would be."""

    df: pd.DataFrame
    """The documents (one row each)."""
    text_col: str
    """Column holding the texts."""
    label_col: str | None
    """Column holding the labels (None: unlabelled)."""
    backend: Any
    """An ``HFBackend`` (``HFCausalLM.from_pretrained(...)``)."""
    dump: DumpConfig = field(default_factory=DumpConfig)
    """Hook points, ``max_len``, forward ``batch_size``, masking; ``dtype`` of a written store."""
    store_uri: str | None = None
    """Where the store (``write_store``) or the bounded sample goes; None: neither."""
    write_store: bool = False
    """Write every activation to an ordinary store at ``store_uri`` while training."""
    sample_tokens: int = SAMPLE_TOKENS
    """Stored tokens of the bounded sample (when ``write_store`` is off)."""
    label_names: Sequence[str] | None = None
    """Fixed label mapping (default: the sorted distinct labels)."""
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    """fsspec options for ``store_uri`` (left out of the repr: they may hold credentials)."""

    def __post_init__(self) -> None:
        if not isinstance(self.dump, DumpConfig):
            raise TypeError(f"dump: expected a DumpConfig, got {type(self.dump).__name__}")
        validate_frame(self.df, self.text_col, self.label_col)
        for attr in ("tokenizer", "hook_points", "capture", "describe", "d_model"):
            if not hasattr(self.backend, attr):
                raise TypeError(
                    f"backend: expected an HFBackend (e.g. backends.HFCausalLM.from_pretrained(...)), got {type(self.backend).__name__}"
                )
        if self.write_store and not self.store_uri:
            raise ValueError("write_store=True: expected a store_uri to write the store to")
        if self.store_uri is not None and not isinstance(self.store_uri, str | os.PathLike):
            raise TypeError(f"store_uri={self.store_uri!r}: expected a directory path or URI")
        if not isinstance(self.sample_tokens, int) or self.sample_tokens < 1:
            raise ValueError(f"sample_tokens={self.sample_tokens!r}: expected a positive integer")


def sample_documents(
    doc_ids: np.ndarray, n_kept: np.ndarray, is_test: np.ndarray, n_tokens: int, seed: int = 0
) -> np.ndarray:
    """Row numbers of a bounded sample: held-out documents first, then training documents,
    each group in a seeded order, until ``n_tokens`` stored tokens (``n_kept [n]``) are in."""
    rng = np.random.default_rng([seed, 7])
    order = np.concatenate(
        [rng.permutation(np.flatnonzero(is_test)), rng.permutation(np.flatnonzero(~is_test))]
    )
    order = order[n_kept[order] > 0]
    take = int(np.searchsorted(np.cumsum(n_kept[order]), n_tokens, side="left")) + 1
    return np.sort(doc_ids[order[:take]])


@dataclass
class _Window:
    docs: np.ndarray  # int64 [m]: row numbers, in forward order
    rows: int  # stored tokens of its documents
    batches: int  # whole batches it yields


class OnlineSource:
    """A training source (``sae.sources.TrainingSource``) over model forward passes; see the
    module docstring for the data order, resume and memory."""

    resumable = True

    def __init__(self, spec: OnlineActivations, cfgs: Sequence[SAEConfig]):
        cfg = cfgs[0]
        self.spec, self.cfg, self.dump = spec, cfg, spec.dump
        backend = spec.backend
        self.hook_points = resolve_hook_points(backend, self.dump)
        names = [h.name for h in self.hook_points]
        self.hooks: list[str] = []
        for c in cfgs:
            h = c.hook_point or names[0]
            if h not in names:
                raise ValueError(
                    f"cfg.hook_point={h!r}: not computed online; the dump config has {names} "
                    "(add it to dump.hook_points)"
                )
            if h not in self.hooks:
                self.hooks.append(h)
        # a written store holds every hook point; training alone needs only its own
        self._capture = [h for h in self.hook_points if spec.write_store or h.name in self.hooks]
        self.d_model = int(backend.d_model)
        self.texts = spec.df[spec.text_col]
        self.mask = TokenMask(backend.tokenizer, self.dump)
        self.doc_ids = np.arange(len(spec.df), dtype=np.int64)
        self.n_tok, self.n_kept = count_tokens(
            self.texts, self.doc_ids, backend.tokenizer, self.mask, self.dump
        )
        self.is_test = doc_uniform(self.doc_ids, 0) < cfg.test_fraction
        self.train_docs = self.doc_ids[~self.is_test & (self.n_kept > 0)]
        n_train = int(self.n_kept[self.train_docs].sum())
        if n_train < cfg.batch_size:
            raise ValueError(
                f"batch_size={cfg.batch_size}: the train split has only {n_train} tokens "
                f"({int(self.n_kept.sum())} in all, test_fraction={cfg.test_fraction}); use a smaller batch"
            )
        self.buffer = max(cfg.shuffle_buffer_tokens, cfg.batch_size)
        self._windows_cache: tuple[int, list[_Window]] | None = None
        self.per_epoch = sum(w.batches for w in self.windows(0))
        self.total = total_steps(cfg, self.per_epoch)
        self._where: tuple[int, int, np.ndarray, np.ndarray] | None = None
        self._first: tuple[dict[str, torch.Tensor], Any] | None = None
        self._store: ActivationStore | None = None
        self._writer: ShardWriter | None = None
        if spec.write_store:
            self._open_writer()

    # -- data order ----------------------------------------------------------------------------
    def windows(self, epoch: int) -> list[_Window]:
        """The windows of one epoch: seeded document order, cut at ``buffer`` tokens."""
        if self._windows_cache is None or self._windows_cache[0] != epoch:
            perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.train_docs)
            out = []
            for a, b in plan_shards(self.n_kept[perm], 1, self.buffer):
                docs = np.sort(perm[a:b])
                docs = docs[forward_order(docs, self.n_tok[docs], self.n_kept[docs], self.dump)]
                rows = int(self.n_kept[docs].sum())
                out.append(_Window(docs, rows, rows // self.cfg.batch_size))
            self._windows_cache = (epoch, out)
        return self._windows_cache[1]

    def _fill(self, epoch: int, w: int, window: _Window) -> dict[str, torch.Tensor]:
        """Run a window's documents through the model: ``{hook: [rows, d] float32}``, rows in
        the window's seeded shuffled order (written to the store first, in forward order)."""
        perm = np.random.default_rng([self.cfg.seed, epoch, w]).permutation(window.rows)
        dest = np.empty_like(perm)
        dest[perm] = np.arange(window.rows)  # where each forward-order row goes
        writer = self._writer if epoch == 0 and self._needs_shard(w) else None
        if writer is not None:
            writer.start(w, self._shard_ids[w], window.rows)
        acts: dict[str, torch.Tensor] = {}
        doc = np.empty(window.rows, dtype=np.int64)
        pos = np.empty(window.rows, dtype=np.int32)
        at = 0
        for batch in capture_batches(
            self.spec.backend, self.texts, window.docs, self.dump, self._capture, self.mask
        ):
            n = len(batch)
            if at + n > window.rows:
                raise RuntimeError("the tokenizer produced different tokens than when planned")
            if writer is not None:
                writer.add(batch)
            to = torch.from_numpy(dest[at : at + n])
            for h in self.hooks:
                x = batch.acts[h]
                if h not in acts:
                    acts[h] = torch.empty((window.rows, self.d_model), device=x.device)
                acts[h].index_copy_(0, to.to(x.device), x.float())
            doc[dest[at : at + n]] = batch.doc_id
            pos[dest[at : at + n]] = batch.position
            at += n
        if at != window.rows:
            raise RuntimeError("the tokenizer produced different tokens than when planned")
        if writer is not None:
            writer.finish()
        self._where = (epoch, w, doc, pos)
        return acts

    # -- TrainingSource ------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        info = self.spec.backend.describe()
        return {
            "kind": "online",
            "model": info.get("fingerprint"),
            "dataset": self._dataset_fingerprint(),
            "dump": self.dump.model_dump(mode="json", exclude={"dtype", "shard_size_mb"}),
            "hooks": self.hooks,
            "n_train_tokens": int(self.n_kept[self.train_docs].sum()),
            "buffer_tokens": self.buffer,
        }

    def _dataset_fingerprint(self) -> str:
        from integral_superposition.data.datasets import dataset_fingerprint

        return dataset_fingerprint(self.spec.df, self.spec.text_col, self.spec.label_col)

    def locate(self, row: int) -> str:
        if self._where is None:
            return f"buffer row {row}"
        epoch, w, doc, pos = self._where
        return (
            f"document {int(doc[row])} (row {int(doc[row])} of the dataset), token position "
            f"{int(pos[row])} (epoch {epoch}, window {w})"
        )

    def check_finite(self) -> None:  # checked batch by batch by the training loop
        return None

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """Up to ``n`` training rows per hook point, float32 ``[n, d]``: the first rows of
        the first epoch's (shuffled) windows. The first window is kept for :meth:`batches`,
        which starts with it: the initialisation costs no forward pass of its own."""
        parts: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        got = 0
        for w, window in enumerate(self.windows(0)):
            acts = self._fill(0, w, window)
            if w == 0:
                self._first = (acts, self._where)
            take = min(n - got, window.rows)
            for h in self.hooks:
                parts[h].append(acts[h][:take].cpu())
            got += take
            if got >= n:
                break
        return {h: torch.cat(p) for h, p in parts.items()}

    def batches(self, start: int) -> Iterator[tuple[dict[str, torch.Tensor], Any]]:
        bs, total = self.cfg.batch_size, self.total
        step, epoch = 0, 0
        while step < total:
            for w, window in enumerate(self.windows(epoch)):
                if step + window.batches <= start:  # consumed before a resume: no forward
                    step += window.batches
                    continue
                if window.batches == 0:
                    continue
                if epoch == 0 and w == 0 and self._first is not None:
                    acts, self._where = self._first  # filled by sample()
                else:
                    acts = self._fill(epoch, w, window)
                self._first = None
                for b in range(window.batches):
                    if step >= total:
                        return
                    if step >= start:
                        rows = np.arange(b * bs, (b + 1) * bs)
                        yield {h: a[b * bs : (b + 1) * bs] for h, a in acts.items()}, rows
                    step += 1
                del acts
                if step >= total:
                    return
            epoch += 1

    # -- the store it leaves -------------------------------------------------------------------
    def _open_writer(self) -> None:
        spec = self.spec
        labels = resolve_labels(spec.df, spec.label_col, spec.label_names)
        extra = {
            "online": {
                "seed": self.cfg.seed,
                "buffer_tokens": self.buffer,
                "test_fraction": self.cfg.test_fraction,
            }
        }
        self._info = describe_dump(
            spec.df, spec.text_col, spec.label_col, spec.backend, self.dump, self.hook_points,
            labels, None, extra,
        )  # fmt: skip
        # shards: the first epoch's windows, then the held-out documents as a dump plans them
        groups = [w.docs for w in self.windows(0)]
        test = self.doc_ids[self.is_test & (self.n_kept > 0)]
        test = test[forward_order(test, self.n_tok[test], self.n_kept[test], self.dump)]
        bytes_per_token = (
            self.d_model * TORCH_DTYPES[self.dump.dtype].itemsize * len(self.hook_points)
        )
        shard_bytes = int(self.dump.shard_size_mb * (1 << 20))
        for a, b in plan_shards(self.n_kept[test], bytes_per_token, shard_bytes):
            groups.append(test[a:b])
        self._groups = groups
        self._shard_ids = [
            storage.sha256_bytes(f"{self._info.identity}:{s}:{','.join(map(str, g))}".encode())
            for s, g in enumerate(groups)
        ]
        uri = os.fspath(spec.store_uri)
        self._records = reusable_shards(
            uri, self._info.identity, self._shard_ids, False, spec.storage_options
        )
        if self._records is None:  # the complete store is already there
            self._store = ActivationStore(uri, spec.storage_options)
            return
        self._writer = ShardWriter(
            uri, [h.name for h in self.hook_points], self.d_model, self.dump.dtype,
            self._info.label_ids, spec.storage_options,
        )  # fmt: skip
        self._writer.__enter__()

    def _needs_shard(self, s: int) -> bool:
        return (
            self._writer is not None
            and self._records[s] is None
            and (s not in self._writer.records)
        )

    def evaluation_store(self) -> ActivationStore | None:
        """The store left at ``store_uri`` (completed and published on the first call): the
        full store with ``write_store``, else the bounded sample; None without ``store_uri``."""
        if self._store is not None or self.spec.store_uri is None:
            return self._store
        spec = self.spec
        if not spec.write_store:
            docs = sample_documents(
                self.doc_ids, self.n_kept, self.is_test, spec.sample_tokens, self.cfg.seed
            )
            self._store = dump_layer_activations(
                spec.df, spec.text_col, spec.label_col, spec.backend, self.dump,
                os.fspath(spec.store_uri), storage_options=spec.storage_options,
                label_names=spec.label_names, progress=False, documents=docs,
            )  # fmt: skip
            return self._store
        writer = self._writer
        assert writer is not None
        with writer:
            # windows training did not reach (a short budget, a resume) and the held-out docs
            for s, docs in enumerate(self._groups):
                if not self._needs_shard(s):
                    continue
                writer.start(s, self._shard_ids[s], int(self.n_kept[docs].sum()))
                for batch in capture_batches(
                    spec.backend, self.texts, docs, self.dump, self.hook_points, self.mask
                ):
                    writer.add(batch)
                writer.finish()
        records = [writer.records.get(s, r) for s, r in enumerate(self._records)]
        self._writer = None
        uri = os.fspath(spec.store_uri)
        publish_dump(
            uri, self._info, records, self.texts, self.doc_ids, self.n_tok, self.n_kept,
            spec.storage_options, online=True,
        )  # fmt: skip
        self._store = ActivationStore(uri, spec.storage_options)
        return self._store

    def use_store(self, store: ActivationStore) -> None:
        """Evaluate on ``store``, left by another process (rank 0 of a distributed run writes
        the store or the sample once; the other ranks read it)."""
        self._store = store

    def saelens_metadata(self, hook: str) -> dict[str, Any]:
        """SAELens ``metadata`` of an SAE trained online (no store to point at)."""
        from integral_superposition.backends.sources import weights_source

        info = self.spec.backend.describe()
        h = next(p for p in self.hook_points if p.name == hook)
        meta = {
            "model_name": info.get("model_id"),
            "hook_name": h.saelens_name or hook,
            "context_size": self.dump.max_len,
            "prepend_bos": self.dump.prepend_bos,
            "dataset_path": os.fspath(self.spec.store_uri) if self.spec.store_uri else None,
            "isup_hook_point": hook,
            "isup_source": "online",
        }
        source = weights_source(info)
        if source is not None:
            meta["model_source"] = source
        return meta
