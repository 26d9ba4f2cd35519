"""Online SAE training against "dump, then train" on gemma-3-270m, same tokens, end to end.

Three ways to train the same TopK SAE on the same ag_news headlines (same documents, split,
seed, shuffle buffer and schedule), each timed from the loaded model to the published SAE:

- ``dump+train``: ``dump_layer_activations`` (bf16 shards on local disk), then ``train_saes``
  on the store;
- ``online``: ``train_saes(OnlineActivations(...))``: forward passes straight into the
  shuffle buffer, nothing on disk but the SAE;
- ``online+store``: the same with ``write_store=True`` (the store as a by-product).

Reported side by side: seconds, training tokens per second, the held-out FVU (evaluated on
the same dumped store after training, so every row is judged alike), the peak RSS, and the
disk each leaves. Held-out evaluation and the decoder refit are left out of the timings.
The model computes in the dtype ``auto`` picks for this CPU (float32 without native bf16).

Run: ``python bench/bench_online.py`` (defaults take a couple of minutes on 2 CPU cores;
``--docs`` and ``--epochs`` scale it; ``--device cuda`` runs model and SAE on a GPU).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ag_news_frame, machine, peak_rss_mb, record, set_device, sync
from integral_superposition import DumpConfig, SAEConfig
from integral_superposition.backends import HFCausalLM
from integral_superposition.compute import resolve_dtype, short_name
from integral_superposition.dump import dump_layer_activations
from integral_superposition.sae import load_sae
from integral_superposition.sae.metrics import evaluate_sae
from integral_superposition.sae.online import OnlineActivations
from integral_superposition.sae.train import train_saes


def _disk_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=800, help="ag_news headlines (titles)")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--k", type=int, default=2048, help="SAE width")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = set_device(args.device)
    dtype = short_name(resolve_dtype("auto", dev))
    print(f"[bench] {machine()}")
    print(f"[bench] torch CPU capability {torch.backends.cpu.get_cpu_capability()}, model {dtype}")
    df = ag_news_frame(with_description=False).iloc[: args.docs].reset_index(drop=True)
    model = HFCausalLM.from_pretrained(
        "gemma-3-270m", dtype=dtype, device_map=str(dev) if dev.type == "cuda" else None
    )
    dump = DumpConfig(layer=args.layer, max_len=args.max_len, batch_size=32, dtype="bf16")
    cfg = SAEConfig(
        architecture="topk", k=args.k, top_k=32, batch_size=512, epochs=args.epochs,
        shuffle_buffer_tokens=8192, lr=4e-4, lr_warmup_steps=10, log_every=20,
        refit_decoder=False, device=str(dev),
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="isup-bench-online-"))
    rows = []
    try:
        # the held-out store every row is judged on (the dump+train row's own store)
        for name in ("dump+train", "online", "online+store"):
            out = work / name
            sync()
            t0 = time.perf_counter()
            if name == "dump+train":
                store = dump_layer_activations(
                    df, "text", "topic", model, dump, str(out / "acts"), progress=False
                )
                t_dump = time.perf_counter() - t0
                (res,) = train_saes(
                    store, [cfg], [str(out / "sae")], progress=False, evaluate=False
                )
            else:
                spec = OnlineActivations(
                    df, "text", "topic", model, dump,
                    store_uri=str(out / "acts") if name == "online+store" else None,
                    write_store=name == "online+store",
                )  # fmt: skip
                (res,) = train_saes(spec, [cfg], [str(out / "sae")], progress=False, evaluate=False)
                t_dump = float("nan")
            sync()
            secs = time.perf_counter() - t0
            ev = evaluate_sae(
                load_sae(str(out / "sae")), store, split="test", test_fraction=cfg.test_fraction
            )
            rows.append(
                {
                    "method": name,
                    "seconds": secs,
                    "dump_s": t_dump,
                    "tokens": res.tokens,
                    "tok_per_s": res.tokens / secs,
                    "fvu": ev["fvu"],
                    "disk_mb": _disk_mb(out / "acts") if (out / "acts").exists() else 0.0,
                    "peak_rss_mb": peak_rss_mb(),
                }
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cap = torch.backends.cpu.get_cpu_capability()
    print(
        f"\n{args.docs} headlines, layer {args.layer}, max_len {args.max_len}, "
        f"{rows[0]['tokens']} training tokens, k={args.k}, epochs={args.epochs}, "
        f"device {dev}, CPU capability {cap}, model {dtype}"
    )
    print(
        f"{'method':<14}{'seconds':>9}{'(dump s)':>10}{'train tok/s':>13}{'held-out FVU':>14}"
        f"{'disk MB':>9}{'peak RSS MB':>13}"
    )
    for r in rows:
        print(
            f"{r['method']:<14}{r['seconds']:>9.1f}{r['dump_s']:>10.1f}{r['tok_per_s']:>13.0f}"
            f"{r['fvu']:>14.4f}{r['disk_mb']:>9.1f}{r['peak_rss_mb']:>13.0f}"
        )
    print("(peak RSS is the process's running peak: later rows include earlier ones)")
    record(online={r["method"]: r for r in rows} | {"cpu_capability": cap, "dtype": dtype})


if __name__ == "__main__":
    main()
