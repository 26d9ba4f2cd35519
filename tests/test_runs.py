"""Run folders: locating outputs in ``{storage}/{experiment}/{run}`` and reading what a run's
index and manifests record (library, no Prefect)."""

from __future__ import annotations

import os

import pytest
from integral_superposition import runs, storage


def test_paths_of_a_run_folder(tmp_path):
    sae = str(tmp_path / "store" / "exp" / "r1" / "sae" / "layer1")
    assert runs.parent(sae, 2) == str(tmp_path / "store" / "exp" / "r1")
    assert runs.basename(sae + "/") == "layer1"
    assert runs.split_run_root(runs.parent(sae, 2) + "/") == (str(tmp_path / "store"), "exp", "r1")
    assert runs.split_run_root("s3://bucket/prefix/exp/r1") == ("s3://bucket/prefix", "exp", "r1")
    assert runs.parent("s3://bucket/exp/r1/sae/a", 2) == "s3://bucket/exp/r1"
    assert runs.absolute_storage("rel") == os.path.abspath("rel")
    assert runs.absolute_storage("s3://b/x") == "s3://b/x"
    with pytest.raises(ValueError, match=r"run_root='s3://b': expected a folder"):
        runs.split_run_root("s3://b")


def _run(tmp_path):
    root = tmp_path / "exp" / "r1"
    steps = [
        {"step": "dump", "output": {"kind": "activations", "name": "acts", "uri": "A1"}},
        {"step": "combine", "output": {"kind": "activations", "name": "acts", "uri": "A2"}},
        {"step": "train", "output": {"kind": "sae", "name": "s", "uri": str(root / "sae" / "s")}},
        {"step": "report", "output": {"kind": "report", "name": "report", "uri": "R"}},
        {"step": "merge", "output": None},
    ]
    storage.write_json(str(root / runs.RUN_INDEX), {"config": {"name": "exp"}, "steps": steps})
    return root


def test_the_run_index_names_the_store_and_the_outputs(tmp_path):
    root = _run(tmp_path)
    assert runs.find_store_of(str(root / "sae" / "s")) == "A2"  # the last store: the combined one
    config, outputs = runs.read_run_outputs(str(root))
    assert config == {"name": "exp"}
    assert sorted(outputs) == ["activations", "sae"]  # the report's own output is left out
    assert [o["uri"] for o in outputs["activations"]] == ["A1", "A2"]
    with pytest.raises(ValueError, match=r"no run index at .* pass store_uri"):
        runs.find_store_of(str(tmp_path / "other" / "r" / "sae" / "s"))
    storage.write_json(str(root / runs.RUN_INDEX), {"steps": []})
    with pytest.raises(ValueError, match="records no activation store"):
        runs.find_store_of(str(root / "sae" / "s"))


def test_model_of_an_sae_and_dtype_of_a_dump(tmp_path):
    sae = str(tmp_path / "sae")
    storage.write_json(sae + "/cfg.json", {"metadata": {"model_name": "tiny:gemma"}})
    assert runs.sae_model_id(sae) == "tiny:gemma"
    storage.write_json(str(tmp_path / "bare" / "cfg.json"), {})
    with pytest.raises(ValueError, match="names no model; pass model_id"):
        runs.sae_model_id(str(tmp_path / "bare"))
    acts = str(tmp_path / "acts")
    storage.write_manifest(
        acts, "activations", {}, {}, model={"model_id": "m", "dtype": "bfloat16"}
    )
    assert runs.dumped_dtype(acts, "m") == "bf16"
    assert runs.dumped_dtype(acts, "other") is None  # dumped from another model
    assert runs.dumped_dtype(str(tmp_path / "none"), "m") is None


def test_list_runs_takes_a_relative_storage_root(tmp_path, monkeypatch):
    """``isup ls runs`` from the storage's parent: the runs' folders come back absolute."""
    root = _run(tmp_path)
    (root / runs.RUN_CONFIG).write_text("name: exp\n")
    monkeypatch.chdir(tmp_path)
    listed = runs.list_runs(".")
    assert [r["run_root"] for r in listed] == [str(root)]
    assert runs.list_runs(".", experiment="exp") == listed


def test_a_run_location_of_a_run_folder(tmp_path):
    from integral_superposition.tasks.refs import RunLocation

    loc = RunLocation.at(str(tmp_path / "e" / "r") + "/", {"endpoint_url": "http://x"}, "blk")
    assert (loc.storage, loc.experiment, loc.run) == (str(tmp_path), "e", "r")
    assert loc.root == str(tmp_path / "e" / "r") and loc.storage_secret == "blk"
    assert loc.storage_options == {"endpoint_url": "http://x"}
    with pytest.raises(ValueError, match=r"run_root='s3://b': expected a folder"):
        RunLocation.at("s3://b")


def test_the_summary_of_a_dump_from_its_manifest(demo_store):
    from integral_superposition.dump.writer import dump_summary

    assert dump_summary(demo_store.manifest) == {
        "n_tokens": demo_store.n_tokens,
        "n_docs": len(demo_store.docs),
        "d_model": demo_store.d_model,
        "hook_points": ["layer.2"],
        "labels": demo_store.label_names,
        "model": "tiny:gemma",
    }
