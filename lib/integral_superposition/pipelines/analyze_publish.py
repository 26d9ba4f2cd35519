"""Publishing an analysis: its tables (parquet), figures (PNG and SVG) and dashboards (HTML),
each through the analysis's :class:`~integral_superposition.outputs.OutputWriter`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from integral_superposition.analysis.jaccard_sparse import firing_matrix, jaccard_dense
from integral_superposition.outputs import OutputWriter

__all__ = ["publish_dashboards", "publish_figures", "publish_tables"]


def publish_tables(
    pub: OutputWriter,
    store: Any,
    table: pd.DataFrame,
    examples: Any,
    top: Any,
    enrichment_table: pd.DataFrame | None,
    top_latents: pd.DataFrame | None,
    control: pd.DataFrame | None,
    probe: pd.DataFrame | None,
    neighbours: Any,
    lens_frame: pd.DataFrame | None,
) -> None:
    """``tables/*.parquet``: the latent table, enrichment tests, probes, examples (with their
    ``[n, window]`` token and activation windows), neighbours, histograms and the logit lens;
    the optional ones only when computed."""
    pub.parquet("tables/latents.parquet", table)
    if enrichment_table is not None:
        pub.parquet("tables/enrichment.parquet", enrichment_table)
        pub.parquet("tables/top_latents.parquet", top_latents)
    if control is not None:
        pub.parquet("tables/enrichment_control.parquet", control)
    if probe is not None:
        pub.parquet("tables/probe.parquet", probe)
    doc_of = np.asarray(store.doc_ids)
    pos_of = np.asarray(store.positions)
    pub.parquet(
        "tables/examples.parquet",
        pd.DataFrame(
            {
                "latent": examples.latents,
                "kind": np.where(examples.kind < 0, "top", "quantile"),
                "band": examples.kind.astype(np.int16),
                "rank": examples.rank,
                "row": examples.rows,
                "value": examples.values,
                "doc_id": doc_of[examples.rows],
                "position": pos_of[examples.rows],
                "token_id": examples.token_ids[:, examples.center],
                "window_token_ids": list(examples.token_ids),
                "window_acts": list(examples.acts),
            }
        ),
    )
    if neighbours is not None:
        pub.parquet("tables/neighbours.parquet", neighbours.to_frame())
    if top.label_hist is not None:
        j, c, b = np.nonzero(top.label_hist)
        pub.parquet(
            "tables/activation_hist.parquet",
            pd.DataFrame(
                {
                    "latent": j,
                    "label_id": c,
                    "bin": b,
                    "log10_lo": top.hist_edges[b],
                    "count": top.label_hist[j, c, b],
                }
            ),
        )
    if lens_frame is not None:
        pub.parquet("tables/logit_lens.parquet", lens_frame)


def publish_figures(
    pub: OutputWriter,
    p: Any,
    scan: Any,
    table: pd.DataFrame,
    coords: np.ndarray,
    method: str,
    label_names: list[str],
    clusters: np.ndarray | None,
    enrichment_table: pd.DataFrame | None,
) -> None:
    """``figures/*``: density and L0 histograms, decoder geometry, the 2-D latent map
    (``coords`` ``[K, 2]``, by label and by cluster), enrichment and co-activation heatmaps."""
    from integral_superposition.viz import distributions, heatmaps, maps

    K = scan.top.n_latents
    pub.figure("figures/density_hist", distributions.density_histogram(table["density"].to_numpy()))
    pub.figure("figures/l0_hist", distributions.l0_histogram(scan.l0_counts))
    pub.figure("figures/decoder_geometry", distributions.decoder_geometry_figure(table))
    pub.figure(
        "figures/latent_map",
        maps.latent_map(
            coords,
            best_label=table["best_label"].to_numpy() if "best_label" in table else None,
            q=table["q"].to_numpy() if "q" in table else None,
            label_names=label_names,
            dead=table["dead"].to_numpy(),
            alpha=p.alpha,
            title=f"SAE latents ({method.upper()} of {'decoder directions' if p.map_input == 'decoder' else 'label profiles'})",
        ),
    )
    if clusters is not None:
        pub.figure(
            "figures/latent_map_clusters",
            maps.latent_map(
                coords,
                clusters=clusters,
                dead=table["dead"].to_numpy(),
                title="SAE latents by cluster",
            ),
        )
    if enrichment_table is not None:
        tok = enrichment_table[enrichment_table["level"] == "token"]
        pub.figure(
            "figures/enrichment_heatmap",
            heatmaps.enrichment_heatmap(tok, per_label=p.heatmap_per_label, alpha=p.alpha),
        )
        chosen = heatmaps.select_enriched_latents(tok, p.heatmap_per_label)
    else:
        chosen = table.sort_values("fire_count", ascending=False)["latent"].to_numpy()[
            : p.coactivation_latents
        ]
    if scan.firing_rows is not None and scan.firing_rows.size and len(chosen) >= 2:
        sel = np.asarray(chosen)[: p.coactivation_latents]
        F = firing_matrix(scan.firing_rows, scan.firing_latents, K)
        pub.figure(
            "figures/coactivation_heatmap",
            heatmaps.coactivation_heatmap(jaccard_dense(F[:, sel]), sel),
        )


def publish_dashboards(
    pub: OutputWriter,
    p: Any,
    store: Any,
    table: pd.DataFrame,
    examples: Any,
    token_text: dict[int, str],
    top: Any,
    enrichment_table: pd.DataFrame | None,
    neighbours: Any,
    lens: Any,
    label_names: list[str],
) -> None:
    """``dashboards/``: the latent index and one page per latent (live latents only unless
    ``p.dashboards == "all"``)."""
    from integral_superposition.viz import panels

    data = panels.DashboardData.build(
        table=table,
        examples=examples,
        token_text=token_text,
        top=top,
        enrichment=enrichment_table,
        neighbours=neighbours,
        lens=lens,
        label_names=label_names,
        title=f"SAE latents - {store.model_info.get('model_id', '')} {store.hook_point}",
    )
    latents = None if p.dashboards == "all" else table.loc[~table["dead"], "latent"].to_numpy()
    files = panels.write_dashboards(
        pub.uri("dashboards"),
        data,
        latents=latents,
        storage_options=pub.opts,
        owned=pub.owned_under("dashboards"),
    )
    pub.add("dashboards", files)
