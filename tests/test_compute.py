"""Device and dtype resolution: ``auto`` under each hardware branch, explicit dtypes, errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from integral_superposition import compute


@pytest.fixture
def cpu(monkeypatch):
    """Force the CPU detection: ``cpu(flags, capability, onednn)``; the env override is unset."""
    monkeypatch.delenv(compute.CPU_BF16_ENV, raising=False)
    compute._detect_cpu_bf16.cache_clear()
    compute._LOGGED.clear()

    def force(flags: set[str], capability: str, onednn: bool | None = True, slowdown=80.0):
        monkeypatch.setattr(compute, "_cpu_flags", lambda: set(flags))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(compute, "_onednn_bf16", lambda: onednn)
        monkeypatch.setattr(compute, "_matmul_slowdown", lambda dtype=torch.bfloat16: slowdown)
        compute._detect_cpu_bf16.cache_clear()

    yield force
    compute._detect_cpu_bf16.cache_clear()
    compute._LOGGED.clear()


AVX2 = {"sse4_2", "avx", "avx2", "fma"}
SAPPHIRE = AVX2 | {"avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile"}


def test_auto_cpu_with_native_bf16_is_bf16(cpu, caplog):
    cpu(SAPPHIRE, "AVX512")
    with caplog.at_level(logging.INFO, logger="integral_superposition.compute"):
        choice = compute.resolve_compute("auto", "cpu")
        compute.resolve_compute("auto", "cpu")
    assert choice.dtype == torch.bfloat16
    assert "native bf16" in choice.reason and "amx_bf16" in choice.reason
    logs = [r.getMessage() for r in caplog.records if "dtype auto" in r.getMessage()]
    assert logs == [f"dtype auto -> bfloat16: {choice.reason}"]  # once, with its reason


def test_auto_cpu_avx2_only_is_float32(cpu, caplog):
    cpu(AVX2, "AVX2", onednn=False)
    with caplog.at_level(logging.INFO, logger="integral_superposition.compute"):
        assert compute.resolve_dtype("auto", "cpu") == torch.float32
    assert any(
        "dtype auto -> float32: this CPU has no native bf16" in r.getMessage()
        for r in caplog.records
    )


def test_auto_cpu_avx512_without_bf16_is_float32(cpu):
    # AVX-512 alone (Skylake/Cascade Lake): oneDNN emulates bf16, no native kernels
    cpu(AVX2 | {"avx512f", "avx512bw"}, "AVX512", onednn=True)
    assert compute.resolve_dtype("auto", "cpu") == torch.float32


def test_auto_cpu_with_bf16_flags_but_torch_capped_is_float32(cpu):
    cpu(SAPPHIRE, "AVX2", onednn=False)  # what ATEN_CPU_CAPABILITY=avx2 reports
    native, why = compute.cpu_bf16_support()
    assert not native and "CPU capability AVX2" in why


def test_auto_cpu_without_flags_uses_the_timed_probe(cpu):
    cpu(set(), "DEFAULT", onednn=None, slowdown=40.0)
    assert compute.resolve_dtype("auto", "cpu") == torch.float32
    cpu(set(), "DEFAULT", onednn=None, slowdown=0.6)
    assert compute.resolve_dtype("auto", "cpu") == torch.bfloat16


def test_env_override_forces_each_branch(cpu, monkeypatch):
    cpu(AVX2, "AVX2", onednn=False)
    monkeypatch.setenv(compute.CPU_BF16_ENV, "1")
    assert compute.resolve_compute("auto", "cpu").dtype == torch.bfloat16
    assert compute.cpu_bf16_support() == (True, "ISUP_CPU_BF16=1")
    cpu(SAPPHIRE, "AVX512")
    monkeypatch.setenv(compute.CPU_BF16_ENV, "0")
    assert compute.resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setenv(compute.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="ISUP_CPU_BF16='yes': expected 1"):
        compute.resolve_dtype("auto", "cpu")


def test_explicit_bf16_on_a_slow_cpu_runs_with_a_warning(cpu, caplog):
    cpu(AVX2, "AVX2", onednn=False, slowdown=95.0)
    with caplog.at_level(logging.WARNING, logger="integral_superposition.compute"):
        choice = compute.resolve_compute("bf16", "cpu")
    assert choice.dtype == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "about 95x slower than float32" in warned[0]
    assert "dtype='bf16'" in warned[0]
    caplog.clear()
    cpu(SAPPHIRE, "AVX512")
    with caplog.at_level(logging.WARNING, logger="integral_superposition.compute"):
        assert compute.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert not caplog.records


def test_explicit_names_and_errors(cpu):
    cpu(SAPPHIRE, "AVX512")
    for name, dt in [
        ("fp32", torch.float32),
        ("float32", torch.float32),
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        (torch.float32, torch.float32),
    ]:
        assert compute.resolve_dtype(name, "cpu") == dt
    with pytest.raises(ValueError, match="dtype='int8': expected 'auto', 'fp32'"):
        compute.resolve_dtype("int8", "cpu")
    with pytest.raises(ValueError, match=r"model\.dtype=torch\.int32"):
        compute.parse_dtype(torch.int32, "model.dtype")


def test_gpu_branches(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Test GPU")
    compute._LOGGED.clear()
    assert compute.resolve_device("auto") == torch.device("cuda:0")
    assert compute.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="device='cuda:2': this machine has 2 CUDA"):
        compute.resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    choice = compute.resolve_compute("auto", "auto")
    assert (choice.device.type, choice.dtype) == ("cuda", torch.bfloat16)
    assert "Test GPU supports bf16" in choice.describe()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert compute.resolve_dtype("auto", "cuda") == torch.float16
    assert compute.resolve_dtype("fp32", "cuda") == torch.float32

    # the SAE encode never runs in fp16: auto falls back to float32 there
    def encode_dtype(dtype):
        return compute.resolve_dtype(dtype, "cuda", arg="encode_dtype", fp16=False)

    assert encode_dtype("auto") == torch.float32
    with pytest.raises(ValueError, match="encode_dtype='fp16'"):
        encode_dtype("fp16")


def test_resolve_device_errors_and_default():
    if not torch.cuda.is_available():
        assert compute.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="device='cuda': CUDA is not available"):
            compute.resolve_device("cuda")
    with pytest.raises(ValueError, match="device='gpu0': expected 'auto', 'cpu'"):
        compute.resolve_device("gpu0")
    assert compute.resolve_device("auto", default=torch.device("meta")).type == "meta"
    assert compute.resolve_device(None) == compute.resolve_device("auto")


def test_config_defaults_are_auto(cpu, monkeypatch):
    from integral_superposition.analysis.params import AnalysisParams
    from integral_superposition.experiment import ModelSpec, load_preset
    from integral_superposition.sae.encode import SparseEncoder
    from integral_superposition.sae.model import SparseAutoencoder

    assert ModelSpec().dtype == "auto" and load_preset("default").model.dtype == "auto"
    assert AnalysisParams().encode_dtype == "auto"
    sae = SparseAutoencoder(16, 32, architecture="topk", top_k=4)
    cpu(SAPPHIRE, "AVX512")
    assert SparseEncoder(sae, "auto").dtype == torch.bfloat16
    cpu(AVX2, "AVX2", onednn=False)
    assert SparseEncoder(sae, "auto").dtype == torch.float32
    if not torch.cuda.is_available():
        assert ModelSpec().resolved_device_map() is None


def test_avx2_emulation_has_no_native_bf16():
    """Under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` the rule sees no native bf16
    (whatever this CPU has), as on a plain AVX2 machine."""
    env = {k: v for k, v in os.environ.items() if k != compute.CPU_BF16_ENV}
    env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    code = (
        "import torch; from integral_superposition import compute;"
        "print(compute.resolve_dtype('auto', 'cpu'), compute.cpu_bf16_support()[1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("torch.float32 this CPU has no native bf16"), out.stdout


def test_model_dtype_auto_follows_the_cpu(monkeypatch):
    from integral_superposition.backends import load_backend

    monkeypatch.setenv(compute.CPU_BF16_ENV, "0")
    assert load_backend("tiny:gemma", dtype="auto").dtype == torch.float32
    monkeypatch.setenv(compute.CPU_BF16_ENV, "1")
    assert load_backend("tiny:gemma", dtype="auto").dtype == torch.bfloat16


def test_model_cache_identity_names_the_dtype_auto_picks(monkeypatch):
    from integral_superposition.experiment import ModelSpec
    from integral_superposition.tasks.refs import ModelRef

    auto = ModelRef(spec=ModelSpec(model_id="tiny:gemma"), stamp="s")
    monkeypatch.setenv(compute.CPU_BF16_ENV, "0")
    fp32 = ModelRef(spec=ModelSpec(model_id="tiny:gemma", dtype="fp32"), stamp="s")
    assert auto.cache_identity() == fp32.cache_identity()
    monkeypatch.setenv(compute.CPU_BF16_ENV, "1")
    bf16 = ModelRef(spec=ModelSpec(model_id="tiny:gemma", dtype="bf16"), stamp="s")
    assert auto.cache_identity() == bf16.cache_identity() != fp32.cache_identity()


def test_loading_a_model_in_bf16_on_a_cpu_without_it_warns(cpu, caplog):
    from integral_superposition.backends import load_backend

    cpu(AVX2, "AVX2", onednn=False, slowdown=60.0)
    with caplog.at_level(logging.WARNING, logger="integral_superposition.compute"):
        backend = load_backend("tiny:gemma", dtype="bf16")
    assert backend.dtype == torch.bfloat16  # it runs, as asked
    assert any("about 60x slower than float32" in r.getMessage() for r in caplog.records)


def test_training_autocast_auto_is_on_for_a_bf16_gpu_only(monkeypatch):
    from integral_superposition.config import SAEConfig
    from integral_superposition.sae.trainee import autocast_enabled

    cfg = SAEConfig()
    assert cfg.autocast_bf16 is None
    assert autocast_enabled(cfg, torch.device("cpu")) is False
    assert autocast_enabled(SAEConfig(autocast_bf16=True), torch.device("cpu")) is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_enabled(cfg, torch.device("cuda:0")) is True
    assert autocast_enabled(SAEConfig(autocast_bf16=False), torch.device("cuda:0")) is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert autocast_enabled(cfg, torch.device("cuda:0")) is False
