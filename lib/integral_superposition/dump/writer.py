"""The shard writer: captured rows -> published shards, and a dump's manifest.

A shard is three files, published in order: ``shard-NNNNN.safetensors`` (one ``[n, d]``
tensor per hook point), ``shard-NNNNN.parquet`` (token_id, doc_id, position, label per row)
and ``shard-NNNNN.json``, its completion record (hashes, norm statistics), written last.
:class:`ShardWriter` fills a shard from :class:`~integral_superposition.dump.capture.CapturedBatch`
rows and writes it in a background thread while the caller computes the next one.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from integral_superposition import storage
from integral_superposition.config import DumpConfig
from integral_superposition.dump.capture import CapturedBatch, check_finite_rows
from integral_superposition.dump.layout import own_listing, remove_named
from integral_superposition.dump.plan import TokenMask
from integral_superposition.dump.shards import TORCH_DTYPES, write_shard

DUMP_FORMAT = 2
"""Version of the dump layout; part of every dump's identity."""

_NORM_BINS = np.linspace(-4.0, 6.0, 401)  # log10 of the L2 norm


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _norm_summary(
    hist: np.ndarray, count: int, total: float, total_sq: float, lo: float, hi: float
) -> dict[str, Any]:
    if count == 0:
        return {"count": 0}
    mean = total / count
    cdf = np.cumsum(hist) / max(1, hist.sum())
    centers = 10 ** ((_NORM_BINS[:-1] + _NORM_BINS[1:]) / 2)

    def q(p: float) -> float:
        return float(centers[min(len(centers) - 1, int(np.searchsorted(cdf, p)))])

    return {
        "count": int(count),
        "mean": float(mean),
        "std": float(np.sqrt(max(0.0, total_sq / count - mean * mean))),
        "min": float(lo),
        "max": float(hi),
        "p50": q(0.5),
        "p99": q(0.99),
        "p999": q(0.999),
        "hist_log10_edges": [float(_NORM_BINS[0]), float(_NORM_BINS[-1]), len(_NORM_BINS) - 1],
        "hist_log10_counts": hist.astype(int).tolist(),
    }


def _norm_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's norm summary of one hook point from its shard records, as a dump
    computes it (non-finite rows make ``mean``/``max`` NaN or inf)."""
    if not parts:
        return {"count": 0}
    with np.errstate(invalid="ignore", over="ignore"):
        return _norm_summary(
            np.sum([np.asarray(p["hist"]) for p in parts], axis=0),
            sum(p["count"] for p in parts),
            sum(p["sum"] for p in parts),
            sum(p["sumsq"] for p in parts),
            min(p["min"] for p in parts),
            max(p["max"] for p in parts),
        )


def _write_shard(
    out_dir: str,
    s: int,
    shard_id: str,
    acts: dict[str, torch.Tensor],
    meta: dict[str, np.ndarray],
    norms: dict[str, np.ndarray],
    storage_options,
) -> dict[str, Any]:
    """Publish one shard: tensors, token table, then its completion record (last)."""
    name = f"shard-{s:05d}"
    n_tokens = int(meta["doc_id"].size)
    norm_rec: dict[str, Any] = {}
    for k, nrm in norms.items():
        hist, _ = np.histogram(np.log10(np.maximum(nrm, 1e-12)), bins=_NORM_BINS)
        norm_rec[k] = {
            "count": int(nrm.size),
            "sum": float(nrm.sum()),
            "sumsq": float((nrm**2).sum()),
            "min": float(nrm.min()),
            "max": float(nrm.max()),
            "hist": hist.tolist(),
        }
    table = pa.table(
        {
            "token_id": pa.array(meta["token_id"], pa.int32()),
            "doc_id": pa.array(meta["doc_id"], pa.int64()),
            "position": pa.array(meta["position"], pa.int32()),
            "label": pa.array(meta["label"], pa.int32()),
        }
    )
    tbytes = _parquet_bytes(table)
    tensors_entry = write_shard(storage.join(out_dir, f"{name}.safetensors"), acts, storage_options)
    storage.write_bytes(storage.join(out_dir, f"{name}.parquet"), tbytes, storage_options)
    rec = {
        "shard_id": shard_id,
        "tensors": f"{name}.safetensors",
        "tokens": f"{name}.parquet",
        "n_tokens": n_tokens,
        "n_docs": int(np.unique(meta["doc_id"]).size),
        "files": {
            f"{name}.safetensors": tensors_entry,
            f"{name}.parquet": storage.file_entry("", tbytes),
        },
        "norms": norm_rec,
    }
    storage.write_json(storage.join(out_dir, f"{name}.json"), rec, storage_options)
    return rec


class ShardWriter:
    """Fills shards row by row and publishes each in a background thread.

    ``start(s, shard_id, n_tokens)`` allocates shard ``s``; ``add(batch)`` copies a captured
    batch into it in the storage dtype (checking for NaN/inf); ``finish()`` hands it to the
    writer thread after the previous shard is written, so at most two shards are in memory.
    ``records[s]`` holds each written shard's completion record. Use as a context manager:
    on exit a shard already handed over is finished (or fails) before returning.
    """

    def __init__(
        self,
        out_dir: str,
        hook_names: Sequence[str],
        d_model: int,
        dtype: str,
        label_ids: np.ndarray,
        storage_options: Mapping[str, Any] | None = None,
    ):
        self.out_dir, self.hook_names, self.d_model = out_dir, list(hook_names), int(d_model)
        self.dtype, self.label_ids, self.storage_options = dtype, label_ids, storage_options
        self.records: dict[int, dict[str, Any]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="isup-shard-writer")
        self._pending: tuple[int, Future] | None = None
        self._shard: tuple[int, str] | None = None

    def start(self, s: int, shard_id: str, n_tokens: int) -> None:
        """Begin shard ``s`` of ``n_tokens`` rows."""
        out = TORCH_DTYPES[self.dtype]
        self._shard = (s, shard_id)
        self._n, self._pos = int(n_tokens), 0
        self._acts = {h: torch.empty((self._n, self.d_model), dtype=out) for h in self.hook_names}
        self._norms = {h: np.empty(self._n, dtype=np.float64) for h in self.hook_names}
        self._meta = {
            "token_id": np.empty(self._n, dtype=np.int32),
            "doc_id": np.empty(self._n, dtype=np.int64),
            "position": np.empty(self._n, dtype=np.int32),
            "label": np.empty(self._n, dtype=np.int32),
        }

    def add(self, batch: CapturedBatch) -> int:
        """Copy the rows of ``batch`` into the current shard; returns their number."""
        n, pos = len(batch), self._pos
        if pos + n > self._n:
            raise RuntimeError(
                "the tokenizer produced different tokens than when the dump was planned"
            )
        for h in self.hook_names:
            dst = self._acts[h][pos : pos + n]
            dst.copy_(batch.acts[h])
            nrm = dst.float().norm(dim=-1)
            self._norms[h][pos : pos + n] = nrm.numpy()
            if not bool(torch.isfinite(nrm).all()):  # NaN/inf, or a huge finite row
                check_finite_rows(dst, batch, h, self.dtype)
        self._meta["token_id"][pos : pos + n] = batch.token_id
        self._meta["doc_id"][pos : pos + n] = batch.doc_id
        self._meta["position"][pos : pos + n] = batch.position
        self._meta["label"][pos : pos + n] = self.label_ids[batch.doc_id]
        self._pos += n
        return n

    def finish(self) -> None:
        """Hand the current (full) shard to the writer thread."""
        assert self._shard is not None
        if self._pos != self._n:
            raise RuntimeError(
                "the tokenizer produced different tokens than when the dump was planned"
            )
        self.wait()
        s, shard_id = self._shard
        fut = self._pool.submit(
            _write_shard,
            self.out_dir,
            s,
            shard_id,
            self._acts,
            self._meta,
            self._norms,
            self.storage_options,
        )
        self._pending = (s, fut)
        self._shard = None
        self._acts, self._norms, self._meta = {}, {}, {}

    def wait(self) -> None:
        """Wait for the shard being written (its errors are raised here)."""
        if self._pending is not None:
            s, fut = self._pending
            self._pending = None
            self.records[s] = fut.result()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)


@dataclass
class DumpInfo:
    """What a dump's manifest says about everything but its shards."""

    cfg: DumpConfig
    identity: str
    model_info: dict[str, Any]
    hook_info: list[dict[str, Any]]
    d_model: int
    label_names: list[str]
    label_ids: np.ndarray  # int32 [n_rows]: label of every dataset row
    fingerprint: str
    text_col: str
    label_col: str | None
    n_rows: int
    mask: TokenMask
    bos_token_id: int | None


def publish_dump(
    out_dir: str,
    info: DumpInfo,
    records: Sequence[Mapping[str, Any]],
    texts: pd.Series,
    doc_ids: np.ndarray,
    n_tok: np.ndarray,
    n_kept: np.ndarray,
    storage_options: Mapping[str, Any] | None = None,
    partition: tuple[int, int] | None = None,
    **extra: Any,
) -> None:
    """Write ``docs.parquet`` and the manifest (last) of a dump whose shards ``records`` (in
    row order) are written; ``doc_ids``/``n_tok``/``n_kept`` ``[n_docs]`` describe its
    documents."""
    files: dict[str, dict[str, Any]] = {}
    for rec in records:
        files.update(rec["files"])
    names = info.label_names
    label_ids = info.label_ids
    doc_df = pd.DataFrame(
        {
            "doc_id": doc_ids,
            "text": texts.iloc[doc_ids].tolist(),
            "label_name": np.asarray(names, dtype=object)[label_ids[doc_ids]],
            "n_tokens": n_kept,
            "seq_len": n_tok,
        }
    )
    docs_bytes = _parquet_bytes(pa.Table.from_pandas(doc_df, preserve_index=False))
    storage.write_bytes(storage.join(out_dir, "docs.parquet"), docs_bytes, storage_options)
    files["docs.parquet"] = storage.file_entry("", docs_bytes)
    norm_stats = {}
    for h in info.hook_info:
        norm_stats[h["name"]] = _norm_stats([r["norms"][h["name"]] for r in records])
    counts = np.bincount(label_ids[doc_ids], minlength=len(names))
    cfg = info.cfg
    storage.write_manifest(
        out_dir,
        "activations",
        cfg,
        files,
        storage_options,
        identity=info.identity,
        dump_format=DUMP_FORMAT,
        model=info.model_info,
        tokenizer=info.model_info["tokenizer"],
        hook_points=info.hook_info,
        d_model=info.d_model,
        dtype=cfg.dtype,
        n_tokens=int(sum(r["n_tokens"] for r in records)),
        n_docs=int(doc_ids.size),
        doc_id_end=info.n_rows,
        docs_file="docs.parquet",
        shards=[
            {
                "tensors": r["tensors"],
                "tokens": r["tokens"],
                "n_tokens": r["n_tokens"],
                "n_docs": r["n_docs"],
                "size": r["files"][r["tensors"]]["size"],
                "sha256": r["files"][r["tensors"]]["sha256"],
            }
            for r in records
        ],
        dataset={
            "fingerprint": info.fingerprint,
            "text_col": info.text_col,
            "label_col": info.label_col,
            "n_rows": info.n_rows,
        },
        labels={
            "names": names,
            "mapping": {n: i for i, n in enumerate(names)},
            "doc_counts": {n: int(c) for n, c in zip(names, counts, strict=True)},
        },
        masking={
            "drop_pad": True,
            "drop_bos": cfg.drop_bos,
            "drop_special": cfg.drop_special,
            "special_token_ids": info.mask.specials.tolist(),
            "bos_token_id": info.bos_token_id,
            "prepend_bos": cfg.prepend_bos,
            "max_len": cfg.max_len,
            "tokens_before_masking": int(n_tok.sum()),
            "tokens_kept": int(n_kept.sum()),
        },
        norm_stats=norm_stats,
        partition=list(partition) if partition else None,
        **extra,
    )


def dump_summary(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers a published dump is shown and referenced by, from its manifest:
    ``n_tokens``, ``n_docs``, ``d_model``, ``hook_points`` (names), ``labels`` (names) and
    ``model`` (the model id)."""
    return {
        "n_tokens": manifest["n_tokens"],
        "n_docs": manifest["n_docs"],
        "d_model": manifest["d_model"],
        "hook_points": [h["name"] for h in manifest["hook_points"]],
        "labels": manifest["labels"]["names"],
        "model": (manifest.get("model") or {}).get("model_id"),
    }


def copy_dump(
    src: str,
    dst: str,
    storage_options: Mapping[str, Any] | None = None,
    chunk: int = 8 << 20,
) -> None:
    """Copy the published activation dump at ``src`` to ``dst``: each file its manifest lists,
    streamed in ``chunk``-byte pieces and checked against the manifest's size and SHA-256,
    then the manifest, last (a crash leaves ``dst`` unpublished, and a rerun copies again).

    A ``dst`` holding anything a dump does not write is refused (``FileExistsError``, nothing
    changed); an earlier dump there is unpublished first and replaced. A source file that does
    not match its manifest raises ``ValueError`` and leaves none of the dump's files in ``dst``.
    """
    manifest = storage.read_manifest(src, storage_options, kind="activations")
    if manifest.get("parts"):
        raise ValueError(
            f"src={src!r} is a dump over partition folders {manifest['parts'][:3]}: expected a "
            "dump whose manifest lists every file (copy each partition instead)"
        )
    if own_listing(dst, storage_options):
        remove_named(dst, [storage.MANIFEST_NAME], storage_options)
    try:
        for name, entry in sorted(manifest["files"].items()):
            h, size = hashlib.sha256(), 0
            fs, path = storage.get_fs(storage.join(src, name), storage_options)
            with (
                fs.open(path, "rb") as f,
                storage.atomic_open(storage.join(dst, name), storage_options) as out,
            ):
                while block := f.read(chunk):
                    h.update(block)
                    size += len(block)
                    out.write(block)
                if size != int(entry["size"]) or h.hexdigest() != entry["sha256"]:
                    raise ValueError(
                        f"{storage.join(src, name)} has {size} bytes with SHA-256 "
                        f"{h.hexdigest()[:16]}..., but its manifest lists {entry['size']} "
                        f"bytes with {str(entry['sha256'])[:16]}...: the dump at src={src!r} "
                        "changed after it was published; nothing was copied"
                    )
    except BaseException:
        # the names this dump writes, whether copied now or left by an earlier copy
        remove_named(dst, sorted(manifest["files"]), storage_options)
        raise
    storage.write_json(storage.join(dst, storage.MANIFEST_NAME), manifest, storage_options)
