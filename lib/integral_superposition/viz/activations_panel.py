"""The seed's notebook panel: a latent's top documents, every token shaded by its activation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from markupsafe import Markup

from integral_superposition.viz.safe_html import CSS, N_SHADES
from integral_superposition.viz.templates import render

__all__ = ["HTMLPanel", "top_activations_panel"]


class HTMLPanel(str):
    """An HTML fragment that notebooks render (``_repr_html_``)."""

    def _repr_html_(self) -> str:
        return str(self)


@torch.no_grad()
def top_activations_panel(
    latent_j: int,
    act_files: Any,
    sae,
    tokenizer=None,
    device: str | torch.device | None = None,
    top_titles: int = 12,
    max_tokens_per_title: int = 64,
    min_alpha: float = 0.0,
) -> HTMLPanel:
    """HTML panel of the documents where latent ``latent_j`` reaches its highest maxima, every
    token shaded by the latent's activation (the seed's panel; returns HTML, displays nothing).

    ``act_files``: an :class:`~integral_superposition.dump.ActivationStore` or store URI(s).
    """
    from integral_superposition.activations import as_activation_source
    from integral_superposition.analysis.top_tokens import decode_tokens, tokenizer_for
    from integral_superposition.sae.encode import check_sae_source, encode_chunks

    src = as_activation_source(act_files)
    check_sae_source(sae, src)
    if not 0 <= latent_j < sae.d_sae:
        raise ValueError(f"latent_j={latent_j}: expected 0..{sae.d_sae - 1}")
    if src.doc_ids is None or src.token_ids is None:
        raise ValueError("act_files: the panel needs token and document ids (an ActivationStore)")
    z = np.zeros(src.n_tokens, dtype=np.float32)
    for rows, _x, codes, _ in encode_chunks(sae, src, device, chunk_tokens=8192):
        z[rows] = codes[:, latent_j].cpu().numpy()
    doc = np.asarray(src.doc_ids)
    uniq, inv = np.unique(doc, return_inverse=True)
    dmax = np.full(uniq.size, -np.inf)
    np.maximum.at(dmax, inv, z)
    best = np.argsort(-dmax, kind="stable")[:top_titles]
    tok = tokenizer if tokenizer is not None else tokenizer_for(src)
    blocks = []
    vmax = float(z.max()) if z.size else 0.0
    for d in best:
        rows = np.flatnonzero(inv == d)[:max_tokens_per_title]
        text = decode_tokens(tok, np.asarray(src.token_ids)[rows])
        tokens = []
        for r in rows:
            v = float(z[r])
            level = (
                0
                if v <= min_alpha or vmax <= 0
                else int(np.clip(np.ceil(v / vmax * N_SHADES), 0, N_SHADES))
            )
            tokens.append((text.get(int(src.token_ids[r]), ""), level, v))
        blocks.append({"value": float(dmax[d]), "tokens": tokens})
    return HTMLPanel(render("panel.html.j2", css=Markup(CSS), latent=latent_j, blocks=blocks))
