"""Reading a published analysis (see :mod:`integral_superposition.pipelines.analyze` for its
layout)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from integral_superposition import storage
from integral_superposition.outputs import Output


class AnalysisResult(Output):
    """A published analysis, read lazily: ``manifest``, ``summary``, the tables as DataFrames,
    and figure bytes."""

    kind = "analysis"

    def table(self, name: str) -> pd.DataFrame | None:
        """``latents``, ``enrichment``, ``enrichment_control``, ``top_latents``, ``examples``,
        ``neighbours``, ``activation_hist`` or ``logit_lens`` (None when this run did not
        produce it)."""
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

    @property
    def control(self) -> pd.DataFrame | None:
        """The shuffled-label control: one row per (level, seed)."""
        return self.table("enrichment_control")

    @property
    def top_latents(self) -> pd.DataFrame | None:
        """Best latents per label at the lead unit, near-duplicates grouped."""
        return self.table("top_latents")

    def top_latents_grouped_by(self, groups: Any, grouping: str = "merge") -> pd.DataFrame:
        """The top-latents table regrouped by ``groups`` (``int [K]``, e.g. a merge's cluster
        labels) instead of this analysis' redundancy groups: same unit, generic latents, alpha
        and rows per label (:func:`~integral_superposition.analysis.redundancy.top_latents_table`).
        """
        from integral_superposition.analysis.redundancy import top_latents_table

        if self.enrichment is None:
            raise ValueError(f"{self.uri!r} has no enrichment table (run with enrichment=True)")
        config = self.manifest.get("config", {})
        latents = self.latents
        generic = latents["generic"].to_numpy(dtype=bool) if "generic" in latents else None
        return top_latents_table(
            self.enrichment,
            np.asarray(groups),
            self.summary.get("lead_level", "token"),
            generic=generic,
            alpha=float(config.get("alpha", 0.05)),
            per_label=int(config.get("top_per_label", 10)),
            grouping=grouping,
            best_q=config.get("best_q"),
        )

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
