"""Steering on gemma-3-270m: hook overhead and whether steering toward a label works.

1. Overhead: greedy generation with a steering hook on every generated token (a clamp on a
   TopK SAE's latent, full encode per token) against unsteered generation, same prompts,
   same settings, runs interleaved in one process; ``min_new_tokens`` keeps the number of
   forwards equal. Goal: steered time <= 1.15 x unsteered.
2. Quality: the ag_news SAE (``common.ag_news_sae()``, layer 9); the latent most enriched for
   Sports and for Business (token-level q < 1e-3, ranked by document-level q); a strength
   sweep (clamp to strength x the latent's max activation on every prompt and generated
   token) over the 12 neutral prompts x 6 sampled continuations of 32 tokens, with the
   controls. Goals: the classifier's target-label share rises from its baseline to >= 0.6
   with perplexity within 2x of unsteered; the random-latent control moves the share by < 0.1.

    python bench/bench_steering.py                       # both parts, all controls
    python bench/bench_steering.py --skip-quality        # overhead only (about 1 minute)
    python bench/bench_steering.py --skip-overhead --controls random   # the quality goals
    python bench/bench_steering.py --skip-overhead --per-label 3 --positions generated
    python bench/bench_steering.py --skip-quality --device cuda   # overhead on a GPU

When no latent passes the enrichment cut (a model with random weights, say), the overhead
part clamps the latent with the largest activation instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from integral_superposition import steering
from integral_superposition.data import neutral_prompts
from integral_superposition.data.tokenize import pad_batch, pad_token_id
from integral_superposition.pipelines.steer_eval import side_by_side
from integral_superposition.sae import load_sae, read_sae_manifest
from integral_superposition.steering import picks, sweep
from integral_superposition.steering.generation import encode_prompts

OUT = common.OUT / "steering"


def enrichment(sae, sae_uri: str, store):
    """Token and document enrichment tables and max activations (cached per SAE)."""
    key = (read_sae_manifest(sae_uri).get("content_hash") or "x")[:12]
    folder = OUT / f"enrichment_{key}"
    files = [folder / n for n in ("token.parquet", "doc.parquet", "max_act.npy")]
    if all(f.exists() for f in files):
        return pd.read_parquet(files[0]), pd.read_parquet(files[1]), np.load(files[2])
    t = time.time()
    tok, doc, scan = picks.enrichment_tables(sae, store, 20)
    folder.mkdir(parents=True, exist_ok=True)
    tok.to_parquet(files[0])
    doc.to_parquet(files[1])
    np.save(files[2], np.asarray(scan.act_max))
    print(f"[bench] enrichment scan {time.time() - t:.0f}s")
    return tok, doc, np.asarray(scan.act_max)


def overhead(
    backend, sae, hook: str, latent: int, value: float, batch_size: int, new_tokens: int, reps: int
):
    prompts = (neutral_prompts() * 4)[:batch_size]
    tok = backend.tokenizer
    batch = pad_batch(encode_prompts(tok, prompts), pad_token_id(tok), "left")
    kw = dict(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, top_k=None, top_p=None,
    )  # fmt: skip

    def unsteered():
        return backend.generate(**kw)

    def steered():
        with steering.steer(
            backend, sae, hook, steering.clamp(latent, value), positions="generated"
        ) as h:
            out = backend.generate(**kw)
        assert h.edited_tokens["generated"] == batch_size * (new_tokens - 1)
        return out

    unsteered(), steered()  # warm-up
    times = {"unsteered": [], "steered": []}
    for _ in range(reps):  # interleaved, so load changes hit both sides alike
        for name, fn in (("unsteered", unsteered), ("steered", steered)):
            common.sync()
            t = time.perf_counter()
            fn()
            common.sync()
            times[name].append(time.perf_counter() - t)
    a, b = statistics.median(times["unsteered"]), statistics.median(times["steered"])
    ratios = [s / u for s, u in zip(times["steered"], times["unsteered"], strict=True)]
    return {
        "batch": batch_size,
        "new_tokens": new_tokens,
        "reps": reps,
        "unsteered_s": round(a, 3),
        "steered_s": round(b, 3),
        "ratio_of_medians": round(b / a, 4),
        "median_paired_ratio": round(statistics.median(ratios), 4),
    }


def significance(table: pd.DataFrame) -> pd.DataFrame:
    """Each steered and random-control row's share shift from the unsteered share of the same
    prompts, its standard error (two independent binomial proportions) and a Fisher exact
    p-value: shows how large a shift sampling noise alone produces at this many generations."""
    from scipy.stats import fisher_exact

    rows = []
    neutral = table[table["prompts"] == "neutral"]
    for lat, g in neutral.groupby("latent", sort=False):
        base = g[g["control"] == "unsteered"].iloc[0]
        k0, n0 = round(base["share"] * base["n"]), int(base["n"])
        for r in g[g["control"].isin(["steer", "random"])].itertuples():
            k, n = round(r.share * r.n), int(r.n)
            p1, p0 = k / n, k0 / n0
            se = float(np.sqrt(p1 * (1 - p1) / n + p0 * (1 - p0) / n0))
            p = fisher_exact([[k, n - k], [k0, n0 - k0]])[1]
            rows.append({"latent": lat, "label": r.label, "control": r.control, "strength": r.strength,
                         "share": p1, "shift": p1 - p0, "se": se, "fisher_p": p})  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--labels", nargs="+", default=["Sports", "Business"])
    ap.add_argument(
        "--latents", nargs="+", type=int, default=None, help="explicit latents (one per label)"
    )
    ap.add_argument("--per-label", type=int, default=1)
    ap.add_argument("--strengths", nargs="+", type=float, default=[0.25, 0.35, 0.5])
    ap.add_argument("--positions", nargs="+", default=["all"])
    ap.add_argument("--mode", default="clamp_max")
    ap.add_argument("--rank-by", default="doc_q")
    ap.add_argument("--samples", type=int, default=6, help="continuations per prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=36)
    ap.add_argument("--controls", nargs="*", default=["alpha0", "random", "own_label"])
    ap.add_argument("--own-prompts", type=int, default=6)
    ap.add_argument("--tag", default="default")
    ap.add_argument("--device", default="cpu", help="where the model and the SAE run: cpu, cuda")
    ap.add_argument("--overhead-tokens", type=int, default=32, help="new tokens per overhead run")
    args = ap.parse_args()
    common.set_device(args.device)

    print(common.machine())
    sae_uri, store = common.ag_news_sae()
    sae = load_sae(sae_uri).eval().to(common.DEVICE)
    m = read_sae_manifest(sae_uri).get("metrics", {})
    print(
        f"SAE {sae_uri}: {sae}; held-out FVU {m.get('fvu', float('nan')):.3f}, L0 {m.get('l0', float('nan')):.1f}"
    )
    backend = common.gemma()  # bf16, as the store was dumped
    tok, doc, mx = enrichment(sae, sae_uri, store)
    picks = steering.pick_latents(
        tok, doc, labels=args.labels, per_label=args.per_label, q_max=1e-3, rank_by=args.rank_by
    )
    print("\n== picked latents (token-level q < 1e-3, ranked by", args.rank_by + ")")
    print(picks.assign(max_act=mx[picks["latent"]]).to_string(index=False))
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": common.machine()}

    if not args.skip_overhead:
        j = int(picks["latent"].iloc[0]) if len(picks) else int(np.argmax(mx))
        print(f"\n== 1. overhead: clamp latent {j} to 1x max on every generated token")
        rows = []
        for batch_size, new_tokens in ((8, args.overhead_tokens), (1, args.overhead_tokens)):
            r = overhead(
                backend, sae, store.hook_point, j, float(mx[j]), batch_size, new_tokens, args.reps
            )
            rows.append(r)
            print(json.dumps(r))
        results["overhead"] = rows
        common.record(
            device=str(backend.device),
            model=common.MODEL,
            overhead={f"batch_{r['batch']}": r for r in rows},
        )

    if not args.skip_quality:
        latents = args.latents or picks["latent"].tolist()
        labels = args.labels if args.latents else picks["label"].tolist()
        params = steering.SteeringParams(
            latents=[int(j) for j in latents], labels=labels, mode=args.mode,
            strengths=args.strengths, positions=args.positions if len(args.positions) > 1 else args.positions[0],
            max_new_tokens=args.new_tokens, do_sample=not args.greedy, temperature=args.temperature,
            samples_per_prompt=args.samples, controls=args.controls, own_label_prompts=args.own_prompts,
            batch_size=args.batch_size,
        )  # fmt: skip
        t = time.time()
        result = sweep.evaluate_steering(
            backend, sae, store, params, enrichment=(tok, doc), max_acts=mx,
            on_progress=lambda d, n: print(f"  [{d}/{n}] {time.time() - t:.0f}s", flush=True),
        )  # fmt: skip
        out = OUT / args.tag
        out.mkdir(parents=True, exist_ok=True)
        result.table.to_parquet(out / "sweep.parquet", index=False)
        result.generations.to_parquet(out / "generations.parquet", index=False)
        fig = result.figure()
        fig.savefig(out / "sweep.png", dpi=110)
        print(f"\n== 2. quality ({time.time() - t:.0f}s; {out}/sweep.png)")
        print("classifier:", json.dumps(result.classifier))
        cols = [
            "latent",
            "label",
            "control",
            "prompts",
            "strength",
            "share",
            "prob",
            "vocab_mass",
            "perplexity",
            "ppl_ratio",
            "distinct2",
            "mean_tokens",
        ]
        print(result.table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        results["quality"] = {"params": params.model_dump(), "summary": result.summary}
        for s in result.summary["latents"]:
            ok_share = s["best_share"] is not None and s["best_share"] >= 0.6
            ok_rand = s["random_max_shift"] is not None and s["random_max_shift"] < 0.1
            print(
                f"latent {s['latent']} ({s['label']}): share {s['baseline_share']:.2f} -> "
                f"{s['best_share'] if s['best_share'] is not None else float('nan'):.2f} at strength {s['best_strength']} "
                f"(ppl x{s['best_ppl_ratio'] if s['best_ppl_ratio'] is not None else float('nan'):.2f}; max share {s['max_share']:.2f}) "
                f"[{'PASS' if ok_share else 'FAIL'} >= 0.6 within 2x ppl]; random control max shift "
                f"{s['random_max_shift'] if s['random_max_shift'] is not None else float('nan'):.2f} [{'PASS' if ok_rand else 'FAIL'} < 0.1]"
            )
        print("\nshare shifts against unsteered (two-sided Fisher exact test on the counts):")
        print(significance(result.table).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        for j in params.latents:
            print(f"\nside by side, latent {j}:")
            print(side_by_side(result, j).to_string(index=False, max_colwidth=70))
    (OUT / f"results_{args.tag}.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
