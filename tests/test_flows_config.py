"""ExperimentConfig: presets, YAML loading, overrides, the sweep, errors that name the field,
and the published JSON schema."""

from __future__ import annotations

import json

import pytest
from integral_superposition.experiment import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    json_schema,
    load_config,
    load_preset,
    resolve_config,
    schema_path,
)


def test_default_preset_is_the_configs_defaults():
    assert load_preset("default") == ExperimentConfig()
    cfg = ExperimentConfig()
    assert cfg.data.source.startswith("demo") and cfg.model.model_id == "gemma-3-270m"
    assert [j.name for j in cfg.sae_jobs()] == ["layer6-topk-k2048"]


def test_smoke_preset_is_small():
    cfg = load_preset("smoke")
    assert cfg.model.model_id.startswith("tiny:")
    assert cfg.fanout.partitions == 4
    assert cfg.sae.k <= 256


def test_published_schema_is_current():
    published = json.loads(schema_path().read_text())
    assert published == json_schema(), (
        "schemas/experiment.schema.json is stale: run `python -m integral_superposition.experiment`"
    )
    assert published["properties"]["sae"]["$ref"].endswith("SAEConfig")


def test_yaml_with_preset_and_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("preset: smoke\nname: mine\nsae:\n  k: 64\nsweep:\n  top_k: [4, 8]\n")
    cfg = load_config(path, ["sae.lr=0.002", "data.label_col=null"])
    assert cfg.name == "mine" and cfg.sae.k == 64 and cfg.sae.lr == 0.002
    assert cfg.sae.epochs == load_preset("smoke").sae.epochs  # the rest comes from the preset
    assert cfg.data.label_col is None
    assert [j.name for j in cfg.sae_jobs()] == ["layer2-topk-k64-top4", "layer2-topk-k64-top8"]
    assert resolve_config(path) == load_config(path)


def test_sweep_over_layers_and_sizes():
    cfg = load_preset(
        "smoke",
        {"dump.hook_points": ["layer.1", "layer.2"], "sweep": {"layer": [1, 2], "k": [64, 128]}},
    )
    jobs = cfg.sae_jobs()
    assert [(j.hook_point, j.cfg.k) for j in jobs] == [
        ("layer.1", 64), ("layer.1", 128), ("layer.2", 64), ("layer.2", 128),
    ]  # fmt: skip
    assert len({j.name for j in jobs}) == 4


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"sae.k": 0}, r"sae\.k"),
        ({"sae.kk": 3}, r"sae\.kk: unknown field"),
        ({"data": {"source": " "}}, r"data\.source"),
        ({"name": "has space"}, r"name"),
        ({"sweep": {"widths": [1, 2]}}, r"sweep key 'widths'"),
        ({"sweep": {"layer": [5]}}, r"sweep\.layer: hook point 'layer\.5' is not dumped"),
        (
            {"sweep": {"top_k": [1000]}},
            r"sweep \(top_k=1000\): sae: top_k=1000: expected top_k <= k",
        ),
        ({"fanout.partitions": 0}, r"fanout\.partitions"),
        ({"model.dtype": "int4"}, r"model\.dtype"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_preset("smoke", overrides)


def test_bad_files_and_presets(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sae: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="preset='huge'"):
        load_preset("huge")
    with pytest.raises(ConfigError, match="not both"):
        resolve_config(bad, "smoke")


def test_overrides_parse_values_as_yaml():
    out = apply_overrides(
        {"sae": {"k": 1}}, ["sae.k=4096", "sweep.k=[1, 2]", "steps.merge=false", "name=x"]
    )
    assert out == {
        "sae": {"k": 4096},
        "sweep": {"k": [1, 2]},
        "steps": {"merge": False},
        "name": "x",
    }
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        apply_overrides({}, ["sae.k"])


def test_run_root_and_public_dict_hide_secrets():
    cfg = load_preset(
        "smoke",
        {
            "storage": "s3://bucket/prefix/",
            "run": "r1",
            "storage_options": {"key": "AKIA", "secret": "s"},
        },
    )
    assert cfg.run_root() == "s3://bucket/prefix/smoke/r1"
    public = cfg.public_dict()
    assert public["storage_options"] == {"key": "***", "secret": "***"}
    assert "AKIA" not in cfg.to_yaml()
