"""The sections of an ``ExperimentConfig``: data, model, fan-out, online training, steps,
report options, and ``SAEJob`` (one SAE of the experiment).

Each section is a pydantic model whose field docstrings are its documentation; unknown
keys, NaN and inf are errors. ``integral_superposition.experiment`` assembles them into
``ExperimentConfig`` and loads configs from YAML, presets and overrides.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)

from integral_superposition.config import SAEConfig

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class ConfigError(ValueError):
    """An invalid experiment config; the message names every bad field."""


class Section(BaseModel):
    """Base of every section: unknown keys, NaN and inf are errors; assignments validate."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
        hide_input_in_errors=True,  # a rejected value may be a credential
    )


class DataSpec(Section):
    """Where the labelled texts come from (anything ``data.load_dataset_auto`` reads)."""

    source: str = "demo:4000"
    """``demo`` / ``demo:N`` (the built-in synthetic headlines), a CSV/TSV/Parquet/JSONL path or URI, ``kaggle:owner/name`` or ``hf:name``."""
    text_col: str = "title"
    """Column holding the texts (built from ``text`` when that is set)."""
    text: str | list[str] | None = None
    """Build the texts from other columns: a template such as ``"{title}. {description}"`` or
    a list of columns joined with a space (None: ``text_col`` as it is)."""
    label_col: str | None = "topic"
    """Column holding the labels (None: an unlabelled dataset; enrichment is then skipped)."""
    filename: str | None = None
    """File inside a Kaggle dataset."""
    max_rows: int | None = Field(None, ge=1)
    """Keep only the first N rows."""
    balance: bool = False
    """Down-sample every label to the rarest one's count."""
    seed: int = 0
    """Seed of the demo corpus and of balancing."""

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("expected a dataset source, e.g. 'demo:4000' or 'data/news.csv'")
        from integral_superposition import storage

        storage.refuse_uri_credentials(v, "source")
        if v.startswith("demo:") and v[5:].isdigit():
            from integral_superposition.data.demo_corpus import MAX_TITLES_PER_TOPIC, TOPICS

            limit = MAX_TITLES_PER_TOPIC * len(TOPICS)
            if int(v[5:]) > limit:
                raise ValueError(
                    f"{v!r}: the demo corpus has at most {limit} distinct headlines; "
                    "use a smaller N or a real dataset"
                )
        return v

    @field_validator("text")
    @classmethod
    def _text(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is not None:
            from integral_superposition.data.datasets import text_columns

            text_columns(v)
        return v

    def is_file(self) -> bool:
        """True when ``source`` names a file (a local path or a URI) rather than a dataset id."""
        s = self.source
        if s == "demo" or s.startswith(("demo:", "kaggle:", "hf:")):
            return False
        return "://" in s or os.path.exists(os.path.expanduser(s))

    def load(self, storage_options: Mapping[str, Any] | None = None):
        """The dataset as a validated DataFrame (``data.load_dataset_auto``)."""
        from integral_superposition.data import load_dataset_auto

        kwargs: dict[str, Any] = {
            "balance": self.balance,
            "seed": self.seed,
            "max_rows": self.max_rows,
        }
        if self.text is not None:
            kwargs["text"] = self.text
        if self.is_file():
            kwargs["storage_options"] = dict(storage_options or {})
        return load_dataset_auto(
            self.source, self.text_col, self.label_col, filename=self.filename, **kwargs
        )

    def stamp(self, storage_options: Mapping[str, Any] | None = None) -> str:
        """A cheap identity of the source's current content, without reading it: size and
        modification time (or ETag) of a file, the spec itself for built-in or remote ids."""
        if not self.is_file():
            return f"id:{self.source}"
        from integral_superposition import storage

        fs, path = storage.get_fs(self.source, storage_options)
        info = fs.info(path)
        parts = [str(info.get(k)) for k in ("size", "ETag", "LastModified", "mtime") if info.get(k)]
        return "file:" + ":".join(parts)


class ModelSpec(Section):
    """Which model the activations come from, and where it runs."""

    model_id: str = "gemma-3-270m"
    """A hub id, a local directory, a ``.gguf`` file, ``gemma-3-270m`` (embedded, offline) or ``tiny:<family>``."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute dtype of the model: ``auto`` is bf16 on GPUs that support it (fp16 on older ones) and on CPUs with native bf16 (AVX512-BF16, AMX), float32 on other CPUs, where bf16 runs many times slower."""
    device: str = "auto"
    """``auto`` (the first CUDA device when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    device_map: str | dict[str, Any] | None = None
    """Accelerate device map for a model larger than one device (``auto``, ``balanced``, or an explicit map); overrides ``device``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    trust_remote_code: bool = False
    """Allow model code from the hub."""

    def resolved_device_map(self) -> str | dict[str, Any] | None:
        """What the backend's ``from_pretrained(device_map=...)`` gets: the explicit map, the
        CUDA device when ``device`` asks for one (or ``auto`` finds one), else None (CPU)."""
        if self.device_map is not None:
            return self.device_map
        if self.device == "cpu":
            return None
        from integral_superposition.compute import resolve_device

        dev = resolve_device(self.device)
        return None if dev.type == "cpu" else str(dev)

    def resolved_dtype(self) -> str:
        """The dtype the model computes in on this machine: ``dtype``, or what ``auto`` picks
        for the device it loads on (``fp32``, ``bf16`` or ``fp16``)."""
        from integral_superposition.compute import resolve_device, resolve_dtype, short_name

        dev = resolve_device("auto" if self.device_map is not None else self.device)
        return short_name(resolve_dtype(self.dtype, dev, arg="model.dtype"))


class FanoutConfig(Section):
    """How the documents of a large corpus are split for dumping: documents
    ``id % partitions == i`` go to partition ``i``; the parts are combined into one store
    that training reads. (Where the partitions run is the flows' business:
    ``integral_superposition.flows.config.FanoutPlan`` adds it.)"""

    partitions: int = Field(1, ge=1, le=4096)
    """Number of partition dumps (1: a single dump)."""


class OnlineConfig(Section):
    """Online training: SAEs train straight from the model's forward passes through an
    in-memory shuffle buffer (``sae.shuffle_buffer_tokens``), with no activation store first."""

    enabled: bool = False
    """Train online: no dump step; every SAE of the experiment trains on one stream of forward passes."""
    write_store: bool = False
    """Also write every activation to the store at ``paths.shards_dir`` while training (a full store, as a dump writes; analysis then reads all of it)."""
    sample_tokens: int = Field(65536, ge=1)
    """Without ``write_store``: stored tokens of the bounded sample (held-out documents first) dumped to ``paths.shards_dir`` for evaluation, analysis, merging and steering."""


class StepsConfig(Section):
    """Which steps after training run."""

    analyze: bool = True
    """Analyse every SAE's latents (statistics, enrichment, dashboards)."""
    merge: bool = True
    """Merge redundant latents of every SAE and evaluate the merged SAE."""
    steer_eval: bool = True
    """Evaluate steering with every SAE's most enriched latents."""
    report: bool = True
    """Write the HTML report and the Prefect summary artifacts."""


class ReportOptions(Section):
    """The experiment report."""

    title: str | None = None
    """Page title (default: the experiment name and run)."""
    top_per_label: int = Field(10, ge=1)
    """Most enriched latents listed per label."""
    figure_width: int = Field(480, ge=64)
    """Width in pixels of the PNGs embedded in the Prefect markdown summary."""


class SAEJob(BaseModel):
    """One SAE of the experiment: its folder name, hook point and training config."""

    model_config = ConfigDict(frozen=True)

    name: str
    hook_point: str
    cfg: SAEConfig
