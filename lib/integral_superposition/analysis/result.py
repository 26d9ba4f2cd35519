"""Reading a published analysis (see :mod:`integral_superposition.analysis.run` for its layout)."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import pandas as pd

from integral_superposition import storage


class AnalysisResult:
    """A published analysis, read lazily: ``manifest``, ``summary``, the tables as DataFrames,
    and figure bytes."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None):
        self.uri = uri
        self.storage_options = storage_options
        self.manifest = storage.read_manifest(uri, storage_options, kind="analysis")
        self._cache: dict[str, Any] = {}

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def read(self, name: str) -> bytes:
        if not self.has(name):
            raise FileNotFoundError(f"{self.uri!r} has no {name!r}")
        return storage.read_bytes(storage.join(self.uri, name), self.storage_options)

    def table(self, name: str) -> pd.DataFrame | None:
        """``latents``, ``enrichment``, ``examples``, ``neighbours``, ``activation_hist`` or
        ``logit_lens`` (None when this run did not produce it)."""
        key = f"tables/{name}.parquet"
        if key not in self._cache:
            self._cache[key] = (
                pd.read_parquet(io.BytesIO(self.read(key))) if self.has(key) else None
            )
        return self._cache[key]

    @property
    def summary(self) -> dict[str, Any]:
        if "summary" not in self._cache:
            self._cache["summary"] = json.loads(self.read("summary.json"))
        return self._cache["summary"]

    @property
    def latents(self) -> pd.DataFrame:
        return self.table("latents")

    @property
    def enrichment(self) -> pd.DataFrame | None:
        return self.table("enrichment")

    def figure(self, name: str, fmt: str = "png") -> bytes | None:
        key = f"figures/{name}.{fmt}"
        return self.read(key) if self.has(key) else None

    def dashboard_uri(self, latent: int | None = None) -> str | None:
        """URI of the index page, or of latent ``latent``'s page (None when not written)."""
        from integral_superposition.viz.panels import latent_page_name

        name = (
            "dashboards/index.html" if latent is None else f"dashboards/{latent_page_name(latent)}"
        )
        return storage.join(self.uri, name) if self.has(name) else None


def load_analysis(uri: str, storage_options: Mapping[str, Any] | None = None) -> AnalysisResult:
    """Open a published analysis output."""
    return AnalysisResult(uri, storage_options)
