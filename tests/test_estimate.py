"""The run-time estimate of ``isup run``'s first line: it scales with the work and the speed."""

from __future__ import annotations

import torch
from integral_superposition.compute import ComputeChoice
from integral_superposition.estimate import REFERENCE_GFLOPS, estimate_run, matmul_gflops
from integral_superposition.experiment import load_preset

CPU32 = ComputeChoice(torch.device("cpu"), torch.float32, "", "fp32")


def test_estimate_scales_with_work_and_speed():
    default = estimate_run(load_preset("default"), CPU32, gflops=REFERENCE_GFLOPS)
    smoke = estimate_run(load_preset("smoke"), CPU32, gflops=REFERENCE_GFLOPS)
    thorough = estimate_run(load_preset("thorough"), CPU32, gflops=REFERENCE_GFLOPS)
    assert smoke.total_s < 60 < default.total_s < 8 * 60 < thorough.total_s
    assert thorough.steps["steer"] > 5 * default.steps["steer"]
    assert thorough.steps["merge"] > default.steps["merge"]
    fast = estimate_run(load_preset("default"), CPU32, gflops=4 * REFERENCE_GFLOPS)
    for step in ("dump", "train", "analyze", "merge", "steer"):
        assert abs(fast.steps[step] * 4 - default.steps[step]) < 1e-6, step
    assert fast.steps["start"] == default.steps["start"]  # start-up does not scale
    bigger = estimate_run(
        load_preset("default", ["data.source=demo:8000", "sae.k=4096"]), CPU32, gflops=75.0
    )
    assert bigger.steps["train"] == 4 * default.steps["train"]
    skipped = estimate_run(load_preset("default", ["steps.merge=false"]), CPU32, gflops=75.0)
    assert "merge" not in skipped.steps


def test_a_slow_model_dtype_slows_the_model_steps_only():
    bf16 = ComputeChoice(torch.device("cpu"), torch.bfloat16, "slow", "bf16")
    fine = estimate_run(load_preset("default"), bf16, gflops=75.0, sae_gflops=75.0)
    slow = estimate_run(load_preset("default"), bf16, gflops=0.75, sae_gflops=75.0)
    assert slow.steps["dump"] == 100 * fine.steps["dump"]
    assert slow.steps["steer"] == 100 * fine.steps["steer"]
    assert slow.steps["train"] == fine.steps["train"]
    assert slow.steps["analyze"] == fine.steps["analyze"]
    assert fine.steps["merge"] < slow.steps["merge"] < 100 * fine.steps["merge"]


def test_describe_and_probe():
    e = estimate_run(load_preset("default"), CPU32, gflops=REFERENCE_GFLOPS)
    assert e.describe() == f"about {round(e.total_s / 60)} min"
    assert estimate_run(load_preset("smoke"), CPU32, gflops=75.0).describe().endswith(" s")
    assert matmul_gflops(torch.device("cpu"), torch.float32, seconds=0.02) > 0.1
