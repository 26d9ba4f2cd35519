"""Publish an activation store from in-memory tensors (synthetic data, tests, imports).

The result is an ordinary dump directory (safetensors shards, Parquet token tables,
``docs.parquet``, ``manifest.json`` written last) that :class:`ActivationStore` reads like one
written by :func:`~integral_superposition.dump.dump_layer_activations`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from integral_superposition import storage
from integral_superposition.dump.layout import own_listing, remove_named
from integral_superposition.dump.shards import TORCH_DTYPES
from integral_superposition.dump.store import ActivationStore
from integral_superposition.dump.writer import _norm_stats, _parquet_bytes, _write_shard


def write_activation_store(
    acts: torch.Tensor | Mapping[str, torch.Tensor],
    out_dir: str,
    *,
    doc_ids: np.ndarray | Sequence[int] | None = None,
    token_ids: np.ndarray | Sequence[int] | None = None,
    labels: np.ndarray | Sequence[int] | None = None,
    label_names: Sequence[str] | None = None,
    tokens_per_doc: int = 32,
    rows_per_shard: int = 65536,
    dtype: str = "fp32",
    model_name: str = "synthetic",
    model_info: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ActivationStore:
    """Publish ``acts`` (``[n, d]``, or ``{hook name: [n, d]}``) as an activation store.

    ``doc_ids`` (``int[n]``; each document's rows contiguous) group rows into documents; by default every
    ``tokens_per_doc`` consecutive rows form one. ``token_ids`` default to 0, ``labels``
    (per row, constant within a document) to 0 with ``label_names`` ``["unlabelled"]``.
    ``model_info`` adds fields to the manifest's ``model`` entry (as a backend's ``describe()``).
    A single tensor is stored under the hook point ``"layer.0"``. A folder holding files a
    dump does not write is refused (``FileExistsError``); an earlier store there is replaced. Values are stored as given
    (NaN included), so the store can also exercise error handling downstream.
    """
    if isinstance(acts, torch.Tensor):
        acts = {"layer.0": acts}
    if not isinstance(acts, Mapping) or not acts:
        raise TypeError("acts: expected a [n, d] tensor or a non-empty {hook name: [n, d]} dict")
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(TORCH_DTYPES)}")
    shapes = {k: tuple(v.shape) for k, v in acts.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"acts: expected [n, d] tensors of one shape, got {shapes}")
    n, d = first
    if d == 0:
        raise ValueError(f"acts has shape {first}: expected at least one column")
    if rows_per_shard < 1 or tokens_per_doc < 1:
        raise ValueError("rows_per_shard and tokens_per_doc must be positive")
    doc = (
        np.arange(n, dtype=np.int64) // tokens_per_doc
        if doc_ids is None
        else np.asarray(doc_ids, dtype=np.int64)
    )
    if doc.shape != (n,) or (n and doc.min() < 0):
        raise ValueError(f"doc_ids: expected {n} non-negative ids, got shape {doc.shape}")
    starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
    if n and np.unique(doc[starts]).size != starts.size:  # dumps order docs by length, not id
        raise ValueError("doc_ids: the rows of each document must be contiguous")
    tok = np.zeros(n, np.int32) if token_ids is None else np.asarray(token_ids, np.int32)
    lab = np.zeros(n, np.int32) if labels is None else np.asarray(labels, np.int32)
    names = list(label_names) if label_names is not None else None
    if names is None:
        names = (
            [str(i) for i in range(int(lab.max()) + 1)]
            if labels is not None and n
            else ["unlabelled"]
        )
    if tok.shape != (n,) or lab.shape != (n,):
        raise ValueError(f"token_ids and labels: expected {n} values each")
    if n and (lab.min() < 0 or lab.max() >= len(names)):
        raise ValueError(f"labels: expected ids in [0, {len(names)})")
    position = (np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))).astype(np.int32)

    out_dir = os.fspath(out_dir)
    # a folder holding anything a dump does not write is refused before anything changes;
    # an earlier store there is replaced: its manifest goes first, then its files, by name
    earlier = own_listing(out_dir, storage_options)
    if earlier:
        remove_named(out_dir, [storage.MANIFEST_NAME], storage_options)
        remove_named(out_dir, sorted(earlier), storage_options)
    tdtype = TORCH_DTYPES[dtype]
    files: dict[str, dict[str, Any]] = {}
    shards = []
    # shards end on document boundaries, like real dumps
    cut = [0]
    while cut[-1] < n:  # no shard at all for an empty store
        end = min(n, cut[-1] + rows_per_shard)
        if end < n:
            later = starts[starts >= end]
            end = int(later[0]) if later.size else n
        cut.append(end)
    records = []
    for s, (a, b) in enumerate(itertools.pairwise(cut)):
        chunk = {k: v[a:b].detach().to("cpu", tdtype).contiguous() for k, v in acts.items()}
        meta = {
            "token_id": tok[a:b],
            "doc_id": doc[a:b],
            "position": position[a:b],
            "label": lab[a:b],
        }
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf rows: NaN/inf statistics
            norms = {k: v.double().norm(dim=-1).numpy() for k, v in chunk.items()}
            rec = _write_shard(
                out_dir, s, f"synthetic-{s:05d}", chunk, meta, norms, storage_options
            )
        records.append(rec)
        files.update(rec["files"])
        shards.append(
            {
                "tensors": rec["tensors"],
                "tokens": rec["tokens"],
                "n_tokens": rec["n_tokens"],
                "n_docs": rec["n_docs"],
                **rec["files"][rec["tensors"]],
            }
        )
    uniq, first_row, counts = np.unique(doc, return_index=True, return_counts=True)
    docs = pd.DataFrame(
        {
            "doc_id": uniq,
            "text": [f"{model_name} document {i}" for i in uniq],
            "label_name": np.asarray(names, dtype=object)[lab[first_row]],
            "n_tokens": counts,
            "seq_len": counts,
        }
    )
    dbytes = _parquet_bytes(pa.Table.from_pandas(docs, preserve_index=False))
    storage.write_bytes(storage.join(out_dir, "docs.parquet"), dbytes, storage_options)
    files["docs.parquet"] = storage.file_entry("", dbytes)
    data_hash = storage.sha256_bytes("|".join(files[f]["sha256"] for f in sorted(files)).encode())
    hooks = [
        {
            "name": k,
            "layer": int(k.split(".")[1]) if k.startswith("layer.") and k[6:].isdigit() else None,
            "module_path": k,
            "saelens_name": f"blocks.{k[6:]}.hook_resid_pre" if k.startswith("layer.") else k,
        }
        for k in acts
    ]
    model = {
        "model_id": model_name,
        "fingerprint": f"synthetic:{data_hash}",
        "tokenizer": {"fingerprint": None},
        **dict(model_info or {}),
    }
    storage.write_manifest(
        out_dir,
        "activations",
        {"synthetic": True, "dtype": dtype, "rows_per_shard": rows_per_shard},
        files,
        storage_options,
        identity=data_hash,
        dump_format=None,
        model=model,
        tokenizer=model["tokenizer"],
        hook_points=hooks,
        d_model=int(d),
        dtype=dtype,
        n_tokens=int(n),
        n_docs=int(uniq.size),
        doc_id_end=int(doc.max()) + 1 if n else 0,
        docs_file="docs.parquet",
        shards=shards,
        dataset={"fingerprint": data_hash, "text_col": None, "label_col": None, "n_rows": n},
        labels={
            "names": names,
            "mapping": {nm: i for i, nm in enumerate(names)},
            "doc_counts": {
                nm: int(c)
                for nm, c in zip(
                    names, np.bincount(lab[first_row], minlength=len(names)), strict=True
                )
            },
        },
        masking={"drop_pad": True, "drop_bos": True, "drop_special": True},
        norm_stats={k: _norm_stats([r["norms"][k] for r in records]) for k in acts},
        partition=None,
    )
    return ActivationStore(out_dir, storage_options)


def sparse_dictionary_activations(
    n: int,
    d: int,
    n_features: int,
    active: float = 3.0,
    *,
    offset: float = 0.0,
    scale: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations built from a known sparse dictionary: ``(acts [n, d], features [F, d])``.

    Each token activates every one of the ``n_features`` unit-norm features independently with
    probability ``active / n_features``, with a magnitude uniform in ``[0.5, 1.5]``;
    ``acts = scale * (codes @ features + offset)``. An SAE trained on them should recover the
    features (mean over features of the best decoder-row cosine close to 1).
    """
    if n < 1 or d < 1 or n_features < 1 or not 0 < active <= n_features:
        raise ValueError(
            f"n={n}, d={d}, n_features={n_features}, active={active}: expected positive sizes "
            "and 0 < active <= n_features"
        )
    # a stream of its own: SparseAutoencoder(seed=0) draws its decoder from manual_seed(0),
    # and a dictionary equal to the initial decoder would make recovery trivial
    g = torch.Generator().manual_seed(1_000_003 + seed)
    feats = torch.randn(n_features, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    on = torch.rand(n, n_features, generator=g) < active / n_features
    codes = (torch.rand(n, n_features, generator=g) + 0.5) * on
    return scale * (codes @ feats + offset), feats
