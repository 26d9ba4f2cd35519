"""Step 3 of the quick start: analyse an SAE's latents - top tokens, label enrichment,
co-activation, 2-D map, logit lens - and write dashboards and the experiment report.

Runs offline on its defaults: without --sae/--store it first dumps the built-in demo corpus
through the embedded gemma-3-270m and trains a small SAE on it (in --work).

    python examples/03_analyze_latents.py
    python examples/03_analyze_latents.py --sae runs/sae --store runs/acts --out runs/analysis
    python examples/03_analyze_latents.py --no-backend     # skip the logit lens (no model load)

Open <out>/dashboards/index.html and <work>/report/report.html in a browser (they work offline).
"""

from __future__ import annotations

import argparse
import os

from integral_superposition import (
    DumpConfig,
    SAEConfig,
    analysis,
    backends,
    data,
    dump,
    pipelines,
    storage,
    viz,
)
from integral_superposition.sae.train import train_saes
from tqdm.auto import tqdm


def demo_store(backend, work: str, n_docs: int, layer: int):
    """The demo corpus dumped at ``layer`` (reused when already published)."""
    cfg = DumpConfig(layer=layer, max_len=32, batch_size=64)
    return dump.dump_layer_activations(
        data.demo_corpus(n_docs), "title", "topic", backend, cfg, os.path.join(work, "acts")
    )


def train_quick_sae(store, work: str, k: int) -> str:
    """A small TopK SAE trained for a few epochs on the store (about a minute on a CPU)."""
    uri = os.path.join(work, "sae")
    if storage.verify_output(uri):
        return uri
    cfg = SAEConfig(
        k=k, architecture="topk", top_k=16, lr=1e-3, epochs=8, batch_size=512, lr_warmup_steps=20
    )
    train_saes(store, [cfg], [uri])  # publishes the SAE folder with its metrics
    return uri


def prepare(args) -> tuple[str, str, object]:
    """``(sae uri, store uri, backend or None)``, building the demo inputs when not given."""
    backend = None
    if not args.no_backend or args.store is None:
        backend = backends.HFCausalLM.from_pretrained(args.model, dtype="auto")
    store_uri = args.store
    if store_uri is None:
        store_uri = demo_store(backend, args.work, args.n_docs, args.layer).uris[0]
    sae_uri = args.sae or train_quick_sae(dump.ActivationStore(store_uri), args.work, args.k)
    return sae_uri, store_uri, (None if args.no_backend else backend)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sae", help="a saved SAE folder (default: train a small one on the demo)")
    p.add_argument("--store", help="an activation store (default: dump the demo corpus)")
    p.add_argument("--out", default=None, help="analysis output (default: <work>/analysis)")
    p.add_argument("--work", default="example_runs", help="folder for the demo inputs")
    p.add_argument("--model", default="gemma-3-270m", help="model for the dump and logit lens")
    p.add_argument("--no-backend", action="store_true", help="skip the logit lens")
    p.add_argument("--n-docs", type=int, default=800, help="demo corpus size")
    p.add_argument("--layer", type=int, default=6, help="layer of the demo dump")
    p.add_argument("--k", type=int, default=512, help="latents of the demo SAE")
    p.add_argument("--n-top", type=int, default=20, help="top examples per latent")
    p.add_argument("--reducer", default="auto", choices=["auto", "pca", "umap"])
    p.add_argument("--summary-csv", default="latent_summary.csv", help="per-latent table (CSV)")
    return p


def main() -> None:
    args = parser().parse_args()
    sae_uri, store_uri, backend = prepare(args)
    out = args.out or os.path.join(args.work, "analysis")
    params = analysis.AnalysisParams(n_top=args.n_top, reducer=args.reducer)

    bar = tqdm(total=1, desc="analysis", unit="step")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    pipelines.run_analysis(sae_uri, store_uri, out, params, backend=backend, on_progress=progress)
    bar.close()

    result = analysis.load_analysis(out)
    s = result.summary
    m = s["metrics"]
    print(f"\nlatents {s['n_latents']} ({s['n_dead']} dead) on {s['n_tokens']} tokens")
    print(
        f"L0 {m['l0']:.1f}  explained variance {m['explained_variance']:.3f}  dense {m['dense_frac']:.3f}"
    )
    print(f"latents enriched for a label (q < 0.05): {s.get('significant_latents_per_label', {})}")

    tables = viz.report.summary_tables(result, top_per_label=3)
    if "top_latents" in tables:
        cols = ["label", "latent", "q", "log_odds", "frac_in_set", "top_tokens"]
        print("\nmost enriched latents per label:")
        print(tables["top_latents"][cols].to_string(index=False, max_colwidth=40))

    result.latents.to_csv(args.summary_csv, index=False)
    report = viz.build_report(os.path.join(args.work, "report"), analysis=result, sae=sae_uri)
    print(f"\nper-latent table  {args.summary_csv}")
    print(f"dashboards        {result.dashboard_uri()}")
    print(f"report            {report}")


if __name__ == "__main__":
    main()
