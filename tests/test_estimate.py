"""The run-time estimate of ``isup run``'s first line: it scales with the work and the speed."""

from __future__ import annotations

import pytest
import torch
from integral_superposition.compute import ComputeChoice
from integral_superposition.estimate import (
    BUSY_SHARE,
    REFERENCE_GFLOPS,
    REFERENCE_S,
    REFERENCE_STEER_WORK,
    REFERENCE_TOKENS,
    SpeedProbe,
    data_tokens,
    estimate_run,
    matmul_gflops,
    matmul_probe,
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
    for step in ("dump", "train", "analyze", "report"):
        assert default.steps[step] == pytest.approx(REFERENCE_S[step]), step
    # the steering step scales by its work over the sweep the reference time was measured on
    work = steering_tokens(load_preset("default").steering) / REFERENCE_STEER_WORK
    assert work > 1 and default.steps["steer"] == pytest.approx(REFERENCE_S["steer"] * work)
    assert thorough.steps["steer"] > 5 * default.steps["steer"]
    assert thorough.steps["merge"] > default.steps["merge"]
    fast = estimate_run(load_preset("default"), CPU32, gflops=4 * REFERENCE_GFLOPS)
    for step in ("dump", "train", "analyze", "merge", "steer"):
        assert abs(fast.steps[step] * 4 - default.steps[step]) < 1e-6, step
    assert fast.steps["start"] == default.steps["start"]  # start-up does not scale
    bigger = estimate_run(
        load_preset("default", ["data.source=demo:8000", "sae.k=4096"]),
        CPU32,
        gflops=REFERENCE_GFLOPS,
    )
    assert bigger.steps["train"] == 4 * default.steps["train"]
    skipped = estimate_run(
        load_preset("default", ["steps.merge=false"]), CPU32, gflops=REFERENCE_GFLOPS
    )
    assert "merge" not in skipped.steps


def test_a_slow_model_dtype_slows_the_model_steps_only():
    bf16 = ComputeChoice(torch.device("cpu"), torch.bfloat16, "slow", "bf16")
    fine = estimate_run(load_preset("default"), bf16, gflops=75.0, sae_gflops=75.0)
    slow = estimate_run(load_preset("default"), bf16, gflops=0.75, sae_gflops=75.0)
    assert slow.steps["dump"] == 100 * fine.steps["dump"]
    assert slow.steps["steer"] == pytest.approx(100 * fine.steps["steer"])
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
    forced = s.model_copy(update={"classifier_abstain": False})
    assert steering_tokens(forced) < steering_tokens(s)
    piloted = s.model_copy(update={"pilot_candidates": 3})
    pilot = 2 * 3 * len(s.pilot_strengths) * 12 * s.pilot_samples * s.max_new_tokens
    assert steering_tokens(piloted) == pytest.approx(steering_tokens(s) + pilot)
    longer = s.model_copy(update={"max_new_tokens": 24})
    assert steering_tokens(longer) == 2 * steering_tokens(s)
    e = estimate_run(
        load_preset("default", ["steering.max_new_tokens=24"]), CPU32, gflops=REFERENCE_GFLOPS
    )
    work = steering_tokens(s) / REFERENCE_STEER_WORK
    assert e.steps["steer"] == pytest.approx(2 * REFERENCE_S["steer"] * work)


def test_the_steering_reference_is_the_measured_sweep():
    """``REFERENCE_STEER_WORK`` is the work of the sweep ``REFERENCE_S["steer"]`` was measured
    on (the default, with the classifier's "none" class, before the refinement and the
    confirmation), and a sweep without that class estimates less."""
    s = load_preset("default").steering
    measured = s.model_copy(update={"refine": 0, "confirm": False})
    assert steering_tokens(measured) == REFERENCE_STEER_WORK
    # a refinement round and the confirmation each add a set per latent; the confirmation
    # also the unsteered model's set on its samples
    full_set = 12 * s.samples_per_prompt * s.max_new_tokens
    assert steering_tokens(s) == pytest.approx(
        REFERENCE_STEER_WORK + (2 * (s.refine + 1) + 1) * full_set
    )
    # each further draw of random latents adds a set per latent (two labels)
    assert s.random_draws == 1
    drawn = s.model_copy(update={"random_draws": 3})
    assert steering_tokens(drawn) == pytest.approx(steering_tokens(s) + 2 * 2 * full_set)
    forced = load_preset("default", ["steering.classifier_abstain=false"])
    e = estimate_run(forced, CPU32, gflops=REFERENCE_GFLOPS)
    assert e.steps["steer"] == pytest.approx(
        REFERENCE_S["steer"] * steering_tokens(forced.steering) / REFERENCE_STEER_WORK
    )
    default = estimate_run(load_preset("default"), CPU32, gflops=REFERENCE_GFLOPS)
    assert e.steps["steer"] < default.steps["steer"]


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


FLOPS = 2.0 * 1024 * 640 * 2048


def test_a_probe_on_a_busy_machine_is_timed_by_its_cpu_time():
    """A probe that got a tenth of the CPU it asked for: its wall time says 10x slower than
    the machine is; the speed comes from its CPU time and the line says the machine is busy."""
    fast = (0.010, 0.012, 0.011)  # seconds per product with the cores to itself
    idle = SpeedProbe(FLOPS, fast, tuple(2 * 0.95 * w for w in fast), threads=2)
    assert not idle.busy and idle.cpu_share == pytest.approx(0.95)
    assert idle.gflops == idle.wall_gflops == pytest.approx(FLOPS / 0.010 / 1e9)
    busy = SpeedProbe(FLOPS, tuple(10 * w for w in fast), tuple(2 * w for w in fast), threads=2)
    assert busy.busy and busy.cpu_share == pytest.approx(0.1)
    assert busy.wall_gflops == pytest.approx(idle.wall_gflops / 10)
    assert busy.gflops == pytest.approx(idle.gflops)
    # no CPU time (an accelerator): the wall clock, never busy
    gpu = SpeedProbe(FLOPS, tuple(10 * w for w in fast), None, threads=1)
    assert not gpu.busy and gpu.cpu_share is None and gpu.gflops == busy.wall_gflops

    cfg = load_preset("default")
    quiet = estimate_run(cfg, CPU32, probe=idle)
    loaded = estimate_run(cfg, CPU32, probe=busy)
    assert loaded.total_s == pytest.approx(quiet.total_s)
    assert quiet.line() == f"{quiet.describe()} on this machine"
    assert loaded.line() == (
        f"{quiet.describe()} on this machine when idle; busy now: the speed probe got 10% of "
        "its CPU"
    )
    # what the wall clock alone would have said: several times longer
    by_wall = estimate_run(cfg, CPU32, gflops=busy.wall_gflops)
    assert by_wall.total_s > 5 * loaded.total_s
    assert by_wall.line().endswith("on this machine") and by_wall.cpu_share is None
    # the threshold itself: just below it is busy, at it is not
    edge = SpeedProbe(FLOPS, (1.0,), (2 * BUSY_SHARE,), threads=2)
    assert not edge.busy
    assert SpeedProbe(FLOPS, (1.0,), (2 * BUSY_SHARE - 0.01,), threads=2).busy


def test_probe_timings_are_checked():
    with pytest.raises(ValueError, match=r"wall_s=\(\): expected positive"):
        SpeedProbe(FLOPS, ())
    with pytest.raises(ValueError, match=r"cpu_s=.*one per repeat of wall_s \(2\)"):
        SpeedProbe(FLOPS, (0.1, 0.1), (0.1,))
    with pytest.raises(ValueError, match="threads=0"):
        SpeedProbe(FLOPS, (0.1,), (0.1,), threads=0)
    with pytest.raises(ValueError, match="probe and gflops"):
        estimate_run(load_preset("default"), CPU32, gflops=75.0, probe=SpeedProbe(FLOPS, (0.1,)))


def test_a_cpu_probe_reads_the_cpu_time_of_every_repeat():
    p = matmul_probe(torch.device("cpu"), torch.float32, seconds=0.02)
    assert p.cpu_s is not None and len(p.cpu_s) == len(p.wall_s) >= 1
    assert p.threads == torch.get_num_threads()
    assert 0 < p.cpu_share <= 1
    assert p.gflops >= p.wall_gflops > 0
