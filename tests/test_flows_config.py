"""ExperimentConfig: presets, YAML loading, overrides, the sweep, errors that name the field,
the published JSON schema, and the flows' orchestration sections kept out of the library."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
    from integral_superposition.flows import config as flows_config

    published = json.loads(schema_path().read_text())
    assert published == flows_config.json_schema(), (
        "schemas/experiment.schema.json is stale: run `python -m integral_superposition.flows.config`"
    )
    assert published["properties"]["sae"]["$ref"].endswith("SAEConfig")
    # experiment files carry the orchestration sections; the library's model does not
    assert {"retries", "gpu_limit", "result_storage", "storage_secret"} <= set(
        published["properties"]
    )
    assert not {"retries", "gpu_limit", "result_storage", "storage_secret"} & set(
        json_schema()["properties"]
    )
    assert "train" in published["$defs"]["FanoutPlan"]["properties"]


ORCHESTRATION = {
    "retries.retries": 0,
    "retries.delay_s": 0.5,
    "gpu_limit": "gpus",
    "result_storage": "null",
    "storage_secret": "isup-s3",
    "fanout.mode": "deployments",
    "fanout.deployment": "dump-partition/other",
    "fanout.train": "per_hook_point",
    "fanout.gpus_per_run": 2,
}


def test_library_config_holds_no_orchestration_settings():
    lib_fields = set(ExperimentConfig.model_fields)
    assert not {"retries", "gpu_limit", "result_storage", "storage_secret"} & lib_fields
    assert set(ExperimentConfig.model_fields["fanout"].annotation.model_fields) == {"partitions"}
    for key, value in ORCHESTRATION.items():
        unknown = key if key.startswith("fanout.") else key.split(".")[0]
        with pytest.raises(ConfigError, match=re.escape(unknown) + ": unknown field"):
            load_preset("smoke", {key: value})


def test_flows_config_reads_every_orchestration_key_from_overrides_and_files(tmp_path):
    from integral_superposition.flows.config import FlowExperimentConfig
    from integral_superposition.flows.config import load_config as flow_load_config
    from integral_superposition.flows.config import load_preset as flow_load_preset

    cfg = flow_load_preset("smoke", [f"{k}={v}" for k, v in ORCHESTRATION.items()] + ["sae.k=64"])
    assert isinstance(cfg, FlowExperimentConfig) and cfg.sae.k == 64
    assert (cfg.retries.retries, cfg.retries.delay_s, cfg.gpu_limit) == (0, 0.5, "gpus")
    assert (cfg.result_storage, cfg.storage_secret) == (None, "isup-s3")  # YAML null
    assert (cfg.fanout.mode, cfg.fanout.train, cfg.fanout.gpus_per_run) == (
        "deployments", "per_hook_point", 2,
    )  # fmt: skip
    assert cfg.fanout.partitions == 4  # the library's part of the section, from the preset
    # the smoke preset's own orchestration settings still apply, under a file's keys
    path = tmp_path / "exp.yaml"
    path.write_text("preset: smoke\nretries:\n  delay_s: 3\nfanout:\n  train: per_sae\n")
    from_file = flow_load_config(path)
    assert (from_file.retries.retries, from_file.retries.delay_s) == (2, 3.0)
    assert (from_file.fanout.partitions, from_file.fanout.train) == (4, "per_sae")
    # the library view drops them and keeps everything that shapes the outputs
    lib = from_file.library_config()
    assert type(lib) is ExperimentConfig and lib.fanout.partitions == 4
    plain = tmp_path / "plain.yaml"
    plain.write_text("preset: smoke\n")
    assert lib == load_config(plain)
    # a library config given to the flows takes the orchestration defaults
    assert FlowExperimentConfig.model_validate(lib).retries.retries == 3


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("fanout.train", "per_layer", r"fanout\.train"),
        ("fanout.gpus_per_run", 0, r"fanout\.gpus_per_run"),
        ("retries.retries", -1, r"retries\.retries"),
        ("fanout.mode", "pods", r"fanout\.mode"),
    ],
)
def test_bad_orchestration_values_name_the_field(key, value, field):
    from integral_superposition.flows.config import load_preset as flow_load_preset

    with pytest.raises(ConfigError, match=field):
        flow_load_preset("smoke", {key: value})


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


def test_step_parameters_from_overrides_name_each_bad_field():
    from integral_superposition.experiment import ReportOptions, params_from_overrides
    from integral_superposition.merge.params import MergeParams

    opts = params_from_overrides(ReportOptions, ["title=Rebuilt run", "top_per_label=3"])
    assert (opts.title, opts.top_per_label) == ("Rebuilt run", 3)
    assert params_from_overrides(ReportOptions, []) == ReportOptions()
    with pytest.raises(ConfigError) as err:
        params_from_overrides(ReportOptions, ["top_per_label=0", "colour=red"])
    assert str(err.value) == (
        "invalid ReportOptions: top_per_label: Input should be greater than or equal to 1 "
        "(got 0); colour: unknown field (got 'red')"
    )
    with pytest.raises(ConfigError, match=r"^invalid MergeParams: ce_docs: "):
        params_from_overrides(MergeParams, ["ce_docs=-1"])


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


def test_the_shipped_ag_news_config_loads_and_steers_label_groups():
    """bench/ag_news.yaml (the whole experiment on AG News) validates against the current
    schema: title + description, 4,096 TopK latents, groups of four latents steered at 24
    new tokens."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "bench" / "ag_news.yaml")
    assert cfg.data.text == "{title}. {description}" and cfg.data.label_col == "topic"
    assert (cfg.sae.k, cfg.sae.top_k, cfg.dump.max_len) == (4096, 32, 64)
    assert cfg.steering.group_size == 4 and cfg.steering.max_new_tokens == 24
    assert cfg.steering.classifier_fit_generations == 48
    assert cfg.steering.strengths == sorted(cfg.steering.strengths)
    assert cfg.merge.similarity["labels"] > 0 and cfg.merge.finetune_epochs == 1
