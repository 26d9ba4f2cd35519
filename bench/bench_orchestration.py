"""Orchestration overhead of the smoke experiment, and the wall time of ``isup run`` on the
defaults.

1. Overhead: the smoke experiment as ``experiment_flow`` (every task, artifact, event and
   result record, against a local Prefect server) and as the same library calls made
   directly, alternated in one process on fresh output folders. Overhead = flow time minus
   direct time. Goal: under 10% of the flow time, or under 15 s. The cached rerun is timed
   too.
2. ``isup run --preset smoke`` as a user runs it (console script, no Prefect server
   configured): its wall time and each step's time. Goal: under a minute.
3. With ``--defaults``: ``isup run`` exactly as the README runs it, on the embedded
   defaults (demo corpus + gemma-3-270m): wall time and each step's time. Goal: under 8
   minutes on a 2-core CPU without native bf16.
4. With ``--avx2``: only 2. and 3., under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``
   (torch and oneDNN limited to AVX2 kernels: bf16 is slow, as on a plain AVX2 CPU, and
   dtype ``auto`` picks float32). Each run also prints its CPU time: on a shared machine the
   wall time is inflated by other work.

    python bench/bench_orchestration.py [--repeats 2] [--defaults | --only-defaults | --avx2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from common import OUT, machine


def direct(cfg, root: Path) -> dict[str, float]:
    """The library calls ``experiment_flow`` makes for ``cfg``, without Prefect."""
    from integral_superposition import storage
    from integral_superposition.backends import load_backend
    from integral_superposition.data.datasets import dataset_fingerprint, label_mapping
    from integral_superposition.dump import combine_dumps, dump_layer_activations
    from integral_superposition.pipelines.analyze import run_analysis
    from integral_superposition.pipelines.merge import run_merge
    from integral_superposition.pipelines.report import merge_section, write_summary_tables
    from integral_superposition.pipelines.steer_eval import run_steering_eval, steering_section
    from integral_superposition.sae.train import train_saes
    from integral_superposition.tasks.dump import partition_name
    from integral_superposition.tasks.refs import OutputRef, RunLocation
    from integral_superposition.viz.report import build_report, markdown_summary

    t: dict[str, float] = {}
    run = root / cfg.name / "direct"
    loc = RunLocation(storage=str(root), experiment=cfg.name, run="direct")

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        t[name] = t.get(name, 0.0) + now - t0
        return now

    t0 = time.perf_counter()
    df = cfg.data.load()
    labels = label_mapping(df[cfg.data.label_col])
    dataset_fingerprint(df, cfg.data.text_col, cfg.data.label_col)
    t0 = lap("data", t0)
    backend = load_backend(cfg.model.model_id, dtype=cfg.model.dtype)
    t0 = lap("model load", t0)
    acts = str(run / cfg.paths.shards_dir)
    n = cfg.fanout.partitions
    kw = dict(label_names=labels, progress=False)
    if n == 1:
        dump_layer_activations(
            df, cfg.data.text_col, cfg.data.label_col, backend, cfg.dump, acts, **kw
        )
    else:
        parts = []
        for i in range(n):
            part = str(Path(acts) / partition_name(i, n))
            dump_layer_activations(
                df,
                cfg.data.text_col,
                cfg.data.label_col,
                backend,
                cfg.dump,
                part,
                partition=(i, n),
                **kw,
            )
            parts.append(part)
        combine_dumps(parts, acts)
    t0 = lap("dump", t0)
    jobs = cfg.sae_jobs()
    saes = [str(run / cfg.paths.sae_path / j.name) for j in jobs]
    train_saes(
        [acts],
        [j.cfg for j in jobs],
        saes,
        checkpoint_uri=str(run / "checkpoints" / "x"),
        progress=False,
    )
    t0 = lap("train", t0)
    analyses, merges, steers = [], [], []
    for j, sae in zip(jobs, saes, strict=True):
        out = str(run / "analysis" / j.name)
        m = run_analysis(sae, acts, out, cfg.analysis, backend=backend)
        analyses.append(OutputRef.from_manifest("analysis", j.name, out, m))
        t0 = lap("analyze", t0)
        if cfg.steps.merge:
            out = str(run / "merge" / j.name)
            m = run_merge(sae, acts, out, cfg.merge, backend=backend)
            merges.append(OutputRef.from_manifest("merge", j.name, out, m, **{
                k: m["merge"].get(k) for k in ("n_latents_before", "n_latents_after")}))  # fmt: skip
            t0 = lap("merge", t0)
        if cfg.steps.steer_eval:
            out = str(run / "steering" / j.name)
            run_steering_eval(sae, acts, out, cfg.steering, backend=backend)
            steers.append(out)
            t0 = lap("steer_eval", t0)
    sections = [merge_section(r, None) for r in merges[:1]] + [
        steering_section(s) for s in steers[:1]
    ]
    build_report(
        str(run / "report"),
        *sections,
        analysis=analyses[0].uri,
        sae=saes[0],
        config=cfg.public_dict(),
    )
    write_summary_tables(analyses, loc.uri(cfg.paths.summary_csv.removesuffix(".csv")), None)
    markdown_summary(analyses[0].uri, *sections, figure_width=cfg.report.figure_width)
    storage.write_json(str(run / "run.json"), {"done": True})
    lap("report", t0)
    return t


def flow_steps(result) -> dict[str, float]:
    """In-task library seconds per step of a flow run (partitions summed into ``dump``)."""
    out: dict[str, float] = {}
    for s in result.steps:
        key = "dump" if s.step == "combine" else s.step
        out[key] = out.get(key, 0.0) + (s.seconds or 0.0)
    return out


def overhead(repeats: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from integral_superposition.flows.config import load_preset
    from integral_superposition.flows.experiment import experiment_flow
    from integral_superposition.tasks import backends as task_backends
    from prefect.testing.utilities import prefect_test_harness

    print(f"machine: {machine()}")
    # tasks run in a worker thread of the flow's task runner: the direct calls do too, so
    # both see the same torch threading
    pool = ThreadPoolExecutor(max_workers=1)
    with prefect_test_harness(server_startup_timeout=180), tempfile.TemporaryDirectory() as tmp:
        base = load_preset("smoke")
        # warm-up: imports, the tiny model's first build, the server's first requests
        pool.submit(direct, base, Path(tmp) / "warmup-direct").result()
        experiment_flow(
            base.model_copy(update={"storage": str(Path(tmp) / "warmup-flow"), "run": "w"})
        )
        rows = []
        for r in range(repeats):
            t0 = time.perf_counter()
            d_steps = pool.submit(direct, base, Path(tmp) / f"direct-{r}").result()
            d_wall = time.perf_counter() - t0
            task_backends.clear_backends()  # the flow loads its model again, as direct() did
            task_backends.LOAD_SECONDS.clear()
            cfg = base.model_copy(update={"storage": str(Path(tmp) / f"flow-{r}"), "run": "a"})
            t0 = time.perf_counter()
            res = experiment_flow(cfg)
            f_wall = time.perf_counter() - t0
            f_steps = flow_steps(res)
            t0 = time.perf_counter()
            again = experiment_flow(cfg.model_copy(update={"run": "b"}))
            cached = time.perf_counter() - t0
            assert again.all_cached
            rows.append((d_wall, f_wall, d_steps, f_steps, sum(task_backends.LOAD_SECONDS), cached))
        d_walls, f_walls = [r[0] for r in rows], [r[1] for r in rows]
        d, f = statistics.median(d_walls), statistics.median(f_walls)
        # within one flow run: its wall time minus the library calls its tasks made and the
        # model load, i.e. what Prefect and the tasks' bookkeeping added
        inrun = [fw - sum(fs.values()) - load for _, fw, _, fs, load, _ in rows]
        ir = statistics.median(inrun)
        print(f"\nsmoke experiment ({len(res.steps)} task runs), {repeats} alternated repeats:")
        print(f"  library calls directly : median {d:5.1f} s  {[round(x, 1) for x in d_walls]}")
        print(f"  experiment_flow        : median {f:5.1f} s  {[round(x, 1) for x in f_walls]}")
        print(
            f"  overhead, flow - direct: {f - d:5.1f} s = {100 * (f - d) / f:.0f}% of the flow time"
            " (across runs: machine noise included)"
        )
        print(
            f"  overhead within each flow run (wall - library calls - model load): median {ir:.1f} s"
            f" = {100 * ir / f:.0f}% of the flow time {[round(x, 1) for x in inrun]}"
        )
        met = min(f - d, ir) < 15 or min(f - d, ir) / f < 0.10
        print(f"  goal (< 10% of the flow time or < 15 s): {'met' if met else 'NOT met'}")
        print(
            f"  cached rerun (all tasks Cached): median {statistics.median(r[5] for r in rows):.1f} s"
        )
        print("\n  step          direct s   in flow s   (last repeat; library time only)")
        last = {**rows[-1][3], "model load": rows[-1][4]}
        for k in rows[-1][2]:
            print(f"  {k:<12} {rows[-1][2][k]:9.1f} {last.get(k, float('nan')):11.1f}")
    pool.shutdown()


AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
"""Makes torch and oneDNN use AVX2 kernels only: on an AVX-512 machine, bf16 then takes the
same slow path as on a CPU without native bf16."""


def cli_wall_time(
    preset: str | None, goal_s: float, extra: list[str] = (), avx2: bool = False
) -> None:
    """``isup run`` as a user runs it: the console script, no Prefect server configured (it
    starts Prefect's temporary one), a fresh Prefect home and output folder. ``avx2``: under
    the AVX2 emulation (:data:`AVX2_ENV`)."""
    what = f"--preset {preset}" if preset else "on the defaults"
    print(f"\nmachine: {machine()}" + (f" | emulated AVX2 ({AVX2_ENV})" if avx2 else ""))
    root = Path(tempfile.mkdtemp(prefix="isup-cli-", dir=OUT if OUT.exists() else None))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(root / "prefect-home"), "HF_HUB_OFFLINE": "1"})
    # a loaded machine can take longer than Prefect's default to start its temporary server
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    if avx2:
        env.update(AVX2_ENV)
    isup = Path(sys.executable).with_name("isup")
    args = [str(isup), "run", "--storage", str(root / "runs"), *extra]
    args += ["--preset", preset] if preset else []
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"isup run {what} failed ({proc.returncode})")
    exp = next(p for p in (root / "runs").iterdir() if not p.name.startswith("."))
    run = next(p for p in exp.iterdir() if not p.name.startswith("."))
    index = json.loads((run / "run.json").read_text())
    print(
        f"`isup run {what}`: wall time {wall:.0f} s ({wall / 60:.1f} min; goal < {goal_s:.0f} s: "
        f"{'met' if wall < goal_s else 'NOT met'}); CPU time {cpu_s:.0f} s, load average "
        f"{os.getloadavg()[0]:.1f} at the end (on a shared machine the wall time is inflated; "
        f"CPU time / {os.cpu_count()} cores bounds it from below)"
    )
    print("  first lines of its output:")
    for line in proc.stdout.splitlines()[:3]:
        print(f"    {line}")
    for s in index["steps"]:
        print(f"  {s['step']:<11} {s['name']:<22} {s['state']:<10} {s['seconds'] or 0:7.1f} s")
    task_total = sum(s["seconds"] or 0 for s in index["steps"])
    print(
        f"  sum of the steps' library times {task_total:.0f} s; the rest ({wall - task_total:.0f} s) "
        "is start-up (imports, the temporary Prefect server), the model load and Prefect bookkeeping"
    )
    print(f"  report: {index['report_uri']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--defaults", action="store_true", help="also time `isup run` on the defaults")
    p.add_argument("--only-defaults", action="store_true")
    p.add_argument(
        "--avx2",
        action="store_true",
        help="only `isup run --preset smoke` and `isup run` on the defaults, under the AVX2 "
        "emulation (the budget: 60 s and 8 minutes on a 2-core AVX2 CPU)",
    )
    a = p.parse_args()
    if a.avx2:
        cli_wall_time("smoke", 60.0, avx2=True)
        cli_wall_time(None, 480.0, avx2=True)
        return
    if not a.only_defaults:
        overhead(a.repeats)
        cli_wall_time("smoke", 60.0)
    if a.defaults or a.only_defaults:
        cli_wall_time(None, 480.0)


if __name__ == "__main__":
    main()
