"""Step 5 of the quick start: 2-D maps of an SAE - latents coloured by their most enriched
label (PCA and, with umap-learn, UMAP), documents in latent space, the most enriched latents
placed among the documents, and the enrichment and co-activation heatmaps. PNG and SVG.

Runs offline on its defaults: without --analysis it first runs example 03 (demo corpus,
small SAE, analysis) in --work.

    python examples/05_plot_maps.py
    python examples/05_plot_maps.py --analysis runs/analysis --out runs/maps
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import numpy as np
from integral_superposition import analysis, pipelines, sae, viz
from integral_superposition.analysis import reducer
from integral_superposition.dump import ActivationStore
from integral_superposition.outputs import OutputWriter


def _example_03():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "03_analyze_latents.py")
    spec = importlib.util.spec_from_file_location("example_03", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_analysis(args) -> str:
    """The analysis to plot: --analysis, or one made by example 03 on the demo inputs."""
    if args.analysis:
        return args.analysis
    ex = _example_03()
    out = os.path.join(args.work, "analysis")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        ex_args = ex.parser().parse_args(["--work", args.work, "--no-backend"])
        sae_uri, store_uri, _ = ex.prepare(ex_args)
        pipelines.run_analysis(sae_uri, store_uri, out, analysis.AnalysisParams(reducer="pca"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--analysis", help="a published analysis (default: run example 03 first)")
    p.add_argument("--work", default="example_runs", help="folder for the demo inputs")
    p.add_argument("--out", default=None, help="where the figures go (default: <work>/maps)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    result = analysis.load_analysis(ensure_analysis(args))
    out = args.out or os.path.join(args.work, "maps")
    lat = result.latents
    labels = result.summary["labels"]
    written = []
    # the figures go through the project's output writer: a rerun replaces the maps it wrote
    # there, a file of the same name that it did not write is refused, never replaced, and a
    # failure removes what this run wrote
    with OutputWriter(out, "maps") as maps:

        def save(fig, name: str) -> None:
            maps.figure(name, fig)
            written.append(maps.uri(f"{name}.png"))

        # latents: decoder directions in 2-D, coloured by the most enriched label
        model = sae.load_sae(result.manifest["sae"]["uri"])
        directions = reducer.decoder_directions(model.W_dec)
        methods = ["pca"] + (["umap"] if reducer.HAS_UMAP else [])
        for method in methods:
            coords, used = reducer.reduce_2d(directions, method, random_state=args.seed)
            best = lat["best_label"].to_numpy() if "best_label" in lat else None
            fig = viz.maps.latent_map(
                coords,
                best_label=best,
                q=lat["q"].to_numpy() if "q" in lat else None,
                label_names=labels,
                dead=lat["dead"].to_numpy(),
                title=f"SAE latents, {used.upper()} of decoder directions",
            )
            save(fig, f"latent_map_{used}")
        if not reducer.HAS_UMAP:
            print(
                "umap-learn is not installed: PCA maps only (pip install 'integral-superposition[viz]')"
            )

        # documents: mean latent code per document, and the most enriched latents among them
        store = ActivationStore(result.manifest["activations"]["uris"])
        doc_ids, codes = analysis.stats.document_codes(model, store)
        doc_label = store.docs.set_index("doc_id").loc[doc_ids, "label"].to_numpy()
        fitted = reducer.PCAReducer(2, random_state=args.seed).fit(codes)
        save(viz.maps.titles_map(codes, doc_label, fitted, label_names=labels), "documents_map")
        enrichment = result.enrichment
        if enrichment is not None:
            token = enrichment[enrichment["level"] == "token"]
            top = viz.heatmaps.select_enriched_latents(token, per_label=1)
            names = [f"L{j}: {lat.loc[j, 'best_label']}" for j in top]
            save(
                viz.maps.latents_labels_map(fitted, codes, np.asarray(top), names),
                "latents_among_documents",
            )
            save(viz.heatmaps.enrichment_heatmap(token, per_label=4), "enrichment_heatmap")
        coact = result.figure("coactivation_heatmap", "svg")
        if coact is not None:
            written.append(maps.write("coactivation_heatmap.svg", coact))
        maps.publish({"analysis": result.manifest.get("content_hash"), "seed": args.seed})
    print("\n".join(["figures (each also as .svg):", *written]))


if __name__ == "__main__":
    main()
