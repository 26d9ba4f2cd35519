"""SAE training throughput: ours vs SAELens's ``SAETrainer`` vs a bare reference loop.

Same architecture and size (TopK k=32, and ReLU + L1; d_sae = 4096, d_in = 640), fp32 on
the CPU, fed the same in-memory batches of real activations (gemma-3-270m, layer 9, ag_news
titles + descriptions). The contenders run interleaved in one process, several rounds; each
round times the steps after ``--warmup`` steps and the report gives the median tokens/s and
the ratios. ``ours (dense)`` is our trainer with the sparse decode/backward turned off
(``SAEConfig.sparse_decode=False``), which measures what the sparse TopK path buys.

ReLU is timed twice: from a fresh initialisation (about half the latents active, so our
trainer takes its dense path) and from a trained state (the ReLU SAE of
``bench/common.ag_news_sae("relu")``, a few percent active, so our sparse path runs); every
contender starts from the same weights.

    python bench/bench_sae_throughput.py [--steps 10] [--warmup 2] [--rounds 3] [--batch 4096]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from common import ag_news_sae, ag_news_store, machine
from integral_superposition import SAEConfig
from integral_superposition.sae import SparseAutoencoder, load_sae
from integral_superposition.sae.train import train_sae

D_SAE, TOP_K, LR = 4096, 32, 3e-4
L1_OURS, L1_SAELENS = 2e-3, 2e-3 * 640  # the same penalty: ours divides the MSE by d_in


class TimedBatches:
    """Re-iterable list of batches that records when each batch is handed out (last pass)."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = batches
        self.marks: list[float] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.marks = []
        for b in self.batches:
            self.marks.append(time.perf_counter())
            yield b


def tokens_per_s(tb: TimedBatches, t_end: float, warmup: int) -> float:
    n = len(tb.batches) - warmup
    return n * tb.batches[0].shape[0] / (t_end - tb.marks[warmup])


def run_ours(arch: str, tb: TimedBatches, init: SparseAutoencoder | None, sparse: bool | None):
    sae = SparseAutoencoder(640, D_SAE, architecture=arch, top_k=TOP_K, seed=0)
    if init is not None:
        sae.load_state_dict(init.state_dict())
    bs = tb.batches[0].shape[0]
    cfg = SAEConfig(
        k=D_SAE, architecture=arch, top_k=TOP_K, lr=LR, l1=L1_OURS, batch_size=bs,
        train_tokens=len(tb) * bs, lr_warmup_steps=1, sparse_decode=sparse, log_every=1000,
    )  # fmt: skip
    train_sae(sae, tb, cfg, "cpu", progress=False)
    return time.perf_counter()


def run_saelens(arch: str, tb: TimedBatches, init: SparseAutoencoder | None):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    common = {"d_in": 640, "d_sae": D_SAE, "dtype": "float32", "device": "cpu"}
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=TOP_K, **common))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=L1_SAELENS, **common))
    if init is not None:
        with torch.no_grad():
            for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
                getattr(sae, n).copy_(getattr(init, n))
    bs = tb.batches[0].shape[0]
    cfg = SAETrainerConfig(
        total_training_samples=len(tb) * bs,
        train_batch_size_samples=bs,
        lr=LR,
        lr_end=LR / 10,
        device="cpu",
    )
    trainer = SAETrainer(cfg, sae, iter(tb))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit()
    return time.perf_counter()


def run_bare(arch: str, tb: TimedBatches, init: SparseAutoencoder | None):
    """Encode, decode, backward, Adam: nothing else."""
    src = init if init is not None else SparseAutoencoder(640, D_SAE, architecture=arch, seed=0)
    W_enc, W_dec, b_enc, b_dec = (
        torch.nn.Parameter(getattr(src, n).detach().clone())
        for n in ("W_enc", "W_dec", "b_enc", "b_dec")
    )
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=LR)
    for x in tb:
        pre = (x - b_dec) @ W_enc + b_enc
        if arch == "topk":
            top = pre.topk(TOP_K, dim=-1, sorted=False)
            z = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
        else:
            z = F.relu(pre)
        x_hat = z @ W_dec + b_dec
        loss = (x_hat - x).pow(2).sum(-1).mean()
        if arch == "relu":
            loss = loss + L1_SAELENS * z.sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--no-trained-relu", action="store_true", help="skip the trained-state ReLU")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    store = ag_news_store()
    n = (args.steps + args.warmup) * args.batch
    x = store.read(0, n).float()
    batches = [x[i : i + args.batch] for i in range(0, n, args.batch)]
    print(machine())
    print(
        f"batches: {len(batches)} x {args.batch} tokens of {store.uris[0]} (layer {store.hook_point}); "
        f"timed steps per run: {args.steps} (after {args.warmup} warm-up steps); rounds: {args.rounds}"
    )
    cases = [("topk", None, "TopK k=32, fresh init"), ("relu", None, "ReLU+L1, fresh init")]
    if not args.no_trained_relu:
        uri, _ = ag_news_sae("relu")
        cases.append(("relu", load_sae(uri), "ReLU+L1, trained state"))
    rows = []
    for arch, init, label in cases:
        runners = {
            "ours": lambda tb, a=arch, i=init: run_ours(a, tb, i, None),
            "ours (dense)": lambda tb, a=arch, i=init: run_ours(a, tb, i, False),
            "SAELens SAETrainer": lambda tb, a=arch, i=init: run_saelens(a, tb, i),
            "bare loop": lambda tb, a=arch, i=init: run_bare(a, tb, i),
        }
        speeds: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.rounds):
            for name, fn in runners.items():
                tb = TimedBatches(batches)
                t_end = fn(tb)
                speeds[name].append(tokens_per_s(tb, t_end, args.warmup))
        med = {k: statistics.median(v) for k, v in speeds.items()}
        print(f"\n== {label}: tokens/s per round (median)")
        for k, v in speeds.items():
            print(f"  {k:20s} {' '.join(f'{s:8.0f}' for s in v)}   median {med[k]:8.0f}")
        r_sl = [a / b for a, b in zip(speeds["ours"], speeds["SAELens SAETrainer"], strict=True)]
        r_bare = [a / b for a, b in zip(speeds["ours"], speeds["bare loop"], strict=True)]
        r_dense = [a / b for a, b in zip(speeds["ours"], speeds["ours (dense)"], strict=True)]
        print(
            f"  ours / SAELens per round: {' '.join(f'{r:.2f}' for r in r_sl)} (median {statistics.median(r_sl):.2f}, goal >= 1.5)\n"
            f"  ours / bare per round:    {' '.join(f'{r:.2f}' for r in r_bare)} (median {statistics.median(r_bare):.2f}, goal >= 0.8)\n"
            f"  sparse / dense decode:    {' '.join(f'{r:.2f}' for r in r_dense)} (median {statistics.median(r_dense):.2f})"
        )
        rows.append((label, med, statistics.median(r_sl), statistics.median(r_bare)))
    print("\n| case | ours tok/s | SAELens tok/s | bare tok/s | ours/SAELens | ours/bare |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, med, rs, rb in rows:
        print(
            f"| {label} | {med['ours']:.0f} | {med['SAELens SAETrainer']:.0f} | {med['bare loop']:.0f} | {rs:.2f} | {rb:.2f} |"
        )


if __name__ == "__main__":
    main()
