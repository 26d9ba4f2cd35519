"""Held-out measurement of one SAE or several (the original, its merges, its refit twin) on
the same tokens: FVU, L0, dead fraction, spliced CE / KL from one shared pass, and the
enriched ``(latent, label)`` pairs behind enrichment retention."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from integral_superposition.merge.params import MergeParams
from integral_superposition.sae.model import SparseAutoencoder


@dataclass
class Reference:
    """The original SAE's evaluation, computed once and shared by every comparison."""

    metrics: dict[str, float]
    significant: np.ndarray | None
    """int64 ``[P, 2]``: (latent, label id) pairs enriched before the merge (None: no labels)."""
    extra: DeadRows | None = None
    """The original latents' firing on the rows the dead count adds to the held-out split."""


@dataclass
class DeadRows:
    """How often each original latent fires on the rows outside the held-out split that the
    dead count adds (``sae.metrics.dead_count_rows``): a merged latent of codes that are never
    negative fires on a row exactly when one of its members does, so one pass of the original
    SAE serves the dead fraction of every merge."""

    fires: np.ndarray
    """int64 ``[K]``: rows on which each original latent fires."""
    n_tokens: int


def _codes_nonnegative(sae: SparseAutoencoder) -> bool:
    """Whether ``sae``'s codes are never negative (so a merged code is 0 only when every
    member's is)."""
    if sae.architecture in ("relu", "topk"):
        return True
    threshold = getattr(sae, "threshold", None)
    return (
        sae.architecture != "groupmax"
        and threshold is not None
        and bool((threshold.detach() >= 0).all())
    )


def dead_rows(sae: SparseAutoencoder, store, params: MergeParams) -> DeadRows | None:
    """:class:`DeadRows` of the original ``sae`` (None when the held-out split alone is long
    enough for the dead count, or the codes can be negative)."""
    from integral_superposition.sae.metrics import dead_count_rows, latent_stats

    extra = dead_count_rows(_split(store, params.eval_split, params))
    if extra is None or sae.is_merged or not _codes_nonnegative(sae):
        return None
    stats = latent_stats(sae, store, extra, params.chunk_tokens)
    return DeadRows(np.asarray(stats.fire_count, dtype=np.int64), int(stats.n_tokens))


def _split(store, name: str, params: MergeParams) -> np.ndarray:
    return store.split_mask(name, test_fraction=params.test_fraction, seed=params.split_seed)


def _enrichment_pairs(top, store, q_threshold: float) -> np.ndarray:
    from integral_superposition.analysis.enrichment import fisher_enrichment

    table = fisher_enrichment(top, store.labels, label_names=store.label_names, alpha=q_threshold)
    sig = table[table["significant"].to_numpy()]
    return np.stack([sig["latent"].to_numpy(), sig["label_id"].to_numpy()], 1).astype(np.int64)


def _has_labels(store) -> bool:
    labels = getattr(store, "labels", None)
    return labels is not None and len(getattr(store, "label_names", []) or []) >= 2


_CE_KEYS = ("ce_recovered", "delta_ce", "kl")


def _measure_core(
    sae: SparseAutoencoder, store, params: MergeParams, extra: DeadRows | None = None
) -> tuple[dict[str, float], np.ndarray | None]:
    """Held-out metrics of one SAE without the spliced CE, and its enriched pairs ``[P, 2]``.

    ``extra``: the original latents' firing on the dead count's added rows; the dead fraction
    of ``sae`` (the original or a merge of it) is then taken from them instead of a pass of
    ``sae`` over those rows."""
    from integral_superposition.analysis.scan import scan_latents
    from integral_superposition.sae.metrics import evaluate_sae

    shared = extra is not None and _codes_nonnegative(sae)
    out = evaluate_sae(
        sae,
        store,
        None,
        split=params.eval_split,
        test_fraction=params.test_fraction,
        split_seed=params.split_seed,
        chunk_tokens=params.chunk_tokens,
        **({"dead_min_tokens": 0} if shared else {}),
    )
    if shared:
        index = sae.merge_index.cpu().numpy() if sae.is_merged else np.arange(sae.d_sae)
        counts = extra.fires > 0
        if getattr(sae, "merge_weight", None) is not None:  # a member of weight 0 never counts
            counts = counts & (sae.merge_weight.cpu().numpy() > 0)
        fires_extra = np.bincount(index, weights=counts, minlength=sae.d_sae) > 0
        fires_split = np.asarray(out["density"]) > 0
        out["dead_frac"] = float((~fires_split & ~fires_extra).mean())
        out["dead_tokens"] = int(out["n_tokens"]) + extra.n_tokens
    metrics = {
        k: v for k, v in out.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for k in _CE_KEYS:
        metrics.setdefault(k, float("nan"))
    pairs = None
    if _has_labels(store):
        mask = _split(store, params.eval_split, params)
        scan = scan_latents(
            sae,
            store,
            n_top=min(params.top_n, int(mask.sum())),
            mask=mask,
            chunk_tokens=params.chunk_tokens,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            pairs = _enrichment_pairs(scan.top, store, params.q_threshold)
        metrics["n_enriched"] = int(pairs.shape[0])
    return metrics, pairs


def spliced_metrics(
    saes: dict[str, SparseAutoencoder], store, params: MergeParams, backend=None
) -> dict[str, dict[str, float]]:
    """Spliced CE / KL of several SAEs on the same ``ce_docs`` held-out documents, from one
    clean and one zero-ablated forward per batch plus one spliced forward per SAE
    (``sae.metrics.spliced_ce_many``). ``{}`` without a backend, with ``ce_docs = 0`` or
    no SAE."""
    from integral_superposition.sae.metrics import store_spliced_ce

    if backend is None or params.ce_docs == 0 or not saes:
        return {}
    return store_spliced_ce(
        backend,
        saes,
        store,
        _split(store, params.eval_split, params),
        n_docs=params.ce_docs,
        batch_size=params.ce_batch_size,
    )


@torch.no_grad()
def measure_many(
    saes: dict[str, SparseAutoencoder], store, params: MergeParams, *, backend=None
) -> dict[str, tuple[dict[str, float], np.ndarray | None]]:
    """:func:`measure` of several SAEs: ``{name: (metrics, enriched pairs)}``; their spliced
    CE / KL come from one pass over the CE documents (:func:`spliced_metrics`)."""
    out = {name: _measure_core(sae, store, params) for name, sae in saes.items()}
    for name, ce in spliced_metrics(saes, store, params, backend).items():
        out[name][0].update(ce)
    return out


@torch.no_grad()
def measure(
    sae: SparseAutoencoder, store, params: MergeParams, *, backend=None
) -> tuple[dict[str, float], np.ndarray | None]:
    """Held-out metrics of one SAE and its enriched ``(latent, label id)`` pairs ``[P, 2]``.

    FVU, L0, dead fraction come from :func:`integral_superposition.sae.metrics.evaluate_sae`;
    with a ``backend``, the spliced CE / KL from ``sae.metrics.spliced_ce_many`` on
    ``ce_docs`` held-out documents; the enrichment from the top-``top_n`` held-out tokens of
    each latent (``analysis.enrichment.fisher_enrichment``).
    """
    return measure_many({"sae": sae}, store, params, backend=backend)["sae"]


def _needs_ce(ref: Reference, params: MergeParams, backend) -> bool:
    """Whether the reference still lacks the spliced CE that ``backend`` could measure."""
    return (
        backend is not None
        and params.ce_docs > 0
        and not np.isfinite(ref.metrics.get("ce_recovered", float("nan")))
    )


def enrichment_retention(
    before: np.ndarray, after: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Fraction of enriched ``(latent, label)`` pairs ``before`` ``[P, 2]`` whose cluster
    ``labels[latent]`` is enriched for the same label in ``after`` ``[Q, 2]`` (cluster ids)."""
    if before.shape[0] == 0:
        return {"enrichment_retention": float("nan"), "n_enriched_before": 0, "n_retained": 0}
    n_lab = int(max(before[:, 1].max(initial=0), after[:, 1].max(initial=0))) + 1
    keys_after = np.unique(after[:, 0] * n_lab + after[:, 1])
    mapped = labels[before[:, 0]] * n_lab + before[:, 1]
    kept = np.isin(mapped, keys_after)
    return {
        "enrichment_retention": float(kept.mean()),
        "n_enriched_before": int(before.shape[0]),
        "n_retained": int(kept.sum()),
    }


def compare(
    original: SparseAutoencoder,
    merged: SparseAutoencoder,
    store,
    params: MergeParams | None = None,
    *,
    backend=None,
    reference: Reference | None = None,
    refit_original: SparseAutoencoder | None = None,
    labels: np.ndarray | None = None,
) -> pd.DataFrame:
    """Original vs merged on the held-out split: one row each (``sae`` = original / merged),
    and ``original_refit`` between them when ``refit_original`` (:func:`refit_identity`:
    the original codes with a refit decoder) is given, which separates what the refit does
    from what the merge does. The spliced CE of every row comes from one pass.

    ``merged`` is a merged SAE of ``original``, or a plain ``K'``-latent SAE standing for a
    merge (a fine-tuned one: ``merge.finetune``) with ``labels`` ``int[K]``, the cluster of
    every original latent."""
    params = params or MergeParams()
    if labels is None:
        if not merged.is_merged or merged.d_pre != original.d_sae:
            raise ValueError(
                f"merged must be a merge of original (d_pre={getattr(merged, 'd_pre', None)}, "
                f"K={original.d_sae}), or a plain SAE given with labels="
            )
        labels = merged.merge_index.cpu().numpy()
    labels = np.asarray(labels)
    if labels.shape != (original.d_sae,) or int(labels.max()) >= merged.d_sae:
        raise ValueError(
            f"labels has shape {labels.shape} and values up to {int(labels.max())}: expected "
            f"[K={original.d_sae}] cluster ids below K'={merged.d_sae}"
        )
    if reference is None:
        reference = reference_metrics(original, store, params)
    saes = {"merged": merged}
    if refit_original is not None:
        saes["original_refit"] = refit_original
    # the original's firing on the dead count's extra rows serves only its own merges
    measured = {
        name: _measure_core(sae, store, params, reference.extra if sae.is_merged else None)
        for name, sae in saes.items()
    }
    ce_saes = ({"original": original} if _needs_ce(reference, params, backend) else {}) | saes
    for name, ce in spliced_metrics(ce_saes, store, params, backend).items():
        (reference.metrics if name == "original" else measured[name][0]).update(ce)
    for name, sae in saes.items():
        metrics, pairs = measured[name]
        if reference.significant is not None and pairs is not None:
            lab = labels if name == "merged" else sae.merge_index.cpu().numpy()
            metrics.update(enrichment_retention(reference.significant, pairs, lab))
    rows = [{"sae": "original", "n_latents": original.d_sae, **reference.metrics}]
    if refit_original is not None:
        rows.append(
            {"sae": "original_refit", "n_latents": original.d_sae, **measured["original_refit"][0]}
        )
    rows.append({"sae": "merged", "n_latents": merged.d_sae, **measured["merged"][0]})
    return pd.DataFrame(rows)


def reference_metrics(
    original: SparseAutoencoder, store, params: MergeParams, *, backend=None
) -> Reference:
    """Evaluate the original SAE once (metrics and its enriched pairs). Without a
    ``backend`` its CE stays NaN until :func:`sweep` or :func:`compare` measures it in
    their shared CE pass."""
    extra = dead_rows(original, store, params)
    metrics, pairs = _measure_core(original, store, params, extra)
    metrics.update(
        spliced_metrics({"original": original}, store, params, backend).get("original", {})
    )
    return Reference(metrics, pairs, extra)
