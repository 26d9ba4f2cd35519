"""Which tokens of which documents a dump stores, and how they are cut into shards.

Planning needs only the tokenizer: every document is tokenised once (in bounded chunks) to
count the tokens fed to the model and the tokens stored, before any forward pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from integral_superposition.config import DumpConfig
from integral_superposition.data.tokenize import special_ids, tokenize_texts


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


def select_documents(n_rows: int, partition: tuple[int, int] | None) -> np.ndarray:
    """Row numbers ``int64[n]`` of the documents a dump covers: all, or those whose id
    ``% count == index`` for ``partition=(index, count)``."""
    doc_ids = np.arange(n_rows, dtype=np.int64)
    if partition is None:
        return doc_ids
    doc_ids = doc_ids[doc_ids % partition[1] == partition[0]]
    if doc_ids.size == 0:
        raise ValueError(
            f"partition={tuple(partition)!r}: selects no document of a dataset with {n_rows} rows"
        )
    return doc_ids


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
class DumpPlan:
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


def count_tokens(
    texts: pd.Series, doc_ids: np.ndarray, tok, mask: TokenMask, cfg: DumpConfig
) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens fed to the model, tokens stored)`` of each document ``doc_ids``, ``int64[n]``
    each; tokenised in chunks of 8192 texts so that memory stays bounded."""
    n_tok = np.zeros(doc_ids.size, dtype=np.int64)
    n_kept = np.zeros(doc_ids.size, dtype=np.int64)
    step = 8192
    for a in range(0, doc_ids.size, step):
        chunk = doc_ids[a : a + step]
        seqs = tokenize_texts(tok, texts.iloc[chunk].tolist(), cfg.max_len, cfg.prepend_bos)
        n_tok[a : a + len(chunk)], n_kept[a : a + len(chunk)] = mask.counts(seqs)
    return n_tok, n_kept


def forward_order(doc_ids: np.ndarray, n_tok: np.ndarray, n_kept: np.ndarray, cfg: DumpConfig):
    """Indices ``int64[m]`` into ``doc_ids`` in forward order: by length (stable on doc id)
    when ``cfg.sort_by_length``, leaving out documents with nothing to store."""
    order = np.lexsort((doc_ids, n_tok)) if cfg.sort_by_length else np.arange(doc_ids.size)
    return order[n_kept[order] > 0]


def plan_documents(
    df: pd.DataFrame,
    text_col: str,
    tok,
    mask: TokenMask,
    cfg: DumpConfig,
    doc_ids: np.ndarray,
    bytes_per_token: int,
) -> DumpPlan:
    """Count the tokens of the documents ``doc_ids`` (row numbers of ``df``) and cut them, in
    forward order, into shards of about ``cfg.shard_size_mb``."""
    texts = df[text_col]
    n_tok, n_kept = count_tokens(texts, doc_ids, tok, mask, cfg)
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
    order = forward_order(doc_ids, n_tok, n_kept, cfg)
    shards = plan_shards(n_kept[order], bytes_per_token, int(cfg.shard_size_mb * (1 << 20)))
    return DumpPlan(doc_ids, n_tok, n_kept, order, shards)
