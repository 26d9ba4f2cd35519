"""Peak memory of SAE training at two dataset sizes: it must not grow with the tokens.

Three activation stores from the real ag_news activations (gemma-3-270m, layer 9, bf16):
the first half of the documents, all of them, and all of them twice (the same dump opened
twice as one store, 2x the tokens without writing a copy). Each child process trains one TopK SAE
(d_sae = 4096, k = 32, batch 4096) for one epoch over its store, evaluates it on the held-out
split and publishes it, while a thread samples ``/proc/self/status``. Reported per size:

- ``VmHWM``: the kernel's peak resident set (anonymous memory plus mapped file pages);
- peak ``RssAnon``: the process's own memory (tensors, buffers, optimizer state);
- peak ``RssFile``: pages of memory-mapped files (the store's shards are read through
  ``np.memmap``; these are clean page-cache pages the kernel can drop at any time);
- the peaks of ``RssAnon`` and ``RssFile`` up to the end of the last training step (before the
  held-out evaluation and publishing): what must not grow with the tokens.

The store's reader holds at most ``prefetch + 2`` shuffle buffers of ``shuffle_buffer_tokens``
rows (one being filled, ``prefetch`` queued, one being consumed): a store smaller than that
never fills them, so its peak is lower for that reason alone. ``--buffer-tokens`` (default
16384, the library default is 65536) keeps the bound below the smallest store, so that the
comparison tests what it should: growth with the number of tokens.

    python bench/bench_sae_memory.py [--buffer-tokens 16384]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import threading
import time

import numpy as np
from common import OUT, ag_news_store, machine, proc_status_kib
from integral_superposition.storage import verify_output


def _status_kib(field: str) -> int:
    return proc_status_kib(field).get(field, 0)


def child(uri: str, buffer_tokens: int) -> None:
    import torch
    from integral_superposition import SAEConfig
    from integral_superposition.dump import ActivationStore
    from integral_superposition.sae.train import train_saes

    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k in peaks:
                peaks[k] = max(peaks[k], _status_kib(k))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    store = ActivationStore(uri.split(","))
    cfg = SAEConfig(
        k=4096, architecture="topk", top_k=32, batch_size=4096, epochs=1.0,
        shuffle_buffer_tokens=buffer_tokens,
    )  # fmt: skip
    t = time.time()
    train_peak: dict[str, int] = {}

    def on_progress(step: int, total: int) -> None:
        if step == total:  # the last step is done: what follows is evaluation and publishing
            train_peak.update({k: max(peaks[k], _status_kib(k)) for k in peaks})

    (res,) = train_saes(
        store, [cfg], [uri.split(",")[0] + "_sae"], progress=False, on_progress=on_progress
    )
    done.set()
    th.join()
    print(
        json.dumps(
            {
                "n_tokens": store.n_tokens,
                "steps": res.steps,
                "tokens": res.tokens,
                "seconds": time.time() - t,
                "VmHWM_MiB": _status_kib("VmHWM") / 1024,
                "RssAnon_MiB": peaks["RssAnon"] / 1024,
                "RssFile_MiB": peaks["RssFile"] / 1024,
                "train_RssAnon_MiB": train_peak["RssAnon"] / 1024,
                "train_RssFile_MiB": train_peak["RssFile"] / 1024,
                "fvu": res.metrics["fvu"],
                "threads": torch.get_num_threads(),
            }
        )
    )


def stores() -> list[str]:
    """The half, full and doubled stores (written once, cached under bench/out/sae_memory/)."""
    from integral_superposition.dump.synthetic import write_activation_store

    src = ag_news_store()
    doc = src.doc_ids
    bounds = np.flatnonzero(doc[1:] != doc[:-1]) + 1  # document boundaries (rows)
    half = int(bounds[np.searchsorted(bounds, len(doc) // 2)])
    uris = []
    for name, n in (("half", half), ("full", src.n_tokens)):
        uri = str(OUT / "sae_memory" / name)
        if not verify_output(uri):
            write_activation_store(
                src.read(0, n), uri, doc_ids=doc[:n], token_ids=src.token_ids[:n],
                labels=src.labels[:n], label_names=src.label_names, dtype="bf16",
                rows_per_shard=65536, model_name="gemma-3-270m",
            )  # fmt: skip
        uris.append(uri)
    return [*uris, f"{uris[1]},{uris[1]}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--buffer-tokens", type=int, default=16384)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.buffer_tokens)
        return
    print(machine())
    print(f"shuffle_buffer_tokens = {args.buffer_tokens}")
    rows = []
    for uri in stores():
        out = subprocess.run(
            [sys.executable, __file__, "--child", uri, "--buffer-tokens", str(args.buffer_tokens)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        "\n| tokens in store | steps | training: peak RssAnon MiB | training: peak RssFile MiB "
        "| whole call: VmHWM MiB | peak RssAnon MiB | peak RssFile MiB | s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['n_tokens']} | {r['steps']} | {r['train_RssAnon_MiB']:.0f} | "
            f"{r['train_RssFile_MiB']:.0f} | {r['VmHWM_MiB']:.0f} | {r['RssAnon_MiB']:.0f} | "
            f"{r['RssFile_MiB']:.0f} | {r['seconds']:.0f} |"
        )
    for a, b in itertools.pairwise(rows):
        print(
            f"\n{a['n_tokens']} -> {b['n_tokens']} tokens ({b['n_tokens'] / a['n_tokens']:.2f}x): "
            f"training RssAnon x{b['train_RssAnon_MiB'] / a['train_RssAnon_MiB']:.2f}; whole call "
            f"(with the held-out evaluation): VmHWM x{b['VmHWM_MiB'] / a['VmHWM_MiB']:.2f}, "
            f"RssAnon x{b['RssAnon_MiB'] / a['RssAnon_MiB']:.2f}, "
            f"RssFile x{b['RssFile_MiB'] / max(1, a['RssFile_MiB']):.2f}"
        )


if __name__ == "__main__":
    main()
