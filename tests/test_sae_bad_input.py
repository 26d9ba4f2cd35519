"""Bad input to SAE training: a clear error naming what is wrong, and nothing left behind."""

from __future__ import annotations

import os

import pydantic
import pytest
import torch
from integral_superposition import SAEConfig
from integral_superposition.dump.synthetic import (
    sparse_dictionary_activations,
    write_activation_store,
)
from integral_superposition.sae import SparseAutoencoder
from integral_superposition.sae.train import NonFiniteActivationsError, train_sae, train_saes

CFG = dict(k=32, architecture="topk", top_k=4, batch_size=64, epochs=1, checkpoint_every=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices gain nothing from threads, and thread hand-offs dominate on busy CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x, _ = sparse_dictionary_activations(2048, 16, 24, seed=2)
    return write_activation_store(x, str(tmp_path_factory.mktemp("bad") / "acts"))


def _nothing_written(tmp_path) -> None:
    assert not os.path.exists(tmp_path / "ckpt") and not os.path.exists(tmp_path / "out")


def _run(store, tmp_path, cfg=None, **kw):
    return train_saes(
        store, [cfg or SAEConfig(**CFG)], [str(tmp_path / "out")],
        checkpoint_uri=str(tmp_path / "ckpt"), progress=False, **kw,
    )  # fmt: skip


def test_d_model_mismatch(store, tmp_path):
    with pytest.raises(ValueError, match=r"d_model=8 does not match the activations' d_model=16"):
        train_sae(
            SparseAutoencoder(8, 32), store, SAEConfig(k=32, batch_size=64),
            checkpoint_uri=str(tmp_path / "ckpt"), progress=False,
        )  # fmt: skip
    _nothing_written(tmp_path)


def test_empty_store(tmp_path):
    empty = write_activation_store(torch.zeros(0, 16), str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"empty \(0 tokens\)"):
        _run(empty, tmp_path)
    _nothing_written(tmp_path)
    with pytest.raises(ValueError, match="no activation rows"):
        train_sae(SparseAutoencoder(16, 32), [], SAEConfig(k=32), progress=False)


def test_batch_larger_than_the_train_split(store, tmp_path):
    with pytest.raises(
        ValueError, match=r"batch_size=100000: the store's train split has only \d+ tokens"
    ):
        _run(store, tmp_path, SAEConfig(**{**CFG, "batch_size": 100_000}))
    _nothing_written(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_name_shard_and_row(tmp_path, bad):
    x, _ = sparse_dictionary_activations(2048, 16, 24, seed=3)
    x[1500, 7] = bad
    st = write_activation_store(x, str(tmp_path / "acts"), rows_per_shard=1000, tokens_per_doc=10)
    with pytest.raises(
        NonFiniteActivationsError,
        match=r"shard .*shard-00001\.safetensors row 500 \(store row 1500\)",
    ):
        _run(st, tmp_path)
    _nothing_written(tmp_path)


def test_non_finite_rows_in_tensors(tmp_path):
    x = torch.randn(500, 16)
    x[321] = float("nan")
    with pytest.raises(NonFiniteActivationsError, match="input row 321"):
        train_sae(
            SparseAutoencoder(16, 32),
            [x],
            SAEConfig(k=32, batch_size=64, max_norm_factor=None),
            progress=False,
        )


def test_non_finite_found_mid_run_removes_the_fresh_checkpoint(tmp_path, monkeypatch):
    """A store whose norm statistics looked fine: the NaN shows up during training."""
    x, _ = sparse_dictionary_activations(2048, 16, 24, seed=3)
    x[-100:] = float("nan")
    st = write_activation_store(x, str(tmp_path / "acts"), tokens_per_doc=10)
    monkeypatch.setattr(
        type(st), "norm_stats", lambda self, name=None: {"mean": 1.0, "max": 2.0, "min": 0.5}
    )
    # the initialisation sample would see the NaN rows first: let it pass them, so that the
    # batch check during training finds them
    gather = type(st).gather
    monkeypatch.setattr(
        type(st),
        "gather",
        lambda self, idx, hook_point=None, check_finite=True: gather(
            self, idx, hook_point, check_finite=False
        ),
    )
    cfg = SAEConfig(**{**CFG, "checkpoint_every": 1, "max_norm_factor": None})
    with pytest.raises(NonFiniteActivationsError, match=r"values: shard .* \(store row \d+\)$"):
        _run(st, tmp_path, cfg)
    _nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"architecture": "topk", "k": 16, "top_k": 32}, "top_k"),
        ({"architecture": "batchtopk", "k": 16, "top_k": 17}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -3}, "top_k"),
        ({"k": 0}, "k"),
        ({"l1": -1e-3}, "l1"),
        ({"auxk_coef": -0.1}, "auxk_coef"),
        ({"lr": -1.0}, "lr"),
        ({"grad_clip": -1.0}, "grad_clip"),
    ],
)
def test_bad_config_values(kw, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        SAEConfig(**kw)


def test_configs_bypassing_validation_are_rechecked(store, tmp_path):
    cfg = SAEConfig.model_construct(**{**SAEConfig().model_dump(), "l1": -1.0})
    with pytest.raises(ValueError, match="l1"):
        _run(store, tmp_path, cfg)
    _nothing_written(tmp_path)


def test_model_top_k_out_of_range():
    with pytest.raises(
        ValueError, match=r"top_k=40: expected top_k <= k \(the number of latents, 32\)"
    ):
        SparseAutoencoder(16, 32, architecture="topk", top_k=40)
    with pytest.raises(ValueError, match=r"top_k=0"):
        SparseAutoencoder(16, 32, architecture="batchtopk", top_k=0)


def test_model_and_config_disagree(store):
    with pytest.raises(ValueError, match=r"cfg.k=64 but the model has k=32"):
        train_sae(SparseAutoencoder(16, 32), store, SAEConfig(k=64), progress=False)
    with pytest.raises(ValueError, match=r"cfg.architecture='topk' but the model is 'relu'"):
        train_sae(
            SparseAutoencoder(16, 32), store, SAEConfig(k=32, architecture="topk"), progress=False
        )


def test_configs_that_cannot_share_a_stream(store, tmp_path):
    cfgs = [SAEConfig(**CFG), SAEConfig(**{**CFG, "batch_size": 128})]
    with pytest.raises(ValueError, match="batch_size differs between configs"):
        train_saes(store, cfgs, [str(tmp_path / "a"), str(tmp_path / "b")], progress=False)
    with pytest.raises(ValueError, match="one URI per config"):
        train_saes(
            store, [SAEConfig(**CFG)], [str(tmp_path / "a"), str(tmp_path / "b")], progress=False
        )
    with pytest.raises(ValueError, match="its own output URI"):
        train_saes(store, [SAEConfig(**CFG)] * 2, [str(tmp_path / "a")] * 2, progress=False)
    with pytest.raises(ValueError, match=r"hook_point='layer\.5': not in this store"):
        train_saes(
            store,
            [SAEConfig(**{**CFG, "hook_point": "layer.5"})],
            [str(tmp_path / "a")],
            progress=False,
        )
    assert not os.listdir(tmp_path)


def test_synthetic_store_takes_documents_in_any_order_but_contiguous(tmp_path):
    """Dumps order documents by length, so ids need not increase; a split document is refused."""
    x = torch.randn(6, 4)
    store = write_activation_store(x, str(tmp_path / "ok"), doc_ids=[5, 5, 1, 1, 1, 3])
    assert store.doc_ids.tolist() == [5, 5, 1, 1, 1, 3]
    assert store.positions.tolist() == [0, 1, 0, 1, 2, 0]
    assert store.norm_stats()["count"] == 6
    assert abs(store.norm_stats()["mean"] - float(x.norm(dim=1).mean())) < 1e-5
    with pytest.raises(ValueError, match="rows of each document must be contiguous"):
        write_activation_store(x, str(tmp_path / "bad"), doc_ids=[5, 5, 1, 5, 1, 3])
    assert not os.path.exists(tmp_path / "bad")
