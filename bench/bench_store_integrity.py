"""What the store's integrity checks cost: SHA-256 on first read and the NaN/inf check.

Builds a synthetic bf16 store (``--tokens`` x 640, 128 MiB shards) in a temporary folder and
times, in this process, one sequential pass (``iter_chunks``, float32) and one epoch of
shuffled batches (``iter_batches``) with the checks off, with only the finite check, and
with both (the per-process memo of verified shards cleared first), next to the encode of the
same tokens by a TopK SAE (``--d-sae`` latents) as a yardstick of the work a consumer does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine
from integral_superposition.dump import shards as shards_mod
from integral_superposition.dump.shards import first_non_finite
from integral_superposition.dump.store import ActivationStore
from integral_superposition.dump.synthetic import write_activation_store
from integral_superposition.sae import SparseAutoencoder


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1 << 18)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(machine(), "|", torch.backends.cpu.get_cpu_capability())
    with tempfile.TemporaryDirectory() as tmp:
        x = torch.randn(args.tokens, 640, generator=torch.Generator().manual_seed(0))
        write_activation_store(
            x.bfloat16(), f"{tmp}/acts", rows_per_shard=1 << 17, tokens_per_doc=64, dtype="bf16"
        )
        del x
        mb = sum(p.stat().st_size for p in Path(tmp, "acts").glob("*.safetensors")) / 2**20

        def chunks(verify: str, finite: bool) -> None:
            store = ActivationStore(f"{tmp}/acts", verify=verify)
            for _ in store.iter_chunks(65536, check_finite=finite):
                pass

        def batches(verify: str, finite: bool) -> None:
            store = ActivationStore(f"{tmp}/acts", verify=verify)
            for b in store.iter_batches(4096, split="all"):
                if finite:  # as the trainer checks each batch
                    first_non_finite(b.acts)

        modes = {
            "no checks": ("off", False),
            "finite check": ("off", True),
            "finite + SHA-256 on first read": ("first-read", True),
        }
        print(f"\nstore: {args.tokens} tokens x 640 bf16, {mb:.0f} MiB in shards")
        for name, fn in (("iter_chunks pass", chunks), ("iter_batches epoch", batches)):
            print(f"== {name}: seconds (best of {args.rounds})")
            for label, (verify, finite) in modes.items():
                best = float("inf")
                for _ in range(args.rounds):
                    shards_mod._verified.clear()
                    best = min(best, timed(lambda g=fn, v=verify, f=finite: g(v, f)))
                print(f"  {label:32s} {best:7.2f}")
        sae = SparseAutoencoder(640, args.d_sae, architecture="topk", top_k=32)
        store = ActivationStore(f"{tmp}/acts", verify="off")

        def encode() -> None:
            with torch.no_grad():
                for _, c in store.iter_chunks(16384, check_finite=False):
                    sae.encode(c)

        print(
            f"== yardstick: TopK encode of every token (d_sae={args.d_sae}): {timed(encode):.2f} s"
        )


if __name__ == "__main__":
    main()
