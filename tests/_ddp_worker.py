"""Training under torchrun for tests/test_sae_distributed.py (one copy per rank).

``python -m torch.distributed.run --nproc-per-node 2 -m _ddp_worker MODE STORE OUT`` with
this folder on ``PYTHONPATH``. MODE ``parallel``: the data-parallel SAEs, then the
module-parallel ones; ``online``: module-parallel online training (rank 0 writes the store);
``slow``: a checkpointed run (``OUT/ckpt``) that pauses after step ``PAUSE_STEP`` to be
killed; ``all``: all three, one process group.
"""

from __future__ import annotations

import os
import sys
import time

import torch

torch.set_num_threads(1)

from integral_superposition import SAEConfig, distributed  # noqa: E402
from integral_superposition.dump.store import ActivationStore  # noqa: E402
from integral_superposition.sae import SparseAutoencoder, save_sae  # noqa: E402
from integral_superposition.sae.train import train_sae, train_saes  # noqa: E402

_BASE = dict(batch_size=64, epochs=1, lr=1e-2, lr_warmup_steps=3, log_every=5)


def dp_cfgs() -> list[SAEConfig]:
    """TopK with AuxK on a short dead window (dead-latent statistics are reduced over ranks),
    BatchTopK (the batch-wide selection spans ranks) and ReLU + L1."""
    return [
        SAEConfig(k=48, architecture="topk", top_k=4, dead_tokens=128, hook_point="a", **_BASE),
        SAEConfig(
            k=48, architecture="batchtopk", top_k=4, dead_tokens=128, hook_point="a", **_BASE
        ),
        SAEConfig(k=32, architecture="relu", l1=0.05, hook_point="b", **_BASE),
    ]


def inplace_model() -> SparseAutoencoder:
    return SparseAutoencoder(16, 40, architecture="topk", top_k=4, seed=7)


def inplace_cfg() -> SAEConfig:
    return SAEConfig(k=40, architecture="topk", top_k=4, hook_point="b", **_BASE)


def mp_cfgs() -> list[SAEConfig]:
    """Two hook points and two widths: the module-parallel run."""
    return [
        SAEConfig(k=64, architecture="topk", top_k=4, hook_point="a", **_BASE),
        SAEConfig(k=32, architecture="topk", top_k=4, hook_point="b", **_BASE),
    ]


ONLINE_HOOKS = ["layer.1", "layer.2"]


def online_spec(backend, store_uri: str):
    """Online training on a tiny model at two hook points, writing the store as it goes."""
    from integral_superposition import DumpConfig
    from integral_superposition.data import demo_corpus
    from integral_superposition.sae.online import OnlineActivations

    dump = DumpConfig(hook_points=ONLINE_HOOKS, max_len=24, batch_size=32, dtype="fp32")
    return OnlineActivations(
        demo_corpus(120), "title", "topic", backend, dump, store_uri=store_uri, write_store=True
    )


def online_cfgs() -> list[SAEConfig]:
    return [
        SAEConfig(
            k=32, architecture="topk", top_k=4, hook_point=h, shuffle_buffer_tokens=512, **_BASE
        )
        for h in ONLINE_HOOKS
    ]


def slow_cfgs() -> list[SAEConfig]:
    return [
        SAEConfig(k=32, architecture="topk", top_k=4, dead_tokens=256, checkpoint_every=3, **_BASE)
    ]


PAUSE_STEP = 6
"""The slow run stops making progress after this step (a checkpoint step) until killed."""


def _pause_at(step_to_pause: int):
    def on_progress(step: int, total: int) -> None:
        if step >= step_to_pause:  # the checkpoint of ``step`` is written: wait to be killed
            time.sleep(600)

    return on_progress


def main() -> None:
    mode, uri, out = sys.argv[1:4]
    info = distributed.init("cpu")
    store = ActivationStore(uri)
    if mode in ("parallel", "all"):
        names = ["dp-topk", "dp-batchtopk", "dp-relu"]
        train_saes(store, dp_cfgs(), [f"{out}/{n}" for n in names], progress=False, evaluate=False)
        # the seed's call trains a given model in place: every rank ends with the same weights
        model = inplace_model()
        train_sae(model, store, inplace_cfg(), "cpu", progress=False)
        if info.is_main:
            save_sae(model, f"{out}/inplace")
        train_saes(
            store,
            mp_cfgs(),
            [f"{out}/mp-a", f"{out}/mp-b"],
            progress=False,
            evaluate=False,
            distribute_modules=True,
        )
    if mode in ("online", "all"):
        from integral_superposition.backends import load_backend

        train_saes(
            online_spec(load_backend("tiny:gemma"), f"{out}/online-acts"),
            online_cfgs(),
            [f"{out}/on-1", f"{out}/on-2"],
            progress=False,
            distribute_modules=True,
        )
    if mode in ("slow", "all"):
        with open(f"{out}/slow.pid-{info.rank}", "w") as f:
            f.write(str(os.getpid()))
        train_saes(
            store,
            slow_cfgs(),
            [f"{out}/slow"],
            checkpoint_uri=f"{out}/ckpt",
            progress=False,
            evaluate=False,
            on_progress=_pause_at(PAUSE_STEP),
        )
    distributed.destroy()


if __name__ == "__main__":
    main()
