"""TopK training with a free-norm decoder (``decoder_norm: free``, SAELens's parametrisation)."""

from __future__ import annotations

import pydantic
import pytest
import torch
from integral_superposition import SAEConfig
from integral_superposition.dump.synthetic import (
    sparse_dictionary_activations,
    write_activation_store,
)
from integral_superposition.sae import SparseAutoencoder, load_sae, read_sae_manifest
from integral_superposition.sae.train import train_saes
from integral_superposition.sae.trainee import Trainee, finish, init_trainee

D, N_FEATURES, D_SAE = 32, 48, 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(**kw) -> SAEConfig:
    base = dict(
        k=D_SAE, architecture="topk", top_k=4, batch_size=64, epochs=1, lr=1e-2,
        lr_warmup_steps=10, log_every=20, dead_tokens=2000, refit_decoder=False,
    )  # fmt: skip
    return SAEConfig(**{**base, **kw})


def test_free_decoder_config_is_checked_and_round_trips():
    with pytest.raises(
        pydantic.ValidationError, match="decoder_norm='free' with architecture='relu'"
    ):
        SAEConfig(architecture="relu", decoder_norm="free")
    with pytest.raises(
        pydantic.ValidationError, match=r"decoder_init_norm=0\.1 with decoder_norm='unit'"
    ):
        SAEConfig(architecture="topk", decoder_init_norm=0.1)
    with pytest.raises(pydantic.ValidationError, match="decoder_norm"):
        SAEConfig(architecture="topk", decoder_norm="sphere")
    with pytest.raises(pydantic.ValidationError, match="decoder_init_norm"):
        SAEConfig(architecture="topk", decoder_norm="free", decoder_init_norm=0.0)
    cfg = _cfg(decoder_norm="free", decoder_init_norm=0.1)
    assert SAEConfig.model_validate_json(cfg.model_dump_json()) == cfg
    assert cfg.schedule().decoder_norm == "free"


def test_free_decoder_ranks_by_row_norm():
    """Latent 0 has the larger pre-activation, latent 1 the larger pre-activation times norm."""
    sae = SparseAutoencoder(2, 2, architecture="topk", top_k=1, seed=0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    sae.train()
    x = torch.tensor([[2.0, 1.0]])
    for sparse in (False, True):
        assert int(sae(x, sparse_decode=sparse).top_indices) == 0
    sae.rank_by_decoder_norm = True
    for sparse in (False, True):
        out = sae(x, sparse_decode=sparse)
        assert int(out.top_indices) == 1
        # the value is the plain pre-activation, decoded by the row as it is
        assert torch.allclose(out.x_hat, torch.tensor([[0.0, 3.0]]))


def test_finish_folds_the_norms_exactly():
    """The SAE saved after free-norm training gives the training forward's reconstruction."""
    torch.manual_seed(0)
    cfg = _cfg(decoder_norm="free", decoder_init_norm=0.1, normalize_activations=False)
    sae = SparseAutoencoder(D, D_SAE, architecture="topk", top_k=4, seed=0)
    t = Trainee(cfg, sae, "h", torch.device("cpu"))
    x = torch.randn(256, D)
    init_trainee(t, x, init_b_dec=True)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((D_SAE,), 0.1))
    assert torch.allclose(sae.W_enc.norm(dim=0), torch.full((D_SAE,), 0.1))
    with torch.no_grad():  # rows of unequal norms, as training leaves them
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 20 + 0.5)
        sae.b_enc.copy_(torch.randn(D_SAE) * 0.01)
    sae.train()
    with torch.no_grad():
        want = sae(x, sparse_decode=False).x_hat
    finish(t)
    assert not sae.rank_by_decoder_norm
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(sae.reconstruct(x), want, atol=1e-4)


def test_free_decoder_steps_leave_rows_free_and_unit_steps_do_not(tmp_path):
    x = torch.randn(512, D) * 3 + 1
    norms = {}
    for mode, init in (("unit", 1.0), ("free", 0.1)):
        cfg = _cfg(decoder_norm=mode, decoder_init_norm=init)
        sae = SparseAutoencoder(D, D_SAE, architecture="topk", top_k=4, seed=0)
        t = Trainee(cfg, sae, "h", torch.device("cpu"))
        init_trainee(t, x, init_b_dec=True)
        t.start(10, 0)
        for step in range(10):
            t.step(x[64 * step % 512 :][:64], step, 10)
        norms[mode] = sae.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms["unit"], torch.ones(D_SAE), atol=1e-5)
    # unconstrained rows move away from their initial norm (Adam steps of ~lr per entry)
    assert float((norms["free"] - 0.1).abs().max()) > 0.01


@pytest.fixture(scope="module")
def dictionary_store(tmp_path_factory):
    x, feats = sparse_dictionary_activations(8000, D, N_FEATURES, 3.0, offset=0.2, scale=100.0)
    return write_activation_store(x, str(tmp_path_factory.mktemp("dict") / "acts")), feats


def test_free_decoder_trains_saves_and_loads(dictionary_store, tmp_path):
    store, feats = dictionary_store
    cfgs = [_cfg(epochs=2), _cfg(epochs=2, decoder_norm="free", decoder_init_norm=0.1)]
    unit, free = train_saes(
        store, cfgs, [str(tmp_path / "unit"), str(tmp_path / "free")], progress=False
    )
    a, b = load_sae(unit.uri), load_sae(free.uri)
    assert torch.allclose(b.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-4)
    assert not torch.allclose(a.W_enc, b.W_enc, atol=1e-3)  # the same seed and batches
    saved = read_sae_manifest(free.uri)["config"]
    assert saved["decoder_norm"] == "free" and saved["decoder_init_norm"] == 0.1
    assert SAEConfig.model_validate(saved) == cfgs[1]
    # it learns the dictionary: decoder rows close to the true features, most variance explained
    w = b.W_dec.detach()
    assert float((feats @ w.T).max(dim=1).values.mean()) >= 0.9
    assert free.metrics["explained_variance"] > 0.5


def test_a_free_decoder_step_is_saelens_topk_step():
    """From the same weights and batch, one Adam step of ours (``decoder_norm: free``) and one
    of SAELens's ``TopKTrainingSAE`` (``rescale_acts_by_decoder_norm``) give the same weights;
    the unit-norm trainer's step does not. (One step: Adam's first update hardly depends on the
    loss's scale, ours being divided by ``d_in``; our clip at 1.0 does not bind, so that
    Adam's eps, which weighs more on our smaller gradients, stays within the tolerance.)"""
    pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    names = ("W_enc", "W_dec", "b_enc", "b_dec")
    torch.manual_seed(0)
    x = torch.randn(128, D) * 2 + 0.5
    free = _cfg(
        decoder_norm="free", decoder_init_norm=0.1, normalize_activations=False, lr=1e-3,
        lr_warmup_steps=0, lr_decay_frac=0.0, max_norm_factor=None, grad_clip=1.0,
    )  # fmt: skip
    ours = SparseAutoencoder(D, D_SAE, architecture="topk", top_k=4, seed=0)
    t = Trainee(free, ours, "h", torch.device("cpu"))
    init_trainee(t, x, init_b_dec=True)
    with torch.no_grad():  # rows of unequal norms, so that the ranking by norm matters
        ours.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    start = {n: getattr(ours, n).detach().clone() for n in names}
    ref = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=D_SAE, k=4, dtype="float32"))
    with torch.no_grad():
        for n in names:
            getattr(ref, n).copy_(start[n])
    t.dead_tokens = 10**9  # no latent is dead yet: no AuxK term on either side
    t.start(1, 0)
    t.step(x, 0, 1)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3, betas=(0.9, 0.999))
    out = ref.training_forward_pass(TrainStepInput(x, {}, None, 0, False))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()
    for n in names:
        # within 5% of one step (lr): Adam's eps weighs more on our loss, divided by d_in
        diff = (getattr(ours, n).detach() - getattr(ref, n).detach()).abs()
        assert float(diff.max()) < 0.05 * 1e-3, n
    unit_cfg = free.model_copy(update={"decoder_norm": "unit", "decoder_init_norm": 1.0})
    unit = SparseAutoencoder(D, D_SAE, architecture="topk", top_k=4, seed=0)
    with torch.no_grad():
        for n in names:
            getattr(unit, n).copy_(start[n])
    tu = Trainee(unit_cfg, unit, "h", torch.device("cpu"))
    tu.dead_tokens = 10**9
    tu.start(1, 0)
    tu.step(x, 0, 1)
    assert float((unit.W_enc.detach() - ref.W_enc.detach()).abs().max()) > 1e-3
