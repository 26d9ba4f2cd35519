"""SAE training: every architecture recovers a known sparse dictionary; the seed's call works."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from integral_superposition import SAEConfig, storage
from integral_superposition.dump.synthetic import (
    sparse_dictionary_activations,
    write_activation_store,
)
from integral_superposition.sae import SparseAutoencoder, load_sae, load_sparsity, read_sae_manifest
from integral_superposition.sae.schedule import lr_at, lr_scheduler, sparsity_coef_at
from integral_superposition.sae.train import TrainResult, train_sae, train_saes

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
D, N_FEATURES, D_SAE = 32, 48, 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices gain nothing from threads, and thread hand-offs dominate on busy CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(arch: str, **kw) -> SAEConfig:
    per_arch = {
        "relu": {"l1": 0.1},
        "topk": {"top_k": 4},
        "batchtopk": {"top_k": 4},
        "jumprelu": {"l1": 0.03, "jumprelu_init_threshold": 0.1, "jumprelu_bandwidth": 0.1},
    }[arch]
    base = dict(
        k=D_SAE, architecture=arch, batch_size=64, epochs=2, lr=1e-2, lr_warmup_steps=10,
        log_every=20, dead_tokens=2000,
    )  # fmt: skip
    return SAEConfig(**{**base, **per_arch, **kw})


@pytest.fixture(scope="module")
def dictionary_store(tmp_path_factory):
    """16,000 tokens built from 48 known features in 32 dimensions (3 active per token), offset
    from the origin and far from unit scale."""
    x, feats = sparse_dictionary_activations(16000, D, N_FEATURES, 3.0, offset=0.2, scale=100.0)
    store = write_activation_store(x, str(tmp_path_factory.mktemp("dict") / "acts"))
    return store, feats


@pytest.fixture(scope="module")
def trained(dictionary_store, tmp_path_factory):
    """All four architectures trained in one pass over the stream."""
    store, _ = dictionary_store
    out = tmp_path_factory.mktemp("saes")
    logs: list[tuple[int, dict]] = []
    progress: list[tuple[int, int, str | None]] = []
    results = train_saes(
        store,
        [_cfg(a) for a in ARCHS],
        [str(out / a) for a in ARCHS],
        checkpoint_uri=str(out / "ckpt"),
        progress=False,
        on_log=lambda step, m: logs.append((step, m)),
        on_progress=lambda step, total, phase=None: progress.append((step, total, phase)),
    )
    return dict(zip(ARCHS, results, strict=True)), logs, progress, out


def _mean_max_cos(sae: SparseAutoencoder, feats: torch.Tensor) -> float:
    w = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    return float((feats @ w.T).max(dim=1).values.mean())


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_recovers_ground_truth_features(trained, dictionary_store, arch):
    _, feats = dictionary_store
    res = trained[0][arch]
    sae = load_sae(res.uri)
    assert sae.architecture == arch
    assert _mean_max_cos(sae, feats) >= 0.9
    # the saved SAE takes raw activations (the training scale is folded into its weights)
    assert res.metrics["explained_variance"] > 0.5
    assert 2.0 < res.metrics["l0"] < 8.0  # about the 3 true features per token


def test_untrained_sae_does_not_recover_features(dictionary_store):
    _, feats = dictionary_store
    assert _mean_max_cos(SparseAutoencoder(D, D_SAE, seed=0), feats) < 0.8


def test_topk_family_sparsity_matches_k(trained):
    assert 3.5 <= trained[0]["topk"].metrics["l0"] <= 4.0  # ReLU-ed: a top value can be 0
    # batchtopk infers with its learned threshold: about k latents per token on average
    assert trained[0]["batchtopk"].metrics["l0"] == pytest.approx(4.0, rel=0.25)


def test_outputs_manifest_callbacks_and_checkpoint_cleanup(trained, dictionary_store):
    results, logs, progress, out = trained
    store, _ = dictionary_store
    res = results["topk"]
    steps = [p for p in progress if p[2] is None]
    assert isinstance(res, TrainResult) and res.steps == steps[-1][0] == steps[-1][1]
    assert [p[0] for p in steps] == list(range(1, res.steps + 1))
    # the work after the last step is named, not a silent "100%"
    after = [p for p in progress if p[2] is not None]
    assert after == [
        (res.steps, res.steps, "refit decoder"),
        (res.steps, res.steps, "evaluate and publish"),
    ]
    assert progress[-2:] == after
    manifest = read_sae_manifest(res.uri)
    assert manifest["content_hash"] == res.content_hash
    assert manifest["activation_manifest_hash"] == store.content_hash
    assert manifest["config"]["architecture"] == "topk" and manifest["config"]["top_k"] == 4
    curve = manifest["training_curve"]
    assert [c["step"] for c in curve][:2] == [20, 40]
    assert {"loss", "l0", "fvu", "dead_frac", "lr"} <= set(curve[0])
    assert curve[-1]["fvu"] < curve[0]["fvu"]
    assert manifest["metrics"]["fvu"] == pytest.approx(res.metrics["fvu"])
    assert storage.verify_output(res.uri, deep=True)
    sp = load_sparsity(res.uri)
    assert sp.shape == (D_SAE,) and float(sp.max()) <= 0.0
    # one log per SAE every log_every steps, tagged with the SAE's index
    assert {m["sae"] for _, m in logs} == set(range(len(ARCHS)))
    assert not storage.exists(str(out / "ckpt"))  # removed once every SAE is published


def test_decoder_rows_unit_norm_and_seed_view(trained):
    sae = load_sae(trained[0]["relu"].uri)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-4)
    assert sae.dec.weight.shape == (D, D_SAE)  # the seed's nn.Linear view


def test_schedules():
    cfg = SAEConfig(lr=1.0, lr_warmup_steps=10, lr_decay_frac=0.2, l1=2.0, l1_warmup_frac=0.1)
    lrs = [lr_at(cfg, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[50] == 1.0 and lrs[80] == pytest.approx(1.0) and lrs[90] == pytest.approx(0.5)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert sparsity_coef_at(cfg, 0, 100) == pytest.approx(0.2)
    assert sparsity_coef_at(cfg, 50, 100) == 2.0
    assert lr_at(cfg, 500, None) == 1.0  # unknown length: no decay


def test_lr_scheduler_follows_the_schedule_and_resumes_mid_run():
    """The optimiser's LR at each step is ``lr_at`` of that step, also after a resume."""
    cfg = SAEConfig(lr=0.5, lr_warmup_steps=7, lr_decay_frac=0.3)
    total = 40
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=123.0)
    sched = lr_scheduler(opt, cfg, total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(cfg, s, total) for s in range(total)])
    assert seen[-1] > 0 and lr_at(cfg, total, total) == 0.0
    opt2 = torch.optim.SGD([p], lr=123.0)
    lr_scheduler(opt2, cfg, total, start=25)
    assert opt2.param_groups[0]["lr"] == pytest.approx(seen[25])


def test_seed_api_trains_in_place_on_tensors(dictionary_store):
    store, _ = dictionary_store
    x = store.read(0, 4000).float()
    model = SparseAutoencoder(d_model=D, k=D_SAE, architecture="topk", top_k=4)

    def ev() -> float:
        with torch.no_grad():
            x_hat = model.reconstruct(x)
        return float(1 - (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    before = ev()
    cfg = SAEConfig(k=D_SAE, architecture="topk", top_k=4, lr=1e-2, epochs=2, batch_size=128)
    res = train_sae(model, [x[:2500], x[2500:]], cfg, "cpu", progress=False)
    assert res.steps == 2 * (-(-4000 // 128))  # a partial last batch per epoch
    assert before < 0 and ev() > 0.4  # raw activations in, raw reconstructions out
    assert res.uri is None and res.metrics["fvu"] < 0.5


def test_seed_api_reads_a_store_and_a_one_shot_iterator(dictionary_store):
    store, _ = dictionary_store
    cfg = SAEConfig(k=D_SAE, architecture="relu", l1=3e-2, train_tokens=2560, batch_size=256)
    model = SparseAutoencoder(D, D_SAE)
    assert train_sae(model, store, cfg, progress=False).steps == 10
    x = store.read(0, 3000).float()
    one_shot = (x[i : i + 300] for i in range(0, 3000, 300))
    res = train_sae(
        SparseAutoencoder(D, D_SAE),
        one_shot,
        cfg.model_copy(update={"train_tokens": None}),
        progress=False,
    )
    assert res.steps == -(-3000 // 256)  # one pass; no decay schedule without a length


def test_multiple_hook_points_in_one_pass(tmp_path):
    x, _ = sparse_dictionary_activations(4096, D, N_FEATURES, seed=1)
    y, _ = sparse_dictionary_activations(4096, D, N_FEATURES, seed=2)
    store = write_activation_store({"layer.1": x, "layer.2": y}, str(tmp_path / "acts"))
    cfgs = [
        SAEConfig(k=32, architecture="topk", top_k=4, batch_size=256, epochs=1, hook_point=h)
        for h in ("layer.1", "layer.2")
    ]
    res = train_saes(store, cfgs, [str(tmp_path / "a"), str(tmp_path / "b")], progress=False)
    assert [read_sae_manifest(r.uri)["hook_point"] for r in res] == ["layer.1", "layer.2"]
    assert load_sae(res[1].uri).metadata["hook_name"] == "blocks.2.hook_resid_pre"


def test_outlier_tokens_are_dropped(tmp_path):
    x, _ = sparse_dictionary_activations(4096, D, N_FEATURES, seed=3)
    x[::97] *= 1000.0  # extreme-norm tokens, like a BOS residual
    store = write_activation_store(x, str(tmp_path / "acts"))
    base = SAEConfig(k=D_SAE, architecture="topk", top_k=4, batch_size=64, epochs=2, lr=1e-2)
    cfgs = [base, base.model_copy(update={"max_norm_factor": None})]
    res = train_saes(
        store, cfgs, [str(tmp_path / "filtered"), str(tmp_path / "all")], progress=False
    )
    keep = np.ones(4096, bool)
    keep[::97] = False
    xc = store.read(0, 4096).float()[torch.from_numpy(keep)]

    def ev(uri: str) -> float:
        with torch.no_grad():
            x_hat = load_sae(uri).reconstruct(xc)
        return float(1 - (x_hat - xc).pow(2).sum() / (xc - xc.mean(0)).pow(2).sum())

    # the outliers wreck the fit to ordinary tokens unless they are dropped
    assert ev(res[0].uri) > 0.6 and ev(res[0].uri) > ev(res[1].uri) + 0.2


def test_bf16_autocast_keeps_fp32_master_weights(dictionary_store, tmp_path):
    store, _ = dictionary_store
    cfg = SAEConfig(
        k=32, architecture="topk", top_k=4, batch_size=256, train_tokens=2560, autocast_bf16=True
    )
    model = SparseAutoencoder(D, 32, architecture="topk", top_k=4)
    res = train_sae(model, store, cfg, progress=False)
    assert res.steps == 10 and model.W_enc.dtype == torch.float32
    assert torch.isfinite(model.W_dec).all()


def test_jumprelu_straight_through_gradients_reach_the_input_only_when_asked():
    from integral_superposition.sae.forward import JumpReLUFunction, RectangleStep

    x = torch.tensor([[0.05, 0.48, 0.52, 0.9]], requires_grad=True)
    thr = torch.full((4,), 0.5, requires_grad=True)
    bw = 0.1  # entries 1 and 2 lie inside the rectangle around the threshold
    window = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    gate = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    for to_input in (False, True):
        x.grad = thr.grad = None
        JumpReLUFunction.apply(x, thr, bw, to_input).sum().backward()
        jump = window * 0.5 / bw  # threshold / bandwidth inside the window
        torch.testing.assert_close(thr.grad, -jump[0])
        torch.testing.assert_close(x.grad, gate + jump if to_input else gate)
        x.grad = thr.grad = None
        RectangleStep.apply(x, thr, bw, to_input).sum().backward()
        torch.testing.assert_close(thr.grad, -window[0] / bw)
        if to_input:
            torch.testing.assert_close(x.grad, window / bw)
        else:
            assert x.grad is None


def test_jumprelu_tanh_penalty_value():
    sae = SparseAutoencoder(D, D_SAE, architecture="jumprelu", jumprelu_init_threshold=0.1)
    sae.jumprelu_sparsity = "tanh"
    x = torch.randn(16, D)
    out = sae(x)
    scaled = out.latents * (4.0 * sae.W_dec.norm(dim=1))
    torch.testing.assert_close(out.sparsity_loss, torch.tanh(scaled).sum(-1).mean())


def test_jumprelu_with_the_jump_gradient_on_the_encoder_recovers_features(
    dictionary_store, tmp_path
):
    store, feats = dictionary_store
    cfg = _cfg("jumprelu", jumprelu_ste_to_input=True)
    (res,) = train_saes(store, [cfg], [str(tmp_path / "sae")], progress=False)
    sae = load_sae(res.uri)
    assert _mean_max_cos(sae, feats) >= 0.9
    assert 2.0 < res.metrics["l0"] < 8.0


def test_jumprelu_pre_activation_loss_value_and_only_in_training():
    sae = SparseAutoencoder(D, D_SAE, architecture="jumprelu", jumprelu_init_threshold=0.3)
    x = torch.randn(16, D)
    assert float(sae(x).aux_loss) == 0.0  # off by default
    sae.jumprelu_pre_act = True
    pre = sae.pre_activations(x)
    want = (torch.relu(sae.threshold - pre) * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(sae(x).aux_loss, want)
    sae.eval()
    assert float(sae(x).aux_loss) == 0.0
