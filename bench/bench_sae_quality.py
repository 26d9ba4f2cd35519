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
SAELens TopK SAEs were read before ``load_sae`` folded the decoder norms (``--no-flag-ignored``
skips those rows).

Seeds: ``--seeds 0,1,2`` repeats the comparison once per seed. A seed sets our SAE's
initialisation, SAELens's initialisation and the shared batch order, so the two trainers of one
seed see the same batches. Our TopK trains with ``refit_decoder`` off (the SGD result, what the
comparison with SAELens is about); ``ours topk, as shipped`` is that same SGD result after the
library's default closed-form decoder refit on the training tokens (``sae.refit``; no other
data), which is what a user of our trainer gets. The summary gives per-seed FVU / L0 / dead
latents of every trainer, the per-seed ratios to SAELens, and their mean and sample standard
deviation over the seeds (also written to ``bench/out/sae_quality/seeds.json``).
``--variant NAME:FIELD=VALUE[,FIELD=VALUE]`` (repeatable) trains further TopK SAEs of ours in the
same pass with those ``SAEConfig`` fields changed, e.g. ``--variant lr2x:lr=0.002``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from common import OUT, ag_news_store, fresh_bench_dir, gemma, machine, peak_rss_mb
from integral_superposition import SAEConfig
from integral_superposition.config import dead_window
from integral_superposition.sae import evaluate_sae, load_sae, save_sae
from integral_superposition.sae.refit import refit_decoders
from integral_superposition.sae.sources import open_source
from integral_superposition.sae.train import train_saes
from integral_superposition.sae.trainee import Trainee, geometric_median

D_SAE, TOP_K = 4096, 32


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:FIELD=VALUE[,FIELD=VALUE]`` -> ``(NAME, {FIELD: VALUE})`` (values read as YAML)."""
    name, sep, body = text.partition(":")
    if not sep or not name or not body:
        raise SystemExit(f"--variant={text!r}: expected NAME:FIELD=VALUE[,FIELD=VALUE]")
    fields = {}
    for part in body.split(","):
        key, eq, value = part.partition("=")
        if not eq or key not in SAEConfig.model_fields:
            raise SystemExit(
                f"--variant={text!r}: {part!r} is not FIELD=VALUE of an SAEConfig field"
            )
        fields[key] = yaml.safe_load(value)
    return name, fields


def our_configs(args, seed: int = 0) -> dict[str, SAEConfig]:
    common = dict(
        k=D_SAE, batch_size=args.batch, epochs=args.epochs, lr=args.lr, lr_warmup_steps=50,
        dead_tokens=args.dead_tokens, auxk_coef=args.auxk_coef, log_every=50, seed=seed,
        refit_decoder=False,  # SAELens has no decoder refit: compare the SGD results
    )  # fmt: skip
    jump = dict(jumprelu_bandwidth=args.bandwidth, jumprelu_init_threshold=args.init_threshold)
    variants = {
        f"topk {name}": SAEConfig(architecture="topk", top_k=TOP_K, **{**common, **fields})
        for name, fields in map(parse_variant, args.variant)
    }
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
        **variants,
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
    torch.manual_seed(cfg.seed)  # SAELens initialises from the global generator
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


def refit_as_shipped(store, cfg: SAEConfig, sgd_uri: str, out: str) -> tuple[str, dict]:
    """Our TopK as a default run publishes it: the SGD result of ``sgd_uri`` after the
    library's decoder refit (``sae.refit.refit_decoders``) on the run's training tokens, with
    the outlier filter training used; kept only when it lowers the held-out FVU."""
    shipped = cfg.model_copy(update={"refit_decoder": True})
    source = open_source(store, [shipped])
    hook = source.hooks[0]
    sae = load_sae(sgd_uri)
    t = Trainee(shipped, sae, hook, torch.device("cpu"))
    if shipped.max_norm_factor is not None:  # as ``trainee.init_trainee`` sets it
        sample = source.sample(16384)[hook]
        t.max_norm = float(shipped.max_norm_factor * sample.norm(dim=1).median())
    (info,) = refit_decoders(source, [t])
    return save_sae(t.sae, out, metadata=sae.metadata, training_config=shipped), info


def train_seed(args, store, seed: int, out: Path) -> dict[str, str]:
    """Train every SAE of one seed; returns ``{row name: SAE folder}``."""
    fresh_bench_dir(out)
    wanted = args.ours.split(",")
    cfgs = {
        a: c
        for a, c in our_configs(args, seed).items()
        if a in wanted or a == "topk" or a.startswith("topk ")
    }
    t, c0 = time.time(), time.process_time()
    res = train_saes(
        store, list(cfgs.values()), [str(out / f"ours_{a.replace(' ', '_')}") for a in cfgs],
        progress=False,
    )  # fmt: skip
    total = res[0].steps
    print(
        f"seed {seed} ours: {len(cfgs)} SAEs in one pass, {total} steps x {args.batch} tokens "
        f"({res[0].tokens} training tokens) in {time.time() - t:.0f}s wall, "
        f"{time.process_time() - c0:.0f}s CPU; peak RSS {peak_rss_mb():.0f} MiB",
        flush=True,
    )
    saes = {f"ours {a}": r.uri for a, r in zip(cfgs, res, strict=True)}
    t = time.time()
    uri, info = refit_as_shipped(store, cfgs["topk"], saes["ours topk"], str(out / "ours_shipped"))
    saes["ours topk, as shipped"] = uri
    print(
        f"seed {seed} ours as shipped: decoder refit in {time.time() - t:.0f}s, held-out FVU "
        f"{info.get('refit_fvu_before', float('nan')):.4f} -> "
        f"{info.get('refit_fvu_after', float('nan')):.4f} "
        f"({'kept' if info.get('refit_applied') else 'discarded: ' + str(info.get('refit_skipped', 'no better'))})",
        flush=True,
    )
    if not args.no_saelens:
        for arch in ("topk", "batchtopk") if args.saelens_batchtopk else ("topk",):
            inits = {"both": (False, True), "zero": (False,), "median": (True,)}
            for median in inits[args.saelens_init]:
                name = f"SAELens {arch}" + (" (b_dec at median)" if median else " (b_dec = 0)")
                t, c0 = time.time(), time.process_time()
                cfg_arch = cfgs.get(arch) or our_configs(args, seed)[arch]
                saes[name] = train_saelens(arch, store, cfg_arch, total, out, median)
                print(
                    f"seed {seed} {name}: {total} steps on the same batches in "
                    f"{time.time() - t:.0f}s wall, {time.process_time() - c0:.0f}s CPU",
                    flush=True,
                )
                if not args.no_flag_ignored:
                    saes[name + ", flag ignored"] = ignoring_rescale(saes[name])
    return saes


def evaluate_all(saes: dict[str, str], store, backend, ce_docs: int) -> dict[str, dict]:
    rows = {}
    for name, uri in saes.items():
        sae = load_sae(uri)
        with torch.no_grad():
            m = evaluate_sae(sae, store, backend, n_ce_docs=max(1, ce_docs))
        rows[name] = {k: v for k, v in m.items() if not isinstance(v, list | dict)}
    return rows


def print_seed(seed: int, rows: dict[str, dict], ce_docs: int) -> None:
    first = next(iter(rows.values()))
    print(
        f"\nseed {seed}, held-out split: {first['n_tokens']} tokens; CE on {ce_docs} held-out "
        f"documents ({first.get('n_predictions', 0)} predictions), gemma-3-270m bf16, "
        f"clean CE {first.get('ce_clean', float('nan')):.3f} nats, zero-ablation CE "
        f"{first.get('ce_zero', float('nan')):.3f}"
    )
    print("\n| SAE | L0 | FVU | dead % | dense % (>0.1) | CE recovered | delta CE (nats) | KL |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, m in rows.items():
        print(
            f"| {name} | {m['l0']:.1f} | {m['fvu']:.4f} | {100 * m['dead_frac']:.2f} | "
            f"{100 * m['dense_frac']:.2f} | {m.get('ce_recovered', float('nan')):.4f} | "
            f"{m.get('delta_ce', float('nan')):.4f} | {m.get('kl', float('nan')):.4f} |"
        )
    for name in [n for n in rows if n.startswith("SAELens topk") and "ignored" not in n]:
        for ours in ("ours topk", "ours topk, as shipped"):
            a, b = rows[ours], rows[name]
            same_l0 = abs(a["l0"] - b["l0"]) <= 0.1 * b["l0"]
            print(
                f"TopK at the same L0 ({a['l0']:.1f} vs {b['l0']:.1f}, within 10%: {same_l0}): "
                f"FVU {ours} {a['fvu']:.4f} vs {name} {b['fvu']:.4f} -> ratio "
                f"{a['fvu'] / b['fvu']:.3f} (goal <= 1)"
            )
    print(f"ours TopK dead latents: {100 * rows['ours topk']['dead_frac']:.2f}% (goal < 1%)")


def _spread(vals: list[float]) -> str:
    sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
    return f"{statistics.fmean(vals):.4f} +- {sd:.4f}"


def summarise(per_seed: dict[int, dict[str, dict]]) -> dict[str, Any]:
    """Per-seed FVU / L0 / dead % of every row, ratios to SAELens and their spread."""
    seeds = list(per_seed)
    names = [n for n in per_seed[seeds[0]] if "ignored" not in n]
    refs = [n for n in names if n.startswith("SAELens topk")]
    ours = [n for n in names if n.startswith("ours topk")]
    print(f"\n## Over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}): held-out FVU")
    head = ["seed", *names] + [f"{o} / {r}" for r in refs for o in ours]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    ratios: dict[str, list[float]] = {}
    for s in seeds:
        rows = per_seed[s]
        cells = [str(s)]
        for n in names:
            m = rows[n]
            cells.append(f"{m['fvu']:.4f} (L0 {m['l0']:.1f}, dead {100 * m['dead_frac']:.2f}%)")
        for r in refs:
            for o in ours:
                q = rows[o]["fvu"] / rows[r]["fvu"]
                ratios.setdefault(f"{o} / {r}", []).append(q)
                cells.append(f"{q:.3f}")
        print("| " + " | ".join(cells) + " |")
    cells = ["mean +- sd"]
    for n in names:
        cells.append(_spread([per_seed[s][n]["fvu"] for s in seeds]))
    cells += [_spread(v) for v in ratios.values()]
    print("| " + " | ".join(cells) + " |")
    dead = {n: _spread([100 * per_seed[s][n]["dead_frac"] for s in seeds]) for n in names}
    print("dead % (mean +- sd): " + "; ".join(f"{n} {v}" for n, v in dead.items()))
    return {"seeds": seeds, "ratios": ratios, "per_seed": {str(s): per_seed[s] for s in seeds}}


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
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:FIELD=VALUE[,FIELD=VALUE]: one more TopK SAE of ours with these fields",
    )
    ap.add_argument(
        "--no-flag-ignored", action="store_true", help="skip the 'flag ignored' SAELens rows"
    )
    args = ap.parse_args()
    try:
        seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds={args.seeds!r}: expected comma-separated integers") from None
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds={args.seeds!r}: a seed is repeated")
    for v in args.variant:
        parse_variant(v)  # a bad variant fails before any training
    logging.disable(logging.WARNING)
    out = OUT / "sae_quality"
    if args.store is not None:
        from integral_superposition.dump import ActivationStore

        store = ActivationStore(args.store)
    else:
        store = ag_news_store(max_len=args.max_len, n_docs=args.docs)
    print(f"store: {args.store or 'ag_news dump'}, {store.n_tokens} tokens, d = {store.d_model}")
    print(machine())
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}; load {os.getloadavg()}")
    backend = gemma() if args.ce_docs > 0 else None
    per_seed = {}
    for seed in seeds:
        # one seed keeps the folder names of a single-seed run
        saes = train_seed(args, store, seed, out if len(seeds) == 1 else out / f"seed{seed}")
        per_seed[seed] = evaluate_all(saes, store, backend, args.ce_docs)
        print_seed(seed, per_seed[seed], args.ce_docs)
        print(f"load {os.getloadavg()}", flush=True)
    summary = summarise(per_seed)
    summary["machine"] = machine()
    summary["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    summary["args"] = vars(args)
    (out / "seeds.json").write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
