"""Step 4 of the quick start: merge redundant SAE latents, refit the decoder, measure the cost.

Runs offline on its defaults: without --sae/--store it first dumps the built-in demo corpus
through the embedded gemma-3-270m and trains a small SAE on it (in --work, shared with
example 03). Then it clusters the latents, builds the merged SAE (the original encoder, then
the projection-weighted sum of each cluster's codes; a ridge-refit decoder), evaluates
original vs merged on held-out tokens, sweeps K' with a random-partition control, and
publishes the merged SAE.

    python examples/04_merge_and_refit.py
    python examples/04_merge_and_refit.py --sae runs/sae --store runs/acts --out runs/merged
    python examples/04_merge_and_refit.py --similarity decoder=1 --linkage average --no-ce

The seed's step-by-step calls are shown at the end (--seed-steps).
"""

from __future__ import annotations

import argparse
import os

import pandas as pd
import torch
from integral_superposition import (
    DumpConfig,
    SAEConfig,
    backends,
    data,
    dump,
    merge,
    pipelines,
    sae,
)
from integral_superposition.sae.train import train_sae


def demo_store(backend, work: str, n_docs: int, layer: int):
    """The demo corpus dumped at ``layer`` (reused when already published)."""
    cfg = DumpConfig(layer=layer, max_len=32, batch_size=64)
    return dump.dump_layer_activations(
        data.demo_corpus(n_docs), "title", "topic", backend, cfg, os.path.join(work, "acts")
    )


def train_quick_sae(store, work: str, k: int) -> str:
    """A small TopK SAE trained for a few epochs on the store (seconds on a CPU)."""
    uri = os.path.join(work, "sae")
    if os.path.exists(os.path.join(uri, "manifest.json")):
        return uri
    cfg = SAEConfig(
        k=k, architecture="topk", top_k=16, lr=1e-3, epochs=8, batch_size=512, lr_warmup_steps=20
    )
    model = sae.SparseAutoencoder(
        store.d_model, cfg.k, architecture=cfg.architecture, top_k=cfg.top_k
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_sae(model, store, cfg, device)  # the seed's call; the store streams batches
    sae.save_sae(model, uri, training_config=cfg, activation_manifest_hash=store.content_hash)
    return uri


def parse_similarity(text: str) -> dict[str, float]:
    """``"reconstruction=1,coactivation=0.3"`` -> ``{"reconstruction": 1.0, "coactivation": 0.3}``."""
    out = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        out[name.strip()] = float(weight or 1.0)
    return out


def seed_steps(model: sae.SparseAutoencoder, store, n_clusters: int) -> None:
    """The seed's recipe, call by call (decoder cosine, average linkage, medoids, ridge refit)."""
    dist = merge.cluster.cosine_dist_from_decoder(model.dec.weight.data.numpy())  # [d, K] layout
    labels = merge.cluster.agglomerative_labels(dist, n_clusters=n_clusters)
    medoids = merge.medoid.medoids_from_labels(dist, labels)
    M = merge.medoid.merge_matrix_from_labels(labels, medoids)  # [K, K']
    data_iter = (x for _rows, x in store.iter_chunks(8192, mask=store.split_mask("train")))
    W_new = merge.refit.merge_and_refit_decoder(data_iter, model, M)  # [d, K']
    print(f"\nseed steps: dist {dist.shape}, {labels.max() + 1} clusters, M {tuple(M.shape)}, "
          f"W_new {tuple(W_new.shape)} (the seed's dec.weight layout)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sae", help="a saved SAE folder (default: train a small one on the demo)")
    p.add_argument("--store", help="an activation store (default: dump the demo corpus)")
    p.add_argument("--out", default=None, help="merged SAE output (default: <work>/merged)")
    p.add_argument("--work", default="example_runs", help="folder for the demo inputs")
    p.add_argument("--model", default="gemma-3-270m", help="model for the dump and CE metrics")
    p.add_argument("--no-ce", action="store_true", help="skip the spliced CE metrics")
    p.add_argument("--ce-docs", type=int, default=16, help="held-out documents for CE / KL")
    p.add_argument("--n-docs", type=int, default=800, help="demo corpus size")
    p.add_argument("--layer", type=int, default=6, help="layer of the demo dump")
    p.add_argument("--k", type=int, default=512, help="latents of the demo SAE")
    p.add_argument("--fraction", type=float, default=0.25, help="K' as a fraction of K")
    p.add_argument("--n-clusters", type=int, help="K' (overrides --fraction)")
    p.add_argument("--similarity", default="reconstruction=1,coactivation=0.3")
    p.add_argument("--linkage", default="complete", choices=["average", "complete", "single"])
    p.add_argument("--aggregation", default="projection", choices=["sum", "projection", "max"])
    p.add_argument("--no-sweep", action="store_true", help="skip the K' sweep")
    p.add_argument("--seed-steps", action="store_true", help="also run the seed's calls")
    args = p.parse_args()

    backend = None
    if not args.no_ce or args.store is None:
        backend = backends.HFCausalLM.from_pretrained(args.model, dtype="auto")
    store_uri = args.store or demo_store(backend, args.work, args.n_docs, args.layer).uris[0]
    store = dump.ActivationStore(store_uri)
    sae_uri = args.sae or train_quick_sae(store, args.work, args.k)
    out = args.out or os.path.join(args.work, "merged")

    params = merge.MergeParams(
        fraction=args.fraction,
        n_clusters=args.n_clusters,
        similarity=parse_similarity(args.similarity),
        linkage=args.linkage,
        aggregation=args.aggregation,
        sweep=not args.no_sweep,
        ce_docs=0 if args.no_ce else args.ce_docs,
    )
    manifest = pipelines.run_merge(
        sae_uri, store_uri, out, params, backend=None if args.no_ce else backend
    )

    pd.set_option("display.width", 160)
    cols = ["sae", "n_latents", "fvu", "l0", "dead_frac", "ce_recovered", "delta_ce", "kl"]
    cols += ["enrichment_retention"]
    ev = pd.read_parquet(os.path.join(out, "merge_eval.parquet"))
    print(f"\nmerged SAE published at {out} ({manifest['content_hash'][:12]})")
    print(ev[[c for c in cols if c in ev]].to_string(index=False, float_format="{:.4f}".format))
    if params.sweep:
        sw = pd.read_parquet(os.path.join(out, "merge_sweep.parquet"))
        scols = ["k_prime", "partition", "fvu", "ce_recovered", "enrichment_retention"]
        print("\nsweep (clustering vs a random partition of the same cluster sizes):")
        print(
            sw[[c for c in scols if c in sw]].to_string(index=False, float_format="{:.4f}".format)
        )
        print(f"figure: {os.path.join(out, 'merge_sweep.png')}")
    mm = pd.read_parquet(os.path.join(out, "merge_map.parquet"))
    big = mm.groupby("cluster").size().sort_values(ascending=False).head(3)
    print(f"\nmerge map: {len(mm)} latents -> {mm['cluster'].nunique()} clusters; largest: "
          + ", ".join(f"cluster {c} ({n} latents, medoid {int(mm.loc[mm.cluster == c, 'medoid'].iloc[0])})" for c, n in big.items()))  # fmt: skip

    merged = sae.load_sae(out)  # an ordinary SparseAutoencoder: analysis and steering take it
    x = store.read(0, 4).float()
    print(f"\n{merged}: d_pre={merged.d_pre}, merge_mode={merged.merge_mode}; "
          f"encode {tuple(merged.encode(x).shape)}, reconstruct {tuple(merged.reconstruct(x).shape)}")  # fmt: skip
    if args.seed_steps:
        seed_steps(sae.load_sae(sae_uri), store, max(1, round(args.fraction * merged.d_pre)))


if __name__ == "__main__":
    main()
