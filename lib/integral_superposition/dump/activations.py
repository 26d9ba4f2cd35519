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
import itertools
import logging
import math
import os
import re
import sys
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
from integral_superposition.compute import check_memory
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
from integral_superposition.dump.shards import (
    TORCH_DTYPES,
    files_intact,
    write_shard,
)
from integral_superposition.dump.store import (
    ActivationStore,
    NonFiniteActivationsError,
    first_non_finite,
    verify_dump,
)
from integral_superposition.progress import ProgressFn, Reporter

log = logging.getLogger(__name__)

DUMP_FORMAT = 2
"""Version of the dump layout; part of every dump's identity."""

_NORM_BINS = np.linspace(-4.0, 6.0, 401)  # log10 of the L2 norm
_SHARD_RE = re.compile(r"^shard-(\d{5})\.json$")


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class TokenMask:
    """Which tokens of a tokenised text are stored: never padding; BOS at position 0 unless
    ``drop_bos=False``; other special tokens unless ``drop_special=False``."""

    def __init__(self, tokenizer, cfg: DumpConfig):
        self.bos = tokenizer.bos_token_id if cfg.drop_bos else None
        # UNK stands for real text, so it is stored like any other token
        not_special = {tokenizer.bos_token_id, getattr(tokenizer, "unk_token_id", None)}
        specials = special_ids(tokenizer) - not_special if cfg.drop_special else set()
        self.specials = np.array(sorted(specials), dtype=np.int64)
        self._specials_t = torch.from_numpy(self.specials)

    def counts(self, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens fed to the model, tokens stored)`` per sequence, both ``int64[n]``."""
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        flat = np.fromiter(
            itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum())
        )
        keep = ~np.isin(flat, self.specials) if self.specials.size else np.ones(flat.size, bool)
        starts = np.cumsum(lengths) - lengths
        if self.bos is not None:
            first = starts[lengths > 0]
            keep[first] &= flat[first] != self.bos
        csum = np.concatenate([[0], np.cumsum(keep)])
        return lengths, csum[starts + lengths] - csum[starts]

    def batch(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``[B, T]`` of the stored tokens of a right-padded batch ``[B, T]``."""
        keep = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]
        if self.bos is not None:
            keep[:, 0] &= input_ids[:, 0] != self.bos
        if self.specials.size:
            keep &= ~torch.isin(input_ids, self._specials_t)
        return keep


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


def plan_shards(
    n_kept_sorted: np.ndarray, bytes_per_token: int, shard_bytes: int
) -> list[tuple[int, int]]:
    """Cut documents (in forward order) into ``[start, end)`` runs of about ``shard_bytes``.

    ``n_kept_sorted``: stored tokens per document ``[n_docs]``. A shard ends on the first
    document that brings it to ``shard_bytes``; shards never split a document.
    """
    per_shard = max(1, shard_bytes // max(1, bytes_per_token))
    n = np.asarray(n_kept_sorted, dtype=np.int64)
    if n.size == 0:
        return []
    bounds, start = [], 0
    csum = np.cumsum(n)
    base = 0
    while start < n.size:
        # first document whose cumulative count reaches the shard's budget
        end = int(np.searchsorted(csum, base + per_shard, side="left")) + 1
        end = min(max(end, start + 1), n.size)
        bounds.append((start, end))
        base = int(csum[end - 1])
        start = end
    return bounds


@dataclass
class _Plan:
    """What a dump computes: documents, their token counts and the shard cut."""

    doc_ids: np.ndarray  # int64 [n_docs]: the documents of this dump (row numbers of df)
    n_tok: np.ndarray  # int64 [n_docs]: tokens fed to the model (BOS included, <= max_len)
    n_kept: np.ndarray  # int64 [n_docs]: tokens stored
    order: np.ndarray  # int64 [n_fwd]: indices into doc_ids in forward order (stored docs only)
    shards: list[tuple[int, int]]  # [start, end) ranges into order

    def shard_docs(self, s: int) -> np.ndarray:
        a, b = self.shards[s]
        return self.doc_ids[self.order[a:b]]

    def shard_tokens(self, s: int) -> int:
        a, b = self.shards[s]
        return int(self.n_kept[self.order[a:b]].sum())


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


def _plan(
    df: pd.DataFrame,
    text_col: str,
    tok,
    mask: TokenMask,
    cfg: DumpConfig,
    partition,
    bytes_per_token: int,
) -> _Plan:
    doc_ids = np.arange(len(df), dtype=np.int64)
    if partition is not None:
        doc_ids = doc_ids[doc_ids % partition[1] == partition[0]]
        if doc_ids.size == 0:
            raise ValueError(
                f"partition={tuple(partition)!r}: selects no document of a dataset with {len(df)} rows"
            )
    texts = df[text_col]
    n_tok = np.zeros(doc_ids.size, dtype=np.int64)
    n_kept = np.zeros(doc_ids.size, dtype=np.int64)
    step = 8192  # bounded: token lists of one chunk at a time
    for a in range(0, doc_ids.size, step):
        chunk = doc_ids[a : a + step]
        seqs = tokenize_texts(tok, texts.iloc[chunk].tolist(), cfg.max_len, cfg.prepend_bos)
        n_tok[a : a + len(chunk)], n_kept[a : a + len(chunk)] = mask.counts(seqs)
    empty = np.flatnonzero(n_tok == 0)
    if empty.size:
        i = int(doc_ids[empty[0]])
        raise ValueError(
            f"text_col={text_col!r} row {i} ({texts.iloc[i]!r}): tokenises to no token; {empty.size} row(s) do"
        )
    if int(n_kept.sum()) == 0:
        raise ValueError(
            "no tokens left to store: every token is BOS or special "
            f"(cfg.max_len={cfg.max_len}, drop_bos={cfg.drop_bos}, drop_special={cfg.drop_special})"
        )
    order = np.lexsort((doc_ids, n_tok)) if cfg.sort_by_length else np.arange(doc_ids.size)
    order = order[n_kept[order] > 0]  # documents with nothing to store need no forward
    shards = plan_shards(n_kept[order], bytes_per_token, int(cfg.shard_size_mb * (1 << 20)))
    return _Plan(doc_ids, n_tok, n_kept, order, shards)


_OWN_NAME_RE = re.compile(
    r"^(manifest\.json|docs\.parquet|shard-\d{5}\.(json|safetensors|parquet))$"
)
_OWN_TMP_RE = re.compile(
    r"^\.tmp-(manifest\.json|docs\.parquet|shard-\d{5}\.(json|safetensors|parquet))-"
)
_PART_DIR_RE = re.compile(r"^part-\d{3}-of-\d{3}$")
_LEASE_RE = re.compile(r"^(\.tmp-)?\.lease\.json")


def _listing(out_dir: str, storage_options) -> tuple[dict[str, int], set[str]]:
    """``({file name: size}, {directory name})`` directly under ``out_dir`` (empty if it
    does not exist)."""
    fs, path = storage.get_fs(out_dir, storage_options)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}, set()
    files: dict[str, int] = {}
    dirs: set[str] = set()
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") == "file":
            files[name] = int(e.get("size") or 0)
        elif e.get("type") == "directory" and name:
            dirs.add(name)
    return files, dirs


def _own_listing(out_dir: str, storage_options, part_dirs: Sequence[str] = ()) -> dict[str, int]:
    """The files under ``out_dir``, after checking that every entry is one a dump writes.

    A folder holding anything else (a user's files, another kind of output) is refused
    before anything is written or removed: a dump never mixes with data it did not write.
    """
    if storage.is_local(out_dir):
        _, path = storage.get_fs(out_dir, storage_options)
        if os.path.exists(path) and not os.path.isdir(path):
            raise FileExistsError(f"out_dir={out_dir!r} is a file: expected a directory")
    files, dirs = _listing(out_dir, storage_options)
    # the lease of a partition writer (lease.py) sits next to its shards while it writes
    files = {n: v for n, v in files.items() if not _LEASE_RE.match(n)}
    foreign = sorted(n for n in files if not (_OWN_NAME_RE.match(n) or _OWN_TMP_RE.match(n)))
    foreign += sorted(f"{d}/" for d in dirs if not (_PART_DIR_RE.match(d) or d in part_dirs))
    if not foreign and storage.MANIFEST_NAME in files:
        try:
            m = storage.read_manifest(out_dir, storage_options)
        except ValueError:
            m = {}
        if m.get("kind") != "activations" or "identity" not in m:
            foreign = [f"{storage.MANIFEST_NAME} of a {m.get('kind')!r} output"]
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise FileExistsError(
            f"out_dir={out_dir!r} holds files an activation dump did not write ({shown}); "
            "choose a new or empty directory (nothing was changed)"
        )
    return files


def _remove_named(out_dir: str, names, storage_options) -> None:
    """Remove files of a dump by name (never a folder, never a name a dump does not write)."""
    for name in names:
        base = name.split("/")[-1]
        head = name[: -len(base)].rstrip("/")
        if not (_OWN_NAME_RE.match(base) or _OWN_TMP_RE.match(base)) or (
            head and not _PART_DIR_RE.match(head)
        ):
            continue
        uri = storage.join(out_dir, *name.split("/"))
        if storage.exists(uri, storage_options):
            storage.remove(uri, storage_options, recursive=False)


def _unpublish(out_dir: str, manifest: Mapping[str, Any], storage_options) -> None:
    """Remove an earlier dump of ours from ``out_dir``: its manifest first (readers stop
    trusting it), then the files it lists and its parts' files, each by name."""
    _remove_named(out_dir, [storage.MANIFEST_NAME], storage_options)
    _remove_named(out_dir, list(manifest.get("files") or {}), storage_options)
    for rel in manifest.get("parts") or []:
        if isinstance(rel, str) and _PART_DIR_RE.match(rel):
            part = storage.join(out_dir, rel)
            files, _ = _listing(part, storage_options)
            _remove_named(part, sorted(files), storage_options)


def _intact(
    out_dir: str,
    files: Mapping[str, Mapping[str, Any]],
    listing: Mapping[str, int],
    storage_options,
) -> bool:
    """True when every file of a shard record is there with its size and SHA-256."""
    if any(listing.get(name) != entry["size"] for name, entry in files.items()):
        return False
    return files_intact(out_dir, files, storage_options)


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
    otherwise): ``cfg.dtype`` activations ``[n_tokens, d_model]`` per hook point, and token
    metadata aligned row by row. ``label_names`` fixes the label mapping (default: the sorted
    distinct labels). ``partition=(i, n)`` dumps only documents whose id ``% n == i``; combine
    the parts with :func:`combine_dumps`. ``on_progress(done_tokens, total_tokens)`` is called
    after every batch.

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
    if label_names is not None:
        names = [str(n) for n in label_names]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"label_names={list(label_names)!r}: expected distinct names")
    else:
        names = label_mapping(df[label_col]) if label_col else ["unlabelled"]
    label_ids = (
        encode_labels(df[label_col], names) if label_col else np.zeros(len(df), dtype=np.int32)
    )
    hook_points = backend.hook_points(cfg.resolved_hook_points())
    seen: set[str] = set()
    dupes = [h.name for h in hook_points if h.name in seen or seen.add(h.name)]
    if dupes:
        raise ValueError(
            f"cfg.hook_points={cfg.resolved_hook_points()!r}: {dupes} named more than once"
        )
    out_dir = os.fspath(out_dir)
    tok = backend.tokenizer
    mask = TokenMask(tok, cfg)
    out_dtype = TORCH_DTYPES[cfg.dtype]
    d_model = int(backend.d_model)
    bytes_per_token = d_model * out_dtype.itemsize * len(hook_points)
    plan = _plan(df, text_col, tok, mask, cfg, partition, bytes_per_token)
    biggest = max(plan.shard_tokens(s) for s in range(len(plan.shards)))
    # two shards in memory (one computed, one being written), each with its float64 norms
    check_memory(
        2 * biggest * (bytes_per_token + 8 * len(hook_points)),
        "cpu",
        f"cfg.shard_size_mb={cfg.shard_size_mb} (shards of up to {biggest} tokens x "
        f"{len(hook_points)} hook point(s) x d_model={d_model} in {cfg.dtype})",
    )

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
        ).encode()
    )
    shard_ids = [
        storage.sha256_bytes(
            f"{identity}:{s}:{','.join(map(str, plan.shard_docs(s).tolist()))}".encode()
        )
        for s in range(len(plan.shards))
    ]

    # -- what is already there ---------------------------------------------------------------
    listing = _own_listing(out_dir, storage_options)
    if storage.MANIFEST_NAME in listing:
        existing = storage.read_manifest(out_dir, storage_options)
        if existing.get("identity") == identity:
            if verify_dump(out_dir, storage_options):
                log.info("dump at %s is complete and verified; reusing it", out_dir)
                return ActivationStore(out_dir, storage_options)
            log.warning("dump at %s is damaged; recomputing its damaged shards", out_dir)
            # same dump, damaged: unpublish it, then recompute what is missing
            _remove_named(out_dir, [storage.MANIFEST_NAME], storage_options)
            listing.pop(storage.MANIFEST_NAME)
        elif not overwrite:
            raise FileExistsError(
                f"out_dir={out_dir!r} already holds a different dump; pass overwrite=True or choose another directory"
            )
        else:
            # overwrite replaces our own earlier dump, file by file; nothing else is touched
            _unpublish(out_dir, existing, storage_options)
            listing = _own_listing(out_dir, storage_options)
    tmp = [n for n in listing if _OWN_TMP_RE.match(n)]
    # temporary files of writes that a crash interrupted: never published, never read
    _remove_named(out_dir, tmp, storage_options)
    for name in tmp:
        listing.pop(name)
    records: list[dict[str, Any] | None] = [None] * len(plan.shards)
    foreign = []
    for name in listing:
        m = _SHARD_RE.match(name)
        if not m:
            continue
        s = int(m.group(1))
        try:
            rec = storage.read_json(storage.join(out_dir, name), storage_options)
        except ValueError:
            rec = {}
        if s >= len(plan.shards) or rec.get("shard_id") != shard_ids[s]:
            foreign.append(name)
        elif _intact(out_dir, rec["files"], listing, storage_options):
            records[s] = rec
        else:
            log.warning("%s: shard %d is damaged; recomputing it", out_dir, s)
    if foreign:
        if not overwrite:
            raise FileExistsError(
                f"out_dir={out_dir!r} holds shards of a different dump ({foreign[0]}); pass overwrite=True or choose another directory"
            )
        # shards of an earlier dump of ours: removed by name, shard by shard
        stems = [n.removesuffix(".json") for n in foreign]
        _remove_named(
            out_dir,
            [f"{st}.{ext}" for st in stems for ext in ("json", "safetensors", "parquet")],
            storage_options,
        )

    # -- compute the missing shards ----------------------------------------------------------
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
    texts = df[text_col]
    pad_id = pad_token_id(tok)
    bar = Reporter(
        f"dump {','.join(h.name for h in hook_points)}",
        on_progress,
        unit="tok",
        total=total,
        initial=done,
        show=progress,
    ).__enter__()  # left in the finally below, with the writer
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="isup-shard-writer")
    pending: tuple[int, Future] | None = None
    try:
        for s in todo:
            docs = plan.shard_docs(s)
            n_s = plan.shard_tokens(s)
            acts = {h.name: torch.empty((n_s, d_model), dtype=out_dtype) for h in hook_points}
            norms = {h.name: np.empty(n_s, dtype=np.float64) for h in hook_points}
            meta = {
                "token_id": np.empty(n_s, dtype=np.int32),
                "doc_id": np.empty(n_s, dtype=np.int64),
                "position": np.empty(n_s, dtype=np.int32),
                "label": np.empty(n_s, dtype=np.int32),
            }
            pos = 0
            for a in range(0, docs.size, cfg.batch_size):
                batch_docs = docs[a : a + cfg.batch_size]
                seqs = tokenize_texts(
                    tok, texts.iloc[batch_docs].tolist(), cfg.max_len, cfg.prepend_bos
                )
                batch = pad_batch(seqs, pad_id, "right")
                keep = mask.batch(batch.input_ids, batch.lengths)
                n = int(keep.sum())
                if pos + n > n_s:
                    raise RuntimeError(
                        "the tokenizer produced different tokens than when the dump was planned"
                    )
                out = backend.capture(batch.input_ids, batch.attention_mask, hook_points)
                for h in hook_points:
                    x = out[h.name]
                    dst = acts[h.name][pos : pos + n]
                    dst.copy_(x[keep.to(x.device)])
                    nrm = dst.float().norm(dim=-1)
                    norms[h.name][pos : pos + n] = nrm.numpy()
                    if not bool(torch.isfinite(nrm).all()):  # NaN/inf, or a huge finite row
                        _check_finite_batch(dst, x, keep, batch_docs, h.name, cfg.dtype)
                rows, cols = keep.nonzero(as_tuple=True)
                meta["token_id"][pos : pos + n] = batch.input_ids[rows, cols].numpy()
                meta["doc_id"][pos : pos + n] = batch_docs[rows.numpy()]
                meta["position"][pos : pos + n] = cols.numpy()
                meta["label"][pos : pos + n] = label_ids[meta["doc_id"][pos : pos + n]]
                pos += n
                done += n
                bar.update(done, total, phase=f"shard {s + 1}/{len(plan.shards)}")
            if pos != n_s:
                raise RuntimeError(
                    "the tokenizer produced different tokens than when the dump was planned"
                )
            if pending is not None:
                records[pending[0]] = pending[1].result()
            pending = (
                s,
                writer.submit(
                    _write_shard, out_dir, s, shard_ids[s], acts, meta, norms, storage_options
                ),
            )
        if pending is not None:
            records[pending[0]] = pending[1].result()
            pending = None
    finally:
        # a shard already handed to the writer is finished (or fails) before we return
        writer.shutdown(wait=True)
        bar.__exit__(*sys.exc_info())

    # -- publish -----------------------------------------------------------------------------
    complete: list[dict[str, Any]] = [r for r in records if r is not None]
    assert len(complete) == len(plan.shards)
    files: dict[str, dict[str, Any]] = {}
    for rec in complete:
        files.update(rec["files"])
    doc_df = pd.DataFrame(
        {
            "doc_id": plan.doc_ids,
            "text": texts.iloc[plan.doc_ids].tolist(),
            "label_name": np.asarray(names, dtype=object)[label_ids[plan.doc_ids]],
            "n_tokens": plan.n_kept,
            "seq_len": plan.n_tok,
        }
    )
    docs_bytes = _parquet_bytes(pa.Table.from_pandas(doc_df, preserve_index=False))
    storage.write_bytes(storage.join(out_dir, "docs.parquet"), docs_bytes, storage_options)
    files["docs.parquet"] = storage.file_entry("", docs_bytes)
    norm_stats = {}
    for h in hook_points:
        norm_stats[h.name] = _norm_stats([r["norms"][h.name] for r in complete])
    counts = np.bincount(label_ids[plan.doc_ids], minlength=len(names))
    storage.write_manifest(
        out_dir,
        "activations",
        cfg,
        files,
        storage_options,
        identity=identity,
        dump_format=DUMP_FORMAT,
        model=model_info,
        tokenizer=model_info["tokenizer"],
        hook_points=hook_info,
        d_model=d_model,
        dtype=cfg.dtype,
        n_tokens=int(sum(r["n_tokens"] for r in complete)),
        n_docs=int(plan.doc_ids.size),
        doc_id_end=len(df),
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
            for r in complete
        ],
        dataset={
            "fingerprint": fingerprint,
            "text_col": text_col,
            "label_col": label_col,
            "n_rows": len(df),
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
            "special_token_ids": mask.specials.tolist(),
            "bos_token_id": tok.bos_token_id,
            "prepend_bos": cfg.prepend_bos,
            "max_len": cfg.max_len,
            "tokens_before_masking": int(plan.n_tok.sum()),
            "tokens_kept": int(plan.n_kept.sum()),
        },
        norm_stats=norm_stats,
        partition=list(partition) if partition else None,
    )
    return ActivationStore(out_dir, storage_options)


def _check_finite_batch(
    dst: torch.Tensor,
    x: torch.Tensor,
    keep: torch.Tensor,
    batch_docs: np.ndarray,
    hook: str,
    dtype: str,
) -> None:
    """``NonFiniteActivationsError`` naming the document, position and cause when the stored
    rows ``dst`` ``[n, d]`` of a batch (model output ``x`` ``[B, T, d]``) hold NaN or inf."""
    bad = first_non_finite(dst)
    if bad is None:
        return
    r, c = bad
    rows, cols = keep.nonzero(as_tuple=True)
    doc, position = int(batch_docs[int(rows[r])]), int(cols[r])
    value = float(x[int(rows[r]), int(cols[r]), c])
    where = f"hook point {hook!r}, document {doc} (row {doc} of the dataset), token position {position}, column {c}"
    if math.isfinite(value):
        raise NonFiniteActivationsError(
            f"activations overflow cfg.dtype={dtype!r} at {where}: the model's value {value:.4g} "
            "becomes inf when stored; dump with dtype='fp32' (or 'bf16')"
        )
    raise NonFiniteActivationsError(
        f"the model produced NaN or inf activations at {where} (value {value}); check the "
        "model's weights and its compute dtype (fp16 overflows easily)"
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
    _own_listing(out_dir, storage_options, {rel.split("/")[0] for rel in rels})
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
    parts_idx = [tuple(m.get("partition") or ()) for m in manifests]
    if len(set(parts_idx)) != len(parts_idx):
        raise ValueError(f"part_dirs={part_dirs!r}: two parts hold the same partition")
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
