"""Activation shard files: safetensors with one ``[n_tokens, d_model]`` tensor per hook point.

The safetensors layout (an 8-byte header length, a JSON header, then raw row-major data)
lets a reader memory-map a local shard and fetch any row range of a remote one with a
single byte-range request.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from integral_superposition import storage
from integral_superposition.compute import DTYPE_NAMES

TORCH_DTYPES = {k: DTYPE_NAMES[k] for k in ("fp16", "bf16", "fp32")}
"""Storage dtypes of activation shards (compute dtypes are resolved by ``compute``)."""
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_ITEMSIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
# numpy has no bfloat16: raw bytes go through a same-width integer view
_RAW_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


REPAIR_HINT = (
    "rerun the dump with the same data, model and config into the same directory "
    "(dump_layer_activations or `isup dump`): it verifies every shard it keeps and "
    "recomputes damaged ones"
)


class CorruptShardError(ValueError):
    """A shard file that does not match its dump's manifest: truncated, damaged or modified."""


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


def _header(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, list[str]]:
    """The safetensors header (length prefix + JSON padded to 8 bytes) and the data order.

    Same layout as ``safetensors.torch.save``: tensors sorted by dtype (F32, BF16, F16, the
    reverse of safetensors' dtype enum order), then name.
    """
    rank = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
    order = sorted(tensors, key=lambda k: (rank.get(tensors[k].dtype, -1), k))
    meta: dict[str, Any] = {}
    offset = 0
    for k in order:
        t = tensors[k]
        if t.dtype not in _ST_NAMES:
            raise TypeError(f"tensor {k!r}: dtype {t.dtype} cannot be stored in a shard")
        n = t.numel() * _ITEMSIZE[t.dtype]
        meta[k] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    head = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head, order


def write_shard(
    uri: str, tensors: Mapping[str, torch.Tensor], storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Stream ``{hook name: [n, d]}`` into a safetensors file at ``uri`` without an in-memory
    copy of the payload; returns its ``{"size", "sha256"}``. Bytes equal :func:`encode_shard`'s.
    """
    head, order = _header(tensors)
    h = hashlib.sha256(head)
    size = len(head)
    with storage.atomic_open(uri, storage_options) as f:
        f.write(head)
        for k in order:
            t = tensors[k].detach().to("cpu").contiguous()
            raw = memoryview(t.view(_RAW_VIEW[t.dtype]).numpy()).cast("B")
            f.write(raw)
            h.update(raw)
            size += raw.nbytes
    return {"size": size, "sha256": h.hexdigest()}


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
    uri: str, storage_options: Mapping[str, Any] | None = None, file_size: int | None = None
) -> dict[str, TensorSpan]:
    """The tensor spans of a shard; ``CorruptShardError`` when its header is unreadable or
    (given ``file_size``) describes more or fewer bytes than the file has."""
    try:
        head = storage.read_bytes(uri, storage_options, 0, 8)
        (n,) = struct.unpack("<Q", head)
        if file_size is not None and 8 + n > file_size:
            raise ValueError(f"header length {n} runs past the end of the file")
        spans = parse_header(storage.read_bytes(uri, storage_options, 0, 8 + n))
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise CorruptShardError(
            f"shard {uri} is damaged: its safetensors header cannot be read ({e}); {REPAIR_HINT}"
        ) from None
    if file_size is not None:
        end = max((sp.start + sp.rows * sp.row_bytes for sp in spans.values()), default=8 + n)
        if end != file_size:
            raise CorruptShardError(
                f"shard {uri} is damaged: its header describes {end} bytes, but the file has "
                f"{file_size} bytes ({'truncated' if file_size < end else 'trailing bytes'}); "
                f"{REPAIR_HINT}"
            )
    return spans


# Shards verified in this process: (uri, sha256, size, modification stamp). A file rewritten
# since it was verified has another stamp and is verified again.
_verified: set[tuple[str, str, int, Any]] = set()
_verify_locks: dict[tuple[str, str], threading.Lock] = {}
_verify_guard = threading.Lock()


def _stat(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[int, Any]:
    """``(size, modification stamp)`` of a file (mtime and inode locally; ETag or time remotely)."""
    fs, path = storage.get_fs(uri, storage_options)
    if storage.is_local(uri):
        st = os.stat(path)
        return int(st.st_size), (st.st_mtime_ns, st.st_ino)
    info = fs.info(path)
    stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime") or info.get("created")
    return int(info["size"]), str(stamp)


def _check_size(uri: str, expected: int | None, found: int) -> None:
    if expected is not None and found != expected:
        raise CorruptShardError(
            f"shard {uri} is damaged: expected {expected} bytes (from the dump's manifest), found "
            f"{found} bytes ({'truncated' if found < expected else 'longer'}); {REPAIR_HINT}"
        )


def verify_file(
    uri: str,
    sha256: str,
    size: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Check a shard file's size and SHA-256 against its manifest entry, once per process and
    file version (streamed in 8 MiB pieces); ``CorruptShardError`` names what differs."""
    found_size, stamp = _stat(uri, storage_options)
    _check_size(uri, size, found_size)
    key = (uri, sha256, found_size, stamp)
    if key in _verified:
        return
    with _verify_guard:
        lock = _verify_locks.setdefault((uri, sha256), threading.Lock())
    with lock:  # two threads opening one shard hash it once
        if key in _verified:
            return
        found = storage.sha256_file(uri, storage_options)
        if found != sha256:
            raise CorruptShardError(
                f"shard {uri} is damaged: its content differs from the dump's manifest although "
                f"its size ({found_size} bytes) matches (sha256 expected {sha256[:16]}..., found "
                f"{found[:16]}...); {REPAIR_HINT}"
            )
        _verified.add(key)


def files_intact(
    dir_uri: str,
    files: Mapping[str, Mapping[str, Any]],
    storage_options: Mapping[str, Any] | None = None,
) -> bool:
    """True when every manifest entry ``{name: {"size", "sha256"}}`` under ``dir_uri`` hashes to
    its SHA-256. Shards go through :func:`verify_file`, which remembers them, so a store opened
    on them afterwards does not hash them again."""
    for name, entry in files.items():
        uri = storage.join(dir_uri, name)
        if name.endswith(".safetensors"):
            try:
                verify_file(uri, entry["sha256"], int(entry["size"]), storage_options)
            except CorruptShardError:
                return False
        elif storage.sha256_file(uri, storage_options) != entry["sha256"]:
            return False
    return True


def verify_dump(dir_uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when a published dump's every file has the manifest's size and SHA-256.

    Shards are checked as :class:`ActivationStore` checks them on first read (and remembered
    for this process, so a store opened afterwards does not hash them again).
    """
    if not storage.verify_output(dir_uri, storage_options):
        return False
    manifest = storage.read_manifest(dir_uri, storage_options)
    return files_intact(dir_uri, manifest.get("files", {}), storage_options)


class ShardReader:
    """Row-range reads from one shard: ``np.memmap`` locally, byte ranges remotely.

    ``size`` and ``sha256`` (the manifest's entry) are checked when given: the size and the
    header on open, always; the SHA-256 on open with ``verify=True`` (once per process).
    A mismatch raises :class:`CorruptShardError` naming the file, what was expected and found.
    """

    def __init__(
        self,
        uri: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        size: int | None = None,
        sha256: str | None = None,
        verify: bool = False,
    ):
        self.uri = uri
        self.storage_options = storage_options
        file_size, _ = _stat(uri, storage_options)
        _check_size(uri, size, file_size)
        if verify and sha256:
            verify_file(uri, sha256, size, storage_options)
        self.spans = read_header(uri, storage_options, file_size)
        self._local = storage.is_local(uri)
        self._map: mmap.mmap | None = None
        self._mmap: np.ndarray | None = None

    def check_shape(self, name: str, rows: int, cols: int) -> None:
        """``CorruptShardError`` unless tensor ``name`` is ``[rows, cols]`` (the manifest's)."""
        span = self.spans.get(name)
        if span is None:
            raise CorruptShardError(
                f"shard {self.uri} is damaged: it has no tensor {name!r} (it has "
                f"{sorted(self.spans)}); {REPAIR_HINT}"
            )
        if (span.rows, span.cols) != (rows, cols):
            raise CorruptShardError(
                f"shard {self.uri} is damaged: tensor {name!r} has shape [{span.rows}, "
                f"{span.cols}], expected [{rows}, {cols}] from the dump's manifest; {REPAIR_HINT}"
            )

    def _memmap(self) -> np.ndarray:
        """The whole file as ``uint8`` (a private, copy-on-write map: never written back)."""
        if self._mmap is None:
            _, path = storage.get_fs(self.uri, self.storage_options)
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._mmap = np.frombuffer(self._map, dtype=np.uint8)
        return self._mmap

    def _release(self, a: int, b: int) -> None:
        """Unmap the pages of bytes ``[a, b)`` from this process (they stay in the page cache)."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            a0 = a - a % mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, a0, b - a0)

    def _byte_range(self, name: str, start: int, stop: int) -> tuple[TensorSpan, int, int]:
        """``(span, first byte, end byte)`` of rows ``[start, stop)`` of tensor ``name``."""
        span = self.spans[name]
        if not 0 <= start <= stop <= span.rows:
            raise IndexError(
                f"rows [{start}, {stop}) out of range for {self.uri} with {span.rows} rows"
            )
        return span, span.start + start * span.row_bytes, span.start + stop * span.row_bytes

    def read_into(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Copy rows ``[start, stop)`` of ``name`` into ``out`` ``[stop-start, d]`` (any dtype).

        Locally the rows go from the memory map straight into ``out``, converted on the way:
        no temporary, so a long-running reader thread does not churn its malloc arena, and the
        pages are unmapped afterwards.
        """
        span, a, b = self._byte_range(name, start, stop)
        if not self._local:
            out.copy_(self.read(name, start, stop))
            return
        mapped = torch.from_numpy(self._memmap()[a:b]).view(span.dtype)
        out.copy_(mapped.reshape(stop - start, span.cols))
        # a streaming pass reads each row once: keep its pages out of the resident set, so a
        # long run's memory does not grow with the bytes it has read
        self._release(a, b)

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` as a ``[stop-start, d]`` tensor (a copy)."""
        span, a, b = self._byte_range(name, start, stop)
        if self._local:
            out = torch.empty((stop - start, span.cols), dtype=span.dtype)
            self.read_into(name, start, stop, out)
            return out
        raw = np.frombuffer(
            storage.read_bytes(self.uri, self.storage_options, a, b), dtype=np.uint8
        ).copy()
        return torch.from_numpy(raw).view(span.dtype).reshape(stop - start, span.cols)

    def read_rows(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """Arbitrary rows (sorted or not, repeats allowed) of tensor ``name``: ``[len(rows), d]``.

        Locally only the wanted rows are copied out of the memory map; remotely, runs of rows
        that lie close together are merged and fetched with one concurrent ``cat_ranges``.
        """
        span = self.spans[name]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return torch.empty((0, span.cols), dtype=span.dtype)
        if rows.min() < 0 or rows.max() >= span.rows:
            raise IndexError(f"rows out of range for {self.uri} with {span.rows} rows")
        if self._local:
            table = self._memmap()[span.start : span.start + span.rows * span.row_bytes]
            raw = table.reshape(span.rows, span.row_bytes)[rows]
            lo, hi = int(rows.min()), int(rows.max()) + 1
            self._release(span.start + lo * span.row_bytes, span.start + hi * span.row_bytes)
            return torch.from_numpy(raw).view(span.dtype).reshape(rows.size, span.cols)
        uniq, inverse = np.unique(rows, return_inverse=True)
        # merge runs separated by gaps of under ~256 KiB: fewer requests, little waste
        max_gap = max(1, (256 << 10) // span.row_bytes)
        breaks = np.flatnonzero(np.diff(uniq) > max_gap) + 1
        runs = np.split(uniq, breaks)
        fs, path = storage.get_fs(self.uri, self.storage_options)
        starts = [span.start + int(r[0]) * span.row_bytes for r in runs]
        ends = [span.start + (int(r[-1]) + 1) * span.row_bytes for r in runs]
        blobs = fs.cat_ranges([path] * len(runs), starts, ends)
        parts = []
        for r, blob in zip(runs, blobs, strict=True):
            if isinstance(blob, Exception):
                raise blob
            block = np.frombuffer(blob, dtype=np.uint8).reshape(-1, span.row_bytes)
            parts.append(block[r - r[0]])
        raw = np.concatenate(parts)[inverse]
        return torch.from_numpy(raw).view(span.dtype).reshape(rows.size, span.cols)
