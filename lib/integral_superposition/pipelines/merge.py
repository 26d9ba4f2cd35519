"""``run_merge``: from a saved SAE and an activation store to a published merged SAE.

The output folder is a regular SAE folder (``save_sae``: ``cfg.json``,
``sae_weights.safetensors``, ``manifest.json`` written last, ``kind="sae"``) plus:

- ``merge_map.parquet``: ``latent, cluster, medoid, distance_to_medoid, cluster_size, is_medoid,
  weight``;
- ``merge_eval.parquet``: original vs merged on the held-out split, with ``original_refit``
  (the original codes with a refit decoder) between them when merges are refit;
- ``merge_sweep.parquet`` and ``merge_sweep.png`` / ``.svg`` when ``params.sweep``.

With ``params.finetune_epochs > 0`` the published SAE is the merge flattened to a plain
``K'``-latent SAE and fine-tuned (``merge.finetune``); the manifest's ``merge.finetune``
records the budget, the recipe and the fine-tune's numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from integral_superposition.merge import evaluate as ev
from integral_superposition.merge.cluster import build_tree
from integral_superposition.merge.finetune import finetune_recipe
from integral_superposition.merge.medoid import merge_map_table
from integral_superposition.merge.params import MergeParams
from integral_superposition.outputs import figure_bytes, jsonable, parquet_bytes
from integral_superposition.pipelines.inputs import load_inputs
from integral_superposition.progress import ProgressFn, Reporter
from integral_superposition.sae.load import (
    check_sae_folder,
    read_sae_manifest,
    save_sae,
)

log = logging.getLogger(__name__)

MERGE_FILES = (
    "merge_map.parquet",
    "merge_eval.parquet",
    "merge_sweep.parquet",
    "merge_sweep.png",
    "merge_sweep.svg",
)
"""The files a merged SAE folder holds besides the SAE's own (``sae.load.SAE_FILES``)."""

_CORE_METRICS = ("fvu", "explained_variance", "l0", "mse")
"""Metrics that are finite whenever their inputs are (CE/KL are NaN without a backend)."""


def _first_non_finite(sae) -> tuple[str, tuple[int, ...], int] | None:
    """``(tensor name, index of its first NaN/inf, count)`` of an SAE's weights, or None."""
    for name, t in sae.state_dict().items():
        if t.is_floating_point():
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                return name, tuple(bad.nonzero()[0].tolist()), int(bad.sum())
    return None


def _check_computation(table: pd.DataFrame, what: str) -> None:
    """``FloatingPointError`` when a core metric of ``table`` is NaN or inf."""
    for col in [c for c in _CORE_METRICS if c in table.columns]:
        vals = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(vals))
        if bad.size:
            row = table.iloc[int(bad[0])]
            who = ", ".join(f"{k}={row[k]}" for k in ("sae", "k_prime", "partition") if k in row)
            raise FloatingPointError(
                f"the merge computation produced {col}={vals[bad[0]]} in the {what} ({who}), "
                "although the store's activations and the SAE's weights are finite"
            )


def _training_config(sae_uri: str, storage_options) -> dict[str, Any] | None:
    """The training config in the SAE's manifest (None for an SAE trained elsewhere)."""
    try:
        return read_sae_manifest(sae_uri, storage_options).get("config")
    except (FileNotFoundError, ValueError):
        return None


def run_merge(
    sae_uri: str,
    store_uri: str | list[str],
    out_uri: str,
    params: MergeParams | Mapping[str, Any] | None = None,
    *,
    backend=None,
    storage_options: Mapping[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
    allow_other_store: bool = False,
) -> dict[str, Any]:
    """Cluster, merge, refit and evaluate the SAE at ``sae_uri`` on the store at ``store_uri``;
    publish the merged SAE at ``out_uri`` and return its manifest. The store must be the one
    the SAE was trained on (``check_training_store``), unless ``allow_other_store=True``.

    ``backend`` (optional) enables the spliced CE / KL metrics. Every argument is checked
    before anything is written; the manifest is written last. NaN or inf stops the merge
    with where it came from: a store row (``NonFiniteActivationsError`` naming the shard
    and row), the SAE's weights (``ValueError``) or the computation (``FloatingPointError``).
    """
    params = params if isinstance(params, MergeParams) else MergeParams.model_validate(params or {})
    if str(out_uri).rstrip("/") == str(sae_uri).rstrip("/"):
        raise ValueError(f"out_uri={out_uri!r} is the source SAE's folder: expected a new location")
    sae, _, store = load_inputs(sae_uri, store_uri, storage_options, allow_other_store)
    # a folder the save would refuse is refused before the merge is computed
    check_sae_folder(out_uri, storage_options, extra=MERGE_FILES)
    sae.eval()
    if sae.is_merged:
        raise ValueError(f"sae_uri={sae_uri!r} holds a merged SAE: merge the original SAE instead")
    bad = _first_non_finite(sae)
    if bad is not None:
        raise ValueError(
            f"sae_uri={sae_uri!r}: the SAE's weights hold NaN or inf values ({bad[0]} has "
            f"{bad[2]}, first at index {list(bad[1])}); merge an SAE with finite weights"
        )
    k = sae.d_sae
    params, notes = ev.dense_fallback(sae, params)
    for note in notes:
        log.warning("merge of %s: %s", sae_uri, note)
    ev.check_params_for(sae, params, store)
    target = params.target_clusters(k)
    sizes = params.sweep_sizes(k) if params.sweep else []
    n_min = 1 if target is None else min([target, *sizes])
    n_sweep = (
        ev.sweep_steps(len(sizes), True, ev.has_refit_control(sae, params)) if params.sweep else 0
    )
    rep = Reporter("merge", on_progress, unit="steps", total=6 + n_sweep)
    with rep:
        return _run_merge(
            sae,
            sae_uri,
            store,
            out_uri,
            params,
            backend,
            storage_options,
            rep,
            target,
            sizes,
            n_min,
            notes,
        )


def _run_merge(
    sae, sae_uri, store, out_uri, params, backend, storage_options, rep, target, sizes, n_min, notes
) -> dict[str, Any]:
    k = sae.d_sae
    tick = rep.advance
    rep.set_phase("similarity and merge tree")
    stats = ev.original_stats(sae, store, params) if ev.uses_original_stats(sae, params) else None
    sim = ev.similarity_for(sae, store, params, stats)
    tree = build_tree(sim, params.linkage, params.graph, params.n_neighbors, n_min)
    labels = tree.cut(target) if target is not None else tree.cut_at(params.distance_threshold)
    tick(phase="merge and refit")
    merged, medoids, dist, refit_info = ev.merge_with_labels(
        sae, labels, sim, params, store=store, stats=stats
    )
    published, finetune_info, recipe = merged, {}, None
    if params.finetune_epochs > 0:
        rep.set_phase("fine-tune")
        recipe = finetune_recipe(
            _training_config(sae_uri, storage_options),
            sae,
            params.finetune_epochs,
            params.test_fraction,
        )
        published, finetune_info = ev.finetune(merged, store, params, recipe)
    bad = _first_non_finite(published)
    if bad is not None:
        raise FloatingPointError(
            f"the merge computation produced NaN or inf values in the merged SAE ({bad[0]} has "
            f"{bad[2]}, first at index {list(bad[1])}), although the store's activations and "
            f"the SAE's weights are finite (refit={params.refit}, "
            f"ridge_lambda={params.ridge_lambda}: a larger ridge_lambda steadies the refit)"
        )
    tick(phase="reference metrics")
    # without the spliced CE: the sweep or the comparison measures it with the others' in one pass
    reference = ev.reference_metrics(sae, store, params)
    tick(phase="sweep" if params.sweep else "evaluate")
    sweep_table = None
    files: dict[str, bytes] = {}
    if params.sweep:
        sweep_table, fig = ev.sweep(
            sae,
            store,
            params,
            backend=backend,
            sizes=sizes,
            similarity=sim,
            tree=tree,
            stats=stats,
            reference=reference,
            recipe=recipe,
            finetuned=(
                {
                    published.d_sae: (
                        published,
                        {
                            **refit_info,
                            **finetune_info,
                            "mean_distance_to_medoid": float(dist.mean()),
                        },
                    )
                }
                if finetune_info and target is not None
                else None
            ),
            on_progress=lambda d, _t, phase=None, base=rep.done: rep.update(base + d, phase=phase),
        )
        _check_computation(sweep_table, "sweep")
        rep.set_phase("evaluate")
        files["merge_sweep.parquet"] = parquet_bytes(sweep_table)
        files["merge_sweep.png"] = figure_bytes(fig, "png", dpi=110)
        files["merge_sweep.svg"] = figure_bytes(fig, "svg", dpi=110)
    same = (
        sweep_table[
            (sweep_table["partition"] == "cluster") & (sweep_table["k_prime"] == published.d_sae)
        ]
        if sweep_table is not None and target is not None
        else None
    )
    if same is not None and len(same):
        # the sweep built this very merge (same tree, cut and refit): reuse its evaluation
        rows = [{"sae": "original", "n_latents": k, **reference.metrics}]
        refit_row = sweep_table[sweep_table["partition"] == "original_refit"]
        for name, sub in (("original_refit", refit_row), ("merged", same)):
            if len(sub):
                m = sub.iloc[0].drop(["k_prime", "fraction", "partition"]).to_dict()
                rows.append({"sae": name, "n_latents": int(sub["k_prime"].iloc[0]), **m})
        eval_table = pd.DataFrame(rows)
    else:
        refit_original, refit_control = None, {}
        if ev.has_refit_control(sae, params):
            refit_original, refit_control = ev.refit_identity(sae, params, store=store, stats=stats)
        eval_table = ev.compare(
            sae,
            published,
            store,
            params,
            backend=backend,
            reference=reference,
            refit_original=refit_original,
            labels=labels,
        )
        if refit_original is not None:
            for key, value in {**refit_control, "mean_distance_to_medoid": 0.0}.items():
                eval_table.loc[eval_table["sae"] == "original_refit", key] = value
        extra = {
            **refit_info,
            **finetune_info,
            "mean_distance_to_medoid": float(dist.mean()),
            "finetuned": bool(finetune_info),
        }
        for key, value in extra.items():
            eval_table.loc[eval_table["sae"] == "merged", key] = value
    _check_computation(eval_table, "evaluation")
    weights = merged.merge_weight.cpu() if merged.merge_weight is not None else None
    files["merge_map.parquet"] = parquet_bytes(merge_map_table(labels, medoids, dist, weights))
    files["merge_eval.parquet"] = parquet_bytes(eval_table)
    sweep_records = (
        [jsonable(r) for r in sweep_table.to_dict("records")] if sweep_table is not None else None
    )
    tick()
    try:
        source_hash = read_sae_manifest(sae_uri, storage_options).get("content_hash")
    except (FileNotFoundError, ValueError):
        source_hash = None
    rows = {r["sae"]: jsonable(r) for r in eval_table.to_dict("records")}
    tick()
    save_sae(
        published,
        out_uri,
        metadata={**sae.metadata, "merged_from": str(sae_uri)},
        training_config=params,
        metrics=rows["merged"],
        activation_manifest_hash=store.content_hash,
        extra_files=files,
        storage_options=storage_options,
        merge={
            "source_sae": str(sae_uri),
            "source_sae_hash": source_hash,
            "n_latents_before": k,
            "n_latents_after": merged.d_sae,
            "aggregation": params.aggregation,
            "dense_fallback": notes,
            "refit": jsonable(refit_info),
            "finetune": (
                {**jsonable(finetune_info), "recipe": recipe.model_dump(mode="json")}
                if recipe is not None
                else None
            ),
            "original_metrics": rows["original"],
            "merged_metrics": rows["merged"],
            "sweep": sweep_records,
        },
    )
    tick()
    return read_sae_manifest(out_uri, storage_options)
