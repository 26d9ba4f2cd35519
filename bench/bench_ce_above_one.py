"""CE loss recovered above 1: what an SAE's splice does on its own corpus and on other text.

CE recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean) exceeds 1 when the model predicts
the next tokens better with the reconstruction spliced in than with its own activation. This
script splices several reconstructions into gemma-3-270m at the store's layer, all in one pass
per text set (``sae.metrics.spliced_ce_many``: the same predictions, the same clean logits):

- ``clean activation spliced back`` (``lambda x: x``): must give exactly 1 and delta CE 0;
- each SAE given (``--sae``, e.g. one published with and one without the decoder refit);
- ``PCA rank r``: the projection onto the top ``r`` principal directions of the store's train
  split (scikit-learn's PCA), a reconstruction that knows nothing but the corpus's activations.

on three text sets: held-out documents of the store (its ``test`` split), training documents
(its ``train`` split) and documents of another corpus (``--other``: ag_news titles and
descriptions by default). A reconstruction fit to a narrow corpus can lower the CE on that
corpus (CE recovered > 1) while raising it on other text; an evaluation that inflated the score
would show it on every set and for the clean splice too.

    python bench/bench_ce_above_one.py --store RUN/acts --sae RUN/sae/layer6-topk-k2048 \\
        [--sae OTHER_SAE] [--docs 64] [--other-docs 32] [--ranks 32,128] [--dtype auto]
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import pandas as pd
import torch
from common import AG_NEWS, machine, peak_rss_mb
from integral_superposition.backends import HFCausalLM
from integral_superposition.dump import ActivationStore
from integral_superposition.sae import load_sae
from integral_superposition.sae.metrics import spliced_ce_many, store_spliced_ce


def pca_reconstruction(store: ActivationStore, rank: int, max_rows: int = 60_000):
    """``x -> mean + (x - mean) V^T V`` with ``V`` ``[rank, d]`` the top principal directions
    of (up to ``max_rows`` of) the store's train-split activations."""
    from sklearn.decomposition import PCA

    mask = store.split_mask("train")
    mask[np.flatnonzero(mask)[max_rows:]] = False
    x = np.concatenate([c.float().numpy() for _r, c in store.iter_chunks(16384, mask=mask)])
    pca = PCA(n_components=rank, svd_solver="randomized", random_state=0).fit(x)
    v = torch.from_numpy(pca.components_).float()  # [rank, d]
    mean = torch.from_numpy(pca.mean_).float()  # [d]

    def project(h: torch.Tensor) -> torch.Tensor:
        hf = h.float() - mean.to(h.device)
        return (hf @ v.T.to(h.device)) @ v.to(h.device) + mean.to(h.device)

    return project, float(pca.explained_variance_ratio_.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--sae", action="append", required=True, help="an SAE folder (repeatable)")
    ap.add_argument("--docs", type=int, default=64, help="documents per set of the store")
    ap.add_argument(
        "--other", default=str(AG_NEWS), help="CSV of other text (title, description columns)"
    )
    ap.add_argument("--other-docs", type=int, default=32)
    ap.add_argument("--ranks", default="32,128", help="PCA ranks (comma-separated; '' for none)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    other = pd.read_csv(args.other).head(args.other_docs)  # read first: fail before the work
    print(machine())
    store = ActivationStore(args.store)
    cfg = store.manifest.get("config") or {}
    max_len = int(cfg.get("max_len", 64))
    model = store.manifest.get("model") or {}
    backend = HFCausalLM.from_pretrained(model.get("embedded") or "gemma-3-270m", dtype=args.dtype)
    recon: dict[str, object] = {"clean activation spliced back": lambda x: x}
    for i, path in enumerate(args.sae):
        metrics = load_manifest_metrics(path)
        refit = "decoder refit" if metrics.get("refit_applied") else "SGD decoder"
        recon[f"SAE {i + 1} ({refit}; held-out FVU {metrics.get('fvu', float('nan')):.3f})"] = (
            load_sae(path).eval()
        )
    for r in [int(v) for v in args.ranks.split(",") if v.strip()]:
        fn, evr = pca_reconstruction(store, r)
        recon[f"PCA rank {r} of train activations (EV {evr:.3f})"] = fn
    info = store.hook_info()
    hook = f"layer.{info['layer']}" if info.get("layer") is not None else info["module_path"]
    rows = []
    sets = {
        "held-out documents (test split)": ("test", None),
        "training documents (train split)": ("train", None),
    }
    for name, (split, _) in sets.items():
        t = time.time()
        res = store_spliced_ce(
            backend, recon, store, store.split_mask(split), n_docs=args.docs, batch_size=args.batch
        )
        rows += [{"text set": name, "splice": k, **v} for k, v in res.items()]
        print(f"{name}: {time.time() - t:.0f}s")
        print_rows(rows[-len(res) :])
    texts = (other["title"].astype(str) + ". " + other["description"].astype(str)).tolist()
    t = time.time()
    res = spliced_ce_many(
        backend,
        recon,
        hook,
        texts,
        batch_size=args.batch,
        max_len=max_len,
        prepend_bos=bool(cfg.get("prepend_bos", True)),
        drop_bos=bool(cfg.get("drop_bos", True)),
        drop_special=bool(cfg.get("drop_special", True)),
    )
    other_name = f"other text ({args.other.split('/')[-1]}, {len(texts)} documents)"
    rows += [{"text set": other_name, "splice": k, **v} for k, v in res.items()]
    print(f"{other_name}: {time.time() - t:.0f}s; peak RSS {peak_rss_mb():.0f} MiB")
    print(f"\nmodel dtype {args.dtype}, splice at {hook}, max_len {max_len}\n")
    print_rows(rows)


def print_rows(rows: list[dict]) -> None:
    """The rows as a markdown table."""
    print(
        "| text set | splice | predictions | CE clean | CE spliced | delta CE | CE recovered | KL |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['text set']} | {r['splice']} | {r['n_predictions']} | {r['ce_clean']:.3f} | "
            f"{r['ce_sae']:.3f} | {r['delta_ce']:+.3f} | {r['ce_recovered']:.4f} | {r['kl']:.3f} |",
            flush=True,
        )


def load_manifest_metrics(path: str) -> dict:
    """The ``metrics`` block of an SAE folder's manifest ({} when it has none)."""
    from integral_superposition.sae.load import read_sae_manifest

    try:
        return dict(read_sae_manifest(path).get("metrics") or {})
    except (FileNotFoundError, ValueError):
        return {}


if __name__ == "__main__":
    main()
