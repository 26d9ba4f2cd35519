"""The plain training launcher (``python -m integral_superposition.sae.launch``) in one process:
its config forms, its results file and its errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from integral_superposition import storage
from integral_superposition.dump.synthetic import (
    sparse_dictionary_activations,
    write_activation_store,
)
from integral_superposition.sae import load_sae
from integral_superposition.sae.launch import STORAGE_OPTIONS_ENV, main, read_sae_configs

SMALL = dict(batch_size=64, epochs=0.25, lr=1e-2, lr_warmup_steps=2, architecture="topk", top_k=4)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x, _ = sparse_dictionary_activations(1024, 8, 12, seed=3)
    return write_activation_store(x * 10, str(tmp_path_factory.mktemp("launch") / "acts"))


def _yaml(path, data) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)


def test_one_sae_config_trains_and_publishes_at_out(store, tmp_path):
    cfg = _yaml(tmp_path / "sae.yaml", {"k": 16, **SMALL})
    out, results = str(tmp_path / "sae"), str(tmp_path / "results.json")
    assert (
        main(["--store", store.uris[0], "--out", out, "--config", cfg, "--results", results]) == 0
    )
    with open(results) as f:
        (row,) = json.load(f)
    assert row["uri"] == out and row["name"] == "" and row["config"]["k"] == 16
    assert row["content_hash"] == storage.read_manifest(out)["content_hash"]
    assert row["steps"] >= 1 and "fvu" in row["metrics"]  # held-out metrics by default
    assert load_sae(out).d_sae == 16


def test_named_saes_go_under_out_or_to_their_own_uri(store, tmp_path):
    own = str(tmp_path / "elsewhere" / "wide")
    cfg = _yaml(
        tmp_path / "saes.yaml",
        {"saes": {"narrow": {"k": 8, **SMALL}, "wide": {"k": 32, **SMALL, "out": own}}},
    )
    args = ["--store", store.uris[0], "--out", str(tmp_path / "o"), "--config", cfg]
    assert main([*args, "--no-evaluate"]) == 0
    assert load_sae(str(tmp_path / "o" / "narrow")).d_sae == 8
    assert load_sae(own).d_sae == 32
    assert not os.path.exists(tmp_path / "o" / "wide")


def test_experiment_config_names_saes_as_the_train_step(tmp_path):
    cfg = _yaml(
        tmp_path / "exp.yaml",
        {"preset": "smoke", "sae": {"k": 16, "architecture": "topk"}, "sweep": {"top_k": [4, 8]}},
    )
    cfgs = read_sae_configs(cfg)
    assert len(cfgs) == 2 and all(own is None for _, own in cfgs.values())
    assert sorted(c.top_k for c, _ in cfgs.values()) == [4, 8]


def test_bad_launcher_input_is_named(store, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"config='.*missing.yaml': no such file"):
        read_sae_configs(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"expected a mapping .* got list"):
        read_sae_configs(str(bad))
    with pytest.raises(ValueError, match=r"invalid SAE config: saes\.a\.k"):
        read_sae_configs(_yaml(tmp_path / "k.yaml", {"saes": {"a": {"k": 0}}}))
    with pytest.raises(ValueError, match=r"SAE name '../x' is not a folder name"):
        read_sae_configs(_yaml(tmp_path / "n.yaml", {"saes": {"../x": {"k": 8}}}))
    named = _yaml(tmp_path / "named.yaml", {"saes": {"a": {"k": 8, **SMALL}}})
    with pytest.raises(SystemExit, match=r"--out: required"):
        main(["--store", store.uris[0], "--config", named])
    monkeypatch.setenv(STORAGE_OPTIONS_ENV, "[1]")
    one = _yaml(tmp_path / "one.yaml", {"k": 8, **SMALL})
    with pytest.raises(ValueError, match=rf"{STORAGE_OPTIONS_ENV}: expected a JSON object"):
        main(["--store", store.uris[0], "--out", str(tmp_path / "x"), "--config", one])
    assert not os.path.exists(tmp_path / "x")


def test_results_path_holding_a_users_file_is_refused_before_training(store, tmp_path):
    cfg = _yaml(tmp_path / "sae.yaml", {"k": 8, **SMALL})
    notes = tmp_path / "results.json"
    notes.write_text('{"my": "notes"}')
    out = tmp_path / "sae"
    args = ["--store", store.uris[0], "--out", str(out), "--config", cfg, "--no-evaluate"]
    with pytest.raises(FileExistsError, match=r"--results .*results\.json"):
        main([*args, "--results", str(notes)])
    assert notes.read_text() == '{"my": "notes"}' and not out.exists()
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileExistsError, match="never replaced"):
        main([*args, "--results", str(tmp_path / "folder")])
    # an earlier results file of the launcher is replaced by a rerun
    ours = str(tmp_path / "ours.json")
    assert main([*args, "--results", ours]) == 0
    first = json.loads(Path(ours).read_text())
    assert main([*args, "--results", ours, "--out", str(tmp_path / "sae2")]) == 0
    (row,) = json.loads(Path(ours).read_text())
    assert row["uri"] == str(tmp_path / "sae2") and first[0]["uri"] == str(out)
