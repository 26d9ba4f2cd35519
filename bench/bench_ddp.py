"""Data-parallel SAE training: correctness and overhead at 1 vs N processes, side by side.

The same TopK SAE (d_in 640, gemma-3-270m's width; ``--d-sae`` 4096, top_k 32, batch
``--batch`` 4096) trains ``--steps`` steps on a synthetic store of sparse-dictionary
activations, once on 1 process and once on N (torchrun; gloo on the CPU, one process per GPU
with NCCL), with the same global batch and seed. Reported per run: tokens/s over the steps
after ``--warmup``, the seconds per step, and the share of each step spent in the all-reduces
(gradients, statistics, BatchTopK's joint threshold search when used) as measured on rank 0;
then the largest weight difference between the two results and the first step after which
the weights differ by more than 1e-6 (a strided sample of ``W_enc`` is kept after every
step). The gradients are summed in another order than one process sums them, so the weights
differ by float rounding (about 1e-7); once such a difference resolves a TopK near-tie the
other way, that token's latents get other gradients and Adam moves their rows by up to about
``lr`` per step from then on.

On a CPU the processes share the cores (2 cores cannot show a speed-up: 1 process uses both
through its threads, 2 processes one each), so the CPU numbers measure the overhead of the
data-parallel machinery. With several GPUs, N defaults to the number of GPUs.

    python bench/bench_ddp.py [--nproc N] [--steps 12] [--warmup 3] [--batch 4096]
        [--d-sae 4096] [--architecture topk] [--device cpu|cuda] [--tokens 65536]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve()
D_IN, TOP_K = 640, 32


def _worker(args: argparse.Namespace) -> None:
    """One rank: train, time the steps and the all-reduces, rank 0 writes the timings."""
    from integral_superposition import SAEConfig, distributed
    from integral_superposition.dump.store import ActivationStore
    from integral_superposition.sae.train import train_saes

    info = distributed.init(args.device)
    spent = [0.0]
    reduce = distributed.all_reduce_

    def timed_all_reduce(tensor, op="sum"):
        t0 = time.perf_counter()
        out = reduce(tensor, op)
        if tensor.is_cuda:
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - t0
        return out

    distributed.all_reduce_ = timed_all_reduce  # the trainer calls it through the module
    marks: dict[int, tuple[float, float]] = {}
    samples: dict[str, torch.Tensor] = {}
    from integral_superposition.sae import trainee

    step_fn = trainee.Trainee.step

    def step_and_sample(self, x, step, total):  # a strided sample of W_enc after every step
        step_fn(self, x, step, total)
        samples[f"step{step}"] = self.sae.W_enc.detach().flatten()[::97].cpu().clone()

    trainee.Trainee.step = step_and_sample

    def on_progress(step: int, total: int) -> None:
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        marks[step] = (time.perf_counter(), spent[0])

    cfg = SAEConfig(
        k=args.d_sae,
        architecture=args.architecture,
        top_k=TOP_K,
        batch_size=args.batch,
        train_tokens=args.batch * args.steps,
        lr=3e-4,
        lr_warmup_steps=2,
        log_every=args.steps,
    )
    (res,) = train_saes(
        ActivationStore(args.store),
        [cfg],
        [args.out],
        progress=False,
        evaluate=False,
        on_progress=on_progress,
    )
    if info.is_main:
        a, b = marks[args.warmup], marks[res.steps]
        n = res.steps - args.warmup
        row = {
            "world_size": info.world_size,
            "device": str(info.device),
            "backend": info.backend,
            "threads": torch.get_num_threads(),
            "tokens_per_s": n * args.batch / (b[0] - a[0]),
            "s_per_step": (b[0] - a[0]) / n,
            "all_reduce_s_per_step": (b[1] - a[1]) / n,
        }
        with open(args.timings, "w") as f:
            json.dump(row, f)
        save_file(samples, args.timings + ".samples.safetensors")
    distributed.destroy()


def _store(path: str, n_tokens: int) -> str:
    from integral_superposition.dump.synthetic import (
        sparse_dictionary_activations,
        write_activation_store,
    )

    if not os.path.exists(os.path.join(path, "manifest.json")):
        x, _ = sparse_dictionary_activations(n_tokens, D_IN, 2048, active=24, seed=0)
        write_activation_store(x * 3.0 + 0.5, path)
    return path


def _run(nproc: int, args: argparse.Namespace, store: str, tmp: str) -> dict:
    from integral_superposition.distributed import run_torchrun

    tag = str(nproc)
    out = os.path.join(tmp, f"sae-{tag}")
    timings = os.path.join(tmp, f"timings-{tag}.json")
    flags = ["--worker", "--store", store, "--out", out, "--timings", timings]
    flags += ["--steps", args.steps, "--warmup", args.warmup, "--batch", args.batch]
    flags += ["--d-sae", args.d_sae, "--architecture", args.architecture, "--device", args.device]
    lines: list[str] = []
    run_torchrun(nproc, str(HERE), [str(f) for f in flags], on_line=lines.append)
    with open(timings) as f:
        row = json.load(f)
    row["out"], row["timings"] = out, timings
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=None, help="Processes of the parallel run.")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--architecture", default="topk", choices=["topk", "batchtopk", "relu"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=65536, help="Tokens of the synthetic store.")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--timings", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    if not 0 < args.warmup < args.steps:
        raise SystemExit(f"--warmup={args.warmup}: expected 0 < warmup < steps={args.steps}")
    if args.tokens < args.batch * args.steps // 2:
        raise SystemExit(f"--tokens={args.tokens}: too few for {args.steps} batches")
    n_gpu = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    nproc = args.nproc or (n_gpu if n_gpu > 1 else 2)
    if args.device.startswith("cuda") and nproc > n_gpu:
        raise SystemExit(
            f"--nproc={nproc}: NCCL needs one GPU per process; this machine has {n_gpu}"
        )
    from common import machine
    from integral_superposition.sae import load_sae

    print(machine())
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        store = _store(os.path.join(tmp, "acts"), args.tokens)
        rows = [_run(1, args, store, tmp), _run(nproc, args, store, tmp)]

        a, b = load_sae(rows[0]["out"]), load_sae(rows[1]["out"])
        per = {
            k: float((getattr(a, k) - getattr(b, k)).detach().abs().max())
            for k in ("W_enc", "W_dec", "b_enc", "b_dec")
        }
        d_par = max(per.values())
        sa, sb = (load_file(r["timings"] + ".samples.safetensors") for r in rows)
        first = next(
            (
                i
                for i in range(args.steps)
                if float((sa[f"step{i}"] - sb[f"step{i}"]).abs().max()) > 1e-6
            ),
            None,
        )
    print(
        f"\n{args.architecture} SAE d_in {D_IN}, d_sae {args.d_sae}, batch {args.batch}, "
        f"{args.steps} steps ({args.warmup} warm-up), device {args.device}"
    )
    head = f"{'processes':>9} {'backend':>7} {'threads':>7} {'tokens/s':>10} {'s/step':>8} {'all-reduce s/step':>18} {'share':>6}"
    print(head)
    for r in rows:
        share = r["all_reduce_s_per_step"] / r["s_per_step"]
        print(
            f"{r['world_size']:>9} {r['backend'] or '-':>7} {r['threads']:>7} "
            f"{r['tokens_per_s']:>10.0f} {r['s_per_step']:>8.3f} "
            f"{r['all_reduce_s_per_step']:>18.4f} {share:>6.1%}"
        )
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"\n{nproc} vs 1 process: x{ratio:.2f} tokens/s")
    where = "never" if first is None else f"from step {first} (0-based) on"
    print("max |difference| per tensor: " + ", ".join(f"{k} {v:.1e}" for k, v in per.items()))
    print(
        f"max |weight difference| {nproc} processes vs 1: {d_par:.2e}; "
        f"sampled W_enc differs by > 1e-6 {where}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
