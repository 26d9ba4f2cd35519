"""A store's token metadata, read from its dumps' token tables and document tables, and the
document-level train/test split every consumer of a store shares."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from integral_superposition.dump.shards import ShardRef

__all__ = ["SPLITS", "doc_uniform", "read_docs", "read_token_table", "split_rows"]

SPLITS = ("train", "test", "all")
"""The splits of a store: its training documents, its held-out documents, or all."""

ReadFile = Callable[[int, str], bytes]
"""``read_file(store_index, name)``: a checked file of the store's ``store_index``-th dump."""


def read_token_table(
    manifests: Sequence[Mapping[str, Any]],
    shards: Sequence[ShardRef],
    label_names: Sequence[str],
    read_file: ReadFile,
) -> dict[str, np.ndarray]:
    """The aligned per-row arrays of a store over ``manifests`` (one per dump, in order):
    ``token_id`` ``int32[n]``, ``doc_id`` ``int64[n]`` (later dumps' ids offset by the
    earlier dumps' ``doc_id_end``), ``position`` ``int32[n]`` and ``label`` ``int32[n]``
    (indices into ``label_names``, mapped by name)."""
    cols: dict[str, list[np.ndarray]] = {"token_id": [], "doc_id": [], "position": [], "label": []}
    doc_offset, store_index = 0, -1
    label_maps = [
        np.array([list(label_names).index(n) for n in m["labels"]["names"]], dtype=np.int32)
        for m in manifests
    ]
    for shard in shards:
        if shard.store_index != store_index:
            if store_index >= 0:
                doc_offset += int(manifests[store_index]["doc_id_end"])
            store_index = shard.store_index
        t = pq.read_table(io.BytesIO(read_file(shard.store_index, shard.tokens)))
        cols["token_id"].append(t.column("token_id").to_numpy().astype(np.int32))
        cols["doc_id"].append(t.column("doc_id").to_numpy().astype(np.int64) + doc_offset)
        cols["position"].append(t.column("position").to_numpy().astype(np.int32))
        cols["label"].append(label_maps[store_index][t.column("label").to_numpy()])
    return {k: (np.concatenate(v) if v else np.zeros(0, dtype=np.int64)) for k, v in cols.items()}


def read_docs(
    manifests: Sequence[Mapping[str, Any]], label_names: Sequence[str], read_file: ReadFile
) -> pd.DataFrame:
    """One row per document of the store: ``doc_id`` (offset as in
    :func:`read_token_table`), ``text``, ``label`` (index into ``label_names``),
    ``label_name``, ``n_tokens``."""
    frames = []
    doc_offset = 0
    for i, m in enumerate(manifests):
        df = pd.read_parquet(io.BytesIO(read_file(i, m["docs_file"])))
        df["doc_id"] = df["doc_id"].astype(np.int64) + doc_offset
        df["label"] = [list(label_names).index(n) for n in df["label_name"]]
        frames.append(df)
        doc_offset += int(m["doc_id_end"])
    return pd.concat(frames, ignore_index=True)


def doc_uniform(doc_ids: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic pseudo-uniform number in [0, 1) per document id (splitmix64)."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        z = doc_ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_rows(
    doc_ids: np.ndarray, split: str = "train", test_fraction: float = 0.05, seed: int = 0
) -> np.ndarray:
    """Boolean row mask ``[n]`` of a document-level split of rows with ``doc_ids`` ``[n]``:
    a document is held out (``test``) when its :func:`doc_uniform` number is below
    ``test_fraction``, so every row of a document lands on the same side, whatever the
    store's order or partitioning."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected 'train', 'test' or 'all'")
    if split == "all":
        return np.ones(len(doc_ids), dtype=bool)
    if not 0 < test_fraction < 1:
        raise ValueError(
            f"test_fraction={test_fraction}: expected a fraction strictly between 0 and 1"
        )
    is_test = doc_uniform(doc_ids, seed) < test_fraction
    return is_test if split == "test" else ~is_test
