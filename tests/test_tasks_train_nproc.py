"""The Prefect training task on two processes (``nproc=2``: torchrun through
``sae.launch.launch_train_saes``) publishes what one process would."""

from __future__ import annotations

import os

import pytest
from integral_superposition import SAEConfig, storage
from integral_superposition.dump.synthetic import (
    sparse_dictionary_activations,
    write_activation_store,
)
from integral_superposition.experiment import SAEJob
from integral_superposition.sae import load_sae
from integral_superposition.sae.train import train_saes as train_direct


@pytest.mark.prefect
def test_train_task_on_two_processes_module_parallel(prefect_api, tmp_path, monkeypatch):
    from integral_superposition.tasks.refs import OutputRef, RunLocation
    from integral_superposition.tasks.train import checkpoint_key, train_saes

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    x, _ = sparse_dictionary_activations(1024, 8, 12, seed=3)
    acts = write_activation_store({"layer.0": x * 10}, str(tmp_path / "acts"))
    store = OutputRef.read("activations", "acts", acts.uris[0])
    base = dict(architecture="topk", top_k=4, batch_size=64, epochs=0.5, hook_point="layer.0")
    jobs = [
        SAEJob(name=f"k{k}", hook_point="layer.0", cfg=SAEConfig(k=k, **base)) for k in (16, 32)
    ]
    loc = RunLocation(storage=str(tmp_path / "runs"), experiment="e", run="r")
    with pytest.raises(ValueError, match=r"nproc=0: expected a positive number"):
        train_saes.fn(store, jobs, loc, gpu_limit=None, nproc=0)
    refs = train_saes.fn(store, jobs, loc, gpu_limit=None, nproc=2, distribute_modules=True)
    assert [r.uri for r in refs] == [loc.uri("sae", j.name) for j in jobs]
    # the checkpoint is removed once published
    assert not os.path.exists(loc.uri("checkpoints", checkpoint_key(store, jobs)))
    direct = train_direct(
        acts, [j.cfg for j in jobs], [str(tmp_path / j.name) for j in jobs], progress=False
    )
    for ref, d in zip(refs, direct, strict=True):
        assert ref.content_hash == storage.read_manifest(ref.uri)["content_hash"]
        assert ref.summary["steps"] == d.steps
        a, b = load_sae(ref.uri).requires_grad_(False), load_sae(d.uri).requires_grad_(False)
        assert float((a.W_dec - b.W_dec).abs().max()) == 0.0  # each SAE on its own rank
