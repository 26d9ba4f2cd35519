"""What the feature dashboards show, gathered once for all latents (:class:`DashboardData`)
and pre-rendered for every page (:class:`PreparedDashboards`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from markupsafe import Markup

from integral_superposition.analysis.jaccard_sparse import Neighbours
from integral_superposition.analysis.logit_lens import LogitLens
from integral_superposition.analysis.scan import TopKSets
from integral_superposition.analysis.top_tokens import Examples
from integral_superposition.viz.safe_html import N_SHADES
from integral_superposition.viz.templates import token_markup

__all__ = ["DashboardData", "PreparedDashboards"]


@dataclass
class DashboardData:
    """Everything the pages show, for all ``K`` latents (built once, rendered per latent)."""

    title: str
    label_names: list[str]
    table: pd.DataFrame
    """Per-latent table indexed 0..K-1 (from ``run_analysis``: statistics, best label, ...)."""
    examples: Examples
    token_text: Mapping[int, str]
    quantile_edges: np.ndarray | None = None
    hist: np.ndarray | None = None
    """int ``[K, C, n_bins]`` firing activations per label on log10 bins."""
    hist_edges: np.ndarray | None = None
    enrichment: pd.DataFrame | None = None
    neighbours: Neighbours | None = None
    lens: LogitLens | None = None

    @classmethod
    def build(
        cls,
        *,
        table: pd.DataFrame,
        examples: Examples,
        token_text: Mapping[int, str],
        top: TopKSets | None = None,
        enrichment: pd.DataFrame | None = None,
        neighbours: Neighbours | None = None,
        lens: LogitLens | None = None,
        label_names: Sequence[str] | None = None,
        title: str = "SAE latents",
    ) -> DashboardData:
        t = table.set_index("latent", drop=False).sort_index()
        if not np.array_equal(t.index.to_numpy(), np.arange(len(t))):
            raise ValueError("table: expected one row per latent 0..K-1")
        return cls(
            title=title,
            label_names=list(
                label_names or (top.label_names if top is not None and top.label_names else [])
            ),
            table=t,
            examples=examples,
            token_text=token_text,
            quantile_edges=None if top is None else top.quantile_edges,
            hist=None if top is None else top.label_hist,
            hist_edges=None if top is None else top.hist_edges,
            enrichment=enrichment,
            neighbours=neighbours,
            lens=lens,
        )

    @property
    def n_latents(self) -> int:
        return len(self.table)


class PreparedDashboards:
    """Vectorised pre-rendering shared by all pages: each example's HTML line, grouped by latent."""

    def __init__(self, data: DashboardData):
        self.data = data
        K = data.n_latents
        ex = data.examples
        ids = np.array(sorted(int(i) for i in data.token_text), dtype=np.int64)
        shown = [token_markup(data.token_text[int(i)]) for i in ids]
        self.tok_html = {int(i): h for i, h in zip(ids, shown, strict=True)}
        # plain str: numpy's string concatenation below must not re-escape the markup around
        vocab_html = np.array(["", *map(str, shown)], dtype=object)
        if ids.size:
            pos = np.searchsorted(ids, ex.token_ids).clip(0, ids.size - 1)
            known = (ex.token_ids >= 0) & (ids[pos] == ex.token_ids)
            pos = np.where(known, pos + 1, 0)
        else:
            known = np.zeros(ex.token_ids.shape, dtype=bool)
            pos = np.zeros(ex.token_ids.shape, dtype=np.int64)
        fallback = (ex.token_ids >= 0) & ~known
        text = vocab_html[pos]
        if fallback.any():
            ids_txt = ex.token_ids[fallback].astype(str).astype(object)
            text[fallback] = "&lt;" + ids_txt + "&gt;"
        vmax = np.asarray(data.table["max_act"], dtype=np.float64)[ex.latents]
        ratio = np.where(vmax[:, None] > 0, ex.acts / np.maximum(vmax[:, None], 1e-30), 0.0)
        level = np.clip(np.ceil(ratio * N_SHADES - 1e-9), 0, N_SHADES).astype(np.int64)
        level[ex.acts <= 0] = 0
        # Compact markup (pages for thousands of latents): unquoted attributes where valid,
        # no class or tooltip on tokens where the latent is silent.
        shade = [""] + [f" class=a{i}" for i in range(1, N_SHADES + 1)]
        hit = [" class=h"] + [f' class="a{i} h"' for i in range(1, N_SHADES + 1)]
        cls = np.array(shade, dtype=object)[level]
        cls[:, ex.center] = np.array(hit, dtype=object)[level[:, ex.center]]
        vals = np.char.mod("%.3g", ex.acts.astype(np.float64)).astype(object)
        tip = np.where(ex.acts > 0, " title=" + vals, "").astype(object)
        spans = "<span" + cls + tip + ">" + text + "</span>"
        spans[ex.window_rows < 0] = ""
        head = np.char.mod("%.3g", ex.values.astype(np.float64)).astype(object)
        lines = [
            '<div class="ex"><span class="v">' + h + "</span>" + "".join(r) + "</div>"
            for h, r in zip(head, spans, strict=True)
        ]
        order = np.lexsort((ex.rank, ex.kind, ex.latents))
        # pre-rendered rows of escaped tokens and numbers: inserted into the pages as markup
        self.lines = np.array([Markup(line) for line in lines], dtype=object)[order]
        self.kind = ex.kind[order]
        starts = np.searchsorted(ex.latents[order], np.arange(K + 1))
        self.starts = starts
        self.enrich = self._enrichment_rows(data)
        self.neighbours = self._neighbour_lists(data)

    def _enrichment_rows(self, data: DashboardData) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        if data.enrichment is None:
            return out
        K, C = data.n_latents, len(data.label_names)
        levels = sorted(data.enrichment["level"].unique(), key=lambda lv: (lv != "token", str(lv)))
        for level in levels:
            t = data.enrichment[data.enrichment["level"] == level].sort_values(
                ["latent", "label_id"]
            )
            if len(t) != K * C:
                continue
            out[str(level)] = {
                c: t[c].to_numpy().reshape(K, C)
                for c in (
                    "frac_in_set",
                    "base_rate",
                    "log_odds",
                    "q",
                    "auroc",
                    "in_set",
                    "set_size",
                    "significant",
                )
            }
        return out

    def _neighbour_lists(self, data: DashboardData) -> list[list[tuple[int, float]]] | None:
        nb = data.neighbours
        if nb is None:
            return None
        return [
            [(int(i), float(jc)) for i, jc in zip(idx[idx >= 0], jac[idx >= 0], strict=True)]
            for idx, jac in zip(nb.index, nb.jaccard, strict=True)
        ]
