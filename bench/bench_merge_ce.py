"""The merge evaluation's spliced CE: one pass for all SAEs against one call per SAE.

A merge sweep measures the spliced CE of the original SAE, the refit control and every
clustered and random merge on the same held-out documents. One ``spliced_ce`` call per SAE
runs three forwards per batch (clean, spliced, zero-ablated): ``3 n`` forwards. The sweep's
``spliced_ce_many`` runs the clean and zero-ablated forwards once: ``2 + n``. Both paths run
here on the same documents, side by side, for the SAEs of a K/4 sweep (original, refit
control, clustered and random merge), and their numbers must agree.

    python bench/bench_merge_ce.py --sae RUN/sae/layer6-topk-k4096 --store RUN/acts [--docs 8]
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from common import machine, peak_rss_mb
from integral_superposition.backends import HFCausalLM
from integral_superposition.dump import ActivationStore
from integral_superposition.merge import evaluate as ev
from integral_superposition.merge.cluster import build_tree
from integral_superposition.merge.params import MergeParams
from integral_superposition.sae import load_sae
from integral_superposition.sae.metrics import store_spliced_ce


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--docs", type=int, default=8, help="held-out documents")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    print(machine())
    store = ActivationStore(args.store)
    sae = load_sae(args.sae).eval()
    params = MergeParams(similarity={"decoder": 1.0})  # the cheapest tree: CE is what is timed
    sim = ev.similarity_for(sae, store, params)
    labels = build_tree(sim, params.linkage, params.graph).cut(sae.d_sae // 4)
    rng = np.random.default_rng(0)
    stats = ev.original_stats(sae, store, params)
    saes = {
        "original": sae,
        "original_refit": ev.refit_identity(sae, params, stats=stats)[0],
        "cluster K/4": ev.merge_with_labels(sae, labels, sim, params, stats=stats)[0],
        "random K/4": ev.merge_with_labels(sae, rng.permutation(labels), sim, params, stats=stats)[
            0
        ],
    }
    model = store.manifest.get("model") or {}
    backend = HFCausalLM.from_pretrained(model.get("embedded") or "gemma-3-270m", dtype=args.dtype)
    mask = store.split_mask("test")
    kw = {"n_docs": args.docs, "batch_size": 16}
    store_spliced_ce(backend, {"warm-up": sae}, store, mask, n_docs=1)
    t = time.perf_counter()
    each = {
        name: store_spliced_ce(backend, {name: s}, store, mask, **kw)[name]
        for name, s in saes.items()
    }
    t_each = time.perf_counter() - t
    t = time.perf_counter()
    many = store_spliced_ce(backend, saes, store, mask, **kw)
    t_many = time.perf_counter() - t
    n_pred = many["original"]["n_predictions"]
    print(
        f"\n{len(saes)} SAEs, {args.docs} held-out documents, {n_pred} predictions, "
        f"model dtype {args.dtype}; peak RSS {peak_rss_mb():.0f} MiB\n"
    )
    print("| SAE | CE recovered, one call each | CE recovered, one pass | KL each | KL one pass |")
    print("| --- | --- | --- | --- | --- |")
    worst = 0.0
    for name in saes:
        a, b = each[name], many[name]
        worst = max(worst, abs(a["ce_recovered"] - b["ce_recovered"]), abs(a["kl"] - b["kl"]))
        print(
            f"| {name} | {a['ce_recovered']:.5f} | {b['ce_recovered']:.5f} | {a['kl']:.5f} | "
            f"{b['kl']:.5f} |"
        )
    print(
        f"\none call per SAE ({3 * len(saes)} forwards per batch): {t_each:.1f}s | one pass "
        f"({2 + len(saes)} forwards per batch): {t_many:.1f}s | speed-up {t_each / t_many:.2f}x "
        f"(forward ratio {3 * len(saes) / (2 + len(saes)):.2f}x); largest difference {worst:.2e}"
    )


if __name__ == "__main__":
    main()
