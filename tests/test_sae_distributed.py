"""Training on two processes under torchrun (gloo, CPU): data-parallel and module-parallel SAEs
equal their single-process twins, and a run killed mid-way resumes under another world size.

One torchrun launch trains the data-parallel SAEs, then the module-parallel ones (from a store,
then online from a tiny model's forward passes), then starts a checkpointed run that the test kills (``kill -9`` of rank 1). The checkpoint is resumed on one
process (stopped part-way) and then on two through the launcher; the result equals an
uninterrupted single-process run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from _ddp_worker import (
    PAUSE_STEP,
    dp_cfgs,
    inplace_cfg,
    inplace_model,
    mp_cfgs,
    online_cfgs,
    online_spec,
    slow_cfgs,
)
from integral_superposition import distributed, storage
from integral_superposition.dump.synthetic import (
    sparse_dictionary_activations,
    write_activation_store,
)
from integral_superposition.sae import load_sae, save_sae
from integral_superposition.sae.launch import launch_train_saes
from integral_superposition.sae.train import train_sae, train_saes

TESTS = os.path.dirname(os.path.abspath(__file__))
DP_NAMES = ["dp-topk", "dp-batchtopk", "dp-relu"]
WEIGHTS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    xa, _ = sparse_dictionary_activations(2048, 16, 24, seed=1)
    xb, _ = sparse_dictionary_activations(2048, 16, 24, seed=2)
    root = tmp_path_factory.mktemp("ddp")
    return write_activation_store({"a": xa * 20 + 1, "b": xb * 5}, str(root / "acts"))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the same float summation order
    yield
    torch.set_num_threads(n)


def _env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([TESTS, *sys.path]), "OMP_NUM_THREADS": "1"}


def _latest_step(ckpt: str) -> int:
    try:
        with open(os.path.join(ckpt, "latest.json")) as f:
            return int(json.load(f)["step"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _max_diff(a_uri: str, b_uri: str) -> dict[str, float]:
    a = load_sae(a_uri).requires_grad_(False)
    b = load_sae(b_uri).requires_grad_(False)
    return {k: float((getattr(a, k) - getattr(b, k)).abs().max()) for k in WEIGHTS}


def _curve(uri: str) -> list[dict]:
    return storage.read_json(storage.join(uri, "manifest.json"))["training_curve"]


def test_two_ranks_equal_one_and_resume_after_kill(store, tmp_path, one_thread, tiny_backend):
    out = str(tmp_path / "ranks")
    os.makedirs(out)
    cmd = distributed.torchrun_command(2, "_ddp_worker", ["all", store.uris[0], out])
    proc = subprocess.Popen(cmd, env={**os.environ, **_env()})
    ckpt = os.path.join(out, "ckpt")
    try:
        # the single-process twins train meanwhile
        ref = str(tmp_path / "ref")
        train_saes(
            store, dp_cfgs(), [f"{ref}/{n}" for n in DP_NAMES], progress=False, evaluate=False
        )
        model = inplace_model()
        train_sae(model, store, inplace_cfg(), "cpu", progress=False)
        save_sae(model, f"{ref}/inplace")
        train_saes(store, mp_cfgs(), [f"{ref}/mp-a", f"{ref}/mp-b"], progress=False, evaluate=False)
        (slow_ref,) = train_saes(
            store, slow_cfgs(), [f"{ref}/slow"], progress=False, evaluate=False
        )
        train_saes(
            online_spec(tiny_backend, f"{ref}/online-acts"),
            online_cfgs(),
            [f"{ref}/on-1", f"{ref}/on-2"],
            progress=False,
        )
        deadline = time.time() + 300
        while _latest_step(ckpt) < PAUSE_STEP:
            assert proc.poll() is None, "torchrun ended before its slow run could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        with open(os.path.join(out, "slow.pid-1")) as f:
            os.kill(int(f.read()), signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0  # torchrun reports the killed worker
    killed_at = _latest_step(ckpt)
    assert killed_at == PAUSE_STEP < slow_ref.steps
    assert not os.path.exists(os.path.join(out, "slow", "manifest.json"))

    # (a) data-parallel: the weights and the reduced training log equal one process's
    for n in DP_NAMES:
        diff = _max_diff(f"{out}/{n}", f"{ref}/{n}")
        assert max(diff.values()) <= 1e-5, (n, diff)
        ca, cb = _curve(f"{out}/{n}"), _curve(f"{ref}/{n}")
        assert [c["step"] for c in ca] == [c["step"] for c in cb]
        for key in ("loss", "fvu", "l0", "dead_frac", "tokens", "tokens_per_step"):
            assert ca[-1][key] == pytest.approx(cb[-1][key], rel=1e-4, abs=1e-6), (n, key)
    # the AuxK run had dead latents, so the summed dead-latent counters were exercised
    assert max(c["dead_frac"] for c in _curve(f"{ref}/dp-topk")) > 0
    # train_sae (in place) under torchrun is data-parallel too
    assert max(_max_diff(f"{out}/inplace", f"{ref}/inplace").values()) <= 1e-5
    # (c) module-parallel: each SAE on its own rank equals its single-process twin
    for n in ("mp-a", "mp-b"):
        assert max(_max_diff(f"{out}/{n}", f"{ref}/{n}").values()) == 0.0, n

    # online, module-parallel: each rank ran its own forwards; rank 0 wrote the store and
    # rank 1 evaluated its SAE on it
    assert storage.read_manifest(f"{out}/online-acts")["kind"] == "activations"
    for n in ("on-1", "on-2"):
        assert max(_max_diff(f"{out}/{n}", f"{ref}/{n}").values()) <= 1e-6, n
        got = storage.read_manifest(f"{out}/{n}")["metrics"]
        assert got["fvu"] == pytest.approx(storage.read_manifest(f"{ref}/{n}")["metrics"]["fvu"])

    # (b) resume on one process, stop part-way, then finish on two through the launcher
    stop = killed_at + 6

    def stop_after(step: int, total: int) -> None:
        if step >= stop:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_saes(
            store,
            slow_cfgs(),
            [f"{out}/slow"],
            checkpoint_uri=ckpt,
            progress=False,
            evaluate=False,
            on_progress=stop_after,
        )
    assert _latest_step(ckpt) == stop
    (res,) = launch_train_saes(
        store.uris[0],
        slow_cfgs(),
        [f"{out}/slow"],
        nproc=2,
        checkpoint_uri=ckpt,
        evaluate=False,
        device="cpu",
        env=_env(),
    )
    assert res.resumed_from_step == stop and res.steps == slow_ref.steps
    assert res.uri == f"{out}/slow" and not os.path.exists(ckpt)
    assert max(_max_diff(res.uri, slow_ref.uri).values()) <= 1e-5
    assert res.content_hash == storage.read_manifest(res.uri)["content_hash"]
