"""Latent merging on real activations: quality of the merge, refit speed, clustering memory.

gemma-3-270m layer-9 activations of ag_news (titles + descriptions), a d_sae = 4096 SAE.

1. Sweep K' = K/2 .. K/16, clustering vs a random partition of the same cluster sizes, on the
   held-out split: FVU, L0, dead fraction, enrichment retention, CE recovered (when the SAE
   metrics offer spliced CE). Goals: at K/4 the FVU rises by at most 25% of the original FVU
   and >= 80% of the significant enrichments survive; clustering beats the control at every K'.
2. Levers at K/4: similarity, linkage, aggregation, ridge lambda, bias refit, no refit, and
   the default evaluated on another document split.
3. Streaming refit speed vs a bare ``Z^T Z`` matmul over the same tokens (goal: >= 50%), for
   codes in memory, end to end from the store, and for the sweep's one pass of original codes.
4. Peak RSS of clustering K = 65,536 synthetic decoder rows in the k-NN mode (subprocess).

    python bench/bench_merge.py                 # everything
    python bench/bench_merge.py --skip-levers --skip-rss
    python bench/bench_merge.py --skip-sweep --skip-levers   # refit speed and memory only
    python bench/bench_merge.py --only-rss                    # clustering memory only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from integral_superposition import merge
from integral_superposition.merge import evaluate as ev
from integral_superposition.merge.params import MergeParams
from integral_superposition.merge.refit import RidgeStats, accumulate_stats, build_merged_sae

OUT = common.OUT / "merge"


def load_sae(uri: str | None):
    """``(sae, description)``: ``--sae`` or the training bench's cached ag_news SAE (trained once)."""
    from integral_superposition.sae import load_sae as _load

    if uri is None:
        uri, _store = common.ag_news_sae("topk", 4096)
        return _load(uri), f"{uri} (bench/common.ag_news_sae)"
    return _load(uri), uri


def fmt(df: pd.DataFrame, cols: list[str]) -> str:
    cols = [c for c in cols if c in df]
    return df[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}")


def quality(sae, store, backend, params: MergeParams) -> pd.DataFrame:
    t = time.time()
    table, fig = ev.sweep(sae, store, params, backend=backend)
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "sweep.png", dpi=110)
    table.to_parquet(OUT / "sweep.parquet", index=False)
    print(f"\n== 1. sweep ({time.time() - t:.0f}s; figure {OUT / 'sweep.png'})")
    print(
        fmt(
            table,
            [
                "k_prime",
                "partition",
                "fvu",
                "l0",
                "dead_frac",
                "enrichment_retention",
                "ce_recovered",
                "delta_ce",
                "kl",
                "fit_fvu",
                "mean_distance_to_medoid",
            ],
        )
    )
    orig = table[table["partition"] == "original"].iloc[0]
    k = int(orig["k_prime"])
    at4 = table[(table["partition"] == "cluster") & (table["k_prime"] == k // 4)].iloc[0]
    rise = (at4["fvu"] - orig["fvu"]) / orig["fvu"]
    print(
        f"K/4: FVU {orig['fvu']:.4f} -> {at4['fvu']:.4f} (+{100 * rise:.1f}% of the original FVU; goal <= 25%) "
        f"{'PASS' if rise <= 0.25 else 'MISS'}"
    )
    ret = at4.get("enrichment_retention", float("nan"))
    print(
        f"K/4: enrichment retention {ret:.3f} of {int(at4.get('n_enriched_before', 0))} pairs (goal >= 0.80) "
        f"{'PASS' if ret >= 0.8 else 'MISS'}"
    )
    refit = table[table["partition"] == "original_refit"]
    if len(refit):
        r0 = refit.iloc[0]
        print(
            f"refit control (K={k}: the original codes, decoder refit): FVU {r0['fvu']:.4f}, "
            f"CE recovered {r0.get('ce_recovered', float('nan')):.4f} vs the original's "
            f"{orig['fvu']:.4f}, {orig.get('ce_recovered', float('nan')):.4f}; K/4 merged "
            f"{at4['fvu']:.4f}, {at4.get('ce_recovered', float('nan')):.4f}"
        )
    for size in sorted(table.loc[table["partition"] == "cluster", "k_prime"], reverse=True):
        c = table[(table["partition"] == "cluster") & (table["k_prime"] == size)].iloc[0]
        r = table[(table["partition"] == "random") & (table["k_prime"] == size)].iloc[0]
        wins = [f"fvu {c['fvu']:.4f} < {r['fvu']:.4f}: {c['fvu'] < r['fvu']}"]
        if np.isfinite(c.get("ce_recovered", np.nan)):
            wins.append(
                f"ce_rec {c['ce_recovered']:.4f} > {r['ce_recovered']:.4f}: {c['ce_recovered'] > r['ce_recovered']}"
            )
        if np.isfinite(c.get("enrichment_retention", np.nan)):
            wins.append(
                f"retention {c['enrichment_retention']:.3f} > {r['enrichment_retention']:.3f}: {c['enrichment_retention'] > r['enrichment_retention']}"
            )
        print(f"K'={size}: clustering vs random: " + "; ".join(wins))
    return table


def levers(sae, store, base: MergeParams, stats, ref) -> pd.DataFrame:
    """Every variant merges to K/4 and is evaluated like the sweep (same held-out tokens)."""
    k = sae.d_sae
    dec = {"similarity": {"decoder": 1.0}}
    variants = {
        "default: reconstruction + 0.3 doc-correlation, complete": {},
        "  same, average linkage": {"linkage": "average"},
        "  same, max aggregation": {"aggregation": "max"},
        "  same, projection weights": {"aggregation": "projection"},
        "  same, ridge_lambda 1e-2": {"ridge_lambda": 1e-2},
        "  same, ridge_lambda 1e-6": {"ridge_lambda": 1e-6},
        "  same, no bias refit": {"refit_bias": False},
        "  same, no refit (medoid rows)": {"refit": False},
        "  same, evaluated on another split (split_seed=1)": {"split_seed": 1},
        "reconstruction only, complete": {"similarity": {"reconstruction": 1.0}},
        "doc-correlation only, complete": {"similarity": {"coactivation": 1.0}},
        "token-Jaccard only, average": {
            "similarity": {"coactivation": 1.0},
            "coactivation": "jaccard",
            "coactivation_level": "token",
            "linkage": "average",
        },
        "decoder cosine, average (the seed's)": {**dec, "linkage": "average"},
        "decoder cosine, complete": {**dec},
        "encoder cosine, complete": {"similarity": {"encoder": 1.0}},
        "decoder + doc-correlation, complete": {
            "similarity": {"decoder": 0.5, "coactivation": 0.5}
        },
    }
    rows = []
    refs = {(base.split_seed,): (stats, ref)}
    for name, change in variants.items():
        t = time.time()
        p = base.model_copy(update=change)
        key = (p.split_seed,)
        if key not in refs:
            refs[key] = (ev.original_stats(sae, store, p), ev.reference_metrics(sae, store, p))
        st, rf = refs[key]
        sim = ev.similarity_for(sae, store, p, st)
        labels = merge.build_tree(sim, p.linkage, p.graph, p.n_neighbors, k // 4).cut(k // 4)
        merged, _m, _d, info = ev.merge_with_labels(sae, labels, sim, p, store=store, stats=st)
        m, pairs = ev.measure(merged, store, p)
        if rf.significant is not None and pairs is not None:
            m.update(ev.enrichment_retention(rf.significant, pairs, labels))
        m["fvu_rise"] = (m["fvu"] - rf.metrics["fvu"]) / rf.metrics["fvu"]
        m["max_cluster"] = int(np.bincount(labels).max())
        rows.append({"variant": name, "seconds": time.time() - t, **info, **m})
    table = pd.DataFrame(rows)
    print(
        f"\n== 2. levers at K'={k // 4} (original FVU {ref.metrics['fvu']:.4f}; fvu_rise is relative to the original FVU)"
    )
    print(
        fmt(
            table,
            [
                "variant",
                "fvu",
                "fvu_rise",
                "l0",
                "dead_frac",
                "enrichment_retention",
                "max_cluster",
                "seconds",
            ],
        )
    )
    return table


def _bare_gram(codes: list[torch.Tensor]) -> float:
    """Seconds of the bare dense ``G += Z^T Z`` over chunks already in memory."""
    t = time.perf_counter()
    g = torch.zeros(codes[0].shape[1], codes[0].shape[1])
    for z in codes:
        g += z.T @ z
    return time.perf_counter() - t


@torch.no_grad()
def refit_speed(sae, store, params: MergeParams, labels: np.ndarray) -> dict:
    """The streaming refit against a bare ``Z^T Z`` matmul over the same tokens, three ways
    (repeated and interleaved so that both sides share the machine's noise):

    a. K' = K/4 codes and activations already in memory: our accumulation (sparse Z^T Z,
       Z^T X, sums) + solve vs the bare dense Z^T Z of the same codes;
    b. the same refit end to end from the store (read + encode + merge + accumulate + solve);
    c. the sweep's path: one pass of the *original* K codes (read + encode + accumulate) vs the
       bare dense Z^T Z of those codes (timed on the first 3 chunks, scaled to all tokens).
    """
    mask = ev._split(store, params.fit_split, params)
    first = np.array([np.flatnonzero(labels == c)[0] for c in range(labels.max() + 1)])
    merged = build_merged_sae(sae, labels, first)
    chunk = params.chunk_tokens
    xs = [x for _r, x in store.iter_chunks(chunk, mask=mask)]
    codes = [merged.encode(x) for x in xs]
    n = sum(c.shape[0] for c in codes)
    orig_codes = [sae.encode(x) for x in xs[:3]]
    n3 = sum(c.shape[0] for c in orig_codes)
    rows = []
    for rep in range(2):
        r = {"rep": rep, "tokens": n, "k_prime": merged.d_sae}
        r["a_bare_ztz_s"] = _bare_gram(codes)
        t = time.perf_counter()
        st = RidgeStats.empty(merged.d_sae, merged.d_in)
        for z, x in zip(codes, xs, strict=True):
            st.update(z, x)
        st.solve(params.ridge_lambda, prior=merged.W_dec.double())
        r["a_accumulate_solve_s"] = time.perf_counter() - t
        t = time.perf_counter()
        accumulate_stats(merged, ev._fit_chunks(store, params)).solve(
            params.ridge_lambda, prior=merged.W_dec.double()
        )
        r["b_end_to_end_s"] = time.perf_counter() - t
        t = time.perf_counter()
        for _r, x in store.iter_chunks(chunk, mask=mask):
            merged.encode(x)
        r["b_read_encode_only_s"] = time.perf_counter() - t
        r["c_bare_ztz_original_s"] = _bare_gram(orig_codes) * n / n3
        t = time.perf_counter()
        accumulate_stats(sae, ev._fit_chunks(store, params)).merged(labels).solve(
            params.ridge_lambda
        )
        r["c_original_pass_project_solve_s"] = time.perf_counter() - t
        rows.append(r)
        print(
            "  "
            + ", ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
            )
        )
    best = {k: min(r[k] for r in rows) for k in rows[0] if k.endswith("_s")}
    ra = best["a_bare_ztz_s"] / best["a_accumulate_solve_s"]
    rb = best["a_bare_ztz_s"] / best["b_end_to_end_s"]
    rc = best["c_bare_ztz_original_s"] / best["c_original_pass_project_solve_s"]
    # the same pipeline with the accumulation replaced by the bare matmul: read + encode + Z^T Z
    bare_pipeline = best["b_read_encode_only_s"] + best["a_bare_ztz_s"]
    rb2 = bare_pipeline / best["b_end_to_end_s"]
    print(
        f"\n== 3. refit speed over {n} fit tokens (best of 2), as a fraction of the bare Z^T Z speed (goal >= 50%):"
    )
    print(
        f"  a. K'={merged.d_sae} codes + activations in memory: accumulate + solve {best['a_accumulate_solve_s']:.2f}s vs bare {best['a_bare_ztz_s']:.2f}s -> {100 * ra:.0f}% {'PASS' if ra >= 0.5 else 'MISS'}"
    )
    print(
        f"  b. K'={merged.d_sae} end to end from the store: {best['b_end_to_end_s']:.2f}s (read + encode alone {best['b_read_encode_only_s']:.2f}s) vs bare {best['a_bare_ztz_s']:.2f}s -> {100 * rb:.0f}% {'PASS' if rb >= 0.5 else 'MISS'}"
    )
    print(
        f"  b'. the same end to end vs read + encode + bare Z^T Z {bare_pipeline:.2f}s -> {100 * rb2:.0f}% {'PASS' if rb2 >= 0.5 else 'MISS'}"
    )
    print(
        f"  c. K={sae.d_sae} original codes, the sweep's one pass (read + encode + accumulate + project + solve) {best['c_original_pass_project_solve_s']:.2f}s vs bare dense Z^T Z {best['c_bare_ztz_original_s']:.2f}s (3 chunks, scaled) -> {100 * rc:.0f}% {'PASS' if rc >= 0.5 else 'MISS'}"
    )
    return {
        "reps": rows,
        "best": best,
        "ratio_a": ra,
        "ratio_b": rb,
        "ratio_b_vs_bare_pipeline": rb2,
        "ratio_c": rc,
    }


RSS_CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from sklearn.metrics import adjusted_rand_score
from integral_superposition.merge.similarity import LatentSimilarity
from integral_superposition.merge.cluster import tree_from_graph
from integral_superposition.merge.medoid import medoids_from_similarity
# VmHWM is this process's own peak: ru_maxrss would carry the parent's peak over fork + exec.
def peak_mb():
    for line in open("/proc/self/status", errors="replace"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
K, d, group = int(sys.argv[1]), int(sys.argv[2]), 16
g = torch.Generator().manual_seed(0)
truth = torch.randperm(K, generator=g) // group
centers = torch.randn(K // group, d, generator=g)
W = centers[truth] + 0.5 * torch.randn(K, d, generator=g)
rss_data = peak_mb()
t0 = time.time()
sim = LatentSimilarity(decoder=W)
edges = sim.knn_edges(16)
t1 = time.time()
tree = tree_from_graph(edges, "average", n_clusters_min=K // 16)
labels = tree.cut(K // 16)
t2 = time.time()
medoids, dist = medoids_from_similarity(sim, labels)  # the merge map's columns, no K x K matrix
t3 = time.time()
print(json.dumps({"K": K, "d": d, "edges": int(edges.rows.size), "knn_s": t1 - t0, "tree_s": t2 - t1,
                  "medoid_s": t3 - t2, "rss_after_data_mb": rss_data,
                  "ari_vs_planted_groups": adjusted_rand_score(truth.numpy(), labels),
                  "peak_rss_mb": peak_mb()}))
"""


def rss_65k(k: int = 65536, d: int = 640) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(k), str(d)],
        capture_output=True,
        text=True,
        check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    dense_gb = k * k * 8 / 2**30
    print(
        f"\n== 4. k-NN clustering of K={k} synthetic decoder rows (d={d}, 16 neighbours, average linkage, cut at K/16): "
        f"peak RSS {res['peak_rss_mb']:.0f} MiB, {res['rss_after_data_mb']:.0f} MiB of it before clustering "
        f"(python, torch, the [K, d] rows) (goal < 4096: {'PASS' if res['peak_rss_mb'] < 4096 else 'MISS'}; "
        f"a dense float64 K x K matrix alone is {dense_gb:.0f} GiB), "
        f"kNN {res['knn_s']:.0f}s, tree {res['tree_s']:.0f}s, medoids {res['medoid_s']:.1f}s, "
        f"ARI vs planted groups {res['ari_vs_planted_groups']:.3f}"
    )
    return res


RSS_COMPARE_CHILD = r"""
import json, resource, sys, time, warnings
import numpy as np, torch
from integral_superposition.merge.cluster import tree_from_graph
from integral_superposition.merge.similarity import LatentSimilarity
# VmHWM is this process's own peak: ru_maxrss would carry the parent's peak over fork + exec.
def peak_mb():
    for line in open("/proc/self/status", errors="replace"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
mode, K, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
truth = torch.randperm(K, generator=g) // 16
W = torch.randn(K // 16, d, generator=g)[truth] + 0.5 * torch.randn(K, d, generator=g)
edges = LatentSimilarity(decoder=W).knn_edges(16)
before = peak_mb()
t = time.time()
if mode == "ours":
    labels = tree_from_graph(edges, "average", n_clusters_min=K // 16).cut(K // 16)
else:
    from sklearn.cluster import AgglomerativeClustering
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = AgglomerativeClustering(
            n_clusters=K // 16, connectivity=edges.to_sparse(), metric="cosine", linkage="average"
        ).fit(W.double().numpy()).labels_
print(json.dumps({"mode": mode, "K": K, "seconds": time.time() - t, "rss_before_mb": before,
                  "peak_rss_mb": peak_mb(),
                  "labels": np.asarray(labels).tolist()}))
"""


def rss_vs_sklearn(ks: tuple[int, ...] = (4096, 8192), d: int = 640) -> list[dict]:
    """Our edge-list agglomeration vs scikit-learn's structured one (same k-NN graph, average
    linkage, cut at K/16), each in a fresh process: peak RSS above the shared setup, and the
    agreement of the labels."""
    from sklearn.metrics import adjusted_rand_score

    rows = []
    for k in ks:
        res = {}
        for mode in ("ours", "sklearn"):
            out = subprocess.run(
                [sys.executable, "-c", RSS_COMPARE_CHILD, mode, str(k), str(d)],
                capture_output=True,
                text=True,
                check=True,
            )
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        ari = adjusted_rand_score(res["ours"].pop("labels"), res["sklearn"].pop("labels"))
        grow = {m: r["peak_rss_mb"] - r["rss_before_mb"] for m, r in res.items()}
        rows.append(
            {
                "K": k,
                "ari_ours_vs_sklearn": ari,
                **{
                    f"{m}_{k2}": v
                    for m, r in res.items()
                    for k2, v in r.items()
                    if k2 != "mode" and k2 != "K"
                },
                "ours_growth_mb": grow["ours"],
                "sklearn_growth_mb": grow["sklearn"],
            }
        )
        print(
            f"  K={k}: the agglomeration raises peak RSS (above the k-NN search) by {grow['ours']:.0f} MiB ({res['ours']['seconds']:.1f}s) here vs "
            f"{grow['sklearn']:.0f} MiB ({res['sklearn']['seconds']:.1f}s) in scikit-learn's structured "
            f"AgglomerativeClustering on the same graph; ARI between the two labelings {ari:.4f}"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sae", help="SAE URI (default: bench/common.ag_news_sae())")
    p.add_argument(
        "--no-ce", action="store_true", help="skip the spliced CE metrics (no gemma forwards)"
    )
    p.add_argument("--ce-docs", type=int, default=32, help="held-out documents for CE / KL")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--skip-levers", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument(
        "--only-rss", action="store_true", help="only the clustering memory part (no gemma data)"
    )
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(common.machine())
    if args.only_rss:
        results = {"machine": common.machine(), "rss_65536": rss_65k()}
        print("\n== 4b. the k-NN agglomeration vs scikit-learn's structured path, same graph:")
        results["rss_vs_sklearn"] = rss_vs_sklearn()
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "results_rss.json").write_text(json.dumps(results, indent=1, default=float))
        return
    store = common.ag_news_store()
    sae, where = load_sae(args.sae)
    sae = sae.eval()
    print(f"store {store}\nSAE {sae} from {where}")
    backend = (
        None if args.no_ce or args.skip_sweep else common.gemma()
    )  # bf16: CE of every SAE on one model
    params = MergeParams(ce_docs=args.ce_docs)
    results: dict = {"machine": common.machine()}
    if not args.skip_sweep:
        results["sweep"] = quality(sae, store, backend, params).to_dict("records")
    stats = ev.original_stats(sae, store, params)
    if not args.skip_levers:
        ref = ev.reference_metrics(sae, store, params)
        results["levers"] = levers(sae, store, params, stats, ref).to_dict("records")
    if not args.skip_speed:
        sim = ev.similarity_for(sae, store, params, stats)
        labels = merge.build_tree(sim, params.linkage, params.graph).cut(sae.d_sae // 4)
        results["refit_speed"] = refit_speed(sae, store, params, labels)
    if not args.skip_rss:
        results["rss_65536"] = rss_65k()
        print("\n== 4b. the k-NN agglomeration vs scikit-learn's structured path, same graph:")
        results["rss_vs_sklearn"] = rss_vs_sklearn()
    OUT.mkdir(parents=True, exist_ok=True)
    name = "results.json" if not (args.skip_sweep or args.skip_levers) else "results_partial.json"
    (OUT / name).write_text(json.dumps(results, indent=1, default=float))
    print(f"\nresults in {OUT / name}")


if __name__ == "__main__":
    main()
