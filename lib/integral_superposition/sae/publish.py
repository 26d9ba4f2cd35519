"""Publishing trained SAEs: held-out evaluation, SAELens metadata from the activation store,
the training curve and the converged flag, saved with
:func:`~integral_superposition.sae.save_sae`; :class:`TrainResult` is what training returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from integral_superposition import storage
from integral_superposition.config import SAEConfig
from integral_superposition.sae.curve import (
    CONVERGED_RULE,
    CURVE_FILE,
    convergence,
    curve_parquet,
)
from integral_superposition.sae.load import save_sae
from integral_superposition.sae.online import OnlineSource
from integral_superposition.sae.schedule import decay_start
from integral_superposition.sae.sources import RankSlice, StoreSource, TrainingSource
from integral_superposition.sae.trainee import Trainee

__all__ = ["TrainResult", "convergence_metrics", "publish_trainee", "store_metadata"]


@dataclass
class TrainResult:
    """What training one SAE produced: where it is saved and how good it is."""

    uri: str | None
    """The published SAE folder (None for :func:`train_sae`, which trains in place)."""
    content_hash: str | None
    """``manifest["content_hash"]`` of the published SAE."""
    metrics: dict[str, Any]
    """Held-out metrics (``evaluate_sae``) or, without a held-out split, the last training log."""
    steps: int
    """Optimiser steps taken in total (including those before a resume)."""
    tokens: int
    """Training tokens consumed (batch rows, before outlier filtering)."""
    resumed_from_step: int = 0
    """The checkpoint step this run resumed from (0 for a fresh run)."""
    config: SAEConfig | None = None


def convergence_metrics(t: Trainee, source: TrainingSource, steps: int) -> dict[str, Any]:
    """The converged flag and the curve's tail statistics of one trained SAE."""
    total = source.total or steps
    return convergence(t.curve, total, decay_start(t.cfg, total))


def store_metadata(store, hook: str) -> dict[str, Any]:
    """SAELens ``metadata`` fields describing where an SAE's activations came from."""
    from integral_superposition.backends.sources import weights_source

    info = store.hook_info(hook)
    mcfg = store.manifest.get("config") or {}
    meta = {
        "model_name": store.model_info.get("model_id"),
        "hook_name": info.get("saelens_name") or hook,
        "context_size": mcfg.get("max_len"),
        "prepend_bos": mcfg.get("prepend_bos", True),
        "dataset_path": store.uris[0] if len(store.uris) == 1 else list(store.uris),
        "isup_hook_point": hook,
    }
    # model_name stays the hub id SAELens expects; the weights' real source sits beside it
    source = weights_source(store.model_info)
    if source is not None:
        meta["model_source"] = source
    return meta


def publish_trainee(
    t: Trainee,
    uri: str,
    source,
    steps: int,
    resumed: int,
    elapsed: float,
    storage_options,
    metadata: Mapping[str, Any] | None,
    evaluate: bool,
    quality: Mapping[str, Any],
) -> TrainResult:
    """Evaluate and save one trained SAE (``quality``: refit and convergence metrics)."""
    sae = t.sae
    cfg = t.cfg
    metrics: dict[str, Any]
    sparsity = None
    meta: dict[str, Any] = {}
    act_hash = None
    store = source.store if isinstance(source, StoreSource) else None
    online = source.source if isinstance(source, RankSlice) else source
    if isinstance(online, OnlineSource):
        # the store it wrote, or the bounded sample of held-out documents
        store = online.evaluation_store()
        meta = online.saelens_metadata(t.hook)
    if store is not None:
        from integral_superposition.sae.metrics import evaluate_sae

        act_hash = store.content_hash
        meta = {**store_metadata(store, t.hook), **meta}
        if evaluate:
            ev = evaluate_sae(
                sae, store, split="test", test_fraction=cfg.test_fraction, hook_point=t.hook
            )
            metrics = {k: v for k, v in ev.items() if not isinstance(v, list | dict)}
            metrics["density_hist"] = ev.get("density_hist")
            sparsity = torch.log10(torch.as_tensor(ev["density"], dtype=torch.float32) + 1e-10)
        else:
            metrics = {}
    else:
        metrics = {}
    if not metrics or not evaluate:
        last = t.curve[-1] if t.curve else {}
        metrics.update({f"train_{k}": v for k, v in last.items() if k not in ("step", "tokens")})
    if sparsity is None and t.tokens_seen:
        sparsity = torch.log10(t.fire_count.double().cpu() / max(1, t.tokens_seen) + 1e-10).float()
    metrics.update(quality)
    metrics["train_tokens"] = t.tokens_seen
    metrics["train_grad_clip"] = t.grad_clip  # the resolved clip (grad_clip='auto': 1/d_in)
    metrics["train_steps"] = steps
    metrics["train_seconds"] = elapsed
    meta.update(metadata or {})
    folder = save_sae(
        sae,
        uri,
        metadata=meta,
        sparsity=sparsity,
        training_config=cfg,
        metrics={k: v for k, v in metrics.items() if k != "density_hist"},
        activation_manifest_hash=act_hash,
        storage_options=storage_options,
        training_curve=t.curve,
        converged_rule=CONVERGED_RULE,
        extra_files={CURVE_FILE: curve_parquet(t.curve)},
        density_hist=metrics.get("density_hist"),
        activation_scale=None,
        hook_point=t.hook,
        source=source.describe(),
    )
    manifest = storage.read_manifest(folder, storage_options)
    small = {k: v for k, v in metrics.items() if k != "density_hist"}
    return TrainResult(folder, manifest["content_hash"], small, steps, t.tokens_seen, resumed, cfg)
