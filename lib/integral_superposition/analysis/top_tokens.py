"""Top activating tokens per latent, quantile samples, and their decoded context windows.

``topk_sets_per_latent(sae, act_files, device)`` keeps the seed's call: ``act_files`` may be
an :class:`~integral_superposition.dump.ActivationStore`, a store URI (or list), the seed's
``.npy`` shards or an ``[N, d]`` array. One pass keeps a running ``[K, n]`` buffer per latent
(memory O(K x n)): only entries above a latent's current ``n``-th best value are merged in,
see :mod:`integral_superposition.analysis.select`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from integral_superposition import compute
from integral_superposition.activations import _load_npy, as_activation_source
from integral_superposition.analysis.scan import TopKSets, scan_latents
from integral_superposition.progress import ProgressFn
from integral_superposition.sae.encode import (
    Codes,
    check_sae_source,
    default_chunk_tokens,
    encode_chunks,
    encode_device,
    sae_on,
)
from integral_superposition.sae.model import SparseAutoencoder

log = logging.getLogger(__name__)

__all__ = [
    "Examples",
    "TopKSets",
    "collect_examples",
    "context_windows",
    "decode_tokens",
    "tokenizer_for",
    "top1_tokens_for_latents",
    "topk_sets_per_latent",
    "window_activations",
]


def topk_sets_per_latent(
    sae: SparseAutoencoder,
    act_files: Any,
    device: str | torch.device | None = None,
    k: int = 200,
    batch: int | None = None,
    *,
    n_bands: int = 0,
    per_band: int = 5,
    mask: np.ndarray | None = None,
    encode_dtype: str | torch.dtype = "float32",
    storage_options: Mapping[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
) -> TopKSets:
    """The ``k`` top-activating tokens of every latent: values, rows, token ids, doc ids, positions.

    ``k`` is the number of examples per latent (the seed's name), ``batch`` the chunk size in
    tokens (default: about 64 MiB of latents per chunk). ``n_bands > 0`` adds ``per_band``
    quantile samples from each of ``n_bands`` equal-count bands of the firing activations.
    The result is a :class:`TopKSets`; ``result[j]`` is latent ``j``'s set of row ids, as in
    the seed. ``encode_dtype="bfloat16"`` runs the encoder matmul in bf16 (faster on CPUs with
    AVX512-BF16/AMX and on GPUs; near-equal activations can swap ranks).
    """
    return scan_latents(
        sae,
        act_files,
        n_top=k,
        n_bands=n_bands,
        per_band=per_band,
        stats=False,
        mask=mask,
        chunk_tokens=batch,
        device=device,
        encode_dtype=encode_dtype,
        storage_options=storage_options,
        on_progress=on_progress,
    ).top


@torch.no_grad()
def top1_tokens_for_latents(
    sae: SparseAutoencoder,
    medoids: np.ndarray | Sequence[int],
    act_files: Any,
    tok_files: Any = None,
    device: str | torch.device | None = None,
    batch: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The single most activating token of each latent in ``medoids``: ``(token ids [M], values [M])``.

    ``tok_files`` (the seed's token shards) is only needed for ``.npy`` activations; a store
    knows its token ids. Token id -1 marks a latent that never fires.
    """
    src = as_activation_source(act_files)
    check_sae_source(sae, src)
    lat = np.asarray(medoids, dtype=np.int64)
    dev = encode_device(sae, device)
    token_ids = src.token_ids
    if token_ids is None:
        if tok_files is None:
            raise ValueError("tok_files: required when act_files are .npy shards without token ids")
        files = [tok_files] if isinstance(tok_files, str) else list(tok_files)
        token_ids = np.concatenate([np.asarray(_load_npy(f, None)).ravel() for f in files])
        if token_ids.size != src.n_tokens:
            raise ValueError(
                f"tok_files hold {token_ids.size} token ids, but act_files hold {src.n_tokens} rows"
            )
    best_v = torch.zeros(lat.size, device=dev)
    best_r = torch.full((lat.size,), -1, dtype=torch.long, device=dev)
    lat_t = torch.from_numpy(lat).to(dev)
    for rows, _x, z, _ in encode_chunks(sae, src, dev, chunk_tokens=batch):
        v, i = z[:, lat_t].max(0)
        better = v > best_v
        best_v = torch.where(better, v, best_v)
        best_r = torch.where(better, torch.from_numpy(rows).to(dev)[i], best_r)
    r = best_r.cpu().numpy()
    toks = np.where(r >= 0, np.asarray(token_ids)[np.maximum(r, 0)], -1)
    return toks.astype(np.int64), best_v.cpu().numpy()


# -- context windows ---------------------------------------------------------------------------
def context_windows(source: Any, rows: np.ndarray, left: int = 8, right: int = 4) -> np.ndarray:
    """Row ids of the window ``[row - left, row + right]`` around each row, ``int64 [M, left+right+1]``.

    Positions outside the row's document (or the store) are -1; so are windows of ``row == -1``.
    Sources without document ids (raw arrays) only bound windows by the array.
    """
    if left < 0 or right < 0:
        raise ValueError(f"left={left}, right={right}: expected non-negative window sizes")
    src = as_activation_source(source)
    rows = np.asarray(rows, dtype=np.int64)
    off = np.arange(-left, right + 1, dtype=np.int64)
    win = rows[..., None] + off
    ok = (rows[..., None] >= 0) & (win >= 0) & (win < src.n_tokens)
    doc_ids = getattr(src, "doc_ids", None)
    if doc_ids is not None:
        doc_ids = np.asarray(doc_ids)
        same = doc_ids[np.clip(win, 0, src.n_tokens - 1)] == doc_ids[np.maximum(rows, 0)][..., None]
        ok &= same
    return np.where(ok, win, -1)


@torch.no_grad()
def window_activations(
    sae: SparseAutoencoder,
    source: Any,
    window_rows: np.ndarray,
    latents: np.ndarray,
    device: str | torch.device | None = None,
    chunk_tokens: int | None = None,
    encode_dtype: str | torch.dtype = "float32",
) -> np.ndarray:
    """Activation of latent ``latents[m]`` on every row of ``window_rows[m]``: float32 ``[M, W]``.

    The distinct rows are encoded once, in chunks; -1 slots give 0.
    """
    src = as_activation_source(source)
    check_sae_source(sae, src)
    window_rows = np.asarray(window_rows, dtype=np.int64)
    lat = np.broadcast_to(np.asarray(latents, dtype=np.int64)[:, None], window_rows.shape)
    out = np.zeros(window_rows.shape, dtype=np.float32)
    ok = window_rows >= 0
    r, j = window_rows[ok], lat[ok]
    if r.size == 0:
        return out
    uniq, inv = np.unique(r, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    inv_sorted = inv[order]
    vals = np.empty(r.size, dtype=np.float32)
    dev = encode_device(sae, device)
    chunk = int(chunk_tokens or default_chunk_tokens(sae.d_sae))

    def gathered():
        for a in range(0, uniq.size, chunk):
            b = min(uniq.size, a + chunk)
            yield np.arange(a, b), src.gather(uniq[a:b])

    def place(a: int, b: int) -> np.ndarray:
        p0, p1 = np.searchsorted(inv_sorted, [a, b])
        return order[p0:p1]

    # A pair costs a gathered d-vector (memory-bound), a distinct row a full [K] encode
    # (compute-bound); measured on CPU the break-even is near pairs * 256 == rows * K.
    exact = compute.resolve_dtype(encode_dtype, dev, "encode_dtype", fp16=False) == torch.float32
    if r.size * 256 < uniq.size * sae.d_sae and exact:
        model = sae_on(sae, dev)
        for rows, x in gathered():
            sel = place(int(rows[0]), int(rows[-1]) + 1)
            zi = torch.from_numpy(inv[sel] - rows[0]).to(dev)
            zj = torch.from_numpy(j[sel]).to(dev)
            vals[sel] = _pair_activations(model, x.float().to(dev), zi, zj).float().cpu().numpy()
    else:
        for rows, _x, codes, _ in encode_chunks(sae, gathered(), dev, encode_dtype, sparse=True):
            sel = place(int(rows[0]), int(rows[-1]) + 1)
            vals[sel] = _lookup(codes, sae.d_sae, inv[sel] - rows[0], j[sel])
    out[ok] = vals
    return out


def _lookup(codes: Codes, K: int, rows: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """``z[rows, latents]`` from a chunk's active entries (0 where inactive), float32 ``[P]``."""
    q = rows.astype(np.int64) * K + latents
    key = (codes.t * K + codes.j).cpu().numpy()
    if key.size == 0:
        return np.zeros(q.size, dtype=np.float32)
    order = np.argsort(key)
    key = key[order]
    val = codes.v.float().cpu().numpy()[order]
    pos = np.minimum(np.searchsorted(key, q), key.size - 1)
    return np.where(key[pos] == q, val[pos], 0.0).astype(np.float32)


def _pair_activations(
    sae: SparseAutoencoder, x: torch.Tensor, rows: torch.Tensor, latents: torch.Tensor
) -> torch.Tensor:
    """``encode(x)[rows, latents]`` for ``P`` (row, latent) pairs, ``[P]``.

    Element-wise activations (ReLU, JumpReLU, BatchTopK at inference) need only one dot
    product per pair, ``P x d`` work instead of a full ``[n, K]`` encode; TopK (which ranks
    all latents of a row) and merged SAEs fall back to the full encode.
    """
    if sae.architecture in ("topk", "groupmax") or getattr(sae, "merge_index", None) is not None:
        return sae.encode(x)[rows, latents]
    out = torch.empty(rows.numel(), dtype=sae.W_enc.dtype, device=x.device)
    xc = x.to(sae.W_enc.dtype) - sae.b_dec
    w = sae.W_enc.T.contiguous()  # [K, d]: rows gather contiguously
    step = 1 << 15  # pairs per block: two [step, d] gathers
    for a in range(0, rows.numel(), step):
        r, j = rows[a : a + step], latents[a : a + step]
        pre = torch.einsum("pd,pd->p", xc[r], w[j]) + sae.b_enc[j]
        if sae.architecture == "relu":
            out[a : a + step] = torch.relu(pre)
        else:
            out[a : a + step] = pre * (pre > sae.threshold[j]).to(pre.dtype)
    return out


@dataclass
class Examples:
    """Example windows for ``M`` (latent, row) pairs: the top and quantile samples of each latent.

    ``kind`` is -1 for top examples and the band index (0 = lowest) for quantile samples.
    """

    latents: np.ndarray
    """int64 ``[M]``."""
    kind: np.ndarray
    """int8 ``[M]``: -1 top, else quantile band."""
    rank: np.ndarray
    """int16 ``[M]``: rank inside the top set or band."""
    rows: np.ndarray
    """int64 ``[M]`` the example's row."""
    values: np.ndarray
    """float32 ``[M]`` activation at the row."""
    window_rows: np.ndarray
    """int64 ``[M, W]`` rows of the context window (-1 outside the document)."""
    token_ids: np.ndarray
    """int64 ``[M, W]`` token ids of the window (-1 unknown/outside)."""
    acts: np.ndarray
    """float32 ``[M, W]`` the latent's activation on each window token."""
    center: int
    """Index of the example's own token in the window."""

    def __len__(self) -> int:
        return int(self.rows.size)


def collect_examples(
    sae: SparseAutoencoder,
    source: Any,
    top: TopKSets,
    left: int = 8,
    right: int = 4,
    device: str | torch.device | None = None,
    chunk_tokens: int | None = None,
    encode_dtype: str | torch.dtype = "float32",
) -> Examples:
    """Context windows and per-token activations for every filled top and quantile slot."""
    src = as_activation_source(source)
    K, n = top.rows.shape
    lat = [np.repeat(np.arange(K), n)]
    kind = [np.full(K * n, -1, dtype=np.int8)]
    rank = [np.tile(np.arange(n), K)]
    rows = [top.rows.ravel()]
    vals = [top.values.ravel()]
    if top.quantile_rows is not None:
        _, nb, pb = top.quantile_rows.shape
        lat.append(np.repeat(np.arange(K), nb * pb))
        kind.append(np.tile(np.repeat(np.arange(nb), pb), K).astype(np.int8))
        rank.append(np.tile(np.arange(pb), K * nb))
        rows.append(top.quantile_rows.ravel())
        vals.append(top.quantile_values.ravel())
    lat_a, kind_a, rank_a = np.concatenate(lat), np.concatenate(kind), np.concatenate(rank)
    rows_a, vals_a = np.concatenate(rows), np.concatenate(vals)
    keep = rows_a >= 0
    lat_a, kind_a, rank_a, rows_a, vals_a = (
        lat_a[keep],
        kind_a[keep],
        rank_a[keep].astype(np.int16),
        rows_a[keep],
        vals_a[keep],
    )
    win = context_windows(src, rows_a, left, right)
    token_ids = getattr(src, "token_ids", None)
    if token_ids is not None:
        toks = np.where(win >= 0, np.asarray(token_ids)[np.maximum(win, 0)], -1).astype(np.int64)
    else:
        toks = np.full(win.shape, -1, dtype=np.int64)
    acts = window_activations(
        sae, src, win, lat_a, device=device, chunk_tokens=chunk_tokens, encode_dtype=encode_dtype
    )
    return Examples(lat_a, kind_a, rank_a, rows_a, vals_a, win, toks, acts, left)


# -- tokens ------------------------------------------------------------------------------------
def decode_tokens(tokenizer, token_ids: np.ndarray | Sequence[int]) -> dict[int, str]:
    """``{token id: decoded text}`` for the distinct ids (-1 and unknown ids are skipped).

    Without a tokenizer every id maps to ``"<id>"``.
    """
    ids = np.unique(np.asarray(token_ids, dtype=np.int64).ravel())
    ids = ids[ids >= 0]
    if tokenizer is None:
        return {int(i): f"<{int(i)}>" for i in ids}
    try:
        texts = tokenizer.batch_decode(
            [[int(i)] for i in ids],
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )
    except Exception:  # tokenizers without batch_decode
        texts = [tokenizer.decode([int(i)]) for i in ids]
    return {int(i): str(t) for i, t in zip(ids, texts, strict=True)}


def tokenizer_for(source: Any = None, backend: Any = None):
    """The tokenizer that produced a store's token ids: the backend's, else the one named by the
    store manifest's ``model`` block (local folder, ``tiny:`` model, embedded GGUF model or the
    HF cache). ``None`` (with a warning) when none can be loaded offline."""
    if backend is not None and getattr(backend, "tokenizer", None) is not None:
        return backend.tokenizer
    info = getattr(source, "model_info", None) if source is not None else None
    if not info:
        return None
    from transformers import AutoTokenizer

    tried: list[str] = []
    name = (info.get("tokenizer") or {}).get("name")
    if name and os.path.isdir(name):
        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception as e:  # a damaged cache folder: try the other sources
            tried.append(f"{name}: {e}")
    model_id = info.get("model_id")
    embedded = info.get("embedded")
    try:
        from integral_superposition.backends.sources import resolve_model_source

        if model_id and str(model_id).startswith("tiny:"):
            return AutoTokenizer.from_pretrained(resolve_model_source(model_id).path)
        if embedded:
            src = resolve_model_source(embedded)
            return AutoTokenizer.from_pretrained(
                os.path.dirname(src.gguf_file), gguf_file=os.path.basename(src.gguf_file)
            )
        if model_id:
            return AutoTokenizer.from_pretrained(model_id, local_files_only=True)
    except Exception as e:
        tried.append(f"{model_id or embedded}: {e}")
    log.warning(
        "no tokenizer for %s could be loaded offline (%s); tokens are shown as ids",
        model_id,
        "; ".join(tried) or "no source",
    )
    return None
