"""Gradient-norm clipping: ``grad_clip: auto`` (1 / d_in), a number, or 0 (off)."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch
from integral_superposition import SAEConfig
from integral_superposition.config import grad_clip_norm
from integral_superposition.dump.synthetic import (
    sparse_dictionary_activations,
    write_activation_store,
)
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.sae.checkpoint import run_fingerprint
from integral_superposition.sae.train import train_saes
from integral_superposition.sae.trainee import Trainee, init_trainee

D, D_SAE = 32, 64


def _cfg(**kw) -> SAEConfig:
    base = dict(
        k=D_SAE, architecture="topk", top_k=4, batch_size=64, epochs=1, lr=1e-2,
        lr_warmup_steps=0, log_every=20, dead_tokens=2000, refit_decoder=False,
    )  # fmt: skip
    return SAEConfig(**{**base, **kw})


def test_grad_clip_values_resolve_and_round_trip():
    assert SAEConfig().grad_clip == "auto"
    assert grad_clip_norm(SAEConfig(), 640) == 1 / 640
    assert grad_clip_norm(SAEConfig(grad_clip=0.25), 640) == 0.25
    assert grad_clip_norm(SAEConfig(grad_clip=0), 640) == 0.0
    assert SAEConfig(grad_clip="0.5").grad_clip == 0.5  # YAML may hand a number as text
    for v in ("auto", 1.0, 0.0):
        cfg = SAEConfig(grad_clip=v)
        assert SAEConfig.model_validate_json(cfg.model_dump_json()) == cfg
    # a config or checkpoint written when grad_clip was a plain float keeps its meaning
    old = SAEConfig.model_validate({**SAEConfig().model_dump(), "grad_clip": 1.0})
    assert old.grad_clip == 1.0 and grad_clip_norm(old, 640) == 1.0
    assert run_fingerprint([old], {}, {})["cfgs"][0]["grad_clip"] == 1.0


@pytest.mark.parametrize("bad", ["sometimes", -1.0, math.inf, math.nan, True, [1.0]])
def test_bad_grad_clip_is_refused_naming_it(bad):
    with pytest.raises(pydantic.ValidationError, match=r"grad_clip=.*expected 'auto' or"):
        SAEConfig(grad_clip=bad)
    cfg = SAEConfig()
    with pytest.raises(pydantic.ValidationError, match="grad_clip"):
        cfg.grad_clip = bad
    assert cfg.grad_clip == "auto"


def _grad_norm_after_step(grad_clip) -> float:
    """One training step from the same start; the gradient norm the optimiser stepped on."""
    torch.manual_seed(0)
    x = torch.randn(256, D) * 3 + 1
    sae = SparseAutoencoder(D, D_SAE, architecture="topk", top_k=4, seed=0)
    t = Trainee(_cfg(grad_clip=grad_clip), sae, "h", torch.device("cpu"))
    init_trainee(t, x, init_b_dec=True)
    t.start(4, 0)
    t.step(x[:64], 0, 4)
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


def test_auto_clips_at_one_over_d_in():
    raw = _grad_norm_after_step(0)
    assert raw > 2 / D  # the unclipped gradient is larger than the clip
    assert _grad_norm_after_step("auto") == pytest.approx(1 / D, rel=1e-4)
    assert _grad_norm_after_step(1 / D) == pytest.approx(1 / D, rel=1e-4)
    assert _grad_norm_after_step(10.0) == pytest.approx(raw, rel=1e-5)  # does not bind


def test_train_saes_records_the_resolved_clip(tmp_path):
    x, _ = sparse_dictionary_activations(3000, D, 48, 3.0, offset=0.2, scale=100.0)
    store = write_activation_store(x, str(tmp_path / "acts"))
    auto, fixed = train_saes(
        store,
        [_cfg(), _cfg(grad_clip=0.5)],
        [str(tmp_path / "auto"), str(tmp_path / "fixed")],
        progress=False,
        evaluate=False,
    )
    assert auto.metrics["train_grad_clip"] == pytest.approx(1 / D)
    assert fixed.metrics["train_grad_clip"] == 0.5
