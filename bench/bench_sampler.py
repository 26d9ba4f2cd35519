"""Top-p sampling step: the candidate nucleus (``generation.nucleus``: ``torch.topk``, grown
until every row's nucleus fits) against a stable sort of the whole vocabulary, side by side.

Logits are gemma-3-270m's next-token logits at the last token of 64 AG News openings (the
first 5 words of each headline), the rows of one sampling step of the steering evaluation.
Both ways pick a token for the same uniform numbers; the script prints the median time of
each over interleaved repeats, their ratio, the nucleus sizes and how many picks differ.

    python bench/bench_sampler.py [--top-p 0.9] [--rows 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from integral_superposition.backends import HFCausalLM
from integral_superposition.data import load_titles_csv
from integral_superposition.steering.generation import inverse_cdf, nucleus

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ag_news_dev.csv"


def sorted_nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: ``probs [B, V]`` sorted in full (stable), cut after ``top_p``."""
    p, order = probs.sort(dim=-1, descending=True, stable=True)
    before = p.cumsum(-1) - p
    return p.masked_fill(before >= top_p, 0.0), order


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(
        f"{platform.node()} | CPU capability {torch.backends.cpu.get_cpu_capability()} | "
        f"torch {torch.__version__} threads={torch.get_num_threads()}",
        flush=True,
    )
    backend = HFCausalLM.from_pretrained(args.model, dtype=torch.float32)
    texts = load_titles_csv(args.data, max_rows=args.rows)["title"].tolist()
    openings = [" ".join(t.split()[:5]) for t in texts]
    enc = backend.tokenizer(openings, return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        logits = backend.model(**enc).logits[:, -1].float()  # [B, V]
    probs = torch.softmax(logits, -1)
    u = torch.rand(probs.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def pick(fn) -> torch.Tensor:
        p, ids = fn(probs, args.top_p)
        return ids.gather(1, inverse_cdf(p, u)[:, None])[:, 0]

    times: dict[str, list[float]] = {"sort": [], "nucleus": []}
    picks = {}
    for _ in range(args.repeats):
        for name, fn in (("sort", sorted_nucleus), ("nucleus", nucleus)):
            t = time.perf_counter()
            picks[name] = pick(fn)
            times[name].append(time.perf_counter() - t)
    sizes = (nucleus(probs, args.top_p)[0] > 0).sum(1).float()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"rows={probs.shape[0]} vocabulary={probs.shape[1]} top_p={args.top_p} | nucleus size "
        f"median {sizes.median().item():.0f}, max {sizes.max().item():.0f}"
    )
    print(
        f"median of {args.repeats}: sort {med['sort'] * 1e3:.1f} ms, nucleus "
        f"{med['nucleus'] * 1e3:.1f} ms, ratio {med['nucleus'] / med['sort']:.3f}; picks differ "
        f"in {int((picks['sort'] != picks['nucleus']).sum())} of {probs.shape[0]} rows"
    )


if __name__ == "__main__":
    main()
