"""``run_analysis``: everything the project knows about a trained SAE's latents, published as
one output directory (tables, figures, dashboards, manifest last).

Layout of ``out_uri``::

    manifest.json                 kind "analysis": params, SAE and activation hashes, files
    summary.json                  scalar metrics, L0 distribution, counts, timings
    tables/latents.parquet        one row per latent: statistics, best label, 2-D map, cluster
    tables/enrichment.parquet     tidy (latent, label, level) enrichment tests; level = unit
    tables/enrichment_control.parquet  shuffled-label control: (level, seed) tests at q < alpha
    tables/top_latents.parquet    best latents per label at the lead unit, near-duplicates grouped
    tables/probe.parquet          sparse probes per label: top-k latents, random, dense
    tables/examples.parquet       top and quantile examples with context windows
    tables/neighbours.parquet     co-activation Jaccard neighbours
    tables/activation_hist.parquet  non-zero (latent, label, log10 bin) activation counts
    tables/logit_lens.parquet     promoted / suppressed tokens (when a backend is given)
    figures/*.png, figures/*.svg  density, L0, decoder geometry, 2-D map, heatmaps
    dashboards/index.html         sortable, filterable index of the latents
    dashboards/latents/NNNNN.html one self-contained page per latent

It needs only the saved SAE and the stored activations (and, for the logit lens, a backend).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from integral_superposition.analysis import enrichment as enr
from integral_superposition.analysis.generic import generic_latents, token_fire_rates
from integral_superposition.analysis.jaccard_sparse import (
    firing_matrix,
    jaccard_neighbours,
)
from integral_superposition.analysis.labels import label_enrichment
from integral_superposition.analysis.logit_lens import logit_lens_for_backend
from integral_superposition.analysis.params import AnalysisParams
from integral_superposition.analysis.probe import (
    doc_latent_matrix,
    doc_mean_activations,
    mean_over_labels,
    sparse_probe,
)
from integral_superposition.analysis.reducer import decoder_directions, reduce_2d
from integral_superposition.analysis.scan import scan_latents
from integral_superposition.analysis.select import row_uniform
from integral_superposition.analysis.stats import (
    l0_distribution,
    latent_table,
    stats_from_scan,
)
from integral_superposition.analysis.top_tokens import (
    collect_examples,
    decode_tokens,
    tokenizer_for,
)
from integral_superposition.outputs import OutputWriter
from integral_superposition.pipelines.analyze_inputs import dead_count, resolve_labels
from integral_superposition.pipelines.analyze_publish import (
    publish_dashboards,
    publish_figures,
    publish_tables,
)
from integral_superposition.pipelines.inputs import load_inputs
from integral_superposition.progress import ProgressFn, Reporter
from integral_superposition.sae.encode import default_chunk_tokens

log = logging.getLogger(__name__)

_STAGES = (
    "contexts",
    "enrichment",
    "probe",
    "neighbours",
    "map",
    "logit_lens",
    "tables",
    "figures",
    "dashboards",
)

__all__ = ["dead_count", "resolve_labels", "run_analysis"]


@dataclass
class _Progress:
    """``on_progress(done, total)``: one unit per scanned chunk, then one per later stage."""

    fn: Reporter | None
    total: int
    done: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    _t: float = field(default_factory=time.perf_counter)

    def set(self, done: int, phase: str = "scan") -> None:
        self.done = min(self.total, done)
        if self.fn is not None:
            self.fn(self.done, self.total, phase=phase)

    def step(self, name: str, n: int = 1) -> None:
        """Stage ``name`` finished: record its time; the line names the stage that runs next."""
        now = time.perf_counter()
        self.timings[name] = round(now - self._t, 3)
        self._t = now
        later = _STAGES[_STAGES.index(name) + 1 :] if name in _STAGES else _STAGES
        self.set(self.done + n, later[0] if later else "publish")


def _top_tokens_text(examples, token_text: Mapping[int, str], K: int, n: int = 3) -> list[str]:
    """The first ``n`` top-example tokens of each latent, joined (for tables and the index)."""
    top = examples.kind < 0
    lat = examples.latents[top]
    rank = examples.rank[top]
    tok = examples.token_ids[top, examples.center]
    sel = rank < n
    parts: list[list[str]] = [[] for _ in range(K)]
    order = np.lexsort((rank[sel], lat[sel]))
    for j, t in zip(lat[sel][order].tolist(), tok[sel][order].tolist(), strict=True):
        parts[j].append(token_text.get(t, f"<{t}>"))
    return [" | ".join(p) for p in parts]


def _generic(p, scan, store, rows, token_labels, n_labels):
    """The generic-latent table of the analysed ``rows``, with each candidate's per-label
    firing rate on its dominant token from the scan's token firing sample (when kept)."""
    top = scan.top
    top_tokens = top.token_ids if top.token_ids is not None else np.full(top.values.shape, -1)
    token_ids = np.asarray(store.token_ids)
    args = (top_tokens, token_ids[rows], np.asarray(store.doc_ids)[rows], token_labels[rows])
    g = generic_latents(
        *args, n_labels, token_share=p.generic_token_share,
        label_doc_fraction=p.generic_label_fraction,
    )  # fmt: skip
    if scan.firing_rows is None or not g["generic"].any():
        return g
    dominant = np.where(g["generic"], g["generic_token_id"], -1)
    sample = rows[row_uniform(rows, p.seed) < scan.firing_rate]
    rates = token_fire_rates(
        dominant, scan.firing_rows, scan.firing_latents, sample, token_ids, token_labels, n_labels
    )
    return generic_latents(
        *args, n_labels, token_share=p.generic_token_share,
        label_doc_fraction=p.generic_label_fraction, fire_rates=rates,
        rate_ratio=p.generic_rate_ratio,
    )  # fmt: skip


RANK_TEXT = {
    "std_diff": "|difference of class means| / pooled within-class deviation (Cohen's d)",
    "mean_diff": "|difference of class means|",
    "forward": "greedy forward selection (logistic score test given the latents before)",
}


def _probe(p, store, scan, doc_labels, label_names, mask, chunk):
    """Sparse probes on the analysed documents: train on the store's ``train`` split, score on
    its ``test`` split. Returns the table (None when skipped) and its summary."""
    if scan.doc_pairs is None or scan.doc_sum is None or doc_labels is None:
        return None, {"skipped": "labels vary inside documents"}
    row_doc = np.asarray(store.doc_ids, dtype=np.int64)
    analysed = row_doc if mask is None else row_doc[mask]
    docs = np.unique(analysed)
    test_rows = store.split_mask("test", p.test_fraction, p.seed)
    test_docs = np.unique(row_doc[test_rows])
    train = ~np.isin(docs, test_docs)
    if train.all() or not train.any():
        why = f"the {p.split!r} split has no {'test' if train.all() else 'train'} documents"
        log.info("sparse probing skipped: %s", why)
        return None, {"skipped": why}
    t0 = time.perf_counter()
    labels_by_doc = doc_labels.set_index("doc_id")["label"]
    y = labels_by_doc.reindex(docs).to_numpy(dtype=np.int64)
    # per-document means over the analysed tokens (SAEBench's pooling), of latents and raw
    lengths = np.bincount(np.searchsorted(docs, analysed), minlength=docs.size)
    pair_len = lengths[np.searchsorted(docs, scan.doc_pairs[:, 0])]
    F = doc_latent_matrix(scan.doc_pairs, scan.doc_sum / pair_len, docs, scan.top.n_latents)
    dense = doc_mean_activations(store, docs, mask, chunk_tokens=min(chunk, 65536))
    table = sparse_probe(
        F, y, train, label_names, ks=p.probe_ks, dense=dense, rank_by=p.probe_rank_by,
        cs=p.probe_cs, cv_folds=p.probe_cv_folds, seed=p.seed,
    )  # fmt: skip
    summary: dict[str, Any] = {
        "n_train_docs": int(train.sum()),
        "n_test_docs": int((~train).sum()),
        "seconds": round(time.perf_counter() - t0, 3),
        "pool": {"latents": "mean", "dense": "mean"},
        "rank_by": p.probe_rank_by,
        "method": (
            "one vs rest per label on class-balanced documents (train and test each); top k "
            f"latents by {RANK_TEXT[p.probe_rank_by]} on the training documents; logistic "
            "regression (L2) on standardised features, C chosen per probe by "
            f"{p.probe_cv_folds}-fold cross-validation on the training documents from "
            f"{len(p.probe_cs)} values; accuracy on the balanced test documents"
        ),
    }
    if len(table):
        summary["mean_over_labels"] = [
            {"method": r["method"], "k": int(r["k"]), "n_test": int(r["n_test"]),
             **{c: float(r[c]) for c in ("accuracy", "accuracy_low", "accuracy_high",
                                         "balanced_accuracy", "f1")}}
            for r in mean_over_labels(table).to_dict("records")
        ]  # fmt: skip
    return table, summary


def run_analysis(
    sae_uri: Any,
    store_uri: Any,
    out_uri: str,
    params: AnalysisParams | Mapping[str, Any] | None = None,
    *,
    backend: Any = None,
    labels: Any = None,
    clusters: np.ndarray | None = None,
    storage_options: Mapping[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
    allow_other_store: bool = False,
) -> dict[str, Any]:
    """Analyse the latents of the SAE at ``sae_uri`` on the activations at ``store_uri`` and
    publish tables, figures and dashboards to ``out_uri``; returns the manifest.

    The store must be the one the SAE was trained on (the activation hash in the SAE's
    manifest), unless ``allow_other_store=True``.

    ``backend`` (optional) adds the logit lens and the tokenizer (else the tokenizer named in
    the store manifest is loaded). ``labels`` overrides the store's labels (one per token, or
    a DataFrame ``doc_id, label``). ``clusters`` (``int[K]``, e.g. merge clusters) colours a
    second map and fills the index's cluster column. Inputs are checked before anything is
    written; on failure the files written so far are removed and no manifest is published.
    """
    p = params if isinstance(params, AnalysisParams) else AnalysisParams(**dict(params or {}))
    sae, sae_info, store = load_inputs(sae_uri, store_uri, storage_options, allow_other_store)
    K = sae.d_sae
    mask = None if p.split == "all" else store.split_mask(p.split, p.test_fraction, p.seed)
    n_rows = store.n_tokens if mask is None else int(mask.sum())
    if p.n_top > n_rows:
        raise ValueError(
            f"n_top={p.n_top}: more top examples per latent than the {n_rows} tokens of the "
            f"{p.split!r} split"
        )
    token_labels, doc_labels, label_names = resolve_labels(store, labels)
    if p.enrichment:
        present = np.unique(token_labels if mask is None else token_labels[mask])
        if present.size < 2:
            raise ValueError(
                f"labels have a single class ({label_names[int(present[0])]!r}) in the analysed "
                "tokens: enrichment needs at least two; pass enrichment=False to analyse an "
                "unlabelled store"
            )
    if clusters is not None:
        clusters = np.asarray(clusters)
        if clusters.shape != (K,):
            raise ValueError(
                f"clusters has shape {clusters.shape}: expected ({K},), one per latent"
            )
    chunk = p.chunk_tokens or default_chunk_tokens(K)
    n_chunks = -(-store.n_tokens // chunk)
    rep = Reporter("analysis", on_progress, unit="steps", total=n_chunks + len(_STAGES))
    # entering unpublishes an earlier analysis there; a failure removes what was written
    # a user's file named like one every analysis writes is refused before the scan
    with OutputWriter(out_uri, "analysis", storage_options, names=ANALYSIS_FILES) as pub, rep:
        prog = _Progress(rep, n_chunks + len(_STAGES))
        return _run(
            p, sae, sae_info, store, backend, token_labels, doc_labels, label_names,
            clusters, mask, chunk, prog, pub,
        )  # fmt: skip


ANALYSIS_FILES = (
    "summary.json",
    "tables/latents.parquet",
    *(
        f"figures/{name}.{fmt}"
        for name in ("density_hist", "l0_hist", "decoder_geometry")
        for fmt in ("png", "svg")
    ),
)
"""Files every published analysis holds (the others depend on its parameters)."""


def _run(
    p, sae, sae_info, store, backend, token_labels, doc_labels, label_names,
    clusters, mask, chunk, prog, pub: OutputWriter,
) -> dict[str, Any]:  # fmt: skip
    K = sae.d_sae
    t_start = time.perf_counter()
    n_chunks = prog.total - len(_STAGES)
    scan = scan_latents(
        sae,
        store,
        n_top=p.n_top,
        n_bands=p.n_bands,
        per_band=p.per_band,
        labels=token_labels,
        label_names=label_names,
        hist_bins=p.hist_bins,
        doc_threshold=p.doc_threshold if doc_labels is not None else None,
        firing_budget=p.firing_budget,
        metrics=p.metrics,
        mask=mask,
        chunk_tokens=chunk,
        device=p.device,
        encode_dtype=p.encode_dtype,
        seed=p.seed,
        on_progress=lambda done, _total: prog.set(done),
    )
    prog.done = n_chunks
    prog.step("scan", 0)
    top = scan.top

    tokenizer = tokenizer_for(store, backend)
    examples = collect_examples(
        sae,
        store,
        top,
        p.context_left,
        p.context_right,
        device=p.device,
        chunk_tokens=chunk,
        encode_dtype=p.encode_dtype,
    )
    prog.step("contexts")

    stats = stats_from_scan(scan)
    table = latent_table(stats, sae.W_dec)
    fires, dead_tokens = dead_count(
        sae, store, mask, top.fire_count, p.dead_min_tokens,
        chunk_tokens=chunk, device=p.device, encode_dtype=p.encode_dtype,
    )  # fmt: skip
    table["dead"] = fires == 0
    metrics = stats.summary()
    metrics["dead_frac"] = float(table["dead"].mean())
    summary: dict[str, Any] = {
        "n_latents": K,
        "n_tokens": int(top.n_tokens),
        "split": p.split,
        "metrics": metrics,
        "l0": l0_distribution(scan.l0_counts),
        "n_dead": int(table["dead"].sum()),
        "dead_tokens": dead_tokens,
        "dead_latents": table.loc[table["dead"], "latent"].tolist(),
        "labels": label_names,
        "tokenizer": None if tokenizer is None else type(tokenizer).__name__,
    }
    enrichment_table = control = top_latents = None
    if p.enrichment:
        rows = np.arange(store.n_tokens) if mask is None else np.flatnonzero(mask)
        generic = _generic(p, scan, store, rows, token_labels, len(label_names))
        labelled = label_enrichment(
            scan, token_labels, label_names, W_dec=sae.W_dec,
            generic=generic["generic"].to_numpy(), doc_labels=doc_labels,
            row_doc=np.asarray(store.doc_ids), alpha=p.alpha, control_seeds=p.control_seeds,
            lead_doc_tokens=p.lead_doc_tokens, redundancy_cosine=p.redundancy_cosine,
            redundancy_jaccard=p.redundancy_jaccard, top_per_label=p.top_per_label,
            purity_top_n=p.purity_top_n, best_q=p.best_q,
        )  # fmt: skip
        table = table.merge(labelled.latents, on="latent", how="left")
        table = table.merge(generic, on="latent", how="left")
        summary["generic_latents"] = table.loc[table["generic"], "latent"].tolist()
        summary.update(labelled.summary)
        enrichment_table, control = labelled.table, labelled.control
        top_latents = labelled.top_latents
    prog.step("enrichment")

    probe = None
    if p.probe and p.enrichment:
        probe, summary["probe"] = _probe(p, store, scan, doc_labels, label_names, mask, chunk)
    prog.step("probe")

    neighbours = None
    if p.firing_budget and scan.firing_rows is not None and scan.firing_rows.size:
        F = firing_matrix(scan.firing_rows, scan.firing_latents, K)
        neighbours = jaccard_neighbours(F, p.n_neighbours)
        summary["firing_sample"] = {
            "rate": scan.firing_rate,
            "nnz": int(F.nnz),
            "rows": int(F.shape[0]),
        }
    prog.step("neighbours")

    if p.map_input == "profiles" and enrichment_table is not None:
        prof = enr.enrichment_matrix(enrichment_table[enrichment_table["level"] == "token"])
        X = np.nan_to_num(prof.to_numpy(dtype=np.float64))
    else:
        X = decoder_directions(sae.W_dec)
    coords, method = reduce_2d(X, p.reducer, random_state=p.seed)
    table["x"], table["y"] = coords[:, 0], coords[:, 1]
    summary["map"] = {"method": method, "input": p.map_input}
    if clusters is not None:
        table["cluster"] = clusters
    prog.step("map")

    lens = None
    lens_frame = None
    if backend is not None and hasattr(backend, "output_embedding"):
        lens = logit_lens_for_backend(sae, backend, top=p.logit_top)
    prog.step("logit_lens")

    ids = [examples.token_ids.ravel()]
    if lens is not None:
        ids += [lens.promoted_ids.ravel(), lens.suppressed_ids.ravel()]
    token_text = decode_tokens(tokenizer, np.concatenate(ids))
    table["top_tokens"] = _top_tokens_text(examples, token_text, K)
    if "generic" in table:
        table["generic_token"] = [
            token_text.get(int(t), f"<{int(t)}>") if g else ""
            for t, g in zip(table["generic_token_id"], table["generic"], strict=True)
        ]
    if lens is not None:
        lens_frame = lens.to_frame(token_text)
        table["promoted_tokens"] = [
            " ".join(token_text.get(int(t), "") for t in row[:5]) for row in lens.promoted_ids
        ]

    publish_tables(
        pub, store, table, examples, top, enrichment_table, top_latents, control, probe,
        neighbours, lens_frame,
    )  # fmt: skip
    prog.step("tables")

    publish_figures(
        pub, p, scan, table, coords, method, label_names, clusters, enrichment_table
    )  # fmt: skip
    prog.step("figures")

    if p.dashboards != "none":
        publish_dashboards(
            pub, p, store, table, examples, token_text, top, enrichment_table, neighbours,
            lens, label_names,
        )  # fmt: skip
    prog.step("dashboards")

    summary["timings_s"] = dict(prog.timings)
    summary["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    summary["scan_stages_s"] = {k: round(v, 3) for k, v in (scan.timings or {}).items()}
    pub.json("summary.json", summary)
    return pub.publish(
        p,
        sae=sae_info,
        activations={
            "uris": list(store.uris),
            "content_hash": store.content_hash,
            "hook_point": store.hook_point,
        },
        model=store.model_info,
        summary={
            k: summary[k]
            for k in ("n_latents", "n_tokens", "n_dead", "dead_tokens", "metrics")
            if k in summary
        },
    )
