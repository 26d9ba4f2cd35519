"""The run-time estimate of ``isup run``'s first line: it scales with the work and the speed."""

from __future__ import annotations

import pytest
import torch
from integral_superposition.compute import ComputeChoice
from integral_superposition.estimate import (
    REFERENCE_GFLOPS,
    REFERENCE_S,
    REFERENCE_TOKENS,
    data_tokens,
    estimate_run,
    matmul_gflops,
    steering_tokens,
)
from integral_superposition.experiment import load_preset

CPU32 = ComputeChoice(torch.device("cpu"), torch.float32, "", "fp32")


def test_estimate_scales_with_work_and_speed():
    default = estimate_run(load_preset("default"), CPU32, gflops=REFERENCE_GFLOPS)
    smoke = estimate_run(load_preset("smoke"), CPU32, gflops=REFERENCE_GFLOPS)
    thorough = estimate_run(load_preset("thorough"), CPU32, gflops=REFERENCE_GFLOPS)
    assert smoke.total_s < 60 < default.total_s < 30 * 60 < thorough.total_s
    # on the reference machine the defaults take the measured reference times
    for step in ("dump", "train", "analyze", "steer", "report"):
        assert default.steps[step] == pytest.approx(REFERENCE_S[step]), step
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


def test_steering_estimate_follows_its_work():
    """Early stopping and the classifier's fitting continuations change the steering work the
    estimate scales by; the default sweep without them is the earlier, larger one."""
    cfg = load_preset("default")
    s = cfg.steering
    old = s.model_copy(update={"early_stop": False, "classifier_fit": "documents"})
    assert steering_tokens(old) > steering_tokens(s)
    more_fit = s.model_copy(update={"classifier_fit_generations": 48})
    assert steering_tokens(more_fit) > steering_tokens(s)
    longer = s.model_copy(update={"max_new_tokens": 24})
    assert steering_tokens(longer) == 2 * steering_tokens(s)
    e = estimate_run(
        load_preset("default", ["steering.max_new_tokens=24"]), CPU32, gflops=REFERENCE_GFLOPS
    )
    assert e.steps["steer"] == pytest.approx(2 * REFERENCE_S["steer"])


def test_a_local_table_is_sized_by_its_texts_capped_at_max_len(tmp_path):
    path = tmp_path / "news.csv"
    rows = ["title,topic"] + [f"{'x' * 39},a" for _ in range(60)] + [f"{'y' * 400},b"] * 40
    path.write_text("\n".join(rows) + "\n")
    cfg = load_preset("default", [f"data.source={path}"])
    # 60 x (ceil(39 / 4) + 1 BOS) + 40 x max_len
    assert data_tokens(cfg.data, 32) == 60 * 11 + 40 * 32
    default = estimate_run(load_preset("default"), CPU32, gflops=REFERENCE_GFLOPS)
    small = estimate_run(cfg, CPU32, gflops=REFERENCE_GFLOPS)
    ratio = (60 * 11 + 40 * 32) / REFERENCE_TOKENS
    for step in ("dump", "train", "analyze"):
        assert small.steps[step] == pytest.approx(default.steps[step] * ratio), step
    assert small.steps["steer"] == default.steps["steer"]  # generation does not scale with data
    given = estimate_run(cfg, CPU32, gflops=REFERENCE_GFLOPS, tokens=2 * REFERENCE_TOKENS)
    assert given.steps["dump"] == pytest.approx(2 * default.steps["dump"])
    # a source not readable without fetching it: the demo's tokens per document
    remote = load_preset("default", ["data.source=s3://bucket/news.csv", "data.max_rows=2000"])
    assert data_tokens(remote.data, 32) is None
    far = estimate_run(remote, CPU32, gflops=REFERENCE_GFLOPS)
    assert far.steps["dump"] == pytest.approx(default.steps["dump"] / 2)
