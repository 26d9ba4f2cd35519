"""Shared fixtures for the benchmark scripts: the real model and real activations.

Benchmarks read ``../shared/data/ag_news_dev.csv`` (or ``$ISUP_AG_NEWS``) and cache what they
build under ``bench/out/`` so that several scripts share one dump.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent
OUT = Path(os.environ.get("ISUP_BENCH_OUT", ROOT / "out"))
AG_NEWS = Path(
    os.environ.get("ISUP_AG_NEWS", ROOT.parent.parent / "shared" / "data" / "ag_news_dev.csv")
)
MIDDLE_LAYER = 9


def machine() -> str:
    """One line describing where a number was measured."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()} | {psutil.cpu_count(logical=True)} CPUs | {psutil.virtual_memory().total / 2**30:.0f} GiB | {gpu} | torch {torch.__version__} threads={torch.get_num_threads()}"


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Reads ``VmHWM`` from ``/proc/self/status``: unlike ``ru_maxrss``, it belongs to this
    process image only (a child spawned by a large parent does not inherit its peak).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ag_news_frame(with_description: bool = True):
    """The real labelled headlines; ``text`` is the title plus, optionally, the description."""
    from integral_superposition.data import load_titles_csv

    if not AG_NEWS.exists():
        raise SystemExit(f"{AG_NEWS} not found: set ISUP_AG_NEWS to the ag_news_dev.csv path")
    df = load_titles_csv(str(AG_NEWS), text_col="title", label_col="topic")
    df["text"] = (
        (df["title"] + ". " + df["description"].fillna("")) if with_description else df["title"]
    )
    return df


def gemma(dtype=torch.bfloat16):
    from integral_superposition.backends import HFCausalLM

    return HFCausalLM.from_pretrained("gemma-3-270m", dtype=dtype)


def ag_news_store(layer: int = MIDDLE_LAYER, max_len: int = 64):
    """gemma-3-270m activations of ag_news titles + descriptions at ``layer`` (cached)."""
    from integral_superposition import DumpConfig
    from integral_superposition.dump import ActivationStore, dump_layer_activations
    from integral_superposition.storage import verify_output

    out = OUT / f"ag_news_gemma_L{layer}_T{max_len}"
    if verify_output(str(out)):
        return ActivationStore(str(out))
    t = time.time()
    store = dump_layer_activations(
        ag_news_frame(),
        "text",
        "topic",
        gemma(),
        DumpConfig(layer=layer, max_len=max_len, batch_size=32),
        str(out),
        overwrite=True,
    )
    print(f"[bench] dumped {store.n_tokens} tokens to {out} in {time.time() - t:.0f}s")
    return store


def ag_news_sae(arch: str = "topk", d_sae: int = 4096, **overrides):
    """``(sae_uri, store)``: an SAE trained (once, cached under ``bench/out/``) on
    :func:`ag_news_store`. ``overrides`` are extra ``SAEConfig`` fields (``top_k``, ``l1``, ...).
    """
    from integral_superposition import SAEConfig
    from integral_superposition.sae.train import train_saes
    from integral_superposition.storage import canonical_json, sha256_bytes, verify_output

    store = ag_news_store()
    defaults = {"top_k": 32, "l1": 2e-3, "lr": 1e-3, "batch_size": 1024, "epochs": 3.0}
    defaults.update({"lr_warmup_steps": 50, "dead_tokens": 200_000, "log_every": 50})
    cfg = SAEConfig(k=d_sae, architecture=arch, **{**defaults, **overrides})
    key = sha256_bytes(canonical_json([cfg, store.content_hash]).encode())[:10]
    out = OUT / f"ag_news_sae_{arch}_{d_sae}_{key}"
    if not verify_output(str(out)):
        t = time.time()
        (res,) = train_saes(store, [cfg], [str(out)], checkpoint_uri=str(out) + ".ckpt")
        print(f"[bench] trained {arch} d_sae={d_sae} in {time.time() - t:.0f}s: {res.metrics}")
    return str(out), store
