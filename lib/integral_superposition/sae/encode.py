"""The one way the library runs an SAE's encoder over stored activations.

:func:`encode_chunks` reads an activation source (a store, files, an array, or any iterable
of ``[n, d]`` chunks) chunk by chunk, checks that the SAE fits it, places the SAE and each chunk
on the device and encodes with the compute-dtype rule of :mod:`integral_superposition.compute`.
Every step that needs latent codes (the analysis scan, document codes, SAE metrics, merge
similarity and refits, dashboards, steering) reads them from here.

Codes come dense (``z [B, K]``, exactly ``sae.encode(x)`` in float32) or sparse
(:class:`Codes`: only the active entries, from :class:`SparseEncoder`; no dense ``[B, K]``
code is built for TopK SAEs).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from integral_superposition import compute
from integral_superposition.activations import ArraySource, as_activation_source
from integral_superposition.dump.store import ActivationStore
from integral_superposition.sae.model import SparseAutoencoder

__all__ = [
    "CHUNK_ELEMENTS",
    "Codes",
    "EncodedChunk",
    "SparseEncoder",
    "check_sae_source",
    "default_chunk_tokens",
    "encode_chunks",
    "encode_device",
    "sae_on",
    "sync_clock",
]

CHUNK_ELEMENTS = 1 << 24
"""Default chunk size in latent activations (``B x K``): 64 MiB of float32 per chunk."""


def default_chunk_tokens(d_sae: int) -> int:
    """Tokens per chunk so that one chunk's codes hold about :data:`CHUNK_ELEMENTS` values."""
    return int(max(256, min(65536, CHUNK_ELEMENTS // max(1, d_sae))))


def check_sae_source(sae: SparseAutoencoder, source: Any) -> None:
    """``TypeError``/``ValueError`` unless ``sae`` is an SAE whose ``d_in`` is the source's width."""
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"sae: expected a SparseAutoencoder, got {type(sae).__name__}")
    if int(source.d_model) != int(sae.d_in):
        raise ValueError(
            f"sae.d_in={sae.d_in} does not match the activations' d_model={source.d_model} "
            f"({getattr(source, 'uris', '')}): the SAE was trained on another model or hook point"
        )


def encode_device(sae: SparseAutoencoder, device: str | torch.device | None) -> torch.device:
    """Where to encode: ``None`` keeps the SAE's device; anything else goes through
    :func:`integral_superposition.compute.resolve_device` (``"auto"``: CUDA when available)."""
    return sae.W_enc.device if device is None else compute.resolve_device(device)


def sae_on(sae: SparseAutoencoder, device: torch.device) -> SparseAutoencoder:
    """The SAE on ``device`` (a copy when it lives elsewhere; the caller's is untouched)."""
    if sae.W_enc.device != torch.device(device):
        sae = copy.deepcopy(sae).to(device)
    return sae


@dataclass
class Codes:
    """The active entries of one chunk's latents ``z [B, K]`` in coordinate form."""

    n_rows: int
    """``B``, the chunk's rows."""
    t: torch.Tensor
    """int64 ``[E]`` row of each entry (0..B-1)."""
    j: torch.Tensor
    """int64 ``[E]`` latent of each entry."""
    v: torch.Tensor
    """float32 ``[E]`` its activation (> 0)."""
    x_hat: torch.Tensor | None = None
    """float32 ``[B, d]`` reconstruction, when asked for."""

    def dense(self, n_latents: int) -> torch.Tensor:
        """The codes as float32 ``[B, n_latents]``."""
        z = torch.zeros((self.n_rows, n_latents), dtype=torch.float32, device=self.v.device)
        z[self.t, self.j] = self.v.float()
        return z


class SparseEncoder:
    """``x [B, d] -> Codes``: the SAE's inference-time encode, returning only active entries.

    TopK codes come straight from the per-row ``topk`` (no dense ``[B, K]`` code is built);
    ReLU/JumpReLU/BatchTopK entries from one mask over the pre-activations. ``dtype="bfloat16"``
    runs the encoder matmul on bf16 copies of ``x`` and ``W_enc`` (fp32 bias and activation):
    several times faster on CPUs with AVX512-BF16 or AMX and on GPUs, at bf16 precision of
    the pre-activations (ranks can swap between near-equal activations). ``"auto"`` picks by
    the hardware (:func:`integral_superposition.compute.resolve_dtype`); fp16 is never used,
    the pre-activations can exceed its range.
    """

    def __init__(self, sae: SparseAutoencoder, dtype: str | torch.dtype = "float32"):
        dtype = compute.resolve_dtype(dtype, sae.W_enc.device, arg="encode_dtype", fp16=False)
        self.sae, self.dtype = sae, dtype
        self.W = sae.W_enc.detach().to(dtype).contiguous()
        self.b_enc = sae.b_enc.detach().float()
        self.b_dec = sae.b_dec.detach().float()
        # merged SAEs aggregate member codes: their latents only exist after a dense encode;
        # groupmax ranks within groups and a skip connection decodes from x as well
        self.dense_only = (
            sae.merge_index is not None or sae.architecture == "groupmax" or sae.W_skip is not None
        )

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) @ W_enc + b_enc`` in float32 ``[B, d_pre]`` (matmul in ``self.dtype``)."""
        # any float input: the subtraction promotes to float32 in one pass (no separate copy)
        xc = torch.sub(x, self.b_dec).to(self.dtype)
        # matmul, then the bias: the same rounding as SparseAutoencoder.encode
        return (xc @ self.W).float().add_(self.b_enc)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, reconstruct: bool = False) -> Codes:
        sae, B = self.sae, x.shape[0]
        if self.dense_only:
            z = sae.encode(x.float()).float()
            t, j = (z > 0).nonzero(as_tuple=True)
            x_hat = sae.decode(z, x.float()).float() if reconstruct else None
            return Codes(B, t, j, z[t, j], x_hat)
        pre = self.pre_activations(x)
        if sae.architecture == "topk":
            top = pre.topk(sae.top_k, dim=-1, sorted=False)
            vals = top.values.relu_()
            x_hat = sae.decode_sparse(vals, top.indices).float() if reconstruct else None
            keep = (vals > 0).view(-1).nonzero().squeeze(1)
            t = torch.arange(B, device=x.device).repeat_interleave(sae.top_k)[keep]
            return Codes(B, t, top.indices.view(-1)[keep], vals.view(-1)[keep], x_hat)
        thr = 0.0 if sae.architecture == "relu" else sae.threshold.detach().float()
        x_hat = None
        if reconstruct:
            z = pre * (pre > thr).to(pre.dtype)
            x_hat = sae.decode(z).float()
        # z > 0 exactly where pre exceeds both the threshold and 0
        t, j = (pre > (thr.clamp_min(0.0) if torch.is_tensor(thr) else thr)).nonzero(as_tuple=True)
        return Codes(B, t, j, pre[t, j], x_hat)


class EncodedChunk(NamedTuple):
    """One encoded chunk of :func:`encode_chunks`."""

    rows: np.ndarray
    """int64 ``[B]`` row ids of the chunk in the source (global rows; in stream order for an
    iterable of chunks)."""
    x: torch.Tensor
    """float32 ``[B, d]`` activations, on the encoding device."""
    codes: Any
    """float32 ``[B, K]`` dense codes, or :class:`Codes` (``sparse=True``)."""
    x_hat: torch.Tensor | None = None
    """float32 ``[B, d]`` reconstruction (``reconstruct=True``)."""


def _is_source(obj: Any) -> bool:
    """Whether ``obj`` is something :func:`as_activation_source` opens (not a chunk stream)."""
    if hasattr(obj, "iter_chunks") or isinstance(obj, np.ndarray | torch.Tensor | ArraySource):
        return True
    if isinstance(obj, str | os.PathLike):
        return True
    return isinstance(obj, list | tuple) and bool(obj) and isinstance(obj[0], str | os.PathLike)


def _stream(chunks: Iterable[Any], d_in: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """``(rows, x)`` from an iterable of tensors, ``(rows, x)`` pairs or ``Batch`` objects."""
    offset = 0
    for i, item in enumerate(chunks):
        rows = None
        if isinstance(item, torch.Tensor | np.ndarray):
            x = item
        elif hasattr(item, "acts"):
            x = item.acts
        elif isinstance(item, tuple | list) and len(item) == 2:
            rows, x = np.asarray(item[0], dtype=np.int64), item[1]
        else:
            raise TypeError(
                f"source chunk {i} is a {type(item).__name__}: expected [n, d] tensors, "
                "(rows, x) pairs or Batch objects"
            )
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != d_in:
            raise ValueError(
                f"source chunk {i} has shape {tuple(x.shape)}: expected [n, {d_in}] (sae.d_in)"
            )
        if rows is None:
            rows = np.arange(offset, offset + x.shape[0], dtype=np.int64)
        offset += x.shape[0]
        yield rows, x


def sync_clock(dev: torch.device) -> float:
    """``time.perf_counter()`` once ``dev`` has finished its queued work (timings on a GPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


@torch.no_grad()
def encode_chunks(
    sae: SparseAutoencoder,
    source: Any,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    *,
    chunk_tokens: int | None = None,
    mask: np.ndarray | None = None,
    sparse: bool = False,
    reconstruct: bool = False,
    hook_point: str | None = None,
    prefetch: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    timings: dict[str, float] | None = None,
) -> Iterator[EncodedChunk]:
    """Encode ``source`` chunk by chunk: one :class:`EncodedChunk` ``(rows, x, codes, x_hat)``
    per chunk of at most ``chunk_tokens`` rows.

    - ``source``: anything :func:`~integral_superposition.activations.as_activation_source`
      opens (a store, URIs, files, an ``[N, d]`` array), or an iterable of ``[n, d]`` chunks,
      ``(rows, x)`` pairs or ``Batch`` objects.
    - ``device``: ``None`` keeps the SAE's device, else
      :func:`~integral_superposition.compute.resolve_device` (the SAE is copied there when it
      lives elsewhere). ``dtype``: the encoder matmul's dtype (``"float32"`` exact, ``"bfloat16"``
      or ``"auto"``, see :class:`SparseEncoder`).
    - ``sparse``: yield :class:`Codes` instead of dense ``[B, K]`` codes; ``reconstruct``: also
      the reconstruction ``x_hat [B, d]``.
    - ``mask`` (``bool[N]``), ``hook_point``, ``prefetch`` (chunks read ahead in a thread;
      default 2 on an accelerator, 0 on a CPU) go to the source's ``iter_chunks``.
    - ``timings``: seconds spent reading and encoding are added to its ``read``/``encode`` keys.

    The SAE runs in eval mode (the caller's training mode is restored when the loop ends).
    """
    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"sae: expected a SparseAutoencoder, got {type(sae).__name__}")
    dev = encode_device(sae, device)
    if _is_source(source):
        # store-like objects (n_tokens, d_model, iter_chunks) are read as they are
        src = (
            source
            if hasattr(source, "iter_chunks")
            else as_activation_source(source, storage_options)
        )
        check_sae_source(sae, src)
        chunk = int(chunk_tokens or default_chunk_tokens(sae.d_sae))
        if chunk < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens}: expected a positive number of tokens")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.dtype != bool or mask.shape != (src.n_tokens,):
                raise ValueError(
                    f"mask: expected bool[{src.n_tokens}] (one flag per stored token), got "
                    f"{mask.dtype}{list(mask.shape)}"
                )
        ahead = (2 if dev.type != "cpu" else 0) if prefetch is None else int(prefetch)
        kw: dict[str, Any] = {}
        if isinstance(src, ActivationStore):  # chunks in the storage dtype, read ahead
            kw = {"dtype": None, "prefetch": ahead}
        if mask is not None:
            kw["mask"] = mask
        if hook_point is not None:
            kw["hook_point"] = hook_point
        chunks: Iterable[tuple[np.ndarray, torch.Tensor]] = src.iter_chunks(chunk, **kw)
    elif mask is not None or hook_point is not None:
        raise ValueError("mask and hook_point need an activation source, not a stream of chunks")
    else:
        chunks = _stream(source, int(sae.d_in))
    model = sae_on(sae, dev)
    was_training = model.training
    model.eval()
    encoder = SparseEncoder(model, dtype)
    exact = encoder.dtype == torch.float32
    clock = time.perf_counter()
    try:
        for rows, x in chunks:
            x = x.to(dev, non_blocking=True).float()
            t0 = sync_clock(dev)
            x_hat = None
            if sparse:
                codes = encoder(x, reconstruct=reconstruct)
                x_hat = codes.x_hat
            else:
                # float32: exactly sae.encode; bf16: the sparse encoder's entries, densified
                codes = model.encode(x).float() if exact else encoder(x).dense(model.d_sae)
                if reconstruct:
                    x_hat = model.decode(codes, x).float()
            t1 = sync_clock(dev)
            if timings is not None:
                timings["read"] = timings.get("read", 0.0) + t0 - clock
                timings["encode"] = timings.get("encode", 0.0) + t1 - t0
            yield EncodedChunk(np.asarray(rows, dtype=np.int64), x, codes, x_hat)
            clock = time.perf_counter()
    finally:
        model.train(was_training)
