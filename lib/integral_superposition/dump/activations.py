"""Dump token-level activations of real tokens to sharded, resumable stores.

Layout of a dump directory (any fsspec URI)::

    shard-00000.safetensors   one [n_tokens, d_model] tensor per hook point
    shard-00000.parquet       token_id, doc_id, position, label per row
    shard-00000.json          completion record of the shard (hashes, norm statistics)
    docs.parquet              doc_id, text, label_name, n_tokens, seq_len per document
    manifest.json             written last; its presence means the dump is complete

Shards are planned up front from token counts alone: documents are sorted by length
(stable on doc id) and cut into shards of about ``shard_size_mb``. Every file is published
atomically and a shard's record is written after its data files, so a rerun after a crash
(even ``kill -9``) skips every shard whose record matches the plan and whose files still
match the record's sizes and SHA-256: only missing or damaged shards are computed and the
result is byte-identical to an uninterrupted run.

While the model computes shard ``s + 1``, a background thread writes shard ``s``; at most two
shards are held in memory, so peak memory depends on ``shard_size_mb``, not on the dataset.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from integral_superposition import storage
from integral_superposition.compute import check_memory
from integral_superposition.config import DumpConfig
from integral_superposition.data.datasets import (
    dataset_fingerprint,
    encode_labels,
    label_mapping,
    validate_frame,
)
from integral_superposition.dump.capture import capture_batches
from integral_superposition.dump.layout import own_listing, reusable_shards
from integral_superposition.dump.plan import (
    DumpPlan,
    TokenMask,
    plan_documents,
    plan_shards,
    select_documents,
)
from integral_superposition.dump.shards import TORCH_DTYPES
from integral_superposition.dump.store import ActivationStore
from integral_superposition.dump.writer import (
    DUMP_FORMAT,
    DumpInfo,
    ShardWriter,
    _norm_summary,
    _parquet_bytes,
    publish_dump,
)
from integral_superposition.progress import ProgressFn, Reporter

__all__ = [
    "DUMP_FORMAT",
    "TokenMask",
    "combine_dumps",
    "describe_dump",
    "dump_layer_activations",
    "plan_shards",
    "resolve_hook_points",
    "resolve_labels",
]

log = logging.getLogger(__name__)


def _check_inputs(
    df: Any,
    text_col: str,
    label_col: str | None,
    backend,
    cfg: Any,
    out_dir: Any,
    partition: Any,
) -> None:
    if not isinstance(cfg, DumpConfig):
        raise TypeError(f"cfg: expected a DumpConfig, got {type(cfg).__name__}")
    if not isinstance(out_dir, str | os.PathLike) or not str(out_dir):
        raise TypeError(f"out_dir={out_dir!r}: expected a directory path or fsspec URI string")
    if not isinstance(text_col, str):
        raise TypeError(f"text_col={text_col!r}: expected a column name (str)")
    if label_col is not None and not isinstance(label_col, str):
        raise TypeError(f"label_col={label_col!r}: expected a column name (str) or None")
    validate_frame(df, text_col, label_col)
    if partition is not None:
        ok = (
            isinstance(partition, tuple | list)
            and len(partition) == 2
            and all(isinstance(v, int) for v in partition)
            and 0 <= partition[0] < partition[1]
        )
        if not ok:
            raise ValueError(
                f"partition={partition!r}: expected (index, count) with 0 <= index < count"
            )
    for attr in ("tokenizer", "hook_points", "capture", "describe", "d_model"):
        if not hasattr(backend, attr):
            raise TypeError(
                f"backend: expected an HFBackend (e.g. backends.HFCausalLM.from_pretrained(...)), got {type(backend).__name__}"
            )
    max_pos = getattr(
        getattr(backend.config, "text_config", None) or backend.config,
        "max_position_embeddings",
        None,
    )
    if isinstance(max_pos, int) and cfg.max_len > max_pos:
        raise ValueError(
            f"cfg.max_len={cfg.max_len}: the model accepts at most {max_pos} positions"
        )


def _check_documents(documents: Any, n_rows: int) -> np.ndarray:
    """``documents`` as sorted distinct row numbers ``int64[n]``; ``ValueError`` when one is
    out of range or the selection is empty."""
    ids = np.asarray(documents)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"documents={documents!r}: expected a non-empty list of row numbers (integers)"
        )
    if ids.min() < 0 or ids.max() >= n_rows:
        raise ValueError(
            f"documents: row {int(ids.max() if ids.max() >= n_rows else ids.min())} is out of "
            f"range; the dataset has {n_rows} rows"
        )
    return np.unique(ids.astype(np.int64))


def resolve_labels(
    df: pd.DataFrame, label_col: str | None, label_names: Sequence[str] | None
) -> tuple[list[str], np.ndarray]:
    """``(label names, label id of every row int32[n_rows])``: ``label_names`` fixes the
    mapping (default: the sorted distinct labels; ``["unlabelled"]`` without ``label_col``)."""
    if label_names is not None:
        names = [str(n) for n in label_names]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"label_names={list(label_names)!r}: expected distinct names")
    else:
        names = label_mapping(df[label_col]) if label_col else ["unlabelled"]
    label_ids = (
        encode_labels(df[label_col], names) if label_col else np.zeros(len(df), dtype=np.int32)
    )
    return names, label_ids


def resolve_hook_points(backend, cfg: DumpConfig) -> list:
    """The backend's hook points for ``cfg`` (each named once)."""
    hook_points = backend.hook_points(cfg.resolved_hook_points())
    seen: set[str] = set()
    dupes = [h.name for h in hook_points if h.name in seen or seen.add(h.name)]
    if dupes:
        raise ValueError(
            f"cfg.hook_points={cfg.resolved_hook_points()!r}: {dupes} named more than once"
        )
    return hook_points


def describe_dump(
    df: pd.DataFrame,
    text_col: str,
    label_col: str | None,
    backend,
    cfg: DumpConfig,
    hook_points: Sequence,
    labels: tuple[list[str], np.ndarray],
    partition: tuple[int, int] | None = None,
    identity_extra: Mapping[str, Any] | None = None,
) -> DumpInfo:
    """Everything a dump's manifest says besides its shards, and its identity: a hash of the
    format, config, dataset, model, tokenizer, hook points, labels and partition (plus
    ``identity_extra`` for stores written another way, e.g. by online training)."""
    names, label_ids = labels
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
    ident: dict[str, Any] = {
        "format": DUMP_FORMAT,
        "cfg": cfg,
        "dataset": fingerprint,
        "text_col": text_col,
        "label_col": label_col,
        "model": model_info["fingerprint"],
        "tokenizer": model_info["tokenizer"].get("fingerprint"),
        "hooks": hook_info,
        "labels": names,
        "partition": partition,
    }
    if identity_extra:
        ident.update(identity_extra)
    tok = backend.tokenizer
    return DumpInfo(
        cfg=cfg,
        identity=storage.sha256_bytes(storage.canonical_json(ident).encode()),
        model_info=model_info,
        hook_info=hook_info,
        d_model=int(backend.d_model),
        label_names=names,
        label_ids=label_ids,
        fingerprint=fingerprint,
        text_col=text_col,
        label_col=label_col,
        n_rows=len(df),
        mask=TokenMask(tok, cfg),
        bos_token_id=tok.bos_token_id,
    )


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
    documents: Sequence[int] | np.ndarray | None = None,
) -> ActivationStore:
    """Dump activations of ``df[text_col]`` at ``cfg``'s hook points into ``out_dir``.

    Stores only real tokens (no padding; BOS and special tokens dropped unless ``cfg`` says
    otherwise): ``cfg.dtype`` activations ``[n_tokens, d_model]`` per hook point, and token
    metadata aligned row by row. ``label_names`` fixes the label mapping (default: the sorted
    distinct labels). ``partition=(i, n)`` dumps only documents whose id ``% n == i``; combine
    the parts with :func:`combine_dumps`. ``documents`` (row numbers of ``df``) dumps only
    those rows, keeping their ids (e.g. a bounded sample). ``on_progress(done_tokens,
    total_tokens)`` is called after every batch.

    Rerunning the same dump into the same ``out_dir`` resumes it (only missing or damaged
    shards are computed) or, when it is complete, returns it; what it keeps is verified first
    (sizes and SHA-256 against the shard records and the manifest). ``out_dir`` holding a
    *different* dump is an error unless ``overwrite=True``, which replaces an earlier dump of
    ours there, file by file (its manifest, then the files it lists); it never removes the
    folder or a file a dump did not write, and a folder holding anything else is refused.
    Every input is checked before anything is written.
    Returns the published :class:`ActivationStore`.
    """
    _check_inputs(df, text_col, label_col, backend, cfg, out_dir, partition)
    partition = tuple(partition) if partition is not None else None
    labels = resolve_labels(df, label_col, label_names)
    hook_points = resolve_hook_points(backend, cfg)
    out_dir = os.fspath(out_dir)
    doc_ids = select_documents(len(df), partition)
    extra = None
    if documents is not None:
        chosen = _check_documents(documents, len(df))
        doc_ids = doc_ids[np.isin(doc_ids, chosen)]
        if doc_ids.size == 0:
            raise ValueError(f"documents: selects no document of partition={partition!r}")
        extra = {"documents": storage.sha256_bytes(doc_ids.tobytes())}
    info = describe_dump(
        df, text_col, label_col, backend, cfg, hook_points, labels, partition, extra
    )
    bytes_per_token = info.d_model * TORCH_DTYPES[cfg.dtype].itemsize * len(hook_points)
    plan = plan_documents(df, text_col, backend.tokenizer, info.mask, cfg, doc_ids, bytes_per_token)
    biggest = max(plan.shard_tokens(s) for s in range(len(plan.shards)))
    # two shards in memory (one computed, one being written), each with its float64 norms
    check_memory(
        2 * biggest * (bytes_per_token + 8 * len(hook_points)),
        "cpu",
        f"cfg.shard_size_mb={cfg.shard_size_mb} (shards of up to {biggest} tokens x "
        f"{len(hook_points)} hook point(s) x d_model={info.d_model} in {cfg.dtype})",
    )
    shard_ids = [
        storage.sha256_bytes(
            f"{info.identity}:{s}:{','.join(map(str, plan.shard_docs(s).tolist()))}".encode()
        )
        for s in range(len(plan.shards))
    ]
    records = reusable_shards(out_dir, info.identity, shard_ids, overwrite, storage_options)
    if records is None:
        return ActivationStore(out_dir, storage_options)
    _compute_shards(
        df[text_col], backend, info, plan, shard_ids, records, hook_points, out_dir,
        storage_options, progress, on_progress,
    )  # fmt: skip
    complete = [r for r in records if r is not None]
    assert len(complete) == len(plan.shards)
    publish_dump(
        out_dir, info, complete, df[text_col], plan.doc_ids, plan.n_tok, plan.n_kept,
        storage_options, partition,
    )  # fmt: skip
    return ActivationStore(out_dir, storage_options)


def _compute_shards(
    texts: pd.Series,
    backend,
    info: DumpInfo,
    plan: DumpPlan,
    shard_ids: list[str],
    records: list[dict[str, Any] | None],
    hook_points: Sequence,
    out_dir: str,
    storage_options: Mapping[str, Any] | None,
    progress: bool,
    on_progress: ProgressFn | None,
) -> None:
    """Compute the shards missing from ``records`` (filled in place) with the forward-capture
    iterator and the shard writer: the model computes shard ``s + 1`` while ``s`` is written."""
    todo = [s for s, r in enumerate(records) if r is None]
    total = int(plan.n_kept.sum())
    done = total - sum(plan.shard_tokens(s) for s in todo)
    if done:
        log.info(
            "resuming %s: %d of %d shards already complete",
            out_dir,
            len(plan.shards) - len(todo),
            len(plan.shards),
        )
    writer = ShardWriter(
        out_dir, [h.name for h in hook_points], info.d_model, info.cfg.dtype,
        info.label_ids, storage_options,
    )  # fmt: skip
    with (
        Reporter(
            f"dump {','.join(h.name for h in hook_points)}",
            on_progress,
            unit="tok",
            total=total,
            initial=done,
            show=progress,
        ) as bar,
        writer,
    ):
        for s in todo:
            writer.start(s, shard_ids[s], plan.shard_tokens(s))
            for batch in capture_batches(
                backend, texts, plan.shard_docs(s), info.cfg, hook_points, info.mask
            ):
                done += writer.add(batch)
                bar.update(done, total, phase=f"shard {s + 1}/{len(plan.shards)}")
            writer.finish()
    records[:] = [writer.records.get(s, r) for s, r in enumerate(records)]


def _check_parts(part_dirs: Sequence[str], manifests: Sequence[Mapping[str, Any]]) -> None:
    """``ValueError`` unless the partition dumps share model, config, dataset and labels and
    hold distinct partitions."""
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
    parts_idx = [tuple(m.get("partition") or ()) for m in manifests]
    if len(set(parts_idx)) != len(parts_idx):
        raise ValueError(f"part_dirs={part_dirs!r}: two parts hold the same partition")


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
    out_dir = os.fspath(out_dir).rstrip("/")
    part_dirs = [os.fspath(p).rstrip("/") for p in part_dirs]
    rels = []
    for p in part_dirs:
        prefix = out_dir + ("/" if "://" in out_dir else os.sep)
        if not p.startswith(prefix):
            raise ValueError(f"part_dirs: {p!r} must be a sub-directory of out_dir={out_dir!r}")
        rels.append(p[len(prefix) :].replace(os.sep, "/"))
    if len(set(rels)) != len(rels):
        raise ValueError(f"part_dirs={part_dirs!r}: a partition is listed twice")
    if any(part in ("", ".", "..") for rel in rels for part in rel.split("/")):
        raise ValueError(f"part_dirs={part_dirs!r}: expected plain sub-directories (no '..')")
    own_listing(out_dir, storage_options, {rel.split("/")[0] for rel in rels})
    manifests = [storage.read_manifest(p, storage_options, kind="activations") for p in part_dirs]
    _check_parts(part_dirs, manifests)
    first = manifests[0]
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
        dump_format=first.get("dump_format"),
        model=first["model"],
        tokenizer=first.get("tokenizer", first["model"].get("tokenizer")),
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
            **first["labels"],
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
