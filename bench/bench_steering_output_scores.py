"""Output scores of a label's candidate latents: what each one *writes* when clamped, measured
through the whole model rather than read off its decoder row.

Enrichment says a latent reads a topic; steering needs one that writes it. For each of the
label's ``--candidates`` best latents by document-level q (a finished run's analysis tables),
the latent is clamped to ``--strength`` x its max activation on every token of the topic-neutral
*fitting* openings (``data.neutral_fit_prompts()``, never the evaluation's
``data.neutral_prompts()``) followed by the unsteered model's continuation of each, and the
forward is teacher-forced on that continuation. Per latent it prints

- ``vocab_gain``: log of the mean probability the next-token distributions put on the label's
  target vocabulary (the steering step's ``vocabulary.parquet``), steered over unsteered;
- ``nll_gain``: the increase of the continuation tokens' mean NLL (nats), a fluency cost.

(``steering.picks.vocabulary_gain_scores``, the score of ``rank_by="vocab_gain"``) and the
best ``--group`` latents by ``vocab_gain``, ready for a plan of
``bench/bench_steering_variants.py``.

    python bench/bench_steering_output_scores.py --run RUN_ROOT --label Business
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from integral_superposition.backends import HFCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line, steering_run
from integral_superposition.data import neutral_fit_prompts
from integral_superposition.steering.generation import generate_continuations
from integral_superposition.steering.picks import pick_latents, vocabulary_gain_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run root (sae/, acts/, analysis/, steering/)")
    ap.add_argument(
        "--sae", default=None, help="the SAE's folder under sae/ (default: the only one)"
    )
    ap.add_argument("--label", required=True)
    ap.add_argument("--strength", type=float, default=0.35, help="x each latent's max activation")
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=24, help="fitting openings used")
    ap.add_argument("--tokens", type=int, default=24, help="tokens of each continuation")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="gemma-3-270m")
    args = ap.parse_args()
    print(cpu_line(args.model), flush=True)
    run, name, vocab_path, sae, store = steering_run(args.run, args.sae, "vocabulary.parquet")
    if args.label not in store.label_names:
        raise SystemExit(f"--label {args.label!r}: expected one of {list(store.label_names)}")
    tables = run / "analysis" / name / "tables"
    enr = pd.read_parquet(tables / "enrichment.parquet")
    level = enr["level"].astype(str)
    picks = pick_latents(
        enr[level == "token"], enr[level == "document"], labels=[args.label],
        per_label=args.candidates,
    )  # fmt: skip
    max_act = pd.read_parquet(tables / "latents.parquet").set_index("latent")["max_act"]
    vocab = pd.read_parquet(vocab_path)
    vocab_ids = vocab.loc[vocab["label"] == args.label, "token_id"].tolist()
    backend = HFCausalLM.from_pretrained(args.model, dtype=torch.float32)

    # the fitting openings' unsteered continuations, teacher-forced under each clamp
    prompts = neutral_fit_prompts()[: args.prompts]
    g = generate_continuations(backend, prompts, args.tokens, do_sample=True, seed=args.seed)
    t0 = time.perf_counter()
    lat = [int(j) for j in picks["latent"]]
    scores = vocabulary_gain_scores(
        backend, sae, store.hook_point, lat, [args.strength * float(max_act[j]) for j in lat],
        vocab_ids, g.prompt_ids, g.token_ids,
    )  # fmt: skip
    out = picks[["latent", "doc_q"]].merge(scores, on="latent")
    out["doc_rank"] = range(len(out))
    out = out.sort_values("vocab_gain", ascending=False, kind="stable")
    print(
        f"{args.label}: {len(out)} candidates, strength {args.strength}, {len(prompts)} openings "
        f"x {args.tokens} tokens; {time.perf_counter() - t0:.1f} s"
    )
    print(out.round({"vocab_gain": 3, "nll_gain": 3}).to_string(index=False))
    group = [int(j) for j in out["latent"].head(args.group)]
    print(json.dumps({"label": args.label, "latents": group}))


if __name__ == "__main__":
    main()
