"""A tiny store and a data-aligned TopK SAE on it, shared by the merge tests."""

from __future__ import annotations

from pathlib import Path

import torch
from integral_superposition import DumpConfig
from integral_superposition.data import demo_corpus
from integral_superposition.dump import ActivationStore, dump_layer_activations
from integral_superposition.sae import SparseAutoencoder


def store_and_topk_sae(backend, root: Path) -> tuple[ActivationStore, SparseAutoencoder]:
    """240 demo headlines at layer 2 of ``backend`` (``root/acts``) and a TopK SAE (K=96,
    top_k 6) whose decoder rows ``[96, d]`` are centred tokens of the store and whose encoder
    is their transpose, so that its latents are informative."""
    store = dump_layer_activations(
        demo_corpus(240),
        "title",
        "topic",
        backend,
        DumpConfig(layer=2, max_len=16, batch_size=32),
        str(root / "acts"),
        progress=False,
    )
    sae = SparseAutoencoder(store.d_model, 96, architecture="topk", top_k=6, seed=0)
    x = store.read(0, store.n_tokens).float()
    with torch.no_grad():
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:96]
        sae.b_dec.copy_(x.mean(0))
        w = x[idx] - x.mean(0)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    return store, sae
