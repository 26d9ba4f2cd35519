"""Analysis benchmarks on real gemma-3-270m activations (ag_news titles + descriptions, layer 9).

1. Top-k extraction (K = 4096 latents, 200 examples per latent, the seed's default) over the
   store read twice (~380k tokens): ours (float32 and bfloat16 encoder matmul) against the
   seed's per-latent loop, in the same run and with the same chunks. The seed's loop is
   timed on a subset of latents and scaled linearly to K; its encode (``sae.encode``, the
   same float32 matmul) is timed in full. Ours reports its own stage times (read, encode,
   select, finish), so the selection-only ratio needs no second pass. Goal: >= 100x.
2. Peak RSS of the top-k extraction on N and 2N tokens, each in a fresh subprocess (goal: flat).
3. Enrichment for K = 16,384 latents x 8 labels (goal: < 5 s).
4. run_analysis for K = 4096 on the store (~190k tokens): stage timings, dashboards for
   every latent (goal: < 60 s) and the index page's load time in headless Chromium (goal: < 2 s).

    python bench/bench_analysis.py             # everything
    python bench/bench_analysis.py --quick     # smaller sizes, for a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from integral_superposition.activations import ArraySource
from integral_superposition.analysis import enrichment
from integral_superposition.analysis.scan import TopKSets, scan_latents
from integral_superposition.dump import ActivationStore
from integral_superposition.pipelines import run_analysis
from integral_superposition.sae import SparseAutoencoder, load_sae, save_sae

OUT = common.OUT / "analysis"
K = common.D_SAE
TOP = 200


def bench_sae(store, target_density: float = 0.02) -> tuple[SparseAutoencoder, str, str]:
    """``(sae, saved uri, description)``: the shared trained SAE when bench/common offers one
    (unless ``$ISUP_BENCH_RANDOM_SAE`` is set), else a random-init d_sae = 4096 ReLU SAE with
    per-latent biases set so that each latent fires on about ``target_density`` of the tokens (random directions, realistic sparsity)."""
    if hasattr(common, "ag_news_sae") and not os.environ.get("ISUP_BENCH_RANDOM_SAE"):
        uri, _ = common.ag_news_sae(d_sae=K)
        return load_sae(uri), uri, f"bench/common.ag_news_sae(): trained TopK d_sae={K} ({uri})"
    uri = OUT / f"random_sae_{K}"
    if (uri / "manifest.json").exists():
        return (
            load_sae(str(uri)),
            str(uri),
            f"random-init d_sae={K}, biases for ~{target_density:.0%} density",
        )
    sae = SparseAutoencoder(store.d_model, K, seed=0)
    x = store.read(0, min(store.n_tokens, 16384)).float()
    with torch.no_grad():
        pre = sae.pre_activations(x)
        sae.b_enc.sub_(torch.quantile(pre, 1 - target_density, dim=0))
    save_sae(sae, str(uri))
    return sae, str(uri), f"random-init d_sae={K}, biases for ~{target_density:.0%} density"


# -- 1. top-k against the seed's loop -----------------------------------------------------------
@torch.no_grad()
def seed_loop(sae, store, latents: np.ndarray, k: int = TOP, batch: int = 16384, device="cpu"):
    """The seed's ``topk_sets_per_latent`` (per-latent numpy loop), restricted to ``latents``:
    each chunk is encoded on ``device`` and copied to numpy.

    Returns (sets, seconds in encode + copy to numpy, seconds in the per-latent loop).
    """
    sae = copy.deepcopy(sae).to(device).eval()
    top_vals = [np.empty((0,), dtype=np.float32) for _ in latents]
    top_idx = [np.empty((0,), dtype=np.int64) for _ in latents]
    t_enc = t_loop = 0.0
    for start in range(0, store.n_tokens, batch):
        end = min(start + batch, store.n_tokens)
        t0 = time.perf_counter()
        z_np = sae.encode(store.read(start, end).float().to(device)).cpu().numpy()
        t1 = time.perf_counter()
        for i, j in enumerate(latents):
            z_j = z_np[:, j]
            active_mask = z_j > 0.0
            if not active_mask.any():
                continue
            active_indices = np.where(active_mask)[0]
            active_vals = z_j[active_indices]
            all_vals = np.concatenate([top_vals[i], active_vals])
            all_idx = np.concatenate([top_idx[i], (start + active_indices).astype(np.int64)])
            if len(all_vals) > k:
                keep = np.argpartition(all_vals, -k)[-k:]
                top_vals[i], top_idx[i] = all_vals[keep], all_idx[keep]
            else:
                top_vals[i], top_idx[i] = all_vals, all_idx
        t_enc += t1 - t0
        t_loop += time.perf_counter() - t1
    return [set(x.tolist()) for x in top_idx], t_enc, t_loop


def _same_sets(sae, store, subset, sets_a, top_b) -> tuple[int, int, float]:
    """``(identical sets, identical value multisets, mean overlap)`` of latent ``subset[i]``'s
    top set in ``sets_a[i]`` (row-id sets) against ``top_b`` (a TopKSets). Sets may differ only
    where activations tie exactly (repeated texts give identical rows): values settle it."""
    same = same_values = 0
    overlap = []
    for i, j in enumerate(subset):
        a, b = sets_a[i], top_b[int(j)]
        overlap.append(len(a & b) / len(a | b) if a | b else 1.0)
        if a == b:
            same += 1
            same_values += 1
            continue
        rows = sorted(a | b)
        with torch.no_grad():
            z = sae.encode(store.gather(rows).float())[:, int(j)].tolist()
        val = dict(zip(rows, z, strict=True))
        same_values += sorted(val[r] for r in a) == sorted(val[r] for r in b)
    return same, same_values, float(np.mean(overlap))


def bench_topk(sae, store, n_subset: int, chunk: int = 16384, device: str = "cpu") -> dict:
    """Ours (float32 and bfloat16 encoder matmul) against the seed's loop, same chunk size,
    both encoding on ``device``."""
    out = {"tokens": store.n_tokens, "chunk": chunk, "device": device}
    tops = {}
    if device != "cpu":  # device context and kernels ready before either side is timed
        x = store.read(0, min(store.n_tokens, chunk))
        for dt in ("float32", "bfloat16"):
            scan_latents(sae, x, n_top=TOP, stats=False, encode_dtype=dt, device=device)
        seed_loop(sae, ArraySource([x.float().numpy()]), np.arange(2), batch=chunk, device=device)
    for dt in ("float32", "bfloat16"):
        t0 = time.perf_counter()
        scan = scan_latents(
            sae, store, n_top=TOP, stats=False, chunk_tokens=chunk, encode_dtype=dt, device=device
        )
        out[f"ours_{dt}_s"] = time.perf_counter() - t0
        out[f"ours_{dt}_timings"] = scan.timings
        tops[dt] = scan.top
    subset = np.linspace(0, sae.d_sae - 1, n_subset).astype(np.int64)
    sets, t_enc, t_loop = seed_loop(sae, store, subset, batch=chunk, device=device)
    seed_loop_est = t_loop * sae.d_sae / n_subset
    seed_est = t_enc + seed_loop_est
    out.update(
        seed_encode_s=t_enc,
        seed_loop_subset_s=t_loop,
        seed_subset=n_subset,
        seed_loop_est_s=seed_loop_est,
        seed_total_est_s=seed_est,
    )
    for dt, top in tops.items():
        tm = out[f"ours_{dt}_timings"]
        out[f"speedup_total_{dt}"] = seed_est / out[f"ours_{dt}_s"]
        out[f"speedup_selection_{dt}"] = seed_loop_est / max(tm["select"] + tm["finish"], 1e-9)
        out[f"speedup_encode_{dt}"] = t_enc / max(tm["read"] + tm["encode"], 1e-9)
        same, same_v, ov = _same_sets(sae, store, subset, sets, top)
        out[f"identical_{dt}"] = f"{same}/{n_subset} sets, {same_v}/{n_subset} value sets"
        out[f"jaccard_{dt}"] = ov
    # bf16 against fp32 over every latent
    a, b = tops["float32"], tops["bfloat16"]
    inter = [len(a[j] & b[j]) / len(a[j] | b[j]) if a[j] | b[j] else 1.0 for j in range(sae.d_sae)]
    out["bf16_vs_fp32_mean_jaccard"] = float(np.mean(inter))
    out["bf16_vs_fp32_identical"] = int(sum(x == 1.0 for x in inter))
    # the same (row, latent) in both top sets: how far bf16 moves an activation
    K = sae.d_sae
    keys = [np.where(t.rows >= 0, t.rows * K + np.arange(K)[:, None], -1).ravel() for t in (a, b)]
    common_keys, ia, ib = np.intersect1d(keys[0], keys[1], return_indices=True)
    ia, ib = ia[common_keys >= 0], ib[common_keys >= 0]
    rel = np.abs(b.values.ravel()[ib] - a.values.ravel()[ia]) / a.values.ravel()[ia]
    out["bf16_vs_fp32_rel_value_err"] = (float(np.median(rel)), float(np.max(rel)))
    return out


# -- 2. peak RSS in a subprocess ----------------------------------------------------------------
def _rss_mb() -> tuple[float, float]:
    """``(anonymous, total)`` resident memory of this process in MiB. The anonymous part
    excludes file pages of memory-mapped shards, which the kernel can drop at any time."""
    kib = common.proc_status_kib("RssAnon", "VmRSS")
    return kib.get("RssAnon", kib["VmRSS"]) / 1024, kib["VmRSS"] / 1024


class RssSampler:
    """Samples this process's resident memory every few ms (``ru_maxrss`` would include what
    the parent held when it forked us, so it cannot measure a child)."""

    def __init__(self, every_s: float = 0.005):
        import threading

        self.every = every_s
        self.peak_anon, self.peak_total = _rss_mb()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            anon, total = _rss_mb()
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_total = max(self.peak_total, total)
            time.sleep(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def rss_child(sae_uri: str, copies: int) -> None:
    store = ActivationStore([str(common.ag_news_store().uris[0])] * copies)
    sae = load_sae(sae_uri)
    _ = store.token_ids, store.doc_ids, store.positions  # metadata, loaded by any consumer
    before, _ = _rss_mb()
    t0 = time.perf_counter()
    with RssSampler() as sampler:
        top = scan_latents(sae, store, n_top=TOP, stats=False).top
    print(
        json.dumps(
            {
                "tokens": store.n_tokens,
                "peak_anon_mb": sampler.peak_anon,
                "peak_total_mb": sampler.peak_total,
                "anon_before_scan_mb": before,
                "seconds": time.perf_counter() - t0,
                "filled": int((top.rows >= 0).sum()),
            }
        )
    )


def bench_rss(sae_uri: str) -> list[dict]:
    out = []
    for copies in (1, 2):
        r = subprocess.run(
            [sys.executable, __file__, "--rss-child", sae_uri, str(copies)],
            capture_output=True,
            text=True,
            check=True,
        )
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


# -- 3. enrichment at 16k latents ---------------------------------------------------------------
def bench_enrichment(
    n_latents: int = 16384, n_labels: int = 8, n_tokens: int = 190_052, n: int = TOP
) -> dict:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, n_labels, n_tokens)
    rows = rng.integers(0, n_tokens, (n_latents, n))
    rows[rng.random((n_latents, n)) < 0.1] = -1  # some latents with fewer firing tokens
    rows[:50] = -1  # and dead ones
    values = np.where(rows >= 0, rng.random((n_latents, n)), 0).astype(np.float32)
    hist = rng.integers(0, 30, (n_latents, n_labels, 96)).astype(np.int64)
    top = TopKSets(
        values=values,
        rows=rows,
        n_tokens=n_tokens,
        fire_count=(rows >= 0).sum(1),
        label_hist=hist,
        hist_edges=np.linspace(-4, 4, 97),
        label_counts=np.bincount(labels, minlength=n_labels),
    )
    t0 = time.perf_counter()
    table = enrichment.fisher_enrichment(top, labels)
    with_auroc = time.perf_counter() - t0
    top.label_hist = None
    t0 = time.perf_counter()
    enrichment.fisher_enrichment(top, labels)
    without = time.perf_counter() - t0
    return {
        "latents": n_latents,
        "labels": n_labels,
        "rows": len(table),
        "seconds": with_auroc,
        "seconds_without_auroc": without,
    }


# -- 4. run_analysis, dashboards and the index page ---------------------------------------------
def bench_run(sae_uri: str, store, backend) -> dict:
    out = str(OUT / f"run_{K}")
    t0 = time.perf_counter()
    manifest = run_analysis(sae_uri, store, out, {"reducer": "auto"}, backend=backend)
    total = time.perf_counter() - t0
    from integral_superposition.analysis import load_analysis

    a = load_analysis(out)
    pages = sum(f.startswith("dashboards/latents/") for f in manifest["files"])
    res = {
        "total_s": total,
        "timings_s": a.summary["timings_s"],
        "pages": pages,
        "map": a.summary["map"],
    }
    from integral_superposition.viz.browser import HeadlessChromium, find_chromium

    if find_chromium() is None:
        res["index_load_s"] = None
        return res
    with HeadlessChromium() as b:
        loads = []
        for _ in range(3):
            v = b.open(os.path.join(out, "dashboards", "index.html"), settle_s=0.0)
            loads.append(v.load_s)
        res["index_rows"] = b.evaluate("document.querySelectorAll('#rows > .r').length")
        res["index_ready"] = b.evaluate("document.body.dataset.ready")
        res["index_load_s"] = loads
        res["index_requests"] = v.foreign_requests
        t0 = time.perf_counter()
        b.evaluate("document.querySelector('[data-k=density]').click()")
        res["index_sort_s"] = time.perf_counter() - t0
        v = b.open(os.path.join(out, "dashboards", "latents", "00042.html"), settle_s=0.0)
        res["latent_page_load_s"] = v.load_s
    res["index_bytes"] = os.path.getsize(os.path.join(out, "dashboards", "index.html"))
    res["dashboards_bytes"] = sum(
        os.path.getsize(os.path.join(r, f))
        for r, _, fs in os.walk(os.path.join(out, "dashboards"))
        for f in fs
    )
    return res


def main() -> None:
    global K
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--quick", action="store_true", help="smaller runs (a smoke test of the script)"
    )
    ap.add_argument(
        "--skip-run", action="store_true", help="skip the run_analysis / dashboard part"
    )
    ap.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument(
        "--device",
        default="cpu",
        help="where both sides of the top-k comparison encode (cpu, cuda)",
    )
    ap.add_argument("--d-sae", type=int, default=K, help="SAE width (latents)")
    ap.add_argument("--rss-child", nargs=2, metavar=("SAE", "COPIES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]))
        return
    common.set_device(args.device)
    K = args.d_sae
    OUT.mkdir(parents=True, exist_ok=True)
    print(common.machine())
    store = common.ag_news_store()
    sae, sae_uri, what = bench_sae(store)
    print(f"SAE: {what}; store: {store.n_tokens} tokens, d_model={store.d_model}")

    doubled = ActivationStore([store.uris[0]] * (1 if args.quick else 2))
    r = bench_topk(sae, doubled, n_subset=64 if args.quick else 256, device=args.device)
    f32, b16 = r["ours_float32_timings"], r["ours_bfloat16_timings"]

    def stages(t: dict) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in t.items())

    print(
        f"\n[top-k] K={sae.d_sae}, n={TOP}, {r['tokens']} tokens (store read {1 if args.quick else 2}x), "
        f"chunks of {r['chunk']} tokens for both, encoding on {r['device']}\n"
        f"  seed per-latent loop, estimated            {r['seed_total_est_s']:8.1f} s   "
        f"(encode {r['seed_encode_s']:.1f} s + loop {r['seed_loop_subset_s']:.1f} s on {r['seed_subset']} latents, "
        f"x {sae.d_sae // r['seed_subset']} = {r['seed_loop_est_s']:.1f} s)\n"
        f"  ours, float32 encoder                      {r['ours_float32_s']:8.1f} s   ({stages(f32)})\n"
        f"  ours, bfloat16 encoder matmul              {r['ours_bfloat16_s']:8.1f} s   ({stages(b16)})\n"
        f"  speed-up end to end, float32 / bfloat16    {r['speedup_total_float32']:8.1f} x / {r['speedup_total_bfloat16']:.1f} x   (goal >= 100x)\n"
        f"  speed-up of the selection alone (select + finish vs the seed's loop), float32 / bfloat16 "
        f"{r['speedup_selection_float32']:.0f} x / {r['speedup_selection_bfloat16']:.0f} x\n"
        f"  speed-up of read + encode alone, float32 / bfloat16 "
        f"{r['speedup_encode_float32']:.1f} x / {r['speedup_encode_bfloat16']:.1f} x\n"
        f"  vs the seed on the timed subset: float32 {r['identical_float32']} (mean Jaccard {r['jaccard_float32']:.4f}); "
        f"bfloat16 {r['identical_bfloat16']} (mean Jaccard {r['jaccard_bfloat16']:.4f})\n"
        f"  bfloat16 vs float32, all {sae.d_sae} latents: {r['bf16_vs_fp32_identical']} identical sets, mean Jaccard "
        f"{r['bf16_vs_fp32_mean_jaccard']:.4f}, relative error of an activation in both sets: median {r['bf16_vs_fp32_rel_value_err'][0]:.1e}, max {r['bf16_vs_fp32_rel_value_err'][1]:.1e}"
    )
    common.record(
        device=r["device"],
        d_sae=sae.d_sae,
        tokens=r["tokens"],
        ours_float32_s=round(r["ours_float32_s"], 3),
        ours_bfloat16_s=round(r["ours_bfloat16_s"], 3),
        seed_total_est_s=round(r["seed_total_est_s"], 3),
        speedup_total_float32=round(r["speedup_total_float32"], 2),
        speedup_total_bfloat16=round(r["speedup_total_bfloat16"], 2),
        speedup_selection_float32=round(r["speedup_selection_float32"], 1),
        identical_float32=r["identical_float32"],
    )
    if not (args.quick or args.skip_rss):
        rss = bench_rss(sae_uri)
        print(
            "\n[peak RSS] top-k extraction in a fresh process (anonymous memory; total incl. mapped shard pages)"
        )
        for x in rss:
            print(
                f"  {x['tokens']:>7} tokens: peak {x['peak_anon_mb']:6.0f} MiB anonymous "
                f"(before the scan {x['anon_before_scan_mb']:.0f}), total {x['peak_total_mb']:.0f} MiB, {x['seconds']:.1f} s"
            )
        print(
            f"  ratio 2N/N: {rss[1]['peak_anon_mb'] / rss[0]['peak_anon_mb']:.3f} anonymous, "
            f"{rss[1]['peak_total_mb'] / rss[0]['peak_total_mb']:.3f} total"
        )
    e = bench_enrichment(n_latents=4096 if args.quick else 16384)
    print(
        f"\n[enrichment] {e['latents']} latents x {e['labels']} labels ({e['rows']} tests): "
        f"{e['seconds']:.2f} s with AUROC, {e['seconds_without_auroc']:.2f} s without (goal < 5 s)"
    )
    if args.skip_run:
        return
    backend = common.gemma()
    run_store = store
    r = bench_run(sae_uri, run_store, backend)
    t = r["timings_s"]
    print(
        f"\n[run_analysis] K={sae.d_sae}, {run_store.n_tokens} tokens, map {r['map']}: {r['total_s']:.1f} s"
    )
    print("  stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    print(
        f"  dashboards: {r['pages']} latent pages + index written in {t.get('dashboards', float('nan')):.1f} s (goal < 60 s), "
        f"{r.get('dashboards_bytes', 0) / 2**20:.0f} MiB"
    )
    if r.get("index_load_s") is not None:
        print(
            f"  index page ({r['index_bytes'] / 2**20:.1f} MiB, {r['index_rows']} rows, script ready={r['index_ready']}): "
            f"load in chromium {', '.join(f'{x:.2f}' for x in r['index_load_s'])} s (goal < 2 s); "
            f"sort by density {r['index_sort_s']:.2f} s; latent page {r['latent_page_load_s']:.2f} s; "
            f"foreign requests {r['index_requests']}"
        )


if __name__ == "__main__":
    main()
