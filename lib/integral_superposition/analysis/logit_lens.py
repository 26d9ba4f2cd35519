"""Logit lens of SAE latents: which output tokens a latent's decoder direction promotes or
suppresses.

The direct effect of adding decoder row ``d_j`` to the residual stream on the logits is
``norm(d_j) @ W_U^T``, ``W_U [vocab, d]`` the unembedding. The final norm matters: Gemma's
RMSNorm multiplies each dimension by ``1 + w``, LayerNorm centres and rescales. We apply the
model's own final norm module to the direction and subtract ``norm(0)`` (LayerNorm's bias
shifts every latent's logits alike and says nothing about the latent). A norm's overall
scale does not change the ranking of tokens, so the reported logits are those of a
direction normalised by the norm itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

__all__ = ["LogitLens", "logit_lens", "logit_lens_for_backend"]


@dataclass
class LogitLens:
    """Top promoted and suppressed tokens per latent, each ``[M, n]`` (``M`` latents)."""

    latents: np.ndarray
    """int64 ``[M]`` the latents analysed."""
    promoted_ids: np.ndarray
    promoted_logits: np.ndarray
    suppressed_ids: np.ndarray
    suppressed_logits: np.ndarray

    def to_frame(self, token_text: Mapping[int, str] | None = None) -> pd.DataFrame:
        """Tidy table: ``latent, direction (promoted|suppressed), rank, token_id, token, logit``."""
        M, n = self.promoted_ids.shape
        frames = []
        for direction, ids, vals in (
            ("promoted", self.promoted_ids, self.promoted_logits),
            ("suppressed", self.suppressed_ids, self.suppressed_logits),
        ):
            flat = ids.ravel()
            frames.append(
                pd.DataFrame(
                    {
                        "latent": np.repeat(self.latents, n),
                        "direction": direction,
                        "rank": np.tile(np.arange(n), M),
                        "token_id": flat,
                        "token": [token_text.get(int(i), f"<{int(i)}>") for i in flat]
                        if token_text is not None
                        else None,
                        "logit": vals.ravel(),
                    }
                )
            )
        out = pd.concat(frames, ignore_index=True)
        out["direction"] = out["direction"].astype("category")
        return out


@torch.no_grad()
def logit_lens(
    W_dec: torch.Tensor | np.ndarray,
    W_U: torch.Tensor | np.ndarray,
    final_norm: torch.nn.Module | None = None,
    top: int = 10,
    latents: Sequence[int] | np.ndarray | None = None,
    batch: int | None = None,
    device: str | torch.device | None = None,
) -> LogitLens:
    """Top ``top`` promoted and suppressed tokens for each decoder row.

    ``W_dec``: ``[K, d]``; ``W_U``: ``[vocab, d]``; ``final_norm``: the module applied before
    the LM head (or None). ``latents`` selects rows (default all). Rows are processed in
    batches so that a ``[batch, vocab]`` logit block stays near 256 MiB.
    """
    W_dec = torch.as_tensor(W_dec).detach()
    W_U = torch.as_tensor(W_U).detach()
    if W_dec.ndim != 2 or W_U.ndim != 2:
        raise ValueError(
            f"W_dec {tuple(W_dec.shape)} and W_U {tuple(W_U.shape)}: expected 2-D matrices"
        )
    if W_dec.shape[1] != W_U.shape[1]:
        raise ValueError(
            f"W_dec has d={W_dec.shape[1]} but the unembedding has d={W_U.shape[1]}: "
            "the SAE does not belong to this model's residual stream"
        )
    V = W_U.shape[0]
    if not 1 <= top <= V:
        raise ValueError(f"top={top}: expected 1..{V} (the vocabulary size)")
    dev = torch.device(device) if device is not None else W_U.device
    lat = np.arange(W_dec.shape[0]) if latents is None else np.asarray(latents, dtype=np.int64)
    if lat.size and (lat.min() < 0 or lat.max() >= W_dec.shape[0]):
        raise ValueError(f"latents: ids must lie in [0, {W_dec.shape[0]})")
    WU = W_U.to(dev)
    compute_dtype = torch.float32 if WU.dtype == torch.float64 else WU.dtype
    WU = WU.to(compute_dtype)
    b = int(batch or max(1, (256 << 20) // (4 * V)))
    out = {k: [] for k in ("pi", "pv", "si", "sv")}
    zero = None
    if final_norm is not None:
        ref = next(final_norm.parameters(), None)
        norm_dtype = ref.dtype if ref is not None else torch.float32
        zero = final_norm(torch.zeros(1, W_dec.shape[1], device=dev, dtype=norm_dtype)).float()
    for a in range(0, lat.size, b):
        rows = W_dec[torch.from_numpy(lat[a : a + b])].to(dev).float()
        if final_norm is not None:
            rows = final_norm(rows.to(norm_dtype)).float() - zero
        logits = (rows.to(compute_dtype) @ WU.T).float()
        hi = logits.topk(top, dim=1)
        lo = logits.topk(top, dim=1, largest=False)
        out["pi"].append(hi.indices.cpu())
        out["pv"].append(hi.values.cpu())
        out["si"].append(lo.indices.cpu())
        out["sv"].append(lo.values.cpu())
    cat = {k: (torch.cat(v).numpy() if v else np.zeros((0, top))) for k, v in out.items()}
    return LogitLens(
        latents=lat,
        promoted_ids=cat["pi"].astype(np.int64),
        promoted_logits=cat["pv"].astype(np.float32),
        suppressed_ids=cat["si"].astype(np.int64),
        suppressed_logits=cat["sv"].astype(np.float32),
    )


def logit_lens_for_backend(
    sae, backend, top: int = 10, latents: Sequence[int] | None = None, use_final_norm: bool = True
) -> LogitLens:
    """:func:`logit_lens` with the backend's unembedding (``backend.output_embedding()``) and
    final norm (``backend.final_norm()``)."""
    if not hasattr(backend, "output_embedding"):
        raise TypeError(
            f"backend {type(backend).__name__} has no output embedding (an encoder?): the logit lens "
            "needs a causal LM"
        )
    W_U = backend.output_embedding()
    if W_U.shape[1] != sae.d_in:
        raise ValueError(
            f"sae.d_in={sae.d_in} does not match the model's d_model={W_U.shape[1]} "
            f"({getattr(backend, 'model_id', '')})"
        )
    norm = backend.final_norm() if use_final_norm else None
    return logit_lens(sae.W_dec, W_U, norm, top=top, latents=latents)
