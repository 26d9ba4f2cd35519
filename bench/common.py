"""Shared fixtures for the benchmark scripts: the real model and real activations.

Benchmarks read ``../shared/data/ag_news_dev.csv`` (or ``$ISUP_AG_NEWS``) and cache what they
build under ``bench/out/`` (or ``$ISUP_BENCH_OUT``) so that several scripts share one dump.

Variables retarget every script (``bench/gpu_check.py`` sets them): ``$ISUP_AG_NEWS``
may be ``demo:N`` (the built-in demo corpus, N headlines, no descriptions),
``$ISUP_BENCH_MODEL`` names another model (default ``gemma-3-270m``; e.g. ``tiny:gemma`` or a
model directory), ``$ISUP_BENCH_LAYER`` the hook layer of the shared dump (default 9),
``$ISUP_BENCH_DTYPE`` the model's dtype (default bf16) and ``$ISUP_BENCH_D_SAE`` the shared
SAE's width (default 4096).
:func:`set_device` picks where the shared dump and SAE are computed.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent
OUT = Path(os.environ.get("ISUP_BENCH_OUT", ROOT / "out"))
AG_NEWS_SOURCE = str(
    os.environ.get("ISUP_AG_NEWS", ROOT.parent.parent / "shared" / "data" / "ag_news_dev.csv")
)
AG_NEWS = Path(AG_NEWS_SOURCE)
MIDDLE_LAYER = int(os.environ.get("ISUP_BENCH_LAYER", "9"))
MODEL = os.environ.get("ISUP_BENCH_MODEL", "gemma-3-270m")
D_SAE = int(os.environ.get("ISUP_BENCH_D_SAE", "4096"))
"""Width of the shared SAE of :func:`ag_news_sae` (``$ISUP_BENCH_D_SAE``)."""
DTYPE = os.environ.get("ISUP_BENCH_DTYPE", "bf16")
"""The model's compute dtype in every script (``$ISUP_BENCH_DTYPE``: bf16, fp16 or fp32)."""
DEVICE = "cpu"
"""Where :func:`ag_news_store` dumps and :func:`ag_news_sae` trains (see :func:`set_device`)."""


BENCH_MARK = ".isup-bench-output"


def fresh_bench_dir(path: Path) -> Path:
    """An empty folder at ``path`` for a benchmark's outputs. An existing folder is emptied
    only when an earlier benchmark made it (it holds ``BENCH_MARK``); a folder holding anything
    else is refused, so a folder of the user's under ``ISUP_BENCH_OUT`` is never touched."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise SystemExit(f"benchmark output {path}: exists and is not a folder")
        if any(path.iterdir()) and not (path / BENCH_MARK).is_file():
            raise SystemExit(
                f"benchmark output {path}: holds files no benchmark wrote (no {BENCH_MARK}); "
                "move them or set ISUP_BENCH_OUT to another folder"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / BENCH_MARK).write_text("made by a benchmark under bench/; emptied on its next run\n")
    return path


def set_device(device: str) -> torch.device:
    """Check ``device`` (``cpu``, ``cuda``, ``cuda:N``) and make it the scripts' device."""
    global DEVICE
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SystemExit(f"--device={device!r}: expected cpu, cuda or cuda:N ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device={device!r}: torch sees no CUDA device on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device={device!r}: expected cpu, cuda or cuda:N")
    DEVICE = str(dev)
    return dev


def sync(device: str | torch.device | None = None) -> None:
    """Wait for queued work on a CUDA ``device`` (default: the scripts' device) before a clock is read."""
    dev = torch.device(device if device is not None else DEVICE)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def record(**values) -> None:
    """Merge key numbers into the JSON file ``$ISUP_BENCH_JSON`` (when set), for summaries."""
    path = os.environ.get("ISUP_BENCH_JSON")
    if not path:
        return
    import json

    from integral_superposition.storage import write_json

    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() else {}
    data.update(values)
    write_json(str(p), data)


def machine() -> str:
    """One line describing where a number was measured."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    data = "demo corpus" if AG_NEWS_SOURCE.startswith("demo") else str(AG_NEWS)
    return f"{platform.node()} | {psutil.cpu_count(logical=True)} CPUs | {psutil.virtual_memory().total / 2**30:.0f} GiB | {gpu} | torch {torch.__version__} threads={torch.get_num_threads()} | model {MODEL} {DTYPE} | data {data}"


def cpu_line(model: str) -> str:
    """One line naming the machine, the torch CPU capability and the model (float32)."""
    return (
        f"{platform.node()} | CPU capability {torch.backends.cpu.get_cpu_capability()} | "
        f"torch {torch.__version__} threads={torch.get_num_threads()} | {model} float32"
    )


def steering_run(run_root: str, sae: str | None, needs: str):
    """A run root with a finished steering step: ``(run, SAE name, path of the step's file
    ``needs``, the SAE, the activation store)``; a clear exit when the file is missing."""
    from integral_superposition.pipelines.inputs import load_inputs

    run = Path(run_root)
    name = run_sae_name(run, sae)
    path = run / "steering" / name / needs
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the steering step on this SAE first")
    model, _, store = load_inputs(str(run / "sae" / name), str(run / "acts"), None)
    return run, name, path, model, store


def run_sae_name(run: Path, sae: str | None = None) -> str:
    """The SAE folder under a run root's ``sae/``: ``sae`` or, without it, the only one."""
    found = (
        [p.name for p in (run / "sae").iterdir() if p.is_dir()] if (run / "sae").is_dir() else []
    )
    name = sae or (found[0] if len(found) == 1 else None)
    if name is None:
        raise SystemExit(f"--run {run}: expected one SAE under sae/ or --sae NAME (found {found})")
    return name


def proc_status_kib(*fields: str) -> dict[str, int]:
    """The memory ``fields`` of ``/proc/self/status`` (e.g. ``VmHWM``, ``RssAnon``) in KiB;
    those it lacks are left out. The file names the process, in any bytes: read with
    replacement."""
    with open("/proc/self/status", errors="replace") as f:
        return {
            k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if k in fields
        }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Reads ``VmHWM`` from ``/proc/self/status``: unlike ``ru_maxrss``, it belongs to this
    process image only (a child spawned by a large parent does not inherit its peak).
    """
    try:
        kib = proc_status_kib("VmHWM")
    except OSError:
        kib = {}
    if "VmHWM" in kib:
        return kib["VmHWM"] / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ag_news_frame(with_description: bool = True):
    """The real labelled headlines; ``text`` is the title plus, optionally, the description.

    With ``$ISUP_AG_NEWS=demo:N``: N headlines of the built-in demo corpus (no descriptions).
    """
    from integral_superposition.data import demo_corpus, load_titles_csv

    if AG_NEWS_SOURCE.startswith("demo"):
        _, _, n = AG_NEWS_SOURCE.partition(":")
        df = demo_corpus(int(n or 3800))
        df["description"] = ""
        df["text"] = df["title"]
        return df
    if not AG_NEWS.exists():
        raise SystemExit(f"{AG_NEWS} not found: set ISUP_AG_NEWS to the ag_news_dev.csv path")
    df = load_titles_csv(str(AG_NEWS), text_col="title", label_col="topic")
    df["text"] = (
        (df["title"] + ". " + df["description"].fillna("")) if with_description else df["title"]
    )
    return df


def gemma(dtype=None, device: str | None = None):
    """The benchmarks' model (``$ISUP_BENCH_MODEL``, default gemma-3-270m) in ``dtype``
    (default ``$ISUP_BENCH_DTYPE``, bf16) on ``device`` (default: the scripts' device)."""
    from integral_superposition.backends import HFCausalLM

    dev = torch.device(device or DEVICE)
    device_map = str(dev) if dev.type == "cuda" else None
    return HFCausalLM.from_pretrained(MODEL, dtype=dtype or DTYPE, device_map=device_map)


def _cache_tag() -> str:
    """``gemma`` for the default model and data; else a short key of both."""
    if MODEL == "gemma-3-270m" and not AG_NEWS_SOURCE.startswith("demo"):
        return "gemma"
    import hashlib

    return hashlib.sha256(f"{MODEL}|{AG_NEWS_SOURCE}".encode()).hexdigest()[:10]


def ag_news_store(layer: int | None = None, max_len: int = 64, n_docs: int | None = None):
    """gemma-3-270m activations of ag_news titles + descriptions at ``layer`` (cached);
    ``n_docs``: only the first documents (a shorter run)."""
    from integral_superposition import DumpConfig
    from integral_superposition.dump import ActivationStore, dump_layer_activations
    from integral_superposition.storage import verify_output

    layer = MIDDLE_LAYER if layer is None else layer
    out = OUT / f"ag_news_{_cache_tag()}_L{layer}_T{max_len}"
    if n_docs is not None:
        out = out.with_name(f"{out.name}_D{n_docs}")
    if verify_output(str(out)):
        return ActivationStore(str(out))
    t = time.time()
    frame = ag_news_frame()
    store = dump_layer_activations(
        frame if n_docs is None else frame.iloc[:n_docs],
        "text",
        "topic",
        gemma(),
        DumpConfig(layer=layer, max_len=max_len, batch_size=32),
        str(out),
        overwrite=True,
    )
    print(f"[bench] dumped {store.n_tokens} tokens to {out} in {time.time() - t:.0f}s")
    return store


def ag_news_sae(arch: str = "topk", d_sae: int | None = None, **overrides):
    """``(sae_uri, store)``: an SAE trained (once, cached under ``bench/out/``) on
    :func:`ag_news_store`. ``overrides`` are extra ``SAEConfig`` fields (``top_k``, ``l1``, ...).
    """
    from integral_superposition import SAEConfig
    from integral_superposition.sae.train import train_saes
    from integral_superposition.storage import canonical_json, sha256_bytes, verify_output

    store = ag_news_store()
    d_sae = D_SAE if d_sae is None else d_sae
    defaults = {"top_k": 32, "l1": 2e-3, "lr": 1e-3, "batch_size": 1024, "epochs": 3.0}
    defaults.update({"lr_warmup_steps": 50, "dead_tokens": 200_000, "log_every": 50})
    cfg = SAEConfig(k=d_sae, architecture=arch, **{**defaults, **overrides})
    key = sha256_bytes(canonical_json([cfg, store.content_hash]).encode())[:10]
    out = OUT / f"ag_news_sae_{arch}_{d_sae}_{key}"
    if not verify_output(str(out)):
        t = time.time()
        (res,) = train_saes(
            store, [cfg], [str(out)], checkpoint_uri=str(out) + ".ckpt", device=DEVICE
        )
        print(f"[bench] trained {arch} d_sae={d_sae} in {time.time() - t:.0f}s: {res.metrics}")
    return str(out), store
