"""Step 2 of the quick start: train sparse autoencoders on dumped activations.

Runs offline on its defaults: without an activation store at --store it first dumps the
built-in demo corpus through the embedded gemma-3-270m (as step 1 does). Then it

1. trains the seed's ReLU SAE with the seed's calls (``sae.train_sae`` on the store,
   ``sae.save_sae(model, "sae_weights.pt")`` - which writes a SAELens folder instead);
2. trains a TopK and a BatchTopK SAE in one pass over the same stream with checkpoints
   (``sae.train_saes``; rerun after an interruption and it resumes);
3. evaluates all three on the held-out split, with CE recovered from spliced forwards.

    python examples/02_train_sae.py
    python examples/02_train_sae.py --store acts_shards --out runs/saes --k 4096 --epochs 4
    python examples/02_train_sae.py --store s3://bucket/acts --out s3://bucket/saes
"""

from __future__ import annotations

import argparse
import os

import torch
from integral_superposition import DumpConfig, SAEConfig, backends, data, dump, sae, storage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="acts_shards", help="activation store (dumped if missing)")
    p.add_argument("--out", default="saes", help="where the SAE folders go (any fsspec URI)")
    p.add_argument("--model", default="gemma-3-270m", help="model for the dump and the CE metrics")
    p.add_argument("--layer", type=int, default=13, help="layer to dump when --store is missing")
    p.add_argument("--n-docs", type=int, default=2000, help="demo corpus size for the dump")
    p.add_argument("--k", type=int, default=2048, help="number of latents (the seed's k)")
    p.add_argument("--top-k", type=int, default=32, help="active latents for TopK/BatchTopK")
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--no-ce", action="store_true", help="skip the spliced-forward CE metrics")
    args = p.parse_args()

    backend = backends.HFCausalLM.from_pretrained(args.model, dtype="auto")
    if not storage.verify_output(args.store):
        cfg = DumpConfig(layer=args.layer, max_len=32, batch_size=64)
        dump.dump_layer_activations(
            data.demo_corpus(args.n_docs), "title", "topic", backend, cfg, args.store
        )
    store = dump.ActivationStore(args.store)
    print(f"{store}\n")

    # 1. The seed's calls: train a ReLU SAE in place, then save it
    cfg = SAEConfig(k=args.k, lr=1e-3, l1=3e-3, epochs=args.epochs, batch_size=args.batch_size)
    model = sae.SparseAutoencoder(d_model=store.d_model, k=args.k)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sae.train_sae(model, store, cfg, device)
    relu_uri = sae.save_sae(model, storage.join(args.out, "relu.pt"))  # writes folder "relu"
    print(f"ReLU SAE saved to {relu_uri}; decoder {tuple(model.dec.weight.shape)}\n")

    # 2. Two more SAEs trained on one pass over the stream, with resumable checkpoints
    common = dict(
        k=args.k, top_k=args.top_k, lr=1e-3, epochs=args.epochs, batch_size=args.batch_size,
        dead_tokens=4 * args.batch_size, checkpoint_every=100,
    )  # fmt: skip
    cfgs = [SAEConfig(architecture=a, **common) for a in ("topk", "batchtopk")]
    results = sae.train_saes(
        store,
        cfgs,
        [storage.join(args.out, a) for a in ("topk", "batchtopk")],
        checkpoint_uri=storage.join(args.out, "checkpoints"),
    )

    # 3. Held-out metrics for all three (CE recovered through spliced forwards)
    uris = {"relu": relu_uri, **{r.config.architecture: r.uri for r in results}}
    print("\n| SAE | L0 | FVU | dead % | CE recovered | delta CE |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, uri in uris.items():
        m = sae.evaluate_sae(
            sae.load_sae(uri), store, None if args.no_ce else backend, n_ce_docs=32
        )
        print(
            f"| {name} | {m['l0']:.1f} | {m['fvu']:.3f} | {100 * m['dead_frac']:.1f} | "
            f"{m.get('ce_recovered', float('nan')):.3f} | {m.get('delta_ce', float('nan')):.3f} |"
        )
    print(f"\nSAEs in {os.path.abspath(args.out) if '://' not in args.out else args.out}")


if __name__ == "__main__":
    main()
