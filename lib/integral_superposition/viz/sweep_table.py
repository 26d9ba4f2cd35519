"""The sweep table under the report's headline: one row per SAE of a sweep, one column per
headline result (with its control and the tokens it was measured on)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from integral_superposition import storage
from integral_superposition.viz.headline import headline_rows
from integral_superposition.viz.templates import MISSING

__all__ = ["SWEEP_COLUMNS", "sweep_rows"]

SWEEP_COLUMNS = {
    "FVU": "FVU",
    "L0 (active latents per token)": "L0",
    "dead latents": "dead",
    "CE loss recovered": "CE recovered",
    "delta CE (nats per token)": "delta CE",
    "KL to the clean model (nats per token)": "KL",
    "accuracy, top 1 latent": "probe k=1",
    "accuracy, top 10 latents": "probe k=10",
    "merged FVU": "merged FVU",
}
"""The headline results a sweep compares, one column each (result name -> column)."""


def sweep_rows(
    entries: Sequence[Mapping[str, Any]], storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per SAE of a sweep: ``{"name", "href", "cells": [{"value", "control", "split"}]}``
    with a cell per :data:`SWEEP_COLUMNS` entry. Each entry names the SAE (``name``, ``sae``
    URI) and optionally its ``analysis``, ``merge`` and ``steering`` URIs and the ``href`` of
    its own report."""
    from integral_superposition.analysis.result import load_analysis

    out = []
    for e in entries:
        if not isinstance(e, Mapping) or "name" not in e or "sae" not in e:
            raise ValueError(
                f"sweep: expected mappings with 'name' and 'sae' (and optional 'analysis', "
                f"'merge', 'steering', 'href'), got {e!r}"
            )
        try:
            manifest = storage.read_manifest(str(e["sae"]), storage_options)
        except (FileNotFoundError, ValueError):
            manifest = None
        analysis = load_analysis(str(e["analysis"]), storage_options) if e.get("analysis") else None
        rows = {
            r.result: r
            for r in headline_rows(manifest, analysis, e.get("merge"), None, storage_options)
        }
        cells = []
        for result in SWEEP_COLUMNS:
            r = rows.get(result)
            cells.append(
                {
                    "value": MISSING if r is None else r.shown,
                    "control": None if r is None or r.control is None else r.control_shown,
                    "split": None if r is None else r.split,
                }
            )
        out.append({"name": str(e["name"]), "href": e.get("href"), "cells": cells})
    return out
