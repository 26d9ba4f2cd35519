"""SAEConfig: one flat constructor over two parts, the architecture and the training schedule."""

from __future__ import annotations

import pydantic
import pytest
import torch
import yaml
from integral_superposition import SAEArchitectureConfig, SAEConfig, TrainSchedule
from integral_superposition.experiment import ExperimentConfig
from integral_superposition.sae import SparseAutoencoder, load_sae
from integral_superposition.sae.checkpoint import run_fingerprint
from integral_superposition.sae.train import train_sae, train_saes

# The flat fields before the split: configs, manifests and checkpoint fingerprints use them.
FLAT_FIELDS = {
    "k", "architecture", "top_k", "lr", "l1", "epochs", "batch_size", "train_tokens",
    "hook_point", "seed", "lr_warmup_steps", "lr_decay_frac", "l1_warmup_frac", "grad_clip",
    "auxk_coef", "aux_k", "dead_tokens", "jumprelu_bandwidth", "jumprelu_init_threshold",
    "jumprelu_sparsity", "jumprelu_tanh_scale", "jumprelu_ste_to_input", "jumprelu_pre_act_coef",
    "normalize_activations", "max_norm_factor", "autocast_bf16", "sparse_decode", "device",
    "checkpoint_every", "log_every", "test_fraction", "shuffle_buffer_tokens",
}  # fmt: skip


def test_the_parts_cover_the_flat_fields_once():
    arch, sched = set(SAEArchitectureConfig.model_fields), set(TrainSchedule.model_fields)
    assert not arch & sched
    newer = {"refit_decoder", "decoder_norm", "decoder_init_norm"}
    assert arch | sched == set(SAEConfig.model_fields) == FLAT_FIELDS | newer
    assert arch == {"k", "architecture", "top_k", "jumprelu_bandwidth", "jumprelu_init_threshold"}


def test_seed_call_and_parts_round_trip():
    cfg = SAEConfig(k=64, lr=1e-3, l1=0.01, epochs=3)
    assert (cfg.k, cfg.d_sae, cfg.lr, cfg.l1, cfg.epochs) == (64, 64, 1e-3, 0.01, 3)
    arch, sched = cfg.architecture_config(), cfg.schedule()
    assert type(arch) is SAEArchitectureConfig and type(sched) is TrainSchedule
    assert arch.k == 64 and sched.lr == 1e-3 and not hasattr(sched, "k")
    assert SAEConfig.from_parts(arch, sched) == cfg
    # an SAEConfig passed as the architecture contributes only its architecture fields
    other = SAEConfig(k=32, lr=5e-2)
    joined = SAEConfig.from_parts(other, sched)
    assert joined.k == 32 and joined.lr == 1e-3
    with pytest.raises(TypeError, match="architecture: expected an SAEArchitectureConfig"):
        SAEConfig.from_parts(sched)  # type: ignore[arg-type]


def test_top_k_is_checked_on_every_part_that_holds_it():
    for cls in (SAEConfig, SAEArchitectureConfig):
        with pytest.raises(pydantic.ValidationError, match=r"top_k=8: expected top_k <= k"):
            cls(k=4, top_k=8, architecture="topk")
    # the model applies the same rule with the same words
    with pytest.raises(
        ValueError, match=r"top_k=8: expected top_k <= k \(the number of latents, 4\)"
    ):
        SparseAutoencoder(16, 4, architecture="topk", top_k=8)
    with pytest.raises(pydantic.ValidationError, match="refit_decoder"):
        TrainSchedule(refit_decoder="sometimes")


def test_yaml_configs_keep_working():
    raw = yaml.safe_load("sae: {k: 256, lr: 0.002, architecture: topk, top_k: 8}\n"
                         "sweep: {k: [128, 256]}")  # fmt: skip
    exp = ExperimentConfig.model_validate(raw)
    assert exp.sae.k == 256 and exp.sae.architecture_config().top_k == 8
    assert exp.sae.schedule().lr == 0.002


def test_model_from_config_and_back():
    cfg = SAEConfig(k=48, architecture="jumprelu", jumprelu_bandwidth=0.01)
    sae = SparseAutoencoder.from_config(16, cfg.architecture_config(), seed=3)
    assert (sae.d_in, sae.d_sae, sae.architecture, sae.bandwidth) == (16, 48, "jumprelu", 0.01)
    same = SparseAutoencoder(16, 48, architecture="jumprelu", jumprelu_bandwidth=0.01, seed=3)
    assert torch.equal(sae.W_dec, same.W_dec)
    assert sae.architecture_config() == cfg.architecture_config()
    with pytest.raises(TypeError, match="arch: expected an SAEArchitectureConfig"):
        SparseAutoencoder.from_config(16, {"k": 48})  # type: ignore[arg-type]


def test_fingerprint_keys_are_the_flat_fields_so_older_checkpoints_resume():
    fp = run_fingerprint([SAEConfig()], {"kind": "store"}, {})
    assert set(fp["cfgs"][0]) == FLAT_FIELDS - {"checkpoint_every", "log_every", "device"}
    # a free-norm decoder run is another run: its checkpoint does not resume a unit-norm one
    free = SAEConfig(architecture="topk", decoder_norm="free", decoder_init_norm=0.1)
    fp_free = run_fingerprint([free], {"kind": "store"}, {})["cfgs"][0]
    assert (fp_free["decoder_norm"], fp_free["decoder_init_norm"]) == ("free", 0.1)


def test_saved_sae_depends_on_the_architecture_only(tmp_path):
    x = torch.randn(2048, 8)
    cfgs = [
        SAEConfig(k=16, architecture="topk", top_k=4, batch_size=256, epochs=1, lr=1e-3),
        SAEConfig(k=16, architecture="topk", top_k=4, batch_size=256, epochs=1, lr=5e-3),
    ]
    a, _ = train_saes(x, cfgs, [str(tmp_path / "a"), str(tmp_path / "b")], progress=False)
    cfg_a = (tmp_path / "a" / "cfg.json").read_text()
    assert cfg_a == (tmp_path / "b" / "cfg.json").read_text()  # other schedule, same cfg.json
    assert load_sae(a.uri).architecture_config() == cfgs[0].architecture_config()


def test_train_sae_default_config_comes_from_the_model():
    model = SparseAutoencoder(8, 16, architecture="topk", top_k=4)
    res = train_sae(model, torch.randn(1024, 8), None, "cpu", progress=False)
    assert res.config.architecture_config() == model.architecture_config()
