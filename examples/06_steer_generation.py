"""Step 6 of the quick start: steer gemma-3-270m with an SAE latent and measure the effect.

Runs offline on its defaults: without --sae/--store it dumps the built-in demo corpus through
the embedded gemma-3-270m and trains a small SAE on it (in --work, shared with examples 03
and 04). Then it

1. runs the seed's calls: ``set_or_scale_latent`` + ``register_prehook_last_row`` +
   ``backend.generate`` + ``handle.remove()``;
2. picks the latent most enriched for --label and prints unsteered and steered continuations
   side by side (``steering.steer`` on every prompt and generated token, clamped to
   --strength x the latent's largest activation in the data);
3. with --eval, sweeps strengths with a label classifier, target-vocabulary mass, perplexity
   and controls, and publishes the table, plot and generations (``run_steering_eval``).

    python examples/06_steer_generation.py
    python examples/06_steer_generation.py --label Business --strength 1.5 --positions generated
    python examples/06_steer_generation.py --sae runs/sae --store runs/acts --eval --out runs/steer
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
    pipelines,
    sae,
    steering,
)
from integral_superposition.data.tokenize import pad_batch, pad_token_id
from integral_superposition.sae.train import train_sae


def demo_store(backend, work: str, n_docs: int, layer: int):
    """The demo corpus dumped at ``layer`` (reused when already published)."""
    cfg = DumpConfig(layer=layer, max_len=32, batch_size=64)
    return dump.dump_layer_activations(
        data.demo_corpus(n_docs), "title", "topic", backend, cfg, os.path.join(work, "acts")
    )


def train_quick_sae(store, work: str, k: int) -> str:
    """A small TopK SAE trained for a few epochs on the store (reused when already saved)."""
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
    train_sae(model, store, cfg, device)
    sae.save_sae(
        model, uri, training_config=cfg, activation_manifest_hash=store.content_hash,
        metadata={"hook_name": f"blocks.{store.hook_info()['layer']}.hook_resid_pre"},
    )  # fmt: skip
    return uri


def seed_calls(backend, model, layer: int, latent: int, value: float, prompt: str) -> None:
    """The seed's recipe, call by call."""
    tok = backend.tokenizer
    inputs = tok([prompt], return_tensors="pt")
    greedy = dict(max_new_tokens=10, do_sample=False, top_k=None, top_p=None)
    plain = backend.generate(**inputs, **greedy)

    modifier = steering.set_or_scale_latent(latent_j=latent, set_to=value)
    handle = steering.register_prehook_last_row(
        backend, layer_idx=layer, sae=model, latent_map=modifier
    )
    try:
        outputs = backend.generate(**inputs, **greedy)
    finally:
        handle.remove()
    n = inputs["input_ids"].shape[1]
    print(f"\nseed calls (latent {latent} set to {value:.1f} on the last prompt token):")
    print(f"  unsteered: {prompt!r} -> {tok.decode(plain[0, n:], skip_special_tokens=True)!r}")
    print(f"  steered:   {prompt!r} -> {tok.decode(outputs[0, n:], skip_special_tokens=True)!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sae", help="a saved SAE folder (default: train a small one on the demo)")
    p.add_argument(
        "--store", help="the activation store the SAE was trained on (default: the demo dump)"
    )
    p.add_argument("--work", default="example_runs", help="folder for the demo inputs")
    p.add_argument(
        "--model", default="gemma-3-270m", help="hub id, local dir, .gguf or gemma-3-270m"
    )
    p.add_argument("--n-docs", type=int, default=800, help="demo corpus size")
    p.add_argument("--layer", type=int, default=6, help="layer of the demo dump")
    p.add_argument("--k", type=int, default=512, help="latents of the demo SAE")
    p.add_argument("--label", default="Sports", help="steer toward this label")
    p.add_argument("--latent", type=int, help="steer this latent instead of the most enriched one")
    p.add_argument(
        "--strength", type=float, default=1.0, help="clamp to this x the latent's max activation"
    )
    p.add_argument("--positions", default="all", help="last_prompt, prompt, generated or all")
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--prompt", action="append", help="prompt(s) (default: neutral openings)")
    p.add_argument("--eval", action="store_true", help="also run the published strength sweep")
    p.add_argument(
        "--out", default=None, help="steering evaluation output (default: <work>/steering)"
    )
    args = p.parse_args()

    backend = backends.HFCausalLM.from_pretrained(args.model, dtype="auto")
    store = (
        dump.ActivationStore(args.store)
        if args.store
        else demo_store(backend, args.work, args.n_docs, args.layer)
    )
    sae_uri = args.sae or train_quick_sae(store, args.work, args.k)
    model = sae.load_sae(sae_uri).eval()
    layer = store.hook_info()["layer"]

    # Which latent? The one most enriched for the label (Fisher tests on the store), and its
    # largest activation in the data (for clamp-to-max).
    tok_table, doc_table, scan = steering.picks.enrichment_tables(model, store)
    picks = steering.pick_latents(tok_table, doc_table, labels=[args.label], q_max=1e-3)
    if args.latent is None and picks.empty:
        raise SystemExit(f"no latent is enriched for {args.label!r} at q < 1e-3; pass --latent")
    latent = args.latent if args.latent is not None else int(picks["latent"].iloc[0])
    max_act = float(scan.act_max[latent])
    print(
        f"\n{model} at layer.{layer}; latent {latent} for {args.label!r} (max activation {max_act:.1f})"
    )
    if not picks.empty:
        print(picks.to_string(index=False))

    prompts = args.prompt or data.neutral_prompts()[:6]
    seed_calls(backend, model, layer, latent, args.strength * max_act, prompts[0])

    rows = steering.compare_generations(
        backend, model, f"layer.{layer}", steering.clamp_to_max(latent, args.strength), prompts,
        max_new_tokens=args.new_tokens, positions=args.positions, max_acts=scan,
    )  # fmt: skip
    pd.set_option("display.width", 200)
    print(f"\nclamp latent {latent} to {args.strength:g} x max on {args.positions} positions:")
    print(
        pd.DataFrame(rows, columns=["prompt", "unsteered", "steered"]).to_string(
            index=False, max_colwidth=60
        )
    )

    # The same edit as a context manager, combined with an ablation of a second latent: the
    # hooks are removed on exit, even after an exception.
    batch = pad_batch(
        steering.generation.encode_prompts(backend.tokenizer, prompts[:2]),
        pad_token_id(backend.tokenizer),
        "left",
    )
    edits = [
        steering.clamp_to_max(latent, args.strength),
        steering.ablate((latent + 1) % model.d_sae),
    ]
    with steering.steer(
        backend,
        model,
        f"layer.{layer}",
        edits,
        positions=("last_prompt", "generated"),
        max_acts=scan,
    ) as h:
        out = backend.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=8,
            do_sample=False,
            top_k=None,
            top_p=None,
        )
    print(
        f"\nsteer() with {[str(e) for e in edits]}: edited {h.edited_tokens}; output shape {tuple(out.shape)}"
    )

    if args.eval:
        out_uri = args.out or os.path.join(args.work, "steering")
        params = steering.SteeringParams(
            latents=[latent], labels=[args.label],
            positions=args.positions, max_new_tokens=args.new_tokens, own_label_prompts=6,
        )  # fmt: skip
        manifest = pipelines.run_steering_eval(
            sae_uri, store.uris[0], out_uri, params, backend=backend
        )
        res = pipelines.load_steering(out_uri)
        cols = ["control", "prompts", "strength", "share", "vocab_mass", "perplexity", "ppl_ratio"]
        print(
            f"\nsteering evaluation published at {out_uri} ({manifest['content_hash'][:12]}); plot {out_uri}/sweep.png"
        )
        print(f"classifier held-out accuracy {res.summary['classifier']['held_out_accuracy']:.3f}")
        print(res.sweep[cols].to_string(index=False, float_format="{:.3f}".format))


if __name__ == "__main__":
    main()
