"""Forward capture: tokenised batches of documents -> activation rows of the stored tokens.

:func:`capture_batches` is the one loop that runs the model over documents, for a dump (which
writes the rows to shards) and for online SAE training (which shuffles them into batches).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from integral_superposition.config import DumpConfig
from integral_superposition.data.tokenize import pad_batch, pad_token_id, tokenize_texts
from integral_superposition.dump.plan import TokenMask
from integral_superposition.dump.shards import NonFiniteActivationsError, first_non_finite


@dataclass
class CapturedBatch:
    """The stored tokens of one forward batch, row-aligned across fields."""

    acts: dict[str, torch.Tensor]
    """``{hook point: [n, d_model]}`` in the model's compute dtype, on the model's device."""
    token_id: np.ndarray
    """``int32[n]``"""
    doc_id: np.ndarray
    """``int64[n]``: row numbers of the dataset."""
    position: np.ndarray
    """``int32[n]``: token position inside its document (BOS at 0)."""

    def __len__(self) -> int:
        return int(self.doc_id.size)


def capture_batches(
    backend,
    texts: pd.Series,
    doc_ids: np.ndarray,
    cfg: DumpConfig,
    hook_points: Sequence,
    mask: TokenMask | None = None,
) -> Iterator[CapturedBatch]:
    """Run the model over the documents ``doc_ids`` (row numbers of ``texts``, in this order)
    in batches of ``cfg.batch_size`` texts, tokenised as ``cfg`` says (``max_len``,
    ``prepend_bos``), and yield the activations of the stored tokens (``mask``: no padding,
    BOS/special tokens dropped unless ``cfg`` keeps them) at ``hook_points`` (the backend's
    resolved hook points)."""
    tok = backend.tokenizer
    mask = mask or TokenMask(tok, cfg)
    pad_id = pad_token_id(tok)
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    for a in range(0, doc_ids.size, cfg.batch_size):
        batch_docs = doc_ids[a : a + cfg.batch_size]
        seqs = tokenize_texts(tok, texts.iloc[batch_docs].tolist(), cfg.max_len, cfg.prepend_bos)
        batch = pad_batch(seqs, pad_id, "right")
        keep = mask.batch(batch.input_ids, batch.lengths)
        out = backend.capture(batch.input_ids, batch.attention_mask, hook_points)
        acts = {}
        for h in hook_points:
            x = out[h.name]
            acts[h.name] = x[keep.to(x.device)]
        rows, cols = keep.nonzero(as_tuple=True)
        yield CapturedBatch(
            acts=acts,
            token_id=batch.input_ids[rows, cols].numpy().astype(np.int32),
            doc_id=batch_docs[rows.numpy()],
            position=cols.numpy().astype(np.int32),
        )


def check_finite_rows(
    stored: torch.Tensor, batch: CapturedBatch, hook: str, dtype: str | None = None
) -> None:
    """``NonFiniteActivationsError`` naming the document, position and cause when ``stored``
    (the rows of ``batch`` at ``hook`` as kept, ``[n, d]``, e.g. converted to a storage
    ``dtype``) holds NaN or inf."""
    bad = first_non_finite(stored)
    if bad is None:
        return
    r, c = bad
    doc, position = int(batch.doc_id[r]), int(batch.position[r])
    value = float(batch.acts[hook][r, c])
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
