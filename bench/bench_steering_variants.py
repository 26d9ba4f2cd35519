"""Steering variants scored by a finished steering step's own classifier and text judge.

Reads a run (its SAE, activation store, analysis tables and the steering step's published
``classifier_fit_generations.parquet``), refits the step's classifier and text judge on
exactly those texts, and scores each variant of a plan: the continuations of the prompts with
the edit, against an unsteered set of the same prompts and sampling draws. Per variant it
prints one JSON line: the target label's share with its 95% interval, the paired lift over
the unsteered share, the text judge's share and lift, the share of every label and of
``none``, and the perplexity ratio (under the unsteered model).

A plan is a JSON file::

    {"prompts": null,             # default: data.neutral_prompts()
     "none_prompts": null,        # default: the step's own "none" continuations; a list of
                                  # openings refits the "none" class on one continuation each
     "variants": [
       {"label": "Business", "latents": [2548, 394, 707, 51], "strength": 0.18},
       {"label": "Business", "latents": [2548, 394, 707, 51], "strength": 0.18, "control": true},
       {"label": "Business", "latents": [3098, 672], "strength": 0.25, "op": "add",
        "positions": "generated"}]}

Each listed latent is clamped (``op`` "set", the default) to, or raised by (``op`` "add"),
``strength`` x its max activation in the store (the analysis's ``latents.parquet``), or x its
entry of ``values`` (optional, one number per latent, in activation units), on ``positions``
(default ``all``). ``mean_diff: N`` in place of ``latents`` steers the label's ``N`` latents
with the largest difference of mean document code, each raised by ``strength`` x its
difference (``op`` "add"; ``SteeringParams(mode="mean_diff")``). ``control: true`` edits as many topic-neutral random latents
instead, each matched to a member's decoder norm (``steering.picks.random_controls``, as the
step's random control). ``ablate`` (optional) lists latents set to 0 on the same positions, in
the variant and in its control alike (for example the latents of the labels a target is
confused with).

    python bench/bench_steering_variants.py --run RUN_ROOT --plan plan.json
    python bench/bench_steering_variants.py --run RUN_ROOT --plan plan.json --seed 1 --tokens 24
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from integral_superposition.backends import HFCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_line, steering_run
from integral_superposition.analysis.stats import label_mean_codes
from integral_superposition.data import neutral_prompts
from integral_superposition.steering import SteeringParams
from integral_superposition.steering.classifier import NONE_LABEL, LabelClassifier
from integral_superposition.steering.edits import Edit
from integral_superposition.steering.generation import continuation_nll, generate_continuations
from integral_superposition.steering.hooks import steer
from integral_superposition.steering.picks import mean_diff_latents, random_controls
from integral_superposition.steering.scores import paired_lift, text_metrics, wilson_interval
from integral_superposition.steering.sweep import fit_text_judge

VARIANT_KEYS = {
    "label",
    "latents",
    "strength",
    "op",
    "positions",
    "control",
    "ablate",
    "values",
    "mean_diff",
}


def read_plan(path: str, names: list[str], d_sae: int) -> dict:
    """The plan at ``path``, checked: every variant names a label of the store, latents of the
    SAE, a finite strength and an op of ``set`` / ``add``."""
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--plan {path}: expected a readable JSON file ({e})") from e
    variants = plan.get("variants") if isinstance(plan, dict) else None
    if not variants:
        raise SystemExit(f"--plan {path}: expected a JSON object with a non-empty 'variants' list")
    shared = set(plan.get("prompts") or []) & set(plan.get("none_prompts") or [])
    if shared:
        raise SystemExit(
            f"--plan {path}: prompts and none_prompts share {sorted(shared)}: the 'none' class "
            "must not learn from an opening it judges"
        )
    for i, v in enumerate(variants):
        extra = set(v) - VARIANT_KEYS
        if extra:
            raise SystemExit(
                f"variants[{i}] has keys {sorted(extra)}: expected {sorted(VARIANT_KEYS)}"
            )
        if v.get("label") not in names:
            raise SystemExit(f"variants[{i}].label={v.get('label')!r}: expected one of {names}")
        md = v.get("mean_diff")
        if md is not None:
            if "latents" in v or "values" in v or v.get("op", "add") != "add":
                raise SystemExit(
                    f"variants[{i}] has mean_diff and {sorted({'latents', 'values', 'op'} & set(v))}"
                    ": expected mean_diff alone (its latents, values and op 'add' follow from it)"
                )
            if isinstance(md, bool) or not isinstance(md, int) or not 0 < md <= d_sae:
                raise SystemExit(
                    f"variants[{i}].mean_diff={md!r}: expected a number of latents in [1, {d_sae}]"
                )
            lat = []
        else:
            lat = v.get("latents")
        if (md is None and not lat) or any(
            not isinstance(j, int) or not 0 <= j < d_sae for j in lat
        ):
            raise SystemExit(
                f"variants[{i}].latents={lat!r}: expected latent indices in [0, {d_sae})"
            )
        abl = v.get("ablate", [])
        if not isinstance(abl, list) or any(
            not isinstance(j, int) or not 0 <= j < d_sae or j in lat for j in abl
        ):
            raise SystemExit(
                f"variants[{i}].ablate={abl!r}: expected latent indices in [0, {d_sae}) that "
                "are not among its latents"
            )
        vals = v.get("values")
        if (
            vals is not None
            and md is None
            and (
                not isinstance(vals, list)
                or len(vals) != len(lat)
                or any(not isinstance(x, int | float) or not math.isfinite(x) for x in vals)
            )
        ):
            raise SystemExit(
                f"variants[{i}].values={vals!r}: expected {len(lat)} finite numbers, one per latent"
            )
        st = v.get("strength")
        if not isinstance(st, int | float) or not math.isfinite(st):
            raise SystemExit(f"variants[{i}].strength={st!r}: expected a finite number")
        if v.get("op", "set") not in ("set", "add"):
            raise SystemExit(f"variants[{i}].op={v.get('op')!r}: expected 'set' or 'add'")
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run root (sae/, acts/, analysis/, steering/)")
    ap.add_argument(
        "--sae", default=None, help="the SAE's folder name under sae/ (default: the only one)"
    )
    ap.add_argument(
        "--plan", required=True, help="the plan, a JSON file (see the module docstring)"
    )
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--tokens", type=int, default=24, help="tokens generated per continuation")
    ap.add_argument("--samples", type=int, default=4, help="continuations per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--test-fraction", type=float, default=0.05, help="the step's classifier_test_fraction"
    )
    args = ap.parse_args()
    print(cpu_line(args.model), flush=True)
    run, name, fit_path, sae, store = steering_run(
        args.run, args.sae, "classifier_fit_generations.parquet"
    )
    names = list(store.label_names)
    plan = read_plan(args.plan, names, sae.d_sae)
    backend = HFCausalLM.from_pretrained(args.model, dtype=torch.float32)
    prompts = plan.get("prompts") or neutral_prompts()
    kw = dict(
        do_sample=True,
        samples_per_prompt=args.samples,
        seed=args.seed,
        batch_size=64,
        sample_major=True,
    )

    # the step's classifier and text judge, refitted on its published texts
    p = SteeringParams(classifier_test_fraction=args.test_fraction, max_new_tokens=args.tokens)
    fit = pd.read_parquet(fit_path)
    if plan.get("none_prompts"):
        g = generate_continuations(
            backend, plan["none_prompts"], args.tokens, do_sample=True, seed=args.seed
        )
        none = pd.DataFrame(
            {"label": NONE_LABEL, "prompt": g.prompts, "text": g.texts, "used": True}
        )
        fit = pd.concat([fit[fit["label"] != NONE_LABEL], none], ignore_index=True)
    base_clf = LabelClassifier.fit(store, test_fraction=args.test_fraction, seed=0)
    lab, non = fit[fit["label"] != NONE_LABEL], fit[fit["label"] == NONE_LABEL]
    X, ok = base_clf.features(backend, lab["text"].tolist(), 64)
    Xn, okn = base_clf.features(backend, non["text"].tolist(), 64)
    y = np.array([names.index(x) for x in lab["label"]])
    clf = base_clf.with_generations(X[ok], y[ok], documents=True, X_none=Xn[okn])
    fit = pd.concat([lab.assign(used=ok), non.assign(used=okn)], ignore_index=True)
    judge, why = fit_text_judge(p, store, clf, fit)
    if judge is None:
        print(f"no text judge: {why}")

    # max activations, decoder norms and the token-level enrichment (random controls)
    tables = run / "analysis" / name / "tables"
    lat_table = pd.read_parquet(tables / "latents.parquet").set_index("latent")
    mx = lat_table["max_act"].reindex(range(sae.d_sae)).to_numpy(np.float64)
    norms = sae.W_dec.detach().float().norm(dim=1).numpy()
    enr = pd.read_parquet(tables / "enrichment.parquet")
    tok = enr[enr["level"].astype(str) == "token"]

    def run_set(edits, positions):
        if edits is None:
            g = generate_continuations(backend, prompts, args.tokens, score=True, **kw)
            nll, n_tok = g.nll, np.array([len(t) for t in g.token_ids])
        else:
            with steer(backend, sae, store.hook_point, edits, positions, keep_error=True):
                g = generate_continuations(backend, prompts, args.tokens, **kw)
            nll, n_tok = continuation_nll(backend, g.prompt_ids, g.token_ids)
        Xg, okg = clf.features(backend, g.texts, 64)
        return g, clf.predict(Xg, okg), float(np.exp(nll.sum() / max(n_tok.sum(), 1)))

    g0, pred0, ppl0 = run_set(None, "all")
    text0 = judge.predict(g0.texts) if judge is not None else None
    print(
        json.dumps(
            {
                "unsteered": {n: round(float((pred0 == c).mean()), 3) for c, n in enumerate(names)}
                | {NONE_LABEL: round(float((pred0 == -2).mean()), 3)},
                "perplexity": round(ppl0, 2),
            }
        )
    )
    codes = None
    for i, v in enumerate(plan["variants"]):
        asked = v
        if v.get("mean_diff"):
            if codes is None:  # each label's mean document code, on the classifier's split
                mask = store.split_mask("train", args.test_fraction, 0)
                codes, _ = label_mean_codes(sae, store, mask=mask)
            md = mean_diff_latents(codes, names, labels=[v["label"]], per_label=v["mean_diff"])
            v = {**v, "latents": md["latent"].tolist(), "values": md["mean_diff"].tolist(),
                 "op": "add"}  # fmt: skip
        c, members, st = (
            names.index(v["label"]),
            [int(j) for j in v["latents"]],
            float(v["strength"]),
        )
        op, positions = v.get("op", "set"), v.get("positions", "all")
        lats, ratios = members, [1.0] * len(members)
        if v.get("control"):
            pick = pd.DataFrame(
                {"label": [v["label"]], "latent": [members[0]], "members": [members]}
            )
            r = random_controls(pick, tok, norms, p.q_max, args.seed + i).iloc[0]
            lats, ratios = (
                [int(j) for j in r["random_members"]],
                [float(x) for x in r["random_ratios"]],
            )
        unit = v.get("values") or [mx[m] for m in members]
        edits = [
            Edit(j, op, float(st * u * q)) for j, u, q in zip(lats, unit, ratios, strict=True)
        ] + [Edit(int(j), "set", 0.0) for j in v.get("ablate", [])]
        t = time.perf_counter()
        g, pred, ppl = run_set(edits, positions)
        hit = pred == c
        out = {
            **asked, "edited": lats[:16], "n_edited": len(lats), "n": int(hit.size), "share": round(float(hit.mean()), 3),
            "share_ci": [round(x, 3) for x in wilson_interval(int(hit.sum()), hit.size)],
            "lift": [round(x, 3) for x in paired_lift(hit, pred0 == c)],
            "ppl_ratio": round(ppl / ppl0, 2),
            "labels": {n: round(float((pred == k).mean()), 2) for k, n in enumerate(names)}
            | {NONE_LABEL: round(float((pred == -2).mean()), 2)},
            "seconds": round(time.perf_counter() - t, 1), "example": g.texts[:2],
        }  # fmt: skip
        if judge is not None:
            m = text_metrics(judge.predict(g.texts), c, text0)
            out["text_share"], out["text_lift"] = (
                round(m["text_share"], 3),
                round(m["text_lift"], 3),
            )
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
