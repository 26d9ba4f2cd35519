"""The dead-latent window scales with the run, so AuxK engages within short runs."""

from __future__ import annotations

import pytest
import torch
from integral_superposition import SAEConfig
from integral_superposition.config import dead_window
from integral_superposition.dump.synthetic import (
    sparse_dictionary_activations,
    write_activation_store,
)
from integral_superposition.sae import read_sae_manifest
from integral_superposition.sae.train import train_saes


def test_dead_window_rule():
    cfg = SAEConfig(batch_size=4096)
    assert dead_window(cfg, 34) == 4 * 4096  # a 139k-token run: four batches
    assert dead_window(cfg, 1000) == 409_600  # a tenth of the run
    assert dead_window(cfg, 10**6) == 10_000_000  # capped
    assert dead_window(cfg.model_copy(update={"dead_tokens": 123}), 34) == 123


def test_dead_window_engages_in_short_run(tmp_path):
    """4 features in 16 dimensions cannot keep 128 latents alive: within 200 steps the log
    reports dead latents and AuxK trains on them, with the default window."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, _ = sparse_dictionary_activations(13000, 16, 4, 1.0)
        store = write_activation_store(x, str(tmp_path / "acts"))
        cfg = SAEConfig(
            k=128, architecture="topk", top_k=2, batch_size=64, epochs=1, test_fraction=0.01,
            lr=1e-2, lr_warmup_steps=10, log_every=20, checkpoint_every=1000,
        )  # fmt: skip
        assert cfg.dead_tokens is None
        (res,) = train_saes(store, [cfg], [str(tmp_path / "sae")], progress=False, evaluate=False)
    finally:
        torch.set_num_threads(n)
    assert 190 <= res.steps <= 210
    curve = read_sae_manifest(str(tmp_path / "sae"))["training_curve"]
    assert curve[-1]["dead_tokens"] == dead_window(cfg, res.steps) < 1_000_000
    assert curve[-1]["dead_frac"] > 0
    assert max(e["aux_loss"] for e in curve) > 0
    assert res.metrics["train_dead_frac"] == pytest.approx(curve[-1]["dead_frac"])
