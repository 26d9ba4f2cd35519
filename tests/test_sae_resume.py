"""Checkpoints: kill -9 mid-run, resume, and end with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from integral_superposition import SAEConfig, storage
from integral_superposition.dump.synthetic import (
    sparse_dictionary_activations,
    write_activation_store,
)
from integral_superposition.sae import load_sae
from integral_superposition.sae.train import train_saes
from safetensors.torch import load_file

CFG = dict(
    k=64, batch_size=64, epochs=1, lr=1e-2, lr_warmup_steps=5, checkpoint_every=3, log_every=4
)


def _cfgs() -> list[SAEConfig]:
    return [
        SAEConfig(architecture="topk", top_k=4, dead_tokens=500, **CFG),
        SAEConfig(architecture="relu", l1=0.05, **CFG),
    ]


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    from integral_superposition import SAEConfig
    from integral_superposition.sae.train import train_saes
    sys.path.insert(0, {test_dir!r})
    from test_sae_resume import _cfgs
    store, ckpt, out = sys.argv[1:4]
    train_saes(store, _cfgs(), [out + "/a", out + "/b"], checkpoint_uri=ckpt, progress=False,
               on_progress=lambda step, total: time.sleep(0.15))
    """
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x, _ = sparse_dictionary_activations(4096, 32, 48, seed=5)
    return write_activation_store(x * 30 + 3, str(tmp_path_factory.mktemp("resume") / "acts"))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the child runs on one thread: same float summation order
    yield
    torch.set_num_threads(n)


def _latest_step(ckpt: str) -> int:
    p = os.path.join(ckpt, "latest.json")
    try:
        with open(p) as f:
            return int(json.load(f)["step"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_kill_and_resume_matches_uninterrupted_run(store, tmp_path, one_thread):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    code = CHILD.format(test_dir=os.path.dirname(__file__))
    proc = subprocess.Popen([sys.executable, "-c", code, store.uris[0], ckpt, out], env=env)
    try:
        deadline = time.time() + 120
        while _latest_step(ckpt) < 9:
            assert proc.poll() is None, "the training child ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _latest_step(ckpt)
    assert 9 <= killed_at < 55
    assert not os.path.exists(out + "/a")
    # the checkpoint holds safetensors and JSON only (no pickle)
    with open(os.path.join(ckpt, "latest.json")) as f:
        latest = json.load(f)
    step_dir = os.path.join(ckpt, latest["dir"])
    assert sorted(os.listdir(step_dir)) == [
        "rng.safetensors",
        "sae-00.safetensors",
        "sae-01.safetensors",
        "state.json",
    ]
    assert any(
        k.startswith("adam.W_enc.") for k in load_file(os.path.join(step_dir, "sae-00.safetensors"))
    )

    # a different config refuses the checkpoint and leaves it alone
    other = [c.model_copy(update={"lr": 5e-3}) for c in _cfgs()]
    with pytest.raises(ValueError, match=r"different run .*lr"):
        train_saes(store, other, [out + "/a", out + "/b"], checkpoint_uri=ckpt, progress=False)
    assert _latest_step(ckpt) == killed_at and not os.path.exists(out + "/a")

    resumed = train_saes(
        store, _cfgs(), [out + "/a", out + "/b"], checkpoint_uri=ckpt, progress=False
    )
    assert resumed[0].resumed_from_step == killed_at
    assert not os.path.exists(ckpt)  # removed once the SAEs are published

    ref = train_saes(
        store, _cfgs(), [str(tmp_path / "ref_a"), str(tmp_path / "ref_b")], progress=False
    )
    assert resumed[0].steps == ref[0].steps > killed_at
    for r, q in zip(resumed, ref, strict=True):
        a, b = load_sae(r.uri).requires_grad_(False), load_sae(q.uri).requires_grad_(False)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            assert float((getattr(a, name) - getattr(b, name)).abs().max()) <= 1e-6, name
        # the training curves agree too (the log accumulators are part of the checkpoint)
        ca = storage.read_json(storage.join(r.uri, "manifest.json"))["training_curve"]
        cb = storage.read_json(storage.join(q.uri, "manifest.json"))["training_curve"]
        assert [c["step"] for c in ca] == [c["step"] for c in cb]
        assert ca[-1]["loss"] == pytest.approx(cb[-1]["loss"], rel=1e-5)


def test_resume_false_starts_over_and_finished_checkpoint_only_publishes(store, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    cfgs = [SAEConfig(architecture="topk", top_k=4, **{**CFG, "epochs": 0.25})]
    seen: list[int] = []

    class Stop(Exception):
        pass

    def stop_at_6(step: int, total: int) -> None:
        seen.append(step)
        if step == 6:
            raise Stop

    with pytest.raises(Stop):
        train_saes(
            store,
            cfgs,
            [str(tmp_path / "a")],
            checkpoint_uri=ckpt,
            progress=False,
            on_progress=stop_at_6,
        )
    assert _latest_step(ckpt) == 6
    seen.clear()
    (res,) = train_saes(
        store, cfgs, [str(tmp_path / "a")], checkpoint_uri=ckpt, resume=False, progress=False,
        on_progress=lambda s, t: seen.append(s),
    )  # fmt: skip
    assert seen[0] == 1 and res.resumed_from_step == 0 and res.steps == seen[-1] > 6
