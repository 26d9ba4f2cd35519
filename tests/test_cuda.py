"""The CUDA paths: a dump on a CUDA backend, training, the analysis scan's device-resident
top-n selection, steering, and ``auto`` device and dtype resolution.

Marked ``cuda``: they run on ``$ISUP_TEST_DEVICE`` (default ``cuda``) and skip when torch sees
no CUDA device. ``bench/gpu_check.py --device cpu`` runs them on the CPU
(``ISUP_TEST_DEVICE=cpu``), where the scan is told to take its accelerator path.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from integral_superposition import DumpConfig, SAEConfig, steering
from integral_superposition.analysis import scan as scan_mod
from integral_superposition.backends import HFCausalLM
from integral_superposition.data import demo_corpus
from integral_superposition.data.tokenize import pad_batch, pad_token_id
from integral_superposition.dump import dump_layer_activations
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.sae.train import train_sae
from integral_superposition.steering.generation import encode_prompts

pytestmark = pytest.mark.cuda

TEST_DEVICE = os.environ.get("ISUP_TEST_DEVICE", "cuda")


@pytest.fixture(scope="module")
def device() -> torch.device:
    """The device under test; skips when it is a CUDA device and torch sees none."""
    dev = torch.device(TEST_DEVICE)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(
            f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); "
            "ISUP_TEST_DEVICE=cpu runs these tests on the CPU"
        )
    return dev


@pytest.fixture(scope="module")
def device_backend(device):
    """tiny:gemma in float32 on the device under test."""
    device_map = str(device) if device.type == "cuda" else None
    backend = HFCausalLM.from_pretrained("tiny:gemma", dtype="fp32", device_map=device_map)
    assert backend.device.type == device.type
    return backend


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def test_dump_on_the_device_matches_the_cpu_dump(device_backend, tiny_backend, tmp_path):
    df = demo_corpus(48)
    cfg = DumpConfig(layer=2, max_len=24, batch_size=16, dtype="fp32")
    on_dev = dump_layer_activations(
        df, "title", "topic", device_backend, cfg, str(tmp_path / "dev"), progress=False
    )
    on_cpu = dump_layer_activations(
        df, "title", "topic", tiny_backend, cfg, str(tmp_path / "cpu"), progress=False
    )
    assert on_dev.n_tokens == on_cpu.n_tokens > 0
    np.testing.assert_array_equal(on_dev.token_ids, on_cpu.token_ids)
    np.testing.assert_array_equal(on_dev.doc_ids, on_cpu.doc_ids)
    a, b = on_dev.read(0, on_dev.n_tokens), on_cpu.read(0, on_cpu.n_tokens)
    assert a.device.type == "cpu" and a.dtype == torch.float32  # stores hold host tensors
    assert _rel_err(a, b) < 2e-3


def test_training_on_the_device_learns_like_the_cpu(device, demo_store):
    cfg = SAEConfig(
        k=128, architecture="topk", top_k=8, lr=3e-3, batch_size=256, epochs=3.0,
        lr_warmup_steps=2, log_every=1000, dead_tokens=10**9,
    )  # fmt: skip
    x = demo_store.read(0, min(demo_store.n_tokens, 2048)).float()
    results = {}
    for dev in (device, torch.device("cpu")):
        sae = SparseAutoencoder(demo_store.d_model, 128, architecture="topk", top_k=8, seed=0)
        with torch.no_grad():
            init_fvu = float(sae(x).fvu)
        res = train_sae(sae, demo_store, cfg, dev, progress=False)
        assert res.steps > 5
        p = next(sae.parameters())
        assert torch.isfinite(p).all()
        with torch.no_grad():
            fvu = float(sae.to("cpu")(x).fvu)
        results[dev.type] = (init_fvu, fvu)
    (init_d, fvu_d), (init_c, fvu_c) = results[device.type], results["cpu"]
    assert init_d == pytest.approx(init_c)
    assert fvu_d < 0.7 * init_d  # it learned
    assert fvu_d == pytest.approx(fvu_c, rel=0.15)  # as much as on the CPU


def test_scan_selection_on_the_device_matches_the_host_selection(device, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 32, generator=gen)
    sae = SparseAutoencoder(32, 96, architecture="relu", seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # sparse, so that some latents fire fewer times than n_top
    host = scan_mod.scan_latents(sae, x, n_top=40, chunk_tokens=1024, device="cpu")
    if device.type == "cpu":  # take the accelerator path (torch buffers, device filter)
        monkeypatch.setattr(scan_mod, "on_accelerator", lambda dev: True)
    dev = scan_mod.scan_latents(sae, x, n_top=40, chunk_tokens=1024, device=device)
    np.testing.assert_array_equal(dev.top.fire_count, host.top.fire_count)
    np.testing.assert_array_equal(dev.top.rows, host.top.rows)
    np.testing.assert_allclose(dev.top.values, host.top.values, rtol=1e-4, atol=1e-5)
    # and both are the brute-force top sets
    with torch.no_grad():
        z = sae.encode(x).numpy()
    for j in (0, 17, 95):
        order = np.argsort(-z[:, j], kind="stable")[:40]
        want = {int(r) for r in order if z[r, j] > 0}
        assert dev.top[j] == want


def test_steering_on_the_device(device, device_backend):
    torch.manual_seed(0)
    sae = SparseAutoencoder(device_backend.d_model, 64, architecture="topk", top_k=8, seed=0)
    tok = device_backend.tokenizer
    batch = pad_batch(
        encode_prompts(tok, ["The market", "Scientists said"]), pad_token_id(tok), "left"
    )
    kw = dict(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=False,
        max_new_tokens=6, min_new_tokens=6, top_k=None, top_p=None,
    )  # fmt: skip
    plain = device_backend.generate(**kw)
    assert plain.device.type == device.type
    with steering.steer(device_backend, sae, "layer.2", steering.scale(3, 1.0)) as h:
        same = device_backend.generate(**kw)
    assert h.edited_tokens["generated"] > 0
    torch.testing.assert_close(same, plain)  # an identity edit changes nothing
    with steering.steer(device_backend, sae, "layer.2", steering.clamp(3, 1e4)) as h:
        steered = device_backend.generate(**kw)
    assert not torch.equal(steered, plain)
    assert sae.W_dec.device.type == "cpu"  # the caller's SAE is never moved


def test_auto_device_and_dtype_resolution(device, device_backend):
    from integral_superposition.compute import cpu_bf16_support, resolve_compute, resolve_device
    from integral_superposition.experiment import ModelSpec

    has_cuda = torch.cuda.is_available()
    auto = torch.device("cuda:0" if has_cuda else "cpu")
    assert resolve_device("auto") == auto
    assert ModelSpec(device="auto").resolved_device_map() == ("cuda:0" if has_cuda else None)
    assert ModelSpec(device="cpu").resolved_device_map() is None
    assert resolve_device("auto", default=device_backend.device) == device_backend.device
    assert resolve_device("auto", default=None) == auto

    choice = resolve_compute("auto", device)
    assert choice.device.type == device.type
    if device.type == "cuda":
        # bf16 on a GPU that has it (compute capability 8.0 and up), else fp16
        bf16 = torch.cuda.get_device_capability(device)[0] >= 8
        assert choice.dtype == (torch.bfloat16 if bf16 else torch.float16), choice.describe()
    else:
        native, _ = cpu_bf16_support()
        assert choice.dtype == (torch.bfloat16 if native else torch.float32), choice.describe()
    assert resolve_compute("fp32", device).dtype == torch.float32  # explicit wins
