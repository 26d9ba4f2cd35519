"""SAE training throughput: ours vs SAELens's ``SAETrainer`` vs a bare reference loop.

Same architecture and size (TopK k=32, and ReLU + L1; d_sae = 4096, d_in = 640), fp32 on
the CPU, fed the same in-memory batches of real activations (gemma-3-270m, layer 9, ag_news
titles + descriptions). The contenders run interleaved in one process, several rounds; each
round times the steps after ``--warmup`` steps (the order of the contenders rotates from
round to round) and the report gives the median tokens/s and the median per-round ratios,
per wall-clock second and per CPU second of this process (the machine is shared, so the
wall-clock ratios are noisy; CPU time is less sensitive to the neighbours). ``ours (dense)`` is our trainer with the sparse decode/backward turned off
(``SAEConfig.sparse_decode=False``), which measures what the sparse TopK path buys.

ReLU is timed twice: from a fresh initialisation (about half the latents active, so our
trainer takes its dense path) and from a trained state (the ReLU SAE of
``bench/common.ag_news_sae("relu")``, a few percent active, so our sparse path runs); every
contender starts from the same weights.

A third ReLU case times a whole training run: every contender trains ``--run-steps`` steps
(default 300, on the store's shuffled rows) from the same fresh initialisation, once,
with the library's default L1 coefficient (``SAEConfig().l1``; the other cases use 2e-3),
and the report gives the tokens/s over the run and over its first and last fifths. The L1
makes the code sparse within the run, and from then on our trainer switches to its sparse
path by itself; SAELens's trainer and the bare loop stay dense. This is what a user waits for:
the ratio over a whole run, which a fresh-init window understates and a trained-state window
overstates. ``--cases`` picks a subset of the cases.

    python bench/bench_sae_throughput.py [--steps 6] [--warmup 2] [--rounds 5] [--batch 4096]
        [--run-steps 300] [--cases topk,relu,trained,run] [--device cuda] [--d-sae 4096]

``--device cuda`` runs every contender on a GPU, the batches already on the device; each
clock reading waits for the device's queue. Without sae-lens installed, its column is skipped.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import common
import torch
import torch.nn.functional as F
from common import ag_news_sae, ag_news_store, machine
from integral_superposition import SAEConfig
from integral_superposition.sae import SparseAutoencoder, load_sae
from integral_superposition.sae.train import train_sae

D_SAE, TOP_K, LR = 4096, 32, 3e-4
D_IN = 640  # set from the store in main()
L1_OURS = 2e-3  # SAELens and the bare loop get l1 * d_in: ours divides the MSE by d_in


class TimedBatches:
    """Re-iterable list of batches that records when each batch is handed out (last pass)."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = batches
        self.marks: list[tuple[float, float]] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.marks = []
        for b in self.batches:
            self.marks.append(now())
            yield b


def now() -> tuple[float, float]:
    """(wall clock, CPU time of this process over all its threads), after the device's queue."""
    common.sync()
    return time.perf_counter(), time.process_time()


def tokens_per_s(tb: TimedBatches, t_end: tuple[float, float], warmup: int) -> tuple[float, float]:
    """Tokens per wall second and per CPU second of the steps after ``warmup``."""
    n = (len(tb.batches) - warmup) * tb.batches[0].shape[0]
    return tuple(n / (end - start) for end, start in zip(t_end, tb.marks[warmup], strict=True))


def run_ours(
    arch: str,
    tb: TimedBatches,
    init: SparseAutoencoder | None,
    sparse: bool | None,
    l1: float = L1_OURS,
):
    sae = SparseAutoencoder(D_IN, D_SAE, architecture=arch, top_k=TOP_K, seed=0)
    if init is not None:
        sae.load_state_dict(init.state_dict())
    bs = tb.batches[0].shape[0]
    cfg = SAEConfig(
        k=D_SAE, architecture=arch, top_k=TOP_K, lr=LR, l1=l1, batch_size=bs,
        train_tokens=len(tb) * bs, lr_warmup_steps=1, sparse_decode=sparse, log_every=1000,
    )  # fmt: skip
    train_sae(sae, tb, cfg, common.DEVICE, progress=False)
    return now()


def run_saelens(arch: str, tb: TimedBatches, init: SparseAutoencoder | None, l1: float = L1_OURS):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    shared = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": common.DEVICE}
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=TOP_K, **shared))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=l1 * D_IN, **shared))
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
        device=common.DEVICE,
    )
    trainer = SAETrainer(cfg, sae, iter(tb))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit()
    return now()


def run_bare(arch: str, tb: TimedBatches, init: SparseAutoencoder | None, l1: float = L1_OURS):
    """Encode, decode, backward, Adam: nothing else."""
    src = init if init is not None else SparseAutoencoder(D_IN, D_SAE, architecture=arch, seed=0)
    W_enc, W_dec, b_enc, b_dec = (
        torch.nn.Parameter(getattr(src, n).detach().to(common.DEVICE).clone())
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
            loss = loss + l1 * D_IN * z.sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return now()


def main() -> None:
    global D_SAE, D_IN
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument(
        "--cases",
        default="topk,relu,trained,run",
        help="comma-separated subset of topk, relu (fresh init), trained (ReLU), run (whole run)",
    )
    ap.add_argument("--run-steps", type=int, default=300, help="whole ReLU run (0: skip)")
    ap.add_argument("--device", default="cpu", help="where every contender trains: cpu, cuda")
    ap.add_argument("--d-sae", type=int, default=D_SAE, help="SAE width")
    args = ap.parse_args()
    common.set_device(args.device)
    D_SAE = args.d_sae
    logging.disable(logging.WARNING)
    store = ag_news_store()
    D_IN = store.d_model
    n = (args.steps + args.warmup) * args.batch
    if store.n_tokens < n:
        raise SystemExit(
            f"--steps/--warmup/--batch need {n} tokens; the store has {store.n_tokens}"
        )
    x = store.read(0, n).float().to(common.DEVICE)
    batches = [x[i : i + args.batch] for i in range(0, n, args.batch)]
    print(machine())
    print(
        f"batches: {len(batches)} x {args.batch} tokens of {store.uris[0]} (layer {store.hook_point}); "
        f"timed steps per run: {args.steps} (after {args.warmup} warm-up steps); rounds: {args.rounds}"
    )
    want = set(args.cases.split(","))
    try:
        import sae_lens  # noqa: F401

        have_saelens = True
    except ImportError:
        have_saelens = False
        print("sae-lens is not installed: its trainer is skipped")
    cases = [("topk", None, "TopK k=32, fresh init")] if "topk" in want else []
    if "relu" in want:
        cases.append(("relu", None, "ReLU+L1, fresh init"))
    if "trained" in want:
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
        if not have_saelens:
            del runners["SAELens SAETrainer"]
        wall: dict[str, list[float]] = {k: [] for k in runners}
        cpu: dict[str, list[float]] = {k: [] for k in runners}
        for r in range(args.rounds):
            order = list(runners.items())
            order = order[r % len(order) :] + order[: r % len(order)]  # rotate who goes first
            for name, fn in order:
                tb = TimedBatches(batches)
                w, c = tokens_per_s(tb, fn(tb), args.warmup)
                wall[name].append(w)
                cpu[name].append(c)
        med = {k: statistics.median(v) for k, v in wall.items()}
        print(f"\n== {label}: tokens per wall second, per round (median)")
        for k, v in wall.items():
            print(f"  {k:20s} {' '.join(f'{s:8.0f}' for s in v)}   median {med[k]:8.0f}")

        def ratios(sp: dict[str, list[float]], other: str) -> list[float]:
            if other not in sp:
                return [float("nan")]
            return [a / b for a, b in zip(sp["ours"], sp[other], strict=True)]

        summary = {}
        for tag, other, goal in (
            ("ours / SAELens", "SAELens SAETrainer", " (goal >= 1.5)"),
            ("ours / bare", "bare loop", " (goal >= 0.8)"),
            ("sparse / dense", "ours (dense)", ""),
        ):
            rw, rc = ratios(wall, other), ratios(cpu, other)
            summary[tag] = (statistics.median(rw), statistics.median(rc))
            print(
                f"  {tag:15s} wall per round: {' '.join(f'{x:.2f}' for x in rw)} "
                f"(median {summary[tag][0]:.2f}); per CPU second: median {summary[tag][1]:.2f}{goal}"
            )
        rows.append((label, med, summary))
    if args.run_steps > 0 and "run" in want:
        rows.append(whole_run(store, args.batch, args.run_steps, have_saelens))
    print(
        "\n| case | ours tok/s | SAELens tok/s | bare tok/s | ours/SAELens | ours/bare | "
        "sparse/dense | ours/SAELens (CPU s) | ours/bare (CPU s) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    nan = float("nan")
    for label, med, sm in rows:
        print(
            f"| {label} | {med['ours']:.0f} | {med.get('SAELens SAETrainer', nan):.0f} | {med['bare loop']:.0f} "
            f"| {sm['ours / SAELens'][0]:.2f} | {sm['ours / bare'][0]:.2f} "
            f"| {sm['sparse / dense'][0]:.2f} | {sm['ours / SAELens'][1]:.2f} "
            f"| {sm['ours / bare'][1]:.2f} |".replace("| nan |", "| - |")
        )

    def num(v: float, nd: int) -> float | None:
        return None if v != v else round(v, nd)

    common.record(
        device=common.DEVICE,
        d_in=D_IN,
        d_sae=D_SAE,
        batch=args.batch,
        cases={
            label: {
                "ours_tok_s": round(med["ours"]),
                "bare_tok_s": round(med["bare loop"]),
                "saelens_tok_s": num(med.get("SAELens SAETrainer", nan), 0),
                "ours_vs_saelens": num(sm["ours / SAELens"][0], 3),
                "ours_vs_bare": num(sm["ours / bare"][0], 3),
            }
            for label, med, sm in rows
        },
    )


def whole_run(store, batch: int, steps: int, have_saelens: bool = True):
    """Each contender trains ``steps`` steps from the same fresh ReLU init, once.

    The batches are the store's rows (up to ``steps * batch`` of them), shuffled with a fixed
    seed, cycled when the store is smaller than the run.
    """
    n = min(store.n_tokens, steps * batch) // batch * batch
    x = store.read(0, n).float()[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    x = x.to(common.DEVICE)
    run = [x[(i * batch) % n :][:batch] for i in range(steps)]
    init = SparseAutoencoder(D_IN, D_SAE, architecture="relu", seed=0)
    l1 = SAEConfig().l1  # the library default
    runners = {
        "ours": lambda tb: run_ours("relu", tb, init, None, l1),
        "SAELens SAETrainer": lambda tb: run_saelens("relu", tb, init, l1),
        "bare loop": lambda tb: run_bare("relu", tb, init, l1),
    }
    if not have_saelens:
        del runners["SAELens SAETrainer"]
    label = f"ReLU+L1, whole run of {steps} steps"
    print(f"\n== {label} from a fresh init (once each): tokens per wall second")
    wall, cpu = {}, {}
    fifth = max(1, steps // 5)
    for name, fn in runners.items():
        tb = TimedBatches(run)
        end = fn(tb)
        wall[name], cpu[name] = tokens_per_s(tb, end, 0)
        marks = [m[0] for m in tb.marks] + [end[0]]
        bs = run[0].shape[0]
        first = fifth * bs / (marks[fifth] - marks[0])
        last = fifth * bs / (marks[-1] - marks[-1 - fifth])
        print(
            f"  {name:20s} whole run {wall[name]:8.0f}   first fifth {first:8.0f}   "
            f"last fifth {last:8.0f}   ({marks[-1] - marks[0]:.0f} s)"
        )
    nan = float("nan")
    summary = {
        "ours / SAELens": (
            wall["ours"] / wall.get("SAELens SAETrainer", nan),
            cpu["ours"] / cpu.get("SAELens SAETrainer", nan),
        ),
        "ours / bare": (wall["ours"] / wall["bare loop"], cpu["ours"] / cpu["bare loop"]),
        "sparse / dense": (float("nan"), float("nan")),
    }
    for tag, (w, c) in list(summary.items())[:2]:
        goal = " (goal >= 1.5)" if "SAELens" in tag else " (goal >= 0.8)"
        print(f"  {tag:15s} {w:.2f} per wall second, {c:.2f} per CPU second{goal}")
    return label, wall, summary


if __name__ == "__main__":
    main()
