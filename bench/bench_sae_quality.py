"""SAE quality: our four architectures and SAELens's TopK on the same tokens and steps.

Real activations: gemma-3-270m, layer 9, ag_news titles + descriptions
(``bench/common.ag_news_store()``). Our ReLU, TopK, BatchTopK and JumpReLU SAEs (d_sae =
4096) train in one pass over the train split; SAELens's ``SAETrainer`` trains its TopK (and,
with ``--saelens-batchtopk``, BatchTopK) SAE on exactly the same batches in the same order,
with the same learning-rate schedule and the same dead-latent window. Everything is then
evaluated by the same code on the held-out split (``sae.metrics.evaluate_sae``): L0, FVU,
dead fraction, and CE recovered / delta CE / KL from spliced forwards through gemma-3-270m on
held-out documents.

The run is short (4 epochs of ~180k tokens, ~700 steps of 1,024 tokens), so two defaults
differ from the library's: ``--auxk-coef`` is 1/4 rather than 1/32 (which suits runs of many
millions of tokens and leaves about 4% of the TopK latents dead here; SAELens's default is 1,
in the same units), and the JumpReLU options are the ones that let its threshold move within
a short run. ReLU uses the library's default L1 coefficient. JumpReLU is trained twice: as
DeepMind's (L0 through the threshold only; ``--jumprelu-l0``) and as Anthropic's variant
(``jumprelu_tanh``: tanh penalty ``--tanh-coef``, the jump's gradient on the encoder, and the
pre-activation loss ``--pre-act-coef``).

Goals: at the same L0 (TopK k = 32 on both sides) our FVU is no worse than SAELens's, and our
TopK with AuxK ends with under 1% dead latents on the held-out split.

    python bench/bench_sae_quality.py [--epochs 4] [--batch 1024] [--auxk-coef 0.25] [--ce-docs 64]

A shorter run: ``--docs 1000 --max-len 32 --ours topk`` (the first documents, our TopK only).
``--store PATH`` trains on an existing activation store instead (e.g. an experiment's dump);
``--saelens-init zero`` trains SAELens's TopK once, with its default ``b_dec = 0``.
Each SAELens SAE is also evaluated as a loader that ignores its
``rescale_acts_by_decoder_norm`` would read it (``SAELens ... flag ignored``), which is how
SAELens TopK SAEs were read before ``load_sae`` folded the decoder norms.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import shutil
import time
import warnings
from pathlib import Path

import torch
from common import OUT, ag_news_store, gemma, machine, peak_rss_mb
from integral_superposition import SAEConfig
from integral_superposition.config import dead_window
from integral_superposition.sae import evaluate_sae, load_sae
from integral_superposition.sae.train import train_saes
from integral_superposition.sae.trainee import geometric_median

D_SAE, TOP_K = 4096, 32


def our_configs(args) -> dict[str, SAEConfig]:
    common = dict(
        k=D_SAE, batch_size=args.batch, epochs=args.epochs, lr=args.lr, lr_warmup_steps=50,
        dead_tokens=args.dead_tokens, auxk_coef=args.auxk_coef, log_every=50, seed=0,
        refit_decoder=False,  # SAELens has no decoder refit: compare the SGD results
    )  # fmt: skip
    jump = dict(jumprelu_bandwidth=args.bandwidth, jumprelu_init_threshold=args.init_threshold)
    return {
        "relu": SAEConfig(architecture="relu", l1=args.relu_l1, **common),
        "topk": SAEConfig(architecture="topk", top_k=TOP_K, **common),
        "batchtopk": SAEConfig(architecture="batchtopk", top_k=TOP_K, **common),
        "jumprelu": SAEConfig(architecture="jumprelu", l1=args.jumprelu_l0, **jump, **common),
        # Anthropic's variant: tanh penalty, the jump's gradient on the encoder, pre-act loss
        "jumprelu_tanh": SAEConfig(
            architecture="jumprelu",
            l1=args.tanh_coef,
            jumprelu_sparsity="tanh",
            jumprelu_ste_to_input=True,
            jumprelu_pre_act_coef=args.pre_act_coef,
            **jump,
            **common,
        ),
    }


def same_batches(store, cfg: SAEConfig, total: int):
    """The batches our trainer reads, in its order (``StoreSource.batches``)."""
    it = store.iter_batches(
        cfg.batch_size, split="train", test_fraction=cfg.test_fraction, split_seed=0,
        seed=cfg.seed, n_batches=total, buffer_tokens=max(cfg.shuffle_buffer_tokens, cfg.batch_size),
        block_tokens=4096,
    )  # fmt: skip
    return (b.acts for b in it)


def train_saelens(
    arch: str, store, cfg: SAEConfig, total: int, out: Path, median_b_dec: bool
) -> str:
    """SAELens's ``SAETrainer`` on our batches. ``median_b_dec``: start ``b_dec`` at the
    geometric median of the first batches (in the scaled units SAELens trains in), as its
    training runner does with ``b_dec_init_method="geometric_median"``; else its default 0."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    common = dict(
        d_in=store.d_model, d_sae=D_SAE, k=TOP_K, dtype="float32", device="cpu",
        normalize_activations="expected_average_only_in",
    )  # fmt: skip
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common))
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    n_norm = 8
    if median_b_dec:
        first = torch.cat(list(itertools.islice(same_batches(store, cfg, total), n_norm))).float()
        scale = math.sqrt(store.d_model) / float(first.norm(dim=1).mean())
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(first * scale))
    tcfg = SAETrainerConfig(
        total_training_samples=total * cfg.batch_size,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr * 1e-3,
        lr_warm_up_steps=cfg.lr_warmup_steps,
        lr_decay_steps=round(cfg.lr_decay_frac * total),
        device="cpu",
        dead_feature_window=max(1, dead_window(cfg, total) // cfg.batch_size),
        n_batches_for_norm_estimate=n_norm,
    )
    # the norm estimate reads n_norm batches first (the start of the stream again)
    data = itertools.chain(
        itertools.islice(same_batches(store, cfg, total), n_norm), same_batches(store, cfg, total)
    )
    trainer = SAETrainer(tcfg, sae, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit()
    path = out / f"saelens_{arch}{'_median' if median_b_dec else ''}"
    sae.save_model(str(path))  # SAELens's own format, read back by our load_sae
    return str(path)


def ignoring_rescale(folder: str) -> str:
    """A copy of a SAELens folder whose ``rescale_acts_by_decoder_norm`` is off: what a loader
    that never reads the flag computes."""
    copy = folder + "_flag_ignored"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    cfg_path = Path(copy) / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rescale_acts_by_decoder_norm"] = False
    cfg_path.write_text(json.dumps(cfg))
    return copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dead-tokens", type=int, default=8192)
    ap.add_argument("--auxk-coef", type=float, default=0.25)
    ap.add_argument("--relu-l1", type=float, default=SAEConfig().l1)
    ap.add_argument("--jumprelu-l0", type=float, default=1e-3)
    ap.add_argument("--tanh-coef", type=float, default=3e-4, help="jumprelu_tanh: tanh penalty")
    ap.add_argument("--pre-act-coef", type=float, default=1e-6, help="jumprelu_tanh: pre-act loss")
    ap.add_argument("--bandwidth", type=float, default=0.05)
    ap.add_argument("--init-threshold", type=float, default=0.05)
    ap.add_argument("--ce-docs", type=int, default=64)
    ap.add_argument("--saelens-batchtopk", action="store_true")
    ap.add_argument("--no-saelens", action="store_true")
    ap.add_argument("--docs", type=int, default=None, help="only the first ag_news documents")
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--ours", default="relu,topk,batchtopk,jumprelu,jumprelu_tanh")
    ap.add_argument(
        "--store", default=None, help="an existing activation store instead of the bench's dump"
    )
    ap.add_argument(
        "--saelens-init",
        choices=("both", "zero", "median"),
        default="both",
        help="SAELens's b_dec start: its default 0, the geometric median, or both",
    )
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    out = OUT / "sae_quality"
    if args.store is not None:
        from integral_superposition.dump import ActivationStore

        store = ActivationStore(args.store)
    else:
        store = ag_news_store(max_len=args.max_len, n_docs=args.docs)
    print(f"store: {args.store or 'ag_news dump'}, {store.n_tokens} tokens, d = {store.d_model}")
    wanted = args.ours.split(",")
    cfgs = {a: c for a, c in our_configs(args).items() if a in wanted or a == "topk"}
    print(machine())
    t = time.time()
    res = train_saes(
        store, list(cfgs.values()), [str(out / f"ours_{a}") for a in cfgs], progress=False
    )
    t_ours = time.time() - t
    total = res[0].steps
    print(
        f"ours: {len(cfgs)} SAEs in one pass, {total} steps x {args.batch} tokens "
        f"({res[0].tokens} tokens) in {t_ours:.0f}s; peak RSS {peak_rss_mb():.0f} MiB"
    )
    saes = {f"ours {a}": r.uri for a, r in zip(cfgs, res, strict=True)}
    if not args.no_saelens:
        for arch in ("topk", "batchtopk") if args.saelens_batchtopk else ("topk",):
            inits = {"both": (False, True), "zero": (False,), "median": (True,)}
            for median in inits[args.saelens_init]:
                name = f"SAELens {arch}" + (" (b_dec at median)" if median else " (b_dec = 0)")
                t = time.time()
                cfg_arch = cfgs.get(arch) or our_configs(args)[arch]
                saes[name] = train_saelens(arch, store, cfg_arch, total, out, median)
                print(f"{name}: {total} steps on the same batches in {time.time() - t:.0f}s")
                saes[name + ", flag ignored"] = ignoring_rescale(saes[name])
    backend = gemma() if args.ce_docs > 0 else None
    rows = {}
    for name, uri in saes.items():
        sae = load_sae(uri)
        with torch.no_grad():
            rows[name] = evaluate_sae(sae, store, backend, n_ce_docs=max(1, args.ce_docs))
    first = next(iter(rows.values()))
    print(
        f"\nheld-out split: {first['n_tokens']} tokens; CE on {args.ce_docs} held-out documents "
        f"({first.get('n_predictions', 0)} predictions), gemma-3-270m bf16, "
        f"clean CE {first.get('ce_clean', float('nan')):.3f} nats, zero-ablation CE {first.get('ce_zero', float('nan')):.3f}"
    )
    print("\n| SAE | L0 | FVU | dead % | dense % (>0.1) | CE recovered | delta CE (nats) | KL |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, m in rows.items():
        print(
            f"| {name} | {m['l0']:.1f} | {m['fvu']:.4f} | {100 * m['dead_frac']:.2f} | "
            f"{100 * m['dense_frac']:.2f} | {m.get('ce_recovered', float('nan')):.4f} | "
            f"{m.get('delta_ce', float('nan')):.4f} | {m.get('kl', float('nan')):.4f} |"
        )
    for name in [n for n in rows if n.startswith("SAELens topk")]:
        a, b = rows["ours topk"], rows[name]
        same_l0 = abs(a["l0"] - b["l0"]) <= 0.1 * b["l0"]
        print(
            f"\nTopK at the same L0 ({a['l0']:.1f} vs {b['l0']:.1f}, within 10%: {same_l0}): "
            f"FVU ours {a['fvu']:.4f} vs {name} {b['fvu']:.4f} -> ratio {a['fvu'] / b['fvu']:.3f} "
            f"(goal <= 1)"
        )
    print(f"ours TopK dead latents: {100 * rows['ours topk']['dead_frac']:.2f}% (goal < 1%)")


if __name__ == "__main__":
    main()
