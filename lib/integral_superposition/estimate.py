"""How long an experiment will roughly take here, before it runs (``isup run``'s first line).

The estimate scales the measured step times of the default experiment on the reference
machine (2 CPU cores, AVX2 only, float32; ``bench/bench_orchestration.py``) by the work each
step of ``cfg`` does relative to the defaults (documents, dumped layers, latents, epochs,
merges, steered generations) and by this machine's speed: a short matmul probe in the
chosen dtype on the chosen device (about 0.1 s), compared with the reference's. It is meant
to tell minutes from hours, not to be exact.

On a CPU the probe also reads the CPU time the process got (``time.process_time``, all its
threads). When other work holds the cores, the probe's wall time says more about the load
than about the machine: when it got less than ``BUSY_SHARE`` of the CPU it asked for (CPU
seconds over wall seconds times torch's threads), the speed comes from its CPU time instead,
and the estimate says that it holds for the idle machine and how busy the machine is now.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch

from integral_superposition.compute import ComputeChoice, resolve_compute

__all__ = [
    "BUSY_SHARE",
    "Estimate",
    "SpeedProbe",
    "data_tokens",
    "estimate_run",
    "matmul_gflops",
    "matmul_probe",
    "steering_tokens",
]

REFERENCE_GFLOPS = 140.0
"""float32 matmul throughput of the reference machine (2 cores, AVX2), GFLOP/s: the median
of nine speed probes (:func:`matmul_probe`, 96-158 GFLOP/s) on the idle machine and CPU
settings ``REFERENCE_S`` was measured on, just after that run. The same idle VM has probed
anywhere from 126 to 196 GFLOP/s within minutes: an estimate is good to about a third."""

REFERENCE_S = {
    "start": 30.0,
    "load": 15.0,
    "dump": 32.0,
    "train": 21.0,
    "analyze": 58.0,
    "merge": 66.0,
    "steer": 216.0,
    "report": 2.0,
}
"""Seconds of each step of the default experiment on the reference machine: one ``isup run``
on the defaults, on an idle 2-core VM under the AVX2 emulation (CPU capability AVX2, float32;
``bench/bench_orchestration.py --avx2``): 439 s wall, 694 s CPU. The steps are its wall
times; ``start`` (the imports, the temporary Prefect server and the bookkeeping between the
steps) and ``load`` (the model load) share the 45 s outside them."""

REFERENCE_STEER_WORK = 7848.0
"""The steering work (:func:`steering_tokens`) of the sweep ``REFERENCE_S["steer"]`` was
measured on: the default preset's steering (with the classifier's "none" continuations),
before the refinement and the confirmation (``refine=0, confirm=False``), with one draw of
random latents (``random_draws=1``).
Any other sweep is scaled by its work over this one."""

_GPU_SPEEDUP_CAP = 12.0
"""The default steps are small: a GPU's matmul speed does not carry over to them in full."""


BUSY_SHARE = 0.7
"""A probe that got less than this share of the CPU it asked for ran on a busy machine (an
idle 2-core machine gives its 2-thread matmul about 0.95)."""

_PROBE_SHAPE = (1024, 640, 2048)


@dataclass(frozen=True)
class SpeedProbe:
    """Timings of the repeats of one timed matmul: ``flops`` per product, the wall seconds of
    each repeat ``wall_s [R]``, the process CPU seconds of each ``cpu_s [R]`` (None where CPU
    time says nothing of the speed: an accelerator) and the CPU ``threads`` it ran on."""

    flops: float
    wall_s: tuple[float, ...]
    cpu_s: tuple[float, ...] | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        if not self.wall_s or min(self.wall_s) <= 0:
            raise ValueError(f"wall_s={self.wall_s!r}: expected positive seconds per repeat")
        if self.cpu_s is not None and (len(self.cpu_s) != len(self.wall_s) or min(self.cpu_s) < 0):
            raise ValueError(
                f"cpu_s={self.cpu_s!r}: expected non-negative seconds, one per repeat of "
                f"wall_s ({len(self.wall_s)})"
            )
        if self.threads < 1:
            raise ValueError(f"threads={self.threads!r}: expected at least 1")

    @property
    def wall_gflops(self) -> float:
        """GFLOP/s of the fastest repeat by the wall clock."""
        return self.flops / min(self.wall_s) / 1e9

    @property
    def cpu_share(self) -> float | None:
        """CPU seconds over wall seconds times ``threads``, over all repeats (at most 1)."""
        if self.cpu_s is None:
            return None
        return min(1.0, sum(self.cpu_s) / (sum(self.wall_s) * self.threads))

    @property
    def busy(self) -> bool:
        """Whether the probe got less than ``BUSY_SHARE`` of the CPU it asked for."""
        share = self.cpu_share
        return share is not None and share < BUSY_SHARE

    @property
    def gflops(self) -> float:
        """This machine's speed when idle: the wall-clock speed, or on a busy machine the speed
        of the repeat that ran fastest by its CPU seconds spread over ``threads``."""
        if not self.busy:
            return self.wall_gflops
        held = min(c for c in self.cpu_s if c > 0) / self.threads if any(self.cpu_s) else 0.0
        if held <= 0:  # no CPU time measured: the wall clock is all there is
            return self.wall_gflops
        return max(self.wall_gflops, self.flops / held / 1e9)


def matmul_probe(device: torch.device, dtype: torch.dtype, seconds: float = 0.1) -> SpeedProbe:
    """Time ``[1024, 640] @ [640, 2048]`` products in ``dtype`` on ``device``: the repeats
    that fit in about ``seconds`` of wall time, each by the wall clock and, on a CPU, by the
    process's CPU time."""
    m, k, n = _PROBE_SHAPE
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    on_cpu = device.type == "cpu"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up: kernel selection
    sync()
    walls: list[float] = []
    cpus: list[float] = []
    while sum(walls) < seconds or not walls:
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        sync()
        walls.append(max(time.perf_counter() - t0, 1e-9))
        cpus.append(time.process_time() - c0)
        if walls[-1] > seconds:  # a slow path: one product is enough to know
            break
    return SpeedProbe(
        flops=2.0 * m * k * n,
        wall_s=tuple(walls),
        cpu_s=tuple(cpus) if on_cpu else None,
        threads=torch.get_num_threads() if on_cpu else 1,
    )


def matmul_gflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.1) -> float:
    """GFLOP/s of a ``[1024, 640] @ [640, 2048]`` product in ``dtype`` on ``device`` when the
    machine is idle (:attr:`SpeedProbe.gflops` of :func:`matmul_probe`)."""
    return matmul_probe(device, dtype, seconds).gflops


@dataclass(frozen=True)
class Estimate:
    """Estimated seconds per step and in total, with the compute choice it assumed; on a busy
    machine ``cpu_share``, the share of the CPU the speed probe got."""

    steps: dict[str, float]
    choice: ComputeChoice
    gflops: float
    cpu_share: float | None = None

    @property
    def total_s(self) -> float:
        return sum(self.steps.values())

    @property
    def busy(self) -> bool:
        """Whether the speed probe ran on a busy machine (see ``BUSY_SHARE``)."""
        return self.cpu_share is not None and self.cpu_share < BUSY_SHARE

    def describe(self) -> str:
        """``"about 6 min"`` (rounded to what an estimate can say)."""
        return _rounded(self.total_s)

    def line(self) -> str:
        """``"about 6 min on this machine"``; on a busy machine ``"about 23 min on this machine
        when idle; busy now: the speed probe got 15% of its CPU"``."""
        if not self.busy:
            return f"{self.describe()} on this machine"
        return (
            f"{self.describe()} on this machine when idle; busy now: the speed probe got "
            f"{self.cpu_share:.0%} of its CPU"
        )


def _rounded(s: float) -> str:
    if s < 90:
        return f"about {max(10, round(s / 10) * 10):.0f} s"
    if s < 3600:
        return f"about {round(s / 60):.0f} min"
    return f"about {s / 3600:.1f} h"


REFERENCE_TOKENS = 39_733
"""Tokens the default experiment dumps (4,000 demo headlines at ``max_len`` 32)."""

DEMO_TOKENS_PER_DOC = REFERENCE_TOKENS / 4000
"""Mean tokens of a demo headline (with its BOS), from the reference dump."""

CHARS_PER_TOKEN = 4.0
"""Characters per token of English text, for sizing a table's documents before tokenising."""

LOCAL_TABLE_MAX_BYTES = 256 * 2**20
"""Local tables up to this size are read to count their documents and tokens."""


def _n_docs(source: str, max_rows: int | None) -> int | None:
    m = re.fullmatch(r"demo(?::(\d+))?", source)
    n = int(m.group(1) or 4000) if m else None
    if max_rows is not None:
        n = min(n, max_rows) if n is not None else max_rows
    return n


def data_tokens(data, max_len: int) -> float | None:
    """Roughly the tokens a dump of ``data`` (a ``DataSpec``) writes at ``max_len``: the demo
    headlines' measured mean length, or, for a local table of at most
    ``LOCAL_TABLE_MAX_BYTES``, each document's characters over ``CHARS_PER_TOKEN`` plus its
    BOS, capped at ``max_len``. None when the source is not known without fetching it."""
    n = _n_docs(data.source, data.max_rows)
    if re.fullmatch(r"demo(?::\d+)?", data.source):
        return float(n) * min(DEMO_TOKENS_PER_DOC, max_len)
    path = os.path.expanduser(data.source)
    if "://" in data.source or not os.path.isfile(path):
        return None
    if os.path.getsize(path) > LOCAL_TABLE_MAX_BYTES:
        return None
    texts = data.load()[data.text_col].astype(str)
    per_doc = np.minimum(np.ceil(texts.str.len().to_numpy() / CHARS_PER_TOKEN) + 1, max_len)
    return float(per_doc.sum())


def _model_factor(model_id: str) -> float:
    """Forward cost relative to gemma-3-270m (built-in tiny models are about free)."""
    return 0.02 if model_id.startswith("tiny:") else 1.0


def steering_tokens(s, n_labels: int = 8) -> float:
    """Tokens the steering evaluation with ``SteeringParams`` ``s`` generates and scores,
    roughly: its sets of continuations (``max_new_tokens`` each) - the unsteered set, the
    classifier check, the classifier's fitting continuations and its "none" continuations
    (generated but not scored for perplexity: half a continuation's cost), the pilot among
    candidate latents and per steered latent its strengths (with each ``refine`` round, counted
    as run), its confirmation and its controls (``random_draws`` random sets, and the confirmation's
    unsteered set).
    With ``early_stop`` about two strengths of each latent run in full and the others one
    round. ``n_labels``: labels of the data when ``s.labels`` does not say (the demo corpus
    has 8)."""
    n_prompts = len(s.prompts) if s.prompts is not None else 12
    targets = len(s.labels) if s.labels is not None else n_labels
    rounds = s.samples_per_prompt
    full_set = n_prompts * rounds
    n_str = len(s.strengths)
    if getattr(s, "early_stop", False):
        full = min(2, n_str)
        steer = full * full_set + (n_str - full) * n_prompts
    else:
        steer = n_str * full_set
    n_ctrl = 1 if s.control_strengths == "best" else n_str
    refine = getattr(s, "refine", 0)
    confirm = getattr(s, "confirms", False)
    per_latent = (
        steer
        + (refine + confirm) * full_set
        + ("alpha0" in s.controls) * full_set
        + n_ctrl * ("random" in s.controls) * getattr(s, "random_draws", 1) * full_set
        + n_ctrl * ("own_label" in s.controls) * s.own_label_prompts * rounds
    )
    checks = (targets if s.check_labels == "targets" else n_labels) * s.own_label_prompts * rounds
    fit = 0.0
    if getattr(s, "classifier_fit", "documents") != "documents":
        fit = 0.5 * s.classifier_fit_generations * n_labels
    if getattr(s, "classifier_abstain", False):  # the classifier's "none" continuations
        fit += 0.5 * s.classifier_fit_generations
    pilot = 0.0
    if s.latents == "auto" and getattr(s, "pilot_candidates", 1) > s.per_label:
        pilot = targets * s.pilot_candidates * len(s.pilot_strengths) * n_prompts * s.pilot_samples
    total = (1 + confirm) * full_set + checks + fit + pilot + targets * s.per_label * per_latent
    return float(total * s.max_new_tokens)


def estimate_run(
    cfg,
    choice: ComputeChoice | None = None,
    probe_s: float = 0.1,
    gflops: float | None = None,
    sae_gflops: float | None = None,
    tokens: float | None = None,
    probe: SpeedProbe | None = None,
) -> Estimate:
    """Rough seconds per step of ``cfg`` (an ``ExperimentConfig``) on this machine when idle
    (or on one whose matmul runs at ``gflops`` in the model's dtype and ``sae_gflops`` in
    float32, the SAE's; ``REFERENCE_GFLOPS`` gives the reference machine's). ``probe``: the
    timings of a speed probe in the model's dtype (:func:`matmul_probe`, run when neither it
    nor ``gflops`` is given); a probe that ran on a busy machine gives the speed by its CPU time
    and ``Estimate.cpu_share``. The dump, training, analysis and the merge's SAE passes scale
    with the dumped tokens: ``tokens``, else :func:`data_tokens`, else the demo's tokens per
    document."""
    if probe is not None and gflops is not None:
        raise ValueError("probe and gflops: expected one of them, a probe's timings or its speed")
    if choice is None:
        choice = resolve_compute(cfg.model.dtype, cfg.model.device)
    shares: list[float | None] = []
    if gflops is None:
        probe = probe or matmul_probe(choice.device, choice.dtype, probe_s)
        gflops = probe.gflops
        shares.append(probe.cpu_share)
    if sae_gflops is None:
        if choice.dtype == torch.float32 or not probe_s:
            sae_gflops = gflops
        else:
            sae_probe = matmul_probe(choice.device, torch.float32, probe_s)
            sae_gflops = sae_probe.gflops
            shares.append(sae_probe.cpu_share)
    known = [x for x in shares if x is not None]
    cpu_share = min(known) if known else None

    def relative(g: float) -> float:
        s = g / REFERENCE_GFLOPS
        return max(min(s, _GPU_SPEEDUP_CAP) if choice.device.type == "cuda" else s, 1e-3)

    # the model computes in its dtype; SAE training and encoding in float32 (or bf16 where
    # that is native, i.e. no slower)
    speed, sae_speed = relative(gflops), relative(sae_gflops)
    model = _model_factor(cfg.model.model_id)
    if tokens is None:
        try:
            tokens = data_tokens(cfg.data, cfg.dump.max_len)
        except Exception:  # an unreadable table is the dump's error to report, not ours
            tokens = None
    if tokens is None:  # as many documents as the demo's of its length, or max_rows of them
        docs = _n_docs(cfg.data.source, cfg.data.max_rows) or 4000
        tokens = docs * min(DEMO_TOKENS_PER_DOC, cfg.dump.max_len)
    d_ratio = tokens / REFERENCE_TOKENS
    layers = [
        int(h.split(".")[1]) for h in cfg.dump.resolved_hook_points() if h.startswith("layer.")
    ]
    depth = (max(layers) + 1) / 7 if layers else 18 / 7
    jobs = cfg.sae_jobs()
    lat = sum(j.cfg.k for j in jobs) / 2048
    train = sum(j.cfg.k * j.cfg.epochs for j in jobs) / (2048 * 4)
    steps = {
        "start": REFERENCE_S["start"],
        "load": REFERENCE_S["load"] * (0.1 if model < 1 else 1.0),
        "dump": REFERENCE_S["dump"] * d_ratio * depth * model / speed,
        "train": REFERENCE_S["train"] * d_ratio * train / sae_speed,
    }
    if cfg.steps.analyze:
        steps["analyze"] = REFERENCE_S["analyze"] * d_ratio * lat / sae_speed
    if cfg.steps.merge:
        m = cfg.merge
        merges = 2 + (2 * len(m.sweep_fractions) if m.sweep else 0)
        ce = m.ce_docs / 32
        # about half of it is the spliced CE through the model
        per_merge = REFERENCE_S["merge"] / 6 * lat
        steps["merge"] = merges * per_merge * (0.5 * d_ratio / sae_speed + 0.5 * ce / speed)
    if cfg.steps.steer_eval:
        work = steering_tokens(cfg.steering) / REFERENCE_STEER_WORK
        steps["steer"] = REFERENCE_S["steer"] * work * model / speed
    if cfg.steps.report:
        steps["report"] = REFERENCE_S["report"]
    return Estimate(steps=steps, choice=choice, gflops=gflops, cpu_share=cpu_share)
