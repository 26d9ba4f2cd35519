"""The seed's ``act_files``: lists of ``.npy``, ``.safetensors`` and store paths are accepted by
``train_sae`` and ``topk_sets_per_latent``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from integral_superposition import SAEConfig
from integral_superposition.analysis.top_tokens import topk_sets_per_latent
from integral_superposition.dump.synthetic import (
    sparse_dictionary_activations,
    write_activation_store,
)
from integral_superposition.sae import SparseAutoencoder, train_sae
from safetensors.torch import save_file

D, K = 16, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    """A dump of three shards with real token ids, documents and labels."""
    x, _ = sparse_dictionary_activations(1500, D, 24, seed=2)
    root = tmp_path_factory.mktemp("act_files")
    n = x.shape[0]
    store = write_activation_store(
        x * 3 + 1,
        str(root / "acts"),
        token_ids=np.arange(n) % 97 + 3,
        labels=(np.arange(n) // 32) % 2,
        label_names=["a", "b"],
        rows_per_shard=512,
    )
    assert len(store.shards) == 3
    return store


def _files(store) -> list[str]:
    return [f"{store.uris[0]}/{s.tensors}" for s in store.shards]


def _cfg() -> SAEConfig:
    return SAEConfig(k=K, architecture="topk", top_k=4, batch_size=128, epochs=1, lr=3e-3)


def _train(source) -> SparseAutoencoder:
    model = SparseAutoencoder(D, K, architecture="topk", top_k=4)
    train_sae(model, source, _cfg(), "cpu", progress=False)
    return model


def test_train_sae_on_a_dumps_own_shard_files_is_training_on_the_dump(dump):
    a, b = _train(_files(dump)), _train(dump.uris[0])
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.metadata["hook_name"] == b.metadata["hook_name"]


def test_npy_and_safetensors_files_train_like_the_tensors_they_hold(dump, tmp_path):
    parts = [dump.read(s.offset, s.offset + s.n_tokens).float() for s in dump.shards]
    npy, st = [], []
    for i, p in enumerate(parts):
        np.save(tmp_path / f"shard{i}.npy", p.numpy())
        save_file({"acts": p.contiguous()}, str(tmp_path / f"shard{i}.safetensors"))
        npy.append(str(tmp_path / f"shard{i}.npy"))
        st.append(tmp_path / f"shard{i}.safetensors")  # os.PathLike works as well
    expected = _train(parts)
    for files in (npy, st):
        got = _train(files)
        assert torch.equal(got.W_dec, expected.W_dec) and torch.equal(got.b_enc, expected.b_enc)


def test_topk_sets_on_shard_files_match_the_store(dump):
    model = _train(dump)
    full = topk_sets_per_latent(model, dump, k=5, device="cpu")
    from_files = topk_sets_per_latent(model, _files(dump), k=5, device="cpu")
    assert np.array_equal(full.rows, from_files.rows)
    assert np.array_equal(full.token_ids, from_files.token_ids)
    # a subset of the shards: its own rows, with the dump's token ids, documents and positions
    sub = topk_sets_per_latent(model, _files(dump)[1:], k=5, device="cpu")
    ref = dump.shards[1]
    x = dump.read(ref.offset, dump.n_tokens).float()
    expected = topk_sets_per_latent(model, x, k=5, device="cpu")
    assert sub.n_tokens == dump.n_tokens - ref.offset
    assert np.array_equal(sub.rows, expected.rows) and np.allclose(sub.values, expected.values)
    hit = sub.rows >= 0
    assert hit.sum() > 0
    glob = sub.rows[hit] + ref.offset
    assert np.array_equal(sub.token_ids[hit], np.asarray(dump.token_ids)[glob])
    assert np.array_equal(sub.doc_ids[hit], np.asarray(dump.doc_ids)[glob])
    assert np.array_equal(sub.positions[hit], np.asarray(dump.positions)[glob])


def test_shard_files_on_s3(s3_bucket):
    bucket, opts = s3_bucket
    x, _ = sparse_dictionary_activations(900, D, 24, seed=3)
    store = write_activation_store(
        x, f"{bucket}/seed-acts", rows_per_shard=300, storage_options=opts
    )
    files = [f"{store.uris[0]}/{s.tensors}" for s in store.shards]
    model = SparseAutoencoder(D, K, architecture="topk", top_k=4)
    train_sae(model, files, _cfg(), "cpu", storage_options=opts, progress=False)
    top = topk_sets_per_latent(model, files[:2], k=3, device="cpu", storage_options=opts)
    n = store.shards[2].offset  # shards end at document boundaries
    x = store.read(0, n).float()
    expected = topk_sets_per_latent(model, x, k=3, device="cpu")
    assert top.n_tokens == n and np.array_equal(top.values, expected.values)
    with torch.no_grad():  # each top row's activation is its value (rows of equal value may swap)
        z = model.encode(x).numpy()
    hit = top.rows >= 0
    latent = np.broadcast_to(np.arange(K)[:, None], top.rows.shape)
    assert hit.sum() > 0
    assert np.allclose(z[top.rows[hit], latent[hit]], top.values[hit], rtol=1e-5)


def test_bad_act_files_are_clear_errors(dump, tmp_path):
    with pytest.raises(ValueError, match=r"expected \.npy or \.safetensors files"):
        topk_sets_per_latent(SparseAutoencoder(D, K), [_files(dump)[0], dump.uris[0]])
    save_file({"a": torch.zeros(4, D), "b": torch.zeros(4, D)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="expected exactly one"):
        topk_sets_per_latent(SparseAutoencoder(D, K), [str(tmp_path / "two.safetensors")])
