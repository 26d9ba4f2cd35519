"""Reading a published analysis (see :mod:`integral_superposition.pipelines.analyze` for its
layout)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from integral_superposition import storage
from integral_superposition.outputs import Output


class AnalysisResult(Output):
    """A published analysis, read lazily: ``manifest``, ``summary``, the tables as DataFrames,
    and figure bytes."""

    kind = "analysis"

    def table(self, name: str) -> pd.DataFrame | None:
        """``latents``, ``enrichment``, ``examples``, ``neighbours``, ``activation_hist`` or
        ``logit_lens`` (None when this run did not produce it)."""
        return self.parquet(f"tables/{name}.parquet")

    @property
    def summary(self) -> dict[str, Any]:
        return self.json("summary.json")

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
