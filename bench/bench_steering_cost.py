"""CPU cost of the default steering evaluation, before and after a change, side by side.

Runs ``run_steering_eval`` with the default preset's steering parameters on one SAE and its
store, once with the library of a git ref (``--before``, extracted with ``git archive``) and
once with this checkout's, each in a fresh process under the same environment (by default
the AVX2 emulation ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, dtype ``auto`` ->
float32, the reference machine of ``estimate.py``). Each process loads the model first and
then times only the steering step: CPU seconds (user + system, every thread) and wall
seconds, with the number of continuations generated and the summary's headline. On a
shared machine compare the CPU seconds: the wall time is inflated by other work.

    python bench/bench_steering_cost.py --sae RUN/sae/layer6-topk-k2048 --store RUN/acts \\
        --before <git ref> [--set labels='[Sports]'] [--no-avx2] [--only after]

``RUN`` is a run of the default experiment (``isup run --set steps.steer_eval=false``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DRIVER = r"""
import json, resource, sys, time
import torch
import integral_superposition as isup
from integral_superposition.backends import load_backend
from integral_superposition.experiment import load_preset
from integral_superposition.pipelines.steer_eval import run_steering_eval

sae, store, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
cfg = load_preset("default", overrides)
backend = load_backend(cfg.model.model_id, dtype=cfg.model.dtype)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
run_steering_eval(sae, store, out, cfg.steering, backend=backend)
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
import pandas as pd
sweep = pd.read_parquet(out + "/sweep.parquet")
summary = json.load(open(out + "/summary.json"))
fit = out + "/classifier_fit_generations.parquet"
import os
n_fit = len(pd.read_parquet(fit)) if os.path.exists(fit) else 0
check = len(pd.read_parquet(out + "/check_generations.parquet"))
steered = int(sweep.loc[sweep["strength"].notna(), "n"].sum())
unsteered = int(sweep.loc[sweep["control"] == "unsteered", "n"].iloc[0])
print("RESULT " + json.dumps({
    "library": isup.__file__,
    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "dtype": str(backend.dtype) if hasattr(backend, "dtype") else None,
    "cpu_s": r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime,
    "wall_s": t1 - t0,
    "continuations": steered + unsteered + check + n_fit,
    "steered_continuations": steered,
    "check_continuations": check,
    "fit_continuations": n_fit,
    "latents": [
        {k: lat.get(k) for k in ("latent", "label", "baseline_share", "best_strength",
                                 "best_share", "best_share_lo", "best_share_hi",
                                 "best_ppl_ratio", "random_share_at_best",
                                 "random_lift_at_best")}
        for lat in summary["latents"]
    ],
}))
"""


def extract(ref: str, into: Path) -> Path:
    """The library of git ``ref`` (its ``lib/`` folder) under ``into``."""
    data = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "lib"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / "lib"


def run(lib: Path | None, args, out: Path, env: dict[str, str]) -> dict:
    e = dict(env)
    if lib is not None:
        e["PYTHONPATH"] = str(lib) + os.pathsep + e.get("PYTHONPATH", "")
    cmd = [sys.executable, "-c", DRIVER, args.sae, args.store, str(out), json.dumps(args.set)]
    p = subprocess.run(cmd, env=e, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"steering run failed ({lib or 'this checkout'}):\n{p.stderr[-4000:]}")
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sae", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--before", help="git ref whose library is the baseline")
    ap.add_argument("--set", action="append", default=[], help="preset override KEY=VALUE")
    ap.add_argument("--no-avx2", action="store_true", help="run without the AVX2 emulation")
    ap.add_argument("--only", choices=["before", "after"])
    args = ap.parse_args()
    args.set = [s if s.startswith("steering.") else f"steering.{s}" for s in args.set]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if not args.no_avx2:
        env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only != "after":
            if not args.before:
                raise SystemExit("--before REF is needed for the baseline (or --only after)")
            results["before"] = run(extract(args.before, tmp / "before"), args, tmp / "b", env)
            print("before", json.dumps(results["before"]), flush=True)
        if args.only != "before":
            results["after"] = run(None, args, tmp / "a", env)
            print("after", json.dumps(results["after"]), flush=True)
    print(f"\nsteering step, default preset{' ' + ' '.join(args.set) if args.set else ''}; "
          f"{'AVX2 emulation' if not args.no_avx2 else 'native'}")  # fmt: skip
    print(f"{'':8} {'CPU s':>8} {'wall s':>8} {'continuations':>14}")
    for k, r in results.items():
        print(f"{k:8} {r['cpu_s']:8.1f} {r['wall_s']:8.1f} {r['continuations']:14d}")
    if len(results) == 2:
        b, a = results["before"], results["after"]
        print(
            f"after / before: CPU {a['cpu_s'] / b['cpu_s']:.2f}x, wall {a['wall_s'] / b['wall_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
