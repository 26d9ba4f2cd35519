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

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from integral_superposition.merge.cluster import DENSE_MAX_LATENTS, MergeTree, build_tree
from integral_superposition.merge.medoid import medoids_from_similarity
from integral_superposition.merge.params import MergeParams
from integral_superposition.merge.refit import (
    RidgeStats,
    accumulate_stats,
    build_merged_sae,
    refit_decoder,
)
from integral_superposition.merge.similarity import LatentSimilarity, latent_firing
from integral_superposition.progress import ProgressFn, Reporter
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
        fires_extra = np.bincount(index, weights=extra.fires > 0, minlength=sae.d_sae) > 0
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
) -> pd.DataFrame:
    """Original vs merged on the held-out split: one row each (``sae`` = original / merged),
    and ``original_refit`` between them when ``refit_original`` (:func:`refit_identity`:
    the original codes with a refit decoder) is given, which separates what the refit does
    from what the merge does. The spliced CE of every row comes from one pass."""
    params = params or MergeParams()
    if not merged.is_merged or merged.d_pre != original.d_sae:
        raise ValueError(
            f"merged must be a merge of original (d_pre={getattr(merged, 'd_pre', None)}, K={original.d_sae})"
        )
    if reference is None:
        reference = reference_metrics(original, store, params)
    saes = {"merged": merged}
    if refit_original is not None:
        saes["original_refit"] = refit_original
    measured = {
        name: _measure_core(sae, store, params, reference.extra) for name, sae in saes.items()
    }
    ce_saes = ({"original": original} if _needs_ce(reference, params, backend) else {}) | saes
    for name, ce in spliced_metrics(ce_saes, store, params, backend).items():
        (reference.metrics if name == "original" else measured[name][0]).update(ce)
    for name, sae in saes.items():
        metrics, pairs = measured[name]
        if reference.significant is not None and pairs is not None:
            labels = sae.merge_index.cpu().numpy()
            metrics.update(enrichment_retention(reference.significant, pairs, labels))
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


def check_params_for(sae: SparseAutoencoder, params: MergeParams) -> None:
    """Errors that depend on the SAE's size, raised before any work."""
    if params.similarity.get("reconstruction", 0) > 0 and sae.d_sae > DENSE_MAX_LATENTS:
        raise ValueError(
            f"similarity 'reconstruction' needs the dense K x K Gram matrix of the codes; K={sae.d_sae} > "
            f"{DENSE_MAX_LATENTS}: use 'decoder', 'encoder' or 'coactivation' (with graph='knn')"
        )
    params.target_clusters(sae.d_sae)


def uses_original_stats(sae: SparseAutoencoder, params: MergeParams) -> bool:
    """Whether one pass of original-code statistics serves this merge (and its sweep)."""
    if params.similarity.get("reconstruction", 0) > 0:
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
    return LatentSimilarity(
        sae, params.similarity, firing=firing, coactivation=params.coactivation, stats=stats
    )


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
    statistics of the *original* codes (sum aggregation reuses them; ``max`` streams
    ``store`` again).
    """
    medoids, dist = medoids_from_similarity(sim, labels)
    merged = build_merged_sae(sae, labels, medoids, mode=params.aggregation)
    info: dict[str, float] = {}
    if params.refit:
        if params.aggregation == "sum" and stats is not None:
            merged_stats = stats.merged(labels)
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
    refit = build_merged_sae(sae, ident, ident, mode=params.aggregation)
    if stats is None:
        if store is None:
            raise ValueError("refit_identity needs store= or the original codes' stats=")
        stats = accumulate_stats(refit, _fit_chunks(store, params))
    res = refit_decoder(
        refit, stats=stats, ridge_lambda=params.ridge_lambda, fit_bias=params.refit_bias
    )
    return refit, {"fit_fvu": res.fit_fvu, "ridge_lambda_abs": res.lam, "fit_tokens": res.n_tokens}


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
    on_progress: ProgressFn | None = None,
) -> tuple[pd.DataFrame, Figure]:
    """Merge ``sae`` to each ``K'`` in ``sizes`` (default ``params.sweep_fractions`` of K) by
    clustering and by a random partition of the same sizes; evaluate each on held-out tokens.

    Returns the table (one row per ``K'`` x ``partition`` in ``original``/``cluster``/``random``,
    and, when :func:`has_refit_control`, ``original_refit``: the original codes with a refit
    decoder, :func:`refit_identity`) and a figure of FVU, CE recovered and enrichment retention against
    ``K'``. Every SAE's spliced CE comes from one pass over the CE documents.
    """
    params = params or MergeParams()
    k = sae.d_sae
    sizes = sorted(set(sizes or params.sweep_sizes(k)), reverse=True)
    for s in sizes:
        if not 1 <= s <= k:
            raise ValueError(f"sweep size K'={s}: expected 1 <= K' <= K={k}")
    with_refit = has_refit_control(sae, params)
    steps = sweep_steps(len(sizes), control, with_refit)
    rep = Reporter("merge sweep", on_progress, unit="steps", total=steps)
    tick = rep.advance

    check_params_for(sae, params)
    if stats is None and uses_original_stats(sae, params):
        stats = original_stats(sae, store, params)
    tick(phase="similarity")
    sim = similarity or similarity_for(sae, store, params, stats)
    if tree is None:
        tree = build_tree(sim, params.linkage, params.graph, params.n_neighbors, min(sizes))
    tick(phase="reference metrics")
    ref = reference or reference_metrics(sae, store, params)
    tick()
    rng = np.random.default_rng(params.control_seed)
    variants: list[tuple[int, str, SparseAutoencoder, dict[str, float]]] = []
    if with_refit:
        rep.set_phase("original SAE, decoder refit")
        refit, info = refit_identity(sae, params, store=store, stats=stats)
        variants.append((k, "original_refit", refit, {**info, "mean_distance_to_medoid": 0.0}))
        tick()
    for size in sizes:
        lab = tree.cut(size)
        parts = [("cluster", lab)] + ([("random", rng.permutation(lab))] if control else [])
        for name, labels in parts:
            rep.set_phase(f"sweep K'={size} {name}")
            merged, _med, dist, info = merge_with_labels(
                sae, labels, sim, params, store=store, stats=stats
            )
            variants.append(
                (size, name, merged, {**info, "mean_distance_to_medoid": float(dist.mean())})
            )
            tick()
    rows_m = []
    for size, name, merged, _info in variants:
        rep.set_phase(f"evaluate K'={size} {name}")
        m, pairs = _measure_core(merged, store, params, ref.extra)
        if ref.significant is not None and pairs is not None:
            labels = merged.merge_index.cpu().numpy()
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
    for (size, name, _merged, info), m in zip(variants, rows_m, strict=True):
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
