"""``ExperimentConfig``: one experiment, from the data to the report, as one validated config.

An experiment dumps activations of a dataset through a model, trains one or more SAEs on
them (a base :class:`~integral_superposition.config.SAEConfig` plus an optional sweep over
its fields and layers), analyses, merges and steers each SAE, and writes one report. Every
output goes under the run root ``{storage}/{name}/{run}/``::

    config.yaml           the resolved config (storage options left out)
    acts/                 the activation store (partition dumps under acts/part-III-of-NNN/)
    sae/<sae name>/       one SAELens-format folder per SAE
    checkpoints/<...>/    training checkpoints (resumed by a retried training task)
    analysis/<sae name>/  tables, figures, dashboards
    merge/<sae name>/     the merged SAE and its evaluation
    steering/<sae name>/  the steering evaluation
    report/report.html    the experiment report
    results.csv           the enrichment summary of every SAE (Parquet next to it)
    results_probe.csv     the sparse probes of every SAE (Parquet next to it)
    run.json              the index of the run's outputs, written last

Configs load from YAML (:func:`load_config`), from a named preset (:func:`load_preset`,
``default`` and ``smoke``), and take dotted overrides (``sae.k=4096``). A bad value raises
:class:`ConfigError` naming the field, the value and what was expected. This module is
plain pydantic: it never imports Prefect, and it holds only what shapes the outputs. Where
and how the steps run (Prefect retries, result storage, secret blocks, concurrency limits,
deployment fan-out) is ``integral_superposition.flows.config.FlowExperimentConfig``, a
subclass that adds those sections; the loaders here take it as ``model=``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.resources
import itertools
import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from integral_superposition.analysis.params import AnalysisParams
from integral_superposition.config import DumpConfig, Paths, SAEConfig
from integral_superposition.credentials import (
    MASK,
    masked_options,
    masked_paths,
    split_secret_options,
)
from integral_superposition.experiment_sections import (
    NAME_RE,
    ConfigError,
    DataSpec,
    FanoutConfig,
    ModelSpec,
    OnlineConfig,
    ReportOptions,
    SAEJob,
    Section,
    StepsConfig,
)
from integral_superposition.merge.params import MergeParams
from integral_superposition.overrides import apply_overrides, params_from_overrides
from integral_superposition.overrides import describe_errors as _describe_errors
from integral_superposition.steering.params import SteeringParams

__all__ = [
    "PRESETS",
    "ConfigError",
    "DataSpec",
    "ExperimentConfig",
    "FanoutConfig",
    "ModelSpec",
    "OnlineConfig",
    "ReportOptions",
    "SAEJob",
    "StepsConfig",
    "apply_overrides",
    "json_schema",
    "load_config",
    "load_preset",
    "make_run_id",
    "params_from_overrides",
    "resolve_config",
    "schema_path",
    "write_schema",
]

PRESETS = ("default", "smoke", "thorough")
"""Presets shipped with the package (``presets/<name>.yaml``)."""


class ExperimentConfig(Section):
    """One experiment: data, model, dump, SAEs (with an optional sweep), the analysis, merge,
    steering and report steps, and where everything is written."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
        title="Integral Superposition experiment",
        hide_input_in_errors=True,  # a rejected value may be a credential
    )

    name: str = Field("demo", pattern=NAME_RE)
    """Experiment name: the folder under ``storage`` that holds its runs."""
    run: str | None = Field(None, pattern=NAME_RE)
    """Run name: the folder under the experiment (default: a new timestamped id per run)."""
    storage: str = "runs"
    """Root of all outputs: a local directory or an fsspec URI such as ``s3://bucket/prefix``."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec options for ``storage`` (e.g. ``endpoint_url``). Credentials belong in the environment (AWS_* variables, a profile); the flows also read them from a secret block (``storage_secret``) and move a key, secret, token or password given here into one before a run starts. JSON dumps of the config mask them as ``***``."""
    storage_create_bucket: bool = False
    """Create the bucket of an object-store ``storage`` when it does not exist (default: a missing bucket is an error, so a misspelled name never becomes a new bucket)."""
    data: DataSpec = Field(default_factory=DataSpec)
    """The dataset."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    """The model."""
    dump: DumpConfig = Field(
        default_factory=lambda: DumpConfig(layer=6, max_len=32, batch_size=64, dtype="bf16")
    )
    """Activation dump: hook points, truncation, batch size, storage dtype."""
    fanout: FanoutConfig = Field(default_factory=FanoutConfig)
    """Partitioned dumping for large corpora."""
    sae: SAEConfig = Field(
        default_factory=lambda: SAEConfig(
            architecture="topk",
            k=2048,
            top_k=32,
            epochs=4,
            batch_size=1024,
            lr=4e-4,
            lr_warmup_steps=20,
            checkpoint_every=100,
            log_every=20,
        )
    )
    """The SAE (the base config of the sweep)."""
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    """Train one SAE per combination: SAEConfig field -> values (e.g. ``k: [1024, 4096]``), plus ``layer: [..]`` for dumped layers."""
    paths: Paths = Field(default_factory=Paths)
    """Folder names under the run root."""
    online: OnlineConfig = Field(default_factory=OnlineConfig)
    """Online training (no activation store; a bounded sample for the later steps)."""
    steps: StepsConfig = Field(default_factory=StepsConfig)
    """Which steps after training run."""
    analysis: AnalysisParams = Field(default_factory=lambda: AnalysisParams(dashboards="alive"))
    """Analysis parameters."""
    merge: MergeParams = Field(
        default_factory=lambda: MergeParams(sweep_fractions=[1 / 4, 1 / 16], ce_docs=32)
    )
    """Merge parameters (sized for minutes on a CPU: two K' of the sweep, each against its
    random-partition control, 32 documents for CE; the ``thorough`` preset runs the full sweep)."""
    steering: SteeringParams = Field(
        default_factory=lambda: SteeringParams(
            labels=["Sports", "Business"],
            max_new_tokens=12,
            check_labels="targets",
            classifier_fit_generations=12,
            controls=["random", "own_label"],
            random_draws=1,
        )
    )
    """Steering evaluation parameters (two labels, strengths 0.125-2 x max activation, strongest
    first, each stopped early once it is clearly above 2x perplexity or cannot win, 48
    continuations per complete set, the classifier fitted on documents and 12 continuations of
    training documents per label and checked on the target labels' own prompts, random and
    own-label controls at the best strength, one draw of random latents; the ``thorough``
    preset steers every label with every control at every strength)."""
    report: ReportOptions = Field(default_factory=ReportOptions)
    """Report options."""

    @field_validator("storage", mode="before")
    @classmethod
    def _storage(cls, v: Any) -> str:
        from integral_superposition import storage

        return storage.check_root(v, None)

    @field_validator("storage_options")
    @classmethod
    def _storage_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        masked = masked_paths(v)
        if masked:
            raise ValueError(
                f"{', '.join(masked)}={MASK!r}: expected a credential, got the mask that stands "
                "for one in a config dumped to JSON; give credentials through the environment "
                "(AWS_* variables, a profile) or, in the flows, a secret block (storage_secret)"
            )
        return v

    def __repr_args__(self):
        # repr and str (logs, tracebacks, debuggers) show the options with credentials masked
        for name, value in super().__repr_args__():
            yield name, masked_options(value) if name == "storage_options" else value

    @field_serializer("storage_options", when_used="json")
    def _mask_credentials(self, v: dict[str, Any]) -> dict[str, Any]:
        # JSON is what leaves the process (Prefect flow-run parameters, config.yaml, events):
        # credentials never go with it
        return masked_options(v)

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        allowed = set(SAEConfig.model_fields) | {"layer"}
        for key, values in v.items():
            if key not in allowed:
                raise ValueError(
                    f"sweep key {key!r}: expected 'layer', 'hook_point' or an SAEConfig field "
                    f"({', '.join(sorted(SAEConfig.model_fields))})"
                )
            if not isinstance(values, list) or not values:
                raise ValueError(f"sweep.{key}={values!r}: expected a non-empty list of values")
            if len(set(map(repr, values))) != len(values):
                raise ValueError(f"sweep.{key}={values!r}: values must be distinct")
        if "layer" in v and "hook_point" in v:
            raise ValueError("sweep: give 'layer' or 'hook_point', not both")
        return v

    @model_validator(mode="after")
    def _check_jobs(self) -> ExperimentConfig:
        self.sae_jobs()  # raises on a sweep value or hook point that does not fit
        return self

    # -- derived ------------------------------------------------------------------------------
    def sae_jobs(self) -> list[SAEJob]:
        """The SAEs to train: the base ``sae`` for every combination of ``sweep`` values."""
        hooks = self.dump.resolved_hook_points()
        keys = list(self.sweep)
        combos = list(itertools.product(*(self.sweep[k] for k in keys))) or [()]
        jobs: list[SAEJob] = []
        for combo in combos:
            update = dict(zip(keys, combo, strict=True))
            if "layer" in update:
                update["hook_point"] = f"layer.{update.pop('layer')}"
            base = self.sae.model_dump()
            base.update(update)
            base["hook_point"] = base.get("hook_point") or hooks[0]
            try:
                cfg = SAEConfig.model_validate(base)
            except ValidationError as e:
                where = ", ".join(f"{k}={v!r}" for k, v in zip(keys, combo, strict=True))
                raise ValueError(f"sweep ({where}): " + _describe_errors(e, prefix="sae")) from None
            if cfg.hook_point not in hooks:
                field = "sweep.layer" if "layer" in self.sweep else "sae.hook_point"
                raise ValueError(
                    f"{field}: hook point {cfg.hook_point!r} is not dumped; the dump has {hooks} "
                    "(add it to dump.hook_points)"
                )
            jobs.append(
                SAEJob(
                    name=_job_name(cfg, update, len(hooks) > 1), hook_point=cfg.hook_point, cfg=cfg
                )
            )
        names = [j.name for j in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"sweep: two SAEs get the same name ({names})")
        return jobs

    def experiment_root(self) -> str:
        """``{storage}/{name}``: the folder holding every run of this experiment."""
        from integral_superposition import storage

        return storage.join(self.storage, self.name)

    def run_root(self, run: str | None = None) -> str:
        """``{storage}/{name}/{run}``."""
        from integral_superposition import storage

        run = run or self.run
        if not run:
            raise ValueError("run: no run name (set `run`, or let the flow make one)")
        return storage.join(self.storage, self.name, run)

    @classmethod
    def preset_defaults(cls, preset: str) -> dict[str, Any]:
        """Settings of a subclass's own sections for the shipped preset ``preset``, laid under
        the preset file (none here)."""
        return {}

    def inline_credentials(self) -> dict[str, Any]:
        """The credentials given in ``storage_options`` itself (``key``, ``secret``, ``token``,
        ``client_kwargs.aws_secret_access_key``, ...), nested as there; empty when none."""
        return split_secret_options(self.storage_options)[1]

    def public_dict(self) -> dict[str, Any]:
        """The config as JSON-able data without storage options (they may hold secrets)."""
        d = self.model_dump(mode="json")
        if d.get("storage_options"):
            d["storage_options"] = {k: "***" for k in d["storage_options"]}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.public_dict(), sort_keys=False)


def _job_name(cfg: SAEConfig, swept: Mapping[str, Any], several_hooks: bool) -> str:
    hook = re.sub(r"[^A-Za-z0-9]+", "", cfg.hook_point or "")
    parts = [hook, cfg.architecture, f"k{cfg.k}"]
    if cfg.architecture in ("topk", "batchtopk") and "top_k" in swept:
        parts.append(f"top{cfg.top_k}")
    for key, value in swept.items():
        if key in ("hook_point", "architecture", "k", "top_k"):
            continue
        parts.append(f"{key}{value}".replace("/", "-"))
    return "-".join(str(p) for p in parts if p)


# -- errors ------------------------------------------------------------------------------------
def _validate(
    data: Mapping[str, Any], source: str, model: type[ExperimentConfig] = ExperimentConfig
) -> ExperimentConfig:
    try:
        return model.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid experiment config: {_describe_errors(e)}") from None


# -- loading -----------------------------------------------------------------------------------
def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of config fields at the top level, got {type(data).__name__}"
        )
    return data


def preset_data(name: str) -> dict[str, Any]:
    """The raw YAML mapping of a shipped preset."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r}: expected one of {list(PRESETS)}")
    text = (
        importlib.resources.files("integral_superposition")
        .joinpath("presets", f"{name}.yaml")
        .read_text("utf-8")
    )
    return _read_yaml(text, f"preset {name!r}")


def load_preset(
    name: str,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    model: type[ExperimentConfig] = ExperimentConfig,
) -> ExperimentConfig:
    """A shipped preset (``default``: demo corpus + gemma-3-270m, minutes on a CPU; ``smoke``:
    a tiny model, under a minute; ``thorough``: the default with full-size analysis, merge
    sweep and steering evaluation), with optional dotted overrides, validated as ``model``
    (a subclass adds its own sections, e.g. the flows' orchestration settings)."""
    data = _deep_merge(model.preset_defaults(name), preset_data(name))
    return _validate(apply_overrides(data, overrides), f"preset {name!r}", model)


def load_config(
    path: str | os.PathLike,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    model: type[ExperimentConfig] = ExperimentConfig,
) -> ExperimentConfig:
    """Load an experiment config from a YAML file (local path or fsspec URI). The file may
    start from a preset with ``preset: smoke``; its other keys override the preset's. A file
    with orchestration sections (``retries``, ``fanout.mode``, ...) loads with the flows'
    model (``integral_superposition.flows.config.load_config``)."""
    from integral_superposition import storage

    source = os.fspath(path)
    try:
        text = storage.read_bytes(source).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config={source!r}: no such file") from None
    data = _read_yaml(text, source)
    base: dict[str, Any] = {}
    if "preset" in data:
        name = str(data.pop("preset"))
        base = _deep_merge(model.preset_defaults(name), preset_data(name))
    merged = _deep_merge(base, data)
    return _validate(apply_overrides(merged, overrides), source, model)


def resolve_config(
    config: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    model: type[ExperimentConfig] = ExperimentConfig,
) -> ExperimentConfig:
    """The CLI's rule: a YAML file, else a preset, else ``default``; then the overrides."""
    if config is not None and preset is not None:
        raise ConfigError("give a config file or a preset, not both")
    if config is not None:
        return load_config(config, overrides, model)
    return load_preset(preset or "default", overrides, model)


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k != "sweep":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def make_run_id(now: _dt.datetime | None = None) -> str:
    """A new run name: ``YYYYmmdd-HHMMSS-xxxx`` (UTC, plus 4 random hex digits)."""
    now = now or _dt.datetime.now(_dt.UTC)
    return now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


# -- JSON schema -------------------------------------------------------------------------------
def json_schema(model: type[ExperimentConfig] = ExperimentConfig) -> dict[str, Any]:
    """The JSON schema of ``model``. ``schemas/experiment.schema.json`` holds the schema of the
    experiment files ``isup`` reads: the flows' model, with the orchestration sections."""
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://integral-superposition.dev/schemas/experiment.schema.json"
    return schema


def schema_path() -> Path:
    """The published schema file inside the package."""
    return Path(__file__).resolve().parent / "schemas" / "experiment.schema.json"


def write_schema(
    path: str | os.PathLike | None = None, model: type[ExperimentConfig] = ExperimentConfig
) -> Path:
    """(Re)write a schema file (the published one: ``python -m
    integral_superposition.flows.config``, with the flows' model)."""
    target = Path(path) if path is not None else schema_path()
    schema = json_schema(model)
    if target.exists():  # replaced only when it is a schema of this config
        try:
            found = json.loads(target.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            found = None
        if not isinstance(found, dict) or found.get("title") != schema.get("title"):
            raise FileExistsError(
                f"path={str(target)!r} exists and is not a schema of the experiment config: "
                "refusing to replace it; choose another file (it was not changed)"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(schema, indent=2, sort_keys=False) + "\n"
    from integral_superposition import storage

    storage.write_bytes(str(target), text.encode("utf-8"))
    return target


if __name__ == "__main__":  # the published schema is the flows' model's (orchestration included)
    raise SystemExit(
        "schemas/experiment.schema.json is written by `python -m integral_superposition.flows.config`"
    )
