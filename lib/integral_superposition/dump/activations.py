"""Dump token-level activations of real tokens to sharded, resumable stores.

Layout of a dump directory (any fsspec URI)::

    shard-00000.safetensors   one [n_tokens, d_model] tensor per hook point
    shard-00000.parquet       token_id, doc_id, position, label per row
    shard-00000.json          completion record of the shard (hashes, norm statistics)
    docs.parquet              doc_id, text, label_name, n_tokens per document
    manifest.json             written last; its presence means the dump is complete

Shards are planned up front from token counts alone: documents are sorted by length
(stable on doc id) and cut into shards of about ``shard_size_mb``. A rerun after a crash
skips every shard whose completion record matches the plan, so only missing shards are
computed and the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from integral_superposition import storage
from integral_superposition.config import DumpConfig
from integral_superposition.data.datasets import (
    dataset_fingerprint,
    encode_labels,
    label_mapping,
    validate_frame,
)
from integral_superposition.data.tokenize import (
    pad_batch,
    pad_token_id,
    special_ids,
    tokenize_texts,
)
from integral_superposition.dump.shards import TORCH_DTYPES, encode_shard
from integral_superposition.dump.store import ActivationStore

log = logging.getLogger(__name__)

_NORM_BINS = np.linspace(-4.0, 6.0, 401)  # log10 of the L2 norm
ProgressFn = Callable[[int, int], None]


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _keep_mask(ids: list[int], bos: int | None, specials: set[int], cfg: DumpConfig) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64)
    keep = np.ones(arr.size, dtype=bool)
    if cfg.drop_bos and bos is not None and arr.size and arr[0] == bos:
        keep[0] = False
    if cfg.drop_special and specials:
        keep &= ~np.isin(arr, list(specials))
    return keep


def _norm_summary(
    hist: np.ndarray, count: int, total: float, total_sq: float, lo: float, hi: float
) -> dict[str, float]:
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


def plan_shards(
    n_kept_sorted: np.ndarray, bytes_per_token: int, shard_bytes: int
) -> list[tuple[int, int]]:
    """Cut the length-sorted documents into ``[start, end)`` runs of about ``shard_bytes``."""
    per_shard = max(1, shard_bytes // max(1, bytes_per_token))
    bounds, start, acc = [], 0, 0
    for i, n in enumerate(n_kept_sorted.tolist()):
        acc += n
        if acc >= per_shard:
            bounds.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(n_kept_sorted):
        bounds.append((start, len(n_kept_sorted)))
    return bounds


def dump_layer_activations(
    df: pd.DataFrame,
    text_col: str,
    label_col: str | None,
    backend,
    cfg: DumpConfig,
    out_dir: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
    partition: tuple[int, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_progress: ProgressFn | None = None,
) -> ActivationStore:
    """Dump activations of ``df[text_col]`` at ``cfg``'s hook points into ``out_dir``.

    Stores only real tokens (no padding; BOS and special tokens dropped unless ``cfg`` says
    otherwise), ``cfg.dtype`` activations ``[n_tokens, d_model]`` per hook point, and token
    metadata aligned row by row. ``label_names`` fixes the label mapping (default: the sorted
    distinct labels). ``partition=(i, n)`` dumps only documents whose id ``% n == i``; combine
    the parts with :func:`combine_dumps`. Returns the published :class:`ActivationStore`.
    """
    if not isinstance(cfg, DumpConfig):
        raise TypeError(f"cfg: expected a DumpConfig, got {type(cfg).__name__}")
    validate_frame(df, text_col, label_col)
    names = (
        list(label_names)
        if label_names is not None
        else (label_mapping(df[label_col]) if label_col else ["unlabelled"])
    )
    label_ids = (
        encode_labels(df[label_col], names) if label_col else np.zeros(len(df), dtype=np.int32)
    )
    if partition is not None:
        pi, pn = partition
        if not (isinstance(pn, int) and pn >= 1 and isinstance(pi, int) and 0 <= pi < pn):
            raise ValueError(
                f"partition={partition!r}: expected (index, count) with 0 <= index < count"
            )
    hook_points = backend.hook_points(cfg.resolved_hook_points())
    out_dir = str(out_dir)
    tok = backend.tokenizer
    fingerprint = dataset_fingerprint(df, text_col, label_col)
    model_info = backend.describe()
    hook_info = [
        {
            "name": h.name,
            "layer": h.layer,
            "module_path": h.module_path,
            "saelens_name": h.saelens_name,
        }
        for h in hook_points
    ]
    identity = storage.sha256_bytes(
        storage.canonical_json(
            {
                "cfg": cfg,
                "fingerprint": fingerprint,
                "model": model_info["fingerprint"],
                "hooks": hook_info,
                "labels": names,
                "partition": partition,
            }
        ).encode()
    )

    if storage.exists(storage.join(out_dir, storage.MANIFEST_NAME), storage_options):
        existing = storage.read_manifest(out_dir, storage_options)
        if existing.get("identity") == identity and storage.verify_output(out_dir, storage_options):
            log.info("dump at %s is complete; reusing it", out_dir)
            return ActivationStore(out_dir, storage_options)
        if not overwrite:
            raise FileExistsError(
                f"out_dir={out_dir!r} already holds a different dump; pass overwrite=True or choose another directory"
            )
        storage.remove(out_dir, storage_options)

    # -- plan: token counts only -------------------------------------------------------------
    doc_ids = np.arange(len(df), dtype=np.int64)
    if partition is not None:
        doc_ids = doc_ids[doc_ids % partition[1] == partition[0]]
    texts = df[text_col].tolist()
    bos = tok.bos_token_id
    specials = special_ids(tok) - ({bos} if bos is not None else set())
    n_tok = np.zeros(len(doc_ids), dtype=np.int64)
    n_kept = np.zeros(len(doc_ids), dtype=np.int64)
    for a in range(0, len(doc_ids), 8192):
        chunk = doc_ids[a : a + 8192]
        for j, ids in enumerate(
            tokenize_texts(tok, [texts[i] for i in chunk], cfg.max_len, cfg.prepend_bos)
        ):
            n_tok[a + j] = len(ids)
            n_kept[a + j] = int(_keep_mask(ids, bos, specials, cfg).sum())
    order = np.lexsort((doc_ids, n_tok)) if cfg.sort_by_length else np.arange(len(doc_ids))
    itemsize = torch.tensor([], dtype=TORCH_DTYPES[cfg.dtype]).element_size()
    bytes_per_token = backend.d_model * itemsize * len(hook_points)
    shards = plan_shards(n_kept[order], bytes_per_token, int(cfg.shard_size_mb * (1 << 20)))
    if int(n_kept.sum()) == 0:
        raise ValueError(
            "no tokens left to store: every token is padding, BOS or special (check max_len and the masking flags)"
        )

    # -- run: compute missing shards ---------------------------------------------------------
    records: list[dict[str, Any]] = []
    todo = []
    for s, (a, b) in enumerate(shards):
        shard_docs = doc_ids[order[a:b]]
        shard_id = storage.sha256_bytes(
            (identity + ":" + ",".join(map(str, shard_docs.tolist()))).encode()
        )
        rec_uri = storage.join(out_dir, f"shard-{s:05d}.json")
        rec = None
        if storage.exists(rec_uri, storage_options):
            rec = storage.read_json(rec_uri, storage_options)
            if rec.get("shard_id") != shard_id:
                if not overwrite:
                    raise FileExistsError(
                        f"out_dir={out_dir!r} holds shards of a different dump ({rec_uri}); pass overwrite=True or choose another directory"
                    )
                rec = None
        records.append(rec)
        if rec is None:
            todo.append((s, shard_docs, shard_id))
    total = int(
        sum(n_kept[order[a:b]].sum() for s, (a, b) in enumerate(shards) if records[s] is None)
    )
    pad_id = pad_token_id(tok)
    out_dtype = TORCH_DTYPES[cfg.dtype]
    done = 0
    bar = tqdm(
        total=total,
        unit="tok",
        desc=f"dump {','.join(h.name for h in hook_points)}",
        disable=not progress,
    )
    try:
        for s, shard_docs, shard_id in todo:
            acts: dict[str, list[torch.Tensor]] = {h.name: [] for h in hook_points}
            meta: dict[str, list[np.ndarray]] = {
                "token_id": [],
                "doc_id": [],
                "position": [],
                "label": [],
            }
            for a in range(0, len(shard_docs), cfg.batch_size):
                batch_docs = shard_docs[a : a + cfg.batch_size]
                seqs = tokenize_texts(
                    tok, [texts[i] for i in batch_docs], cfg.max_len, cfg.prepend_bos
                )
                batch = pad_batch(seqs, pad_id, "right")
                keep = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
                for r, ids in enumerate(seqs):
                    keep[r, : len(ids)] = torch.from_numpy(_keep_mask(ids, bos, specials, cfg))
                out = backend.capture(batch.input_ids, batch.attention_mask, hook_points)
                keep_dev = keep.to(next(iter(out.values())).device)
                for h in hook_points:
                    acts[h.name].append(out[h.name][keep_dev].to("cpu", out_dtype))
                rows, cols = keep.nonzero(as_tuple=True)
                rows_np = rows.numpy()
                meta["token_id"].append(batch.input_ids[rows, cols].numpy().astype(np.int32))
                meta["doc_id"].append(batch_docs[rows_np])
                meta["position"].append(cols.numpy().astype(np.int32))
                meta["label"].append(label_ids[batch_docs[rows_np]])
                n = int(keep.sum())
                done += n
                bar.update(n)
                if on_progress is not None:
                    on_progress(done, total)
            records[s] = _write_shard(out_dir, s, shard_id, acts, meta, storage_options)
    finally:
        bar.close()

    # -- publish -----------------------------------------------------------------------------
    files: dict[str, dict[str, Any]] = {}
    for rec in records:
        files.update(rec["files"])
    doc_df = pd.DataFrame(
        {
            "doc_id": doc_ids,
            "text": [texts[i] for i in doc_ids],
            "label_name": [names[label_ids[i]] for i in doc_ids],
            "n_tokens": n_kept,
        }
    )
    docs_bytes = _parquet_bytes(pa.Table.from_pandas(doc_df, preserve_index=False))
    storage.write_bytes(storage.join(out_dir, "docs.parquet"), docs_bytes, storage_options)
    files["docs.parquet"] = storage.file_entry("", docs_bytes)
    norm_stats = {}
    for h in hook_points:
        hist = np.sum([np.asarray(r["norms"][h.name]["hist"]) for r in records], axis=0)
        norm_stats[h.name] = _norm_summary(
            hist,
            sum(r["norms"][h.name]["count"] for r in records),
            sum(r["norms"][h.name]["sum"] for r in records),
            sum(r["norms"][h.name]["sumsq"] for r in records),
            min(r["norms"][h.name]["min"] for r in records),
            max(r["norms"][h.name]["max"] for r in records),
        )
    counts = np.bincount(label_ids[doc_ids], minlength=len(names))
    storage.write_manifest(
        out_dir,
        "activations",
        cfg,
        files,
        storage_options,
        identity=identity,
        model=model_info,
        hook_points=hook_info,
        d_model=backend.d_model,
        dtype=cfg.dtype,
        n_tokens=int(sum(r["n_tokens"] for r in records)),
        n_docs=len(doc_ids),
        doc_id_end=len(df),
        docs_file="docs.parquet",
        shards=[
            {
                "tensors": r["tensors"],
                "tokens": r["tokens"],
                "n_tokens": r["n_tokens"],
                "n_docs": r["n_docs"],
            }
            for r in records
        ],
        dataset={
            "fingerprint": fingerprint,
            "text_col": text_col,
            "label_col": label_col,
            "n_rows": len(df),
        },
        labels={
            "names": names,
            "doc_counts": {n: int(c) for n, c in zip(names, counts, strict=True)},
        },
        masking={
            "drop_pad": True,
            "drop_bos": cfg.drop_bos,
            "drop_special": cfg.drop_special,
            "prepend_bos": cfg.prepend_bos,
            "max_len": cfg.max_len,
            "tokens_before_masking": int(n_tok.sum()),
            "tokens_kept": int(n_kept.sum()),
        },
        norm_stats=norm_stats,
        partition=list(partition) if partition else None,
    )
    return ActivationStore(out_dir, storage_options)


def _write_shard(
    out_dir: str,
    s: int,
    shard_id: str,
    acts: dict[str, list[torch.Tensor]],
    meta: dict[str, list[np.ndarray]],
    storage_options,
) -> dict[str, Any]:
    name = f"shard-{s:05d}"
    tensors = {k: torch.cat(v) for k, v in acts.items()}
    n_tokens = next(iter(tensors.values())).shape[0]
    norms: dict[str, Any] = {}
    for k, t in tensors.items():
        nrm = t.float().norm(dim=-1).numpy().astype(np.float64)
        hist, _ = np.histogram(np.log10(np.maximum(nrm, 1e-12)), bins=_NORM_BINS)
        norms[k] = {
            "count": int(nrm.size),
            "sum": float(nrm.sum()),
            "sumsq": float((nrm**2).sum()),
            "min": float(nrm.min()) if nrm.size else 0.0,
            "max": float(nrm.max()) if nrm.size else 0.0,
            "hist": hist.tolist(),
        }
    data = encode_shard(tensors)
    table = pa.table(
        {
            "token_id": pa.array(np.concatenate(meta["token_id"]), pa.int32()),
            "doc_id": pa.array(np.concatenate(meta["doc_id"]), pa.int64()),
            "position": pa.array(np.concatenate(meta["position"]), pa.int32()),
            "label": pa.array(np.concatenate(meta["label"]), pa.int32()),
        }
    )
    tbytes = _parquet_bytes(table)
    storage.write_bytes(storage.join(out_dir, f"{name}.safetensors"), data, storage_options)
    storage.write_bytes(storage.join(out_dir, f"{name}.parquet"), tbytes, storage_options)
    rec = {
        "shard_id": shard_id,
        "tensors": f"{name}.safetensors",
        "tokens": f"{name}.parquet",
        "n_tokens": int(n_tokens),
        "n_docs": len(np.unique(np.concatenate(meta["doc_id"]))) if n_tokens else 0,
        "files": {
            f"{name}.safetensors": storage.file_entry("", data),
            f"{name}.parquet": storage.file_entry("", tbytes),
        },
        "norms": norms,
    }
    storage.write_json(storage.join(out_dir, f"{name}.json"), rec, storage_options)
    return rec


def combine_dumps(
    part_dirs: Sequence[str], out_dir: str, storage_options: Mapping[str, Any] | None = None
) -> ActivationStore:
    """Publish one store over partition dumps that live in sub-directories of ``out_dir``.

    The parts must come from the same model, config, hook points, dataset and label mapping
    (as :func:`dump_layer_activations` with ``partition=(i, n)`` writes them). The combined
    manifest lists the parts' shards by relative path; no activation is copied.
    """
    if not part_dirs:
        raise ValueError("part_dirs is empty: expected at least one partition dump")
    out_dir = str(out_dir).rstrip("/")
    manifests = [storage.read_manifest(p, storage_options, kind="activations") for p in part_dirs]
    first = manifests[0]
    for p, m in zip(part_dirs, manifests, strict=True):
        for key in ("config", "hook_points", "d_model", "dtype"):
            if m[key] != first[key]:
                raise ValueError(f"partition {p!r} differs from {part_dirs[0]!r} in {key!r}")
        if (
            m["model"]["fingerprint"] != first["model"]["fingerprint"]
            or m["dataset"]["fingerprint"] != first["dataset"]["fingerprint"]
        ):
            raise ValueError(
                f"partition {p!r} comes from another model or dataset than {part_dirs[0]!r}"
            )
        if m["labels"]["names"] != first["labels"]["names"]:
            raise ValueError(
                f"partition {p!r} has labels {m['labels']['names']}, expected {first['labels']['names']}"
            )
    rels = []
    for p in part_dirs:
        p = str(p).rstrip("/")
        if not p.startswith(out_dir + "/"):
            raise ValueError(f"partition {p!r} must be a sub-directory of out_dir={out_dir!r}")
        rels.append(p[len(out_dir) + 1 :])
    files: dict[str, Any] = {}
    shards = []
    docs = []
    for rel, p, m in zip(rels, part_dirs, manifests, strict=True):
        for name, entry in m["files"].items():
            if name != m["docs_file"]:
                files[f"{rel}/{name}"] = entry
        for s in m["shards"]:
            shards.append(
                {**s, "tensors": f"{rel}/{s['tensors']}", "tokens": f"{rel}/{s['tokens']}"}
            )
        docs.append(
            pd.read_parquet(
                io.BytesIO(storage.read_bytes(storage.join(p, m["docs_file"]), storage_options))
            )
        )
    doc_df = (
        pd.concat(docs, ignore_index=True)
        .sort_values("doc_id", kind="stable")
        .reset_index(drop=True)
    )
    docs_bytes = _parquet_bytes(pa.Table.from_pandas(doc_df, preserve_index=False))
    storage.write_bytes(storage.join(out_dir, "docs.parquet"), docs_bytes, storage_options)
    files["docs.parquet"] = storage.file_entry("", docs_bytes)
    norm_stats = {}
    for h in first["hook_points"]:
        parts = [
            m["norm_stats"][h["name"]] for m in manifests if m["norm_stats"][h["name"]].get("count")
        ]
        hist = np.sum([np.asarray(s["hist_log10_counts"]) for s in parts], axis=0)
        count = sum(s["count"] for s in parts)
        total = sum(s["mean"] * s["count"] for s in parts)
        total_sq = sum((s["std"] ** 2 + s["mean"] ** 2) * s["count"] for s in parts)
        norm_stats[h["name"]] = _norm_summary(
            hist, count, total, total_sq, min(s["min"] for s in parts), max(s["max"] for s in parts)
        )
    masking = dict(first["masking"])
    masking["tokens_before_masking"] = sum(m["masking"]["tokens_before_masking"] for m in manifests)
    masking["tokens_kept"] = sum(m["masking"]["tokens_kept"] for m in manifests)
    storage.write_manifest(
        out_dir,
        "activations",
        first["config"],
        files,
        storage_options,
        identity=storage.sha256_bytes("|".join(m["identity"] for m in manifests).encode()),
        model=first["model"],
        hook_points=first["hook_points"],
        d_model=first["d_model"],
        dtype=first["dtype"],
        n_tokens=sum(m["n_tokens"] for m in manifests),
        n_docs=sum(m["n_docs"] for m in manifests),
        doc_id_end=first["doc_id_end"],
        docs_file="docs.parquet",
        shards=shards,
        dataset=first["dataset"],
        labels={
            "names": first["labels"]["names"],
            "doc_counts": {
                n: sum(m["labels"]["doc_counts"][n] for m in manifests)
                for n in first["labels"]["names"]
            },
        },
        masking=masking,
        norm_stats=norm_stats,
        partition=None,
        parts=rels,
    )
    return ActivationStore(out_dir, storage_options)
