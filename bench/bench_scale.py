"""Per-token costs behind docs/scale.md: dumping and SAE training on this machine.

1. Dump: ``dump_layer_activations`` of ``--docs`` real headlines (ag_news titles) through
   gemma-3-270m stopped at block ``--layer`` (no LM head), written to a local folder:
   tokens/s, bytes on disk per token (shards + token tables + manifest), and the achieved
   GFLOP/s, counting 2 x (parameters of the blocks that run) per token (the embedding is a
   lookup; attention over <= ``--max-len`` tokens is left out, a few percent here).
2. Training: optimiser steps of a TopK SAE (d_in from the dump, ``--d-sae`` latents, k=32,
   AuxK on a tenth of the latents) on ``--train-batch`` rows, ``--steps`` timed after
   ``--warmup``: tokens/s and GFLOP/s, counting 6 x d_in x d_sae per token (the dense
   encoder's forward and backward, which dominate at k << d_sae).

The model runs in fp32 unless ``--dtype bf16``; the SAE in fp32. The machine line gives the
torch CPU capability and the load average: on a shared machine the wall-clock numbers are
lower bounds, and the per-CPU-second ones (this process's CPU time) are the steadier.

    python bench/bench_scale.py [--docs 512] [--layer 6] [--d-sae 16384] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import common
import torch
from integral_superposition import DumpConfig
from integral_superposition.dump import dump_layer_activations
from integral_superposition.sae import SparseAutoencoder


def _folder_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


def _block_params(backend, layer: int) -> int:
    """Parameters of the first ``layer`` decoder blocks (what a dump at ``layer.{layer}`` runs)."""
    blocks = list(backend.model.model.layers)[:layer]
    return sum(p.numel() for b in blocks for p in b.parameters())


def bench_dump(docs: int, layer: int, max_len: int, batch: int, dtype: str) -> dict:
    df = common.ag_news_frame(with_description=False).head(docs).reset_index(drop=True)
    backend = common.gemma(dtype)
    cfg = DumpConfig(layer=layer, max_len=max_len, batch_size=batch, dtype="bf16")
    with tempfile.TemporaryDirectory() as tmp:
        # one short warm-up dump so that the timed one pays no first-call costs
        dump_layer_activations(
            df.head(32), "title", "topic", backend, cfg, tmp + "/w", progress=False
        )
        t0, c0 = time.perf_counter(), time.process_time()
        store = dump_layer_activations(
            df, "title", "topic", backend, cfg, tmp + "/d", progress=False
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        size = _folder_bytes(tmp + "/d")
    n = store.n_tokens
    flops_per_token = 2 * _block_params(backend, layer)
    return {
        "model": common.MODEL, "dtype": dtype, "layer": layer, "d_model": store.d_model,
        "tokens": n, "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
        "tokens_per_s": round(n / wall, 1), "tokens_per_cpu_s": round(n / cpu, 1),
        "bytes_per_token": round(size / n, 1),
        "activation_bytes_per_token": store.d_model * 2,
        "gflop_per_token": round(flops_per_token / 1e9, 4),
        "achieved_gflop_per_s": round(flops_per_token * n / wall / 1e9, 1),
        "gflop_per_cpu_s": round(flops_per_token * n / cpu / 1e9, 1),
    }  # fmt: skip


def bench_train(d_in: int, d_sae: int, batch: int, steps: int, warmup: int) -> dict:
    """Optimiser steps of the SAE itself (forward, MSE + AuxK loss, backward, Adam), the
    work of every training step without the trainer's logging and checkpoints."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in, d_sae, architecture="topk", top_k=32)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
    batches = torch.randn(steps + warmup, batch, d_in)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[: d_sae // 10] = True  # AuxK runs, as it does while some latents are dead

    def step(x: torch.Tensor) -> None:
        out = sae(x, dead_mask=dead)
        loss = out.mse + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(batches[i])
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + steps):
        step(batches[i])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = batch * steps
    flops_per_token = 6 * d_in * d_sae
    return {
        "d_in": d_in, "d_sae": d_sae, "top_k": 32, "batch": batch, "steps": steps,
        "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
        "tokens_per_s": round(tokens / wall, 1), "tokens_per_cpu_s": round(tokens / cpu, 1),
        "gflop_per_token": round(flops_per_token / 1e9, 4),
        "achieved_gflop_per_s": round(flops_per_token * tokens / wall / 1e9, 1),
        "gflop_per_cpu_s": round(flops_per_token * tokens / cpu / 1e9, 1),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=512)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="dump batch size")
    ap.add_argument("--dtype", default="fp32", help="model compute dtype: fp32 or bf16")
    ap.add_argument("--d-sae", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--train-batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-dump", action="store_true")
    args = ap.parse_args()
    print(common.machine())
    print(
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    d_in = 640
    if not args.skip_dump:
        dump = bench_dump(args.docs, args.layer, args.max_len, args.batch, args.dtype)
        print("dump", json.dumps(dump))
        d_in = dump["d_model"]
        common.record(scale_dump=dump)
    for d_sae in args.d_sae:
        train = bench_train(d_in, d_sae, args.train_batch, args.steps, args.warmup)
        print("train", json.dumps(train))
        common.record(**{f"scale_train_{d_sae}": train})
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
