"""What a merge costs: original vs merged SAE on the same held-out tokens, and the K' sweep.

Metrics (one row per SAE):

- ``fvu``, ``explained_variance``, ``l0``, ``dead_frac`` (and the other
  :class:`~integral_superposition.sae.metrics.LatentStats` summaries) over the held-out
  tokens;
- ``ce_recovered``, ``delta_ce``, ``kl`` from spliced forwards through a backend, when one
  is given (``ce_docs`` held-out documents);
- ``enrichment_retention``: of the (latent, label) pairs whose top-``n`` token set is
  enriched at BH ``q < q_threshold`` before the merge, the fraction whose cluster is still
  enriched for that label after it.

:func:`sweep` merges to several ``K'`` (default K/2, K/4, K/8, K/16) with the clustering and
with a random partition of the same cluster sizes (the labels permuted), from one merge
tree and one pass of ridge statistics, and plots FVU, CE recovered and enrichment retention
against ``K'``.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from integral_superposition.config import SAEConfig
from integral_superposition.merge.cluster import DENSE_MAX_LATENTS, MergeTree, build_tree
from integral_superposition.merge.finetune import finetune_merged, finetune_recipe, flatten_merged
from integral_superposition.merge.measure import (  # noqa: F401  (re-exported)
    DeadRows,
    Reference,
    _measure_core,
    _needs_ce,
    _split,
    compare,
    dead_rows,
    enrichment_retention,
    measure,
    measure_many,
    reference_metrics,
    spliced_metrics,
)
from integral_superposition.merge.medoid import medoids_from_similarity
from integral_superposition.merge.params import MergeParams
from integral_superposition.merge.refit import (
    RidgeStats,
    accumulate_stats,
    build_merged_sae,
    projection_weights,
    refit_decoder,
)
from integral_superposition.merge.similarity import (
    LatentSimilarity,
    label_profiles,
    latent_firing,
)
from integral_superposition.progress import ProgressFn, Reporter
from integral_superposition.sae.model import SparseAutoencoder

log = logging.getLogger(__name__)


def dense_fallback(sae: SparseAutoencoder, params: MergeParams) -> tuple[MergeParams, list[str]]:
    """``params`` as they run on ``sae``, and a note per change: above
    :data:`DENSE_MAX_LATENTS` latents the ``K x K`` Gram matrix of the codes does not fit, so
    ``aggregation="projection"`` runs as ``"sum"``. Unchanged otherwise (a ``reconstruction``
    similarity there is refused by :func:`check_params_for`)."""
    k = sae.d_sae
    if k <= DENSE_MAX_LATENTS or params.aggregation != "projection":
        return params, []
    note = (
        f"aggregation='projection' -> 'sum' (K={k} > {DENSE_MAX_LATENTS} latents: the dense "
        "K x K Gram matrix of the codes does not fit)"
    )
    return params.model_copy(update={"aggregation": "sum"}), [note]


def check_params_for(sae: SparseAutoencoder, params: MergeParams, store=None) -> None:
    """Errors that depend on the SAE's size (and, given the ``store``, on its labels), raised
    before any work (``params`` after :func:`dense_fallback`)."""
    if store is not None:
        _check_labelled(store, params)
    if params.similarity.get("reconstruction", 0) > 0 and sae.d_sae > DENSE_MAX_LATENTS:
        raise ValueError(
            f"similarity 'reconstruction' needs the dense K x K Gram matrix of the codes; K={sae.d_sae} > "
            f"{DENSE_MAX_LATENTS}: use 'decoder', 'encoder' or 'coactivation' (with graph='knn')"
        )
    if params.aggregation == "projection" and sae.d_sae > DENSE_MAX_LATENTS:
        raise ValueError(
            f"aggregation='projection' needs the dense K x K Gram matrix of the codes; K={sae.d_sae} > "
            f"{DENSE_MAX_LATENTS}: use aggregation='sum'"
        )
    params.target_clusters(sae.d_sae)


def uses_original_stats(sae: SparseAutoencoder, params: MergeParams) -> bool:
    """Whether one pass of original-code statistics serves this merge (and its sweep)."""
    if params.similarity.get("reconstruction", 0) > 0 or params.aggregation == "projection":
        return True
    return params.refit and params.aggregation == "sum" and sae.d_sae <= DENSE_MAX_LATENTS


def similarity_for(
    sae: SparseAutoencoder,
    store,
    params: MergeParams,
    stats: RidgeStats | None = None,
    on_progress: ProgressFn | None = None,
) -> LatentSimilarity:
    """The :class:`LatentSimilarity` ``params`` asks for (firing matrix on the fit split;
    ``stats`` of the original codes for ``reconstruction``)."""
    _check_labelled(store, params)
    firing = None
    if params.similarity.get("coactivation", 0) > 0:
        firing = latent_firing(
            sae,
            store,
            _split(store, params.fit_split, params),
            params.chunk_tokens,
            on_progress,
            level=params.coactivation_level,
        )
    if params.similarity.get("reconstruction", 0) > 0 and stats is None:
        stats = original_stats(sae, store, params)
    profiles = None
    if params.similarity.get("labels", 0) > 0:
        profiles = _label_profiles(sae, store, params, firing, on_progress)
    return LatentSimilarity(
        sae,
        params.similarity,
        firing=firing,
        coactivation=params.coactivation,
        stats=stats,
        profiles=profiles,
    )


def _check_labelled(store, params: MergeParams) -> None:
    """The ``labels`` similarity needs a store with two or more labels."""
    if params.similarity.get("labels", 0) <= 0:
        return
    names = list(getattr(store, "label_names", None) or [])
    if len(names) < 2 or getattr(store, "labels", None) is None:
        raise ValueError(
            f"similarity={params.similarity}: 'labels' needs a store with at least two labels "
            f"(this one has {len(names)}); drop 'labels' from the similarity"
        )


def _label_profiles(sae, store, params: MergeParams, firing, on_progress) -> np.ndarray:
    """``[K, n_labels]`` label profiles on the fit split's documents (``labels`` similarity)."""
    names = list(store.label_names)
    mask = _split(store, params.fit_split, params)
    if firing is None or params.coactivation_level != "document":
        firing = latent_firing(sae, store, mask, params.chunk_tokens, on_progress, level="document")
    selected = np.flatnonzero(mask)
    _, first = np.unique(store.doc_ids[selected], return_index=True)  # rows of latent_firing
    doc_labels = np.asarray(store.labels)[selected[first]]
    return label_profiles(firing, doc_labels, len(names))


def merge_with_labels(
    sae: SparseAutoencoder,
    labels: np.ndarray,
    sim: LatentSimilarity,
    params: MergeParams,
    *,
    store=None,
    stats: RidgeStats | None = None,
) -> tuple[SparseAutoencoder, np.ndarray, np.ndarray, dict[str, float]]:
    """Medoids, the merged SAE and its refit for one partition.

    Returns ``(merged, medoids [K'], distance to medoid [K], refit info)``. ``stats``: ridge
    statistics of the *original* codes (sum and projection aggregation reuse them, projection
    needs them; ``max`` streams ``store`` again).
    """
    medoids, dist = medoids_from_similarity(sim, labels)
    weights = rows = None
    if params.aggregation == "projection":
        if stats is None:
            raise ValueError("aggregation='projection' needs the original codes' stats=")
        w, rows = projection_weights(sae.W_dec, stats, labels)
        # stored as float32 in the SAE: the statistics below use exactly those weights
        weights = np.maximum(w, 0.0).astype(np.float32).astype(np.float64)
    mode = "max" if params.aggregation == "max" else "sum"
    merged = build_merged_sae(sae, labels, medoids, mode=mode, weights=weights, rows=rows)
    info: dict[str, float] = {}
    if params.refit:
        if mode == "sum" and stats is not None:
            merged_stats = stats.merged(labels, weights)
        else:
            if store is None:
                raise ValueError(
                    "refitting needs store= (or original-code stats for sum aggregation)"
                )
            merged_stats = accumulate_stats(merged, _fit_chunks(store, params))
        res = refit_decoder(
            merged, stats=merged_stats, ridge_lambda=params.ridge_lambda, fit_bias=params.refit_bias
        )
        info = {"fit_fvu": res.fit_fvu, "ridge_lambda_abs": res.lam, "fit_tokens": res.n_tokens}
    return merged, medoids, dist, info


def refit_identity(
    sae: SparseAutoencoder, params: MergeParams, *, store=None, stats: RidgeStats | None = None
) -> tuple[SparseAutoencoder, dict[str, float]]:
    """The original SAE's codes with a decoder refit as every merge's is (the identity
    merge, ``K' = K``): the control that tells what the refit does from what the merge does.

    Returns ``(SAE, refit info)``; ``stats``: ridge statistics of the original codes (else
    one pass over ``store``'s fit split).
    """
    k = sae.d_sae
    ident = np.arange(k)
    # the identity merge's codes are the original ones for every aggregation
    refit = build_merged_sae(
        sae, ident, ident, mode="max" if params.aggregation == "max" else "sum"
    )
    if stats is None:
        if store is None:
            raise ValueError("refit_identity needs store= or the original codes' stats=")
        stats = accumulate_stats(refit, _fit_chunks(store, params))
    res = refit_decoder(
        refit, stats=stats, ridge_lambda=params.ridge_lambda, fit_bias=params.refit_bias
    )
    return refit, {"fit_fvu": res.fit_fvu, "ridge_lambda_abs": res.lam, "fit_tokens": res.n_tokens}


def finetune(
    merged: SparseAutoencoder, store, params: MergeParams, recipe: SAEConfig
) -> tuple[SparseAutoencoder, dict[str, float]]:
    """The merge as a plain SAE fine-tuned for ``params.finetune_epochs`` with ``recipe``
    (:mod:`~integral_superposition.merge.finetune`; ``recipe.k`` is replaced by ``K'``).

    Returns ``(flattened SAE, the fine-tune's record)``."""
    flat = flatten_merged(merged)
    cfg = recipe.model_copy(
        update={
            "k": flat.d_sae,
            "top_k": flat.top_k,
            "epochs": float(params.finetune_epochs),
            "test_fraction": params.test_fraction,
        }
    )
    return flat, finetune_merged(flat, store, cfg)


def has_refit_control(sae: SparseAutoencoder, params: MergeParams) -> bool:
    """Whether the evaluation adds the original SAE with a refit decoder: when merges are
    refit and the original codes' ``K x K`` statistics fit (``K <= DENSE_MAX_LATENTS``)."""
    return params.refit and sae.d_sae <= DENSE_MAX_LATENTS


def sweep_steps(n_sizes: int, control: bool = True, refit: bool = True) -> int:
    """Progress steps of :func:`sweep`: three stages, the refit control, one per merge, the CE."""
    return 3 + int(refit) + n_sizes * (2 if control else 1) + 1


def _fit_chunks(store, params: MergeParams):
    for _rows, x in store.iter_chunks(
        params.chunk_tokens, mask=_split(store, params.fit_split, params)
    ):
        yield x


def original_stats(
    sae: SparseAutoencoder, store, params: MergeParams, on_progress=None
) -> RidgeStats:
    """Ridge statistics of the original codes on the fit split (one streaming pass)."""
    return accumulate_stats(sae, _fit_chunks(store, params), on_progress=on_progress)


def sweep(
    sae: SparseAutoencoder,
    store,
    params: MergeParams | None = None,
    *,
    backend=None,
    sizes: list[int] | None = None,
    control: bool = True,
    similarity: LatentSimilarity | None = None,
    tree: MergeTree | None = None,
    stats: RidgeStats | None = None,
    reference: Reference | None = None,
    recipe: SAEConfig | None = None,
    finetuned: dict[int, tuple[SparseAutoencoder, dict[str, float]]] | None = None,
    on_progress: ProgressFn | None = None,
) -> tuple[pd.DataFrame, Figure]:
    """Merge ``sae`` to each ``K'`` in ``sizes`` (default ``params.sweep_fractions`` of K) by
    clustering and by a random partition of the same sizes; evaluate each on held-out tokens.

    Returns the table (one row per ``K'`` x ``partition`` in ``original``/``cluster``/``random``,
    and, when :func:`has_refit_control`, ``original_refit``: the original codes with a refit
    decoder, :func:`refit_identity`) and a figure of FVU, CE recovered and enrichment retention against
    ``K'``. Every SAE's spliced CE comes from one pass over the CE documents.

    With ``params.finetune_epochs > 0`` every merge, cluster and random alike, is flattened
    and fine-tuned with ``recipe`` (the original SAE's training config: :func:`finetune`;
    ``finetuned``: the clustering's fine-tuned merges already built, by ``K'``); its row
    says so (``finetuned``, ``finetune_*``). Latent ``j`` still stands for cluster ``j``.
    """
    params, notes = dense_fallback(sae, params or MergeParams())
    for note in notes:
        log.warning("merge sweep: %s", note)
    k = sae.d_sae
    sizes = sorted(set(sizes or params.sweep_sizes(k)), reverse=True)
    for s in sizes:
        if not 1 <= s <= k:
            raise ValueError(f"sweep size K'={s}: expected 1 <= K' <= K={k}")
    with_refit = has_refit_control(sae, params)
    steps = sweep_steps(len(sizes), control, with_refit)
    rep = Reporter("merge sweep", on_progress, unit="steps", total=steps)
    tick = rep.advance

    check_params_for(sae, params, store)
    if stats is None and uses_original_stats(sae, params):
        stats = original_stats(sae, store, params)
    tick(phase="similarity")
    sim = similarity or similarity_for(sae, store, params, stats)
    if tree is None:
        tree = build_tree(sim, params.linkage, params.graph, params.n_neighbors, min(sizes))
    tick(phase="reference metrics")
    ref = reference or reference_metrics(sae, store, params)
    tick()
    tune = params.finetune_epochs > 0
    if tune and recipe is None:
        recipe = finetune_recipe(None, sae, params.finetune_epochs, params.test_fraction)
    finetuned = finetuned or {}
    rng = np.random.default_rng(params.control_seed)
    variants: list[tuple[int, str, SparseAutoencoder, dict[str, float], np.ndarray]] = []
    if with_refit:
        rep.set_phase("original SAE, decoder refit")
        refit, info = refit_identity(sae, params, store=store, stats=stats)
        info = {**info, "mean_distance_to_medoid": 0.0, "finetuned": False}
        variants.append((k, "original_refit", refit, info, np.arange(k)))
        tick()
    for size in sizes:
        lab = tree.cut(size)
        parts = [("cluster", lab)] + ([("random", rng.permutation(lab))] if control else [])
        for name, labels in parts:
            rep.set_phase(f"sweep K'={size} {name}")
            if name == "cluster" and size in finetuned:
                merged, info = finetuned[size]
            else:
                merged, _med, dist, info = merge_with_labels(
                    sae, labels, sim, params, store=store, stats=stats
                )
                info = {**info, "mean_distance_to_medoid": float(dist.mean())}
                if tune:
                    rep.set_phase(f"fine-tune K'={size} {name}")
                    merged, tuned = finetune(merged, store, params, recipe)
                    info.update(tuned)
            variants.append((size, name, merged, {**info, "finetuned": tune}, labels))
            tick()
    rows_m = []
    for size, name, merged, _info, labels in variants:
        rep.set_phase(f"evaluate K'={size} {name}")
        # the original's firing on the dead count's extra rows serves only its own merges
        m, pairs = _measure_core(merged, store, params, ref.extra if merged.is_merged else None)
        if ref.significant is not None and pairs is not None:
            m.update(enrichment_retention(ref.significant, pairs, labels))
        rows_m.append(m)
    rep.set_phase("spliced CE")
    ce_saes = {f"{i}": v[2] for i, v in enumerate(variants)}
    if _needs_ce(ref, params, backend):
        ce_saes["original"] = sae
    for name, ce in spliced_metrics(ce_saes, store, params, backend).items():
        (ref.metrics if name == "original" else rows_m[int(name)]).update(ce)
    tick()
    rows = [{"k_prime": k, "fraction": 1.0, "partition": "original", **ref.metrics}]
    for (size, name, _merged, info, _labels), m in zip(variants, rows_m, strict=True):
        rows.append({"k_prime": size, "fraction": size / k, "partition": name, **info, **m})
    table = pd.DataFrame(rows)
    return table, plot_sweep(table)


def plot_sweep(table: pd.DataFrame) -> Figure:
    """FVU, CE recovered and enrichment retention against ``K'`` (log2 axis), cluster vs random,
    with the original SAE and its refit-decoder control as horizontal lines."""
    panels = [
        ("fvu", "FVU (held-out)"),
        ("ce_recovered", "CE loss recovered"),
        ("enrichment_retention", "enrichment retained (q < threshold)"),
    ]
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), sharex=True)
    orig = table[table["partition"] == "original"]
    refit = table[table["partition"] == "original_refit"]
    styles = {
        "cluster": ("C0", "-", "o", "clustering"),
        "random": ("C3", "--", "s", "random partition"),
    }
    for ax, (col, title) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("merged latents K'")
        ax.set_xscale("log", base=2)
        if col not in table or table[col].isna().all():
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            continue
        for part, (color, ls, marker, label) in styles.items():
            sub = table[table["partition"] == part].sort_values("k_prime")
            if len(sub) and not sub[col].isna().all():
                ax.plot(sub["k_prime"], sub[col], color=color, ls=ls, marker=marker, label=label)
        if len(orig) and col in orig and not orig[col].isna().all():
            ax.axhline(
                float(orig[col].iloc[0]),
                color="0.4",
                ls=":",
                label=f"original (K={int(orig['k_prime'].iloc[0])})",
            )
        if len(refit) and col in refit and not refit[col].isna().all():
            ax.axhline(
                float(refit[col].iloc[0]), color="C2", ls="-.", label="original, decoder refit"
            )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig
