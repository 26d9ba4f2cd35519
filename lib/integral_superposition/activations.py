"""Activation sources: everything a step can read activations ``[N, d]`` from.

An :class:`~integral_superposition.dump.ActivationStore`, a store URI or list of URIs, ``.npy``
or ``.safetensors`` files (the seed's shards, or a dump's own shard files), or an in-memory
``[N, d]`` array; :func:`as_activation_source` turns any of them into an object with
``n_tokens``, ``d_model``, ``iter_chunks`` and ``gather`` (and, where known, the per-row
``token_ids``, ``doc_ids``, ``positions`` and ``labels``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from integral_superposition.dump.shards import NonFiniteActivationsError, first_non_finite

__all__ = ["ArraySource", "as_activation_source", "open_activation_files"]


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
