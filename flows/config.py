"""``FlowExperimentConfig``: the library's experiment config plus where and how it runs.

The library's :class:`~integral_superposition.experiment.ExperimentConfig` says what an
experiment computes. The flows add what only orchestration needs, as sections of the same
YAML file (so every experiment file, preset and ``--set`` override reads as before):

- ``storage_secret``: the Prefect Secret block holding the storage credentials;
- ``result_storage``: where Prefect keeps task results (the cache records);
- ``retries``: retries of transient failures;
- ``gpu_limit``: the global concurrency limit every GPU step takes a slot of;
- ``fanout``: the library's partitioning (``partitions``) plus where the parts run
  (``mode``, ``deployment``), how training is spread over deployment runs (``train``,
  ``train_deployment``) and how many GPUs each training run gets (``gpus_per_run``).

The loaders here are the library's, validating into :class:`FlowExperimentConfig`; the
published JSON schema (``schemas/experiment.schema.json``) is this model's:
``python -m integral_superposition.flows.config`` rewrites it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from integral_superposition import experiment as _lib
from integral_superposition.experiment import ExperimentConfig, FanoutConfig
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "FanoutPlan",
    "FlowExperimentConfig",
    "RetryConfig",
    "TrainFanout",
    "json_schema",
    "load_config",
    "load_preset",
    "resolve_config",
    "write_schema",
]

PRESET_ORCHESTRATION: dict[str, dict[str, Any]] = {
    "smoke": {"retries": {"retries": 2, "delay_s": 1.0}},
}
"""Orchestration settings of the shipped presets (the library's preset files hold the rest)."""

TrainFanout = Literal["in_process", "per_hook_point", "per_sae"]


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
    )


class RetryConfig(_Section):
    """Retries of transient failures (network and S3 errors, connection resets, CUDA errors a
    restart fixes). Bad configs, shape mismatches, NaNs and out-of-memory errors never retry."""

    retries: int = Field(3, ge=0)
    """Retries per task."""
    delay_s: float = Field(10.0, ge=0)
    """Delay before the first retry; doubles with each further retry."""
    jitter: float = Field(0.2, ge=0)
    """Random jitter of the delays, as a fraction."""


class FanoutPlan(FanoutConfig):
    """How the dump's partitions and the SAE trainings are spread over workers."""

    mode: Literal["tasks", "deployments"] = "tasks"
    """Where dump partitions run: ``tasks`` (tasks of the experiment flow) or ``deployments`` (each partition is a run of ``deployment`` on a worker, e.g. one GPU pod each)."""
    deployment: str = "dump-partition/dump-partition-gpu"
    """The ``flow-name/deployment-name`` that dumps one partition (``mode: deployments``)."""
    train: TrainFanout = "in_process"
    """Where SAEs train: ``in_process`` (one task per hook point in the experiment flow), ``per_hook_point`` (each hook point's SAEs as one run of ``train_deployment``, e.g. one GPU pod each) or ``per_sae`` (every SAE of a sweep as its own run)."""
    train_deployment: str = "train-part/train-part-gpu"
    """The ``flow-name/deployment-name`` that trains one group of SAEs (``train`` other than ``in_process``)."""
    gpus_per_run: int = Field(1, ge=1, le=64)
    """GPUs of one training: above 1, training runs data-parallel under torchrun with one process per GPU (a deployment run gets the job variable of the same name, which requests the GPUs of its pod or container)."""
    distribute_modules: bool = False
    """With ``gpus_per_run`` above 1: each process trains its own SAEs of the group (sparsify's ``--distribute_modules``; at least one SAE per process) instead of a slice of every batch."""


class FlowExperimentConfig(ExperimentConfig):
    """An experiment with its orchestration settings (see the module docstring)."""

    fanout: FanoutPlan = Field(default_factory=FanoutPlan)
    """Partitioned dumping and where the partitions and trainings run."""
    storage_secret: str | None = None
    """Name of a Prefect Secret block holding a JSON object of storage options (S3 credentials, endpoint); merged under ``storage_options`` at run time and never written anywhere."""
    result_storage: str | None = "auto"
    """Where Prefect keeps task results, the cache records that let a rerun skip finished steps: ``auto`` (``{storage}/{name}/.prefect-results`` for remote storage, Prefect's local default otherwise), a saved block slug such as ``remote-file-system/isup-results``, or None (Prefect's default)."""
    retries: RetryConfig = Field(default_factory=RetryConfig)
    """Retries of transient failures."""
    gpu_limit: str | None = "gpu"
    """Global concurrency limit taken by every GPU step (a slot each); skipped when no limit of that name exists."""

    @model_validator(mode="before")
    @classmethod
    def _from_library(cls, data: Any) -> Any:
        # a library config (no orchestration sections) takes the defaults of the flows
        if isinstance(data, ExperimentConfig) and not isinstance(data, cls):
            return data.model_dump()
        return data

    @model_validator(mode="after")
    def _online_in_process(self) -> FlowExperimentConfig:
        # online training is one task: one stream of forward passes feeds every SAE
        if self.online.enabled and self.fanout.train != "in_process":
            raise ValueError(
                f"fanout.train={self.fanout.train!r}: online.enabled trains every SAE in one "
                "task of the experiment flow; expected fanout.train='in_process'"
            )
        if self.online.enabled and self.fanout.gpus_per_run > 1:
            raise ValueError(
                f"fanout.gpus_per_run={self.fanout.gpus_per_run}: online.enabled trains in one "
                "process; expected 1 (torchrun runs online training from the library)"
            )
        return self

    @classmethod
    def preset_defaults(cls, preset: str) -> dict[str, Any]:
        """The orchestration settings of a shipped preset."""
        return copy.deepcopy(PRESET_ORCHESTRATION.get(preset, {}))

    def library_config(self) -> ExperimentConfig:
        """The same experiment as the library's config (orchestration settings left out)."""
        data = self.model_dump(include=set(ExperimentConfig.model_fields))
        data["fanout"] = {"partitions": self.fanout.partitions}
        return ExperimentConfig.model_validate(data)


def load_preset(
    name: str, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> FlowExperimentConfig:
    """A shipped preset with its orchestration settings, plus dotted overrides."""
    return _lib.load_preset(name, overrides, FlowExperimentConfig)  # type: ignore[return-value]


def load_config(
    path: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> FlowExperimentConfig:
    """An experiment YAML file (``preset: <name>`` starts from a preset), plus overrides."""
    return _lib.load_config(path, overrides, FlowExperimentConfig)  # type: ignore[return-value]


def resolve_config(
    config: str | os.PathLike | None = None,
    preset: str | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> FlowExperimentConfig:
    """The CLI's rule: a YAML file, else a preset, else ``default``; then the overrides."""
    return _lib.resolve_config(config, preset, overrides, FlowExperimentConfig)  # type: ignore[return-value]


def json_schema() -> dict[str, Any]:
    """The JSON schema of experiment files (what ``schemas/experiment.schema.json`` holds)."""
    return _lib.json_schema(FlowExperimentConfig)


def write_schema(path: str | os.PathLike | None = None) -> Path:
    """(Re)write the published schema file."""
    return _lib.write_schema(path, FlowExperimentConfig)


if __name__ == "__main__":  # python -m integral_superposition.flows.config: refresh the schema
    print(write_schema())
