"""The merged SAE as a plain SAE, fine-tuned with the training recipe.

A merged SAE keeps the original ``K``-wide encoder: it takes the original TopK code and adds
the members' codes of each cluster (``merge_codes``). :func:`flatten_merged` turns it into an
ordinary ``K'``-latent SAE of the same architecture, which saves and loads like any SAE
(SAELens reads it), and :func:`finetune_merged` trains that SAE for a short budget.

Flattening (``M`` ``[K, K']``: ``M[i, c(i)] = w_i``, the merge weights; ``n_j``: the norm of the
merged decoder row ``j``):

- ``W_enc'[:, j] = n_j * sum_{i in C_j} w_i W_enc[:, i]`` and ``b_enc'[j] = n_j * sum w_i b_enc[i]``,
  so ``pre'_j(x) = n_j * sum_{i in C_j} w_i pre_i(x)``;
- ``W_dec'[j] = W_dec[j] / n_j`` (unit rows, as training keeps them); ``b_dec`` is kept;
- the TopK keeps ``min(top_k, K')`` latents, the original ``top_k``.

So a selected latent decodes to ``pre_j W_dec[j]`` as the merged SAE's latent ``j`` would with
code ``pre_j``, and latents compete by the size of their contribution. The flattened SAE is
not the merged SAE: the merged code adds the members that are among the original top-k,
the flattened one adds every member's pre-activation (negative ones too) and then takes
the top-k of the clusters, so its L0 is the original ``top_k`` where the merged SAE's is
lower (co-members firing together count once). The fine-tune closes that gap: the training
recipe of the original SAE (``SAEConfig``: Adam, LR warmup and decay, unit decoder rows,
gradient clip, AuxK, input scaling) on the store's training split for ``epochs`` epochs,
then the same decoder refit as training (kept when it lowers the held-out FVU). Latent
``j`` still stands for cluster ``j``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from integral_superposition.config import SAEConfig
from integral_superposition.sae.model import SparseAutoencoder

log = logging.getLogger(__name__)

FLATTEN_ARCHITECTURES = ("topk", "relu")
"""Architectures whose merged SAE flattens to a plain one (their code is a function of the
pre-activation alone; a threshold has no merged counterpart)."""


def check_flattenable(merged: SparseAutoencoder) -> None:
    """``ValueError`` naming what stops ``merged`` from being flattened."""
    if not merged.is_merged:
        raise ValueError("merged: expected a merged SAE (with merge_index), got a plain one")
    if merged.merge_mode != "sum":
        raise ValueError(
            f"merge_mode={merged.merge_mode!r}: only a sum merge is linear in the members' "
            "pre-activations and flattens to a plain SAE; expected 'sum' (aggregation 'sum' "
            "or 'projection')"
        )
    if merged.architecture not in FLATTEN_ARCHITECTURES:
        raise ValueError(
            f"architecture={merged.architecture!r}: flattening a merged SAE needs one of "
            f"{FLATTEN_ARCHITECTURES} (a per-latent threshold has no merged counterpart)"
        )


@torch.no_grad()
def flatten_merged(merged: SparseAutoencoder) -> SparseAutoencoder:
    """A plain ``K'``-latent SAE from a sum-merged one (module docstring): ``W_enc``
    ``[d, K']``, ``b_enc`` ``[K']``, unit ``W_dec`` rows ``[K', d]``, the same ``b_dec`` ``[d]``."""
    check_flattenable(merged)
    k_new, d = merged.d_sae, merged.d_in
    w = (
        merged.merge_weight.double().cpu()
        if merged.merge_weight is not None
        else torch.ones(merged.d_pre, dtype=torch.float64)
    )
    index = merged.merge_index.cpu()
    w_enc = merged.W_enc.detach().double().cpu() * w  # [d, K] with columns weighted
    enc = torch.zeros(d, k_new, dtype=torch.float64).index_add_(1, index, w_enc)
    b_enc = torch.zeros(k_new, dtype=torch.float64).index_add_(
        0, index, merged.b_enc.detach().double().cpu() * w
    )
    w_dec = merged.W_dec.detach().double().cpu()
    norms = w_dec.norm(dim=1)
    zero = norms <= 1e-12
    norms = torch.where(zero, torch.ones_like(norms), norms)
    flat = SparseAutoencoder(
        d,
        k_new,
        architecture=merged.architecture,
        top_k=min(merged.top_k, k_new),
        jumprelu_bandwidth=merged.bandwidth,
        seed=None,
        device=merged.W_enc.device,
        dtype=merged.W_enc.dtype,
    )
    rows = w_dec / norms[:, None]
    if bool(zero.any()):  # a row the refit left at zero: the summed encoder direction
        e = enc[:, zero].T
        rows[zero] = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    flat.W_enc.copy_((enc * norms).to(flat.W_enc))
    flat.b_enc.copy_((b_enc * norms).to(flat.b_enc))
    flat.W_dec.copy_(rows.to(flat.W_dec))
    flat.b_dec.copy_(merged.b_dec.detach())
    flat.metadata = dict(merged.metadata)
    return flat.eval()


def finetune_recipe(
    training_config: Mapping[str, Any] | SAEConfig | None,
    sae: SparseAutoencoder,
    epochs: float,
    test_fraction: float,
) -> SAEConfig:
    """The training config of a fine-tune of merges of ``sae`` (``k`` is set to each
    merge's ``K'`` when it runs).

    ``training_config``: the original SAE's (its manifest's ``config``); without one (an SAE
    trained elsewhere) the default recipe of ``sae``'s architecture. Kept: the schedule,
    losses, batch size, seed and hook point; set: ``epochs``, ``test_fraction`` (the merge's
    split, so the fine-tune never sees the held-out tokens), unit decoder rows, the decoder
    refit, and no checkpoints.
    """
    if isinstance(training_config, SAEConfig):
        base = training_config.model_dump()
    elif training_config:
        # fields of the config as it is now (a manifest may hold a field since renamed)
        base = {k: v for k, v in training_config.items() if k in SAEConfig.model_fields}
    else:
        base = SAEConfig.from_parts(sae.architecture_config()).model_dump()
    base.update(
        k=int(sae.d_sae),
        architecture=sae.architecture,
        top_k=int(sae.top_k),
        epochs=float(epochs),
        train_tokens=None,
        test_fraction=float(test_fraction),
        decoder_norm="unit",
        refit_decoder=True,
        checkpoint_every=10**9,
    )
    return SAEConfig.model_validate(base)


def finetune_merged(
    flat: SparseAutoencoder, store, recipe: SAEConfig, device: str | torch.device | None = None
) -> dict[str, Any]:
    """Train the flattened SAE ``flat`` in place with ``recipe`` on ``store``'s training split
    (``train_sae``: the recipe's optimiser and schedule, then its decoder refit); ``flat`` ends
    on its own device again. Returns the fine-tune's record: ``finetune_epochs``, ``_steps``,
    ``_tokens``, ``_seconds`` (wall), ``_cpu_seconds`` (this process, every thread),
    ``finetune_train_fvu_first``/``_last`` (the training curve's
    first and last logged FVU, on the scaled training batches) and ``finetune_refit_applied``."""
    from integral_superposition.sae.train import train_sae

    if flat.is_merged:
        raise ValueError("flat: expected a plain SAE (flatten_merged first), got a merged one")
    home = flat.W_enc.device
    curve: list[dict[str, float]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    res = train_sae(
        flat, store, recipe, device=device, progress=False, on_log=lambda _s, e: curve.append(e)
    )
    flat.to(home).eval()
    return {
        "finetune_epochs": float(recipe.epochs),
        "finetune_steps": int(res.steps),
        "finetune_tokens": int(res.tokens),
        "finetune_seconds": time.perf_counter() - t0,
        "finetune_cpu_seconds": time.process_time() - c0,
        "finetune_train_fvu_first": float(curve[0]["fvu"]) if curve else float("nan"),
        "finetune_train_fvu_last": float(curve[-1]["fvu"]) if curve else float("nan"),
        "finetune_refit_applied": bool(res.metrics.get("refit_applied", False)),
    }


def finetune_labels(merged: SparseAutoencoder) -> np.ndarray:
    """The cluster of every original latent ``int[K]`` (latent ``j`` of the flattened SAE stands
    for cluster ``j``)."""
    return merged.merge_index.cpu().numpy().astype(np.int64)
