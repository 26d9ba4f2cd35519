"""Activation shard files: safetensors with one ``[n_tokens, d_model]`` tensor per hook point.

The safetensors layout (an 8-byte header length, a JSON header, then raw row-major data)
lets a reader memory-map a local shard and fetch any row range of a remote one with a
single byte-range request.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from integral_superposition import storage

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_ITEMSIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes sit inside a shard file."""

    dtype: torch.dtype
    rows: int
    cols: int
    start: int  # absolute byte offset of row 0

    @property
    def row_bytes(self) -> int:
        return self.cols * _ITEMSIZE[self.dtype]


def encode_shard(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise ``{hook name: [n, d]}`` to safetensors bytes (deterministic)."""
    return save({k: v.contiguous() for k, v in tensors.items()})


def parse_header(head: bytes) -> dict[str, TensorSpan]:
    """Parse a safetensors header from the first bytes of a file (at least 8 + header length)."""
    (n,) = struct.unpack("<Q", head[:8])
    if len(head) < 8 + n:
        raise ValueError("truncated safetensors header")
    meta = json.loads(head[8 : 8 + n].decode("utf-8"))
    spans: dict[str, TensorSpan] = {}
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        rows, cols = info["shape"]
        spans[name] = TensorSpan(
            _ST_DTYPES[info["dtype"]], int(rows), int(cols), 8 + n + int(info["data_offsets"][0])
        )
    return spans


def read_header(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, TensorSpan]:
    head = storage.read_bytes(uri, storage_options, 0, 8)
    (n,) = struct.unpack("<Q", head)
    return parse_header(storage.read_bytes(uri, storage_options, 0, 8 + n))


class ShardReader:
    """Row-range reads from one shard: ``np.memmap`` locally, byte ranges remotely."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None):
        self.uri = uri
        self.storage_options = storage_options
        self.spans = read_header(uri, storage_options)
        self._local = storage.is_local(uri)
        self._mmap: np.memmap | None = None

    def _memmap(self) -> np.memmap:
        if self._mmap is None:
            _, path = storage.get_fs(self.uri, self.storage_options)
            self._mmap = np.memmap(path, dtype=np.uint8, mode="r")
        return self._mmap

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` as a ``[stop-start, d]`` tensor (a copy)."""
        span = self.spans[name]
        if not 0 <= start <= stop <= span.rows:
            raise IndexError(
                f"rows [{start}, {stop}) out of range for {self.uri} with {span.rows} rows"
            )
        a = span.start + start * span.row_bytes
        b = span.start + stop * span.row_bytes
        if self._local:
            raw = np.array(self._memmap()[a:b])
        else:
            raw = np.frombuffer(
                storage.read_bytes(self.uri, self.storage_options, a, b), dtype=np.uint8
            ).copy()
        return torch.from_numpy(raw).view(span.dtype).reshape(stop - start, span.cols)

    def read_rows(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """Arbitrary rows (sorted or not) of tensor ``name``: ``[len(rows), d]``."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            span = self.spans[name]
            return torch.empty((0, span.cols), dtype=span.dtype)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if self._local or (hi - lo) <= 4 * rows.size:
            block = self.read(name, lo, hi)
            return block[torch.from_numpy(rows - lo)]
        # sparse remote rows: fetch each contiguous run
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        breaks = np.flatnonzero(np.diff(srt) != 1) + 1
        parts = [self.read(name, int(run[0]), int(run[-1]) + 1) for run in np.split(srt, breaks)]
        out = torch.cat(parts)
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        return out[torch.from_numpy(inv)]
