"""Publish a steering evaluation and read it back: :func:`run_steering_eval`,
:class:`SteeringResult` / :func:`load_steering`, :func:`side_by_side` and the report's
:func:`steering_section`."""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from integral_superposition import storage
from integral_superposition.progress import ProgressFn
from integral_superposition.steering.plot import plot_sweep
from integral_superposition.steering.sweep import SteeringEval, SteeringParams, evaluate_steering

log = logging.getLogger(__name__)

__all__ = [
    "SteeringResult",
    "load_steering",
    "run_steering_eval",
    "side_by_side",
    "steering_section",
]


# -- publishing and reading -------------------------------------------------------------------------
def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def run_steering_eval(
    sae_uri: Any,
    store_uri: Any,
    out_uri: str,
    params: SteeringParams | Mapping[str, Any] | None = None,
    *,
    backend,
    storage_options: Mapping[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
    allow_other_store: bool = False,
) -> dict[str, Any]:
    """Evaluate steering of the SAE at ``sae_uri`` (trained on the store at ``store_uri``)
    and publish the sweep to ``out_uri``; returns the manifest (``kind="steering"``). The
    store must be the SAE's training store (``check_training_store``), unless
    ``allow_other_store=True``.

    Files: ``sweep.parquet``, ``generations.parquet``, ``latents.parquet``,
    ``vocabulary.parquet``, ``sweep.png``, ``sweep.svg``, ``summary.json``; the manifest is
    written last. ``sae_uri``/``store_uri`` may also be a loaded SAE / store. Inputs are
    checked before anything is written; on failure the files written so far are removed.
    """
    from integral_superposition.dump.store import ActivationStore
    from integral_superposition.sae import (
        SparseAutoencoder,
        check_training_store,
        load_sae,
        read_sae_manifest,
    )
    from integral_superposition.viz.figures import close_figure, figure_bytes

    p = (
        params
        if isinstance(params, SteeringParams)
        else SteeringParams.model_validate(dict(params or {}))
    )
    if backend is None or not hasattr(backend, "generate"):
        raise TypeError(f"backend={backend!r}: expected a causal LM backend (backends.HFCausalLM)")
    if isinstance(sae_uri, SparseAutoencoder):
        sae, sae_info = sae_uri, {"uri": None, "content_hash": None}
    else:
        sae = load_sae(str(sae_uri), storage_options=storage_options)
        try:
            sae_info = {
                "uri": str(sae_uri),
                "content_hash": read_sae_manifest(str(sae_uri), storage_options).get(
                    "content_hash"
                ),
            }
        except (FileNotFoundError, ValueError):  # a SAELens folder without our manifest
            sae_info = {"uri": str(sae_uri), "content_hash": None}
    store = (
        store_uri
        if isinstance(store_uri, ActivationStore)
        else ActivationStore(store_uri, storage_options)
    )
    if not isinstance(sae_uri, SparseAutoencoder):
        check_training_store(sae_uri, store, storage_options, allow_other_store)
    if str(out_uri).rstrip("/") in {
        str(sae_info["uri"] or "").rstrip("/"),
        *[u.rstrip("/") for u in store.uris],
    }:
        raise ValueError(f"out_uri={out_uri!r} is an input folder: expected a new location")
    storage.unpublish(out_uri, "steering", storage_options)

    ev = evaluate_steering(backend, sae, store, p, on_progress=on_progress)
    written: dict[str, dict[str, Any]] = {}
    try:
        fig = ev.figure()
        try:
            payloads = {
                "sweep.parquet": _parquet(ev.table),
                "generations.parquet": _parquet(ev.generations),
                "latents.parquet": _parquet(ev.picks),
                "vocabulary.parquet": _parquet(ev.vocabulary),
                "sweep.png": figure_bytes(fig, "png"),
                "sweep.svg": figure_bytes(fig, "svg"),
                "summary.json": storage.canonical_json(_json_safe(ev.summary), indent=2).encode(),
            }
        finally:
            close_figure(fig)
        for name, data in payloads.items():
            storage.write_bytes(storage.join(out_uri, name), data, storage_options)
            written[name] = storage.file_entry("", data)
        return storage.write_manifest(
            out_uri, "steering", p, written, storage_options,
            sae=sae_info,
            activations={"uris": list(store.uris), "content_hash": store.content_hash, "hook_point": store.hook_point},
            model=backend.describe() if hasattr(backend, "describe") else None,
            summary=_json_safe({k: ev.summary[k] for k in ("hook_point", "classifier", "latents")}),
        )  # fmt: skip
    except BaseException:
        for name in written:
            try:
                storage.remove(storage.join(out_uri, name), storage_options, recursive=False)
            except Exception as e:  # best effort: no manifest was written
                log.warning("could not remove %s after a failed steering evaluation: %s", name, e)
        raise


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class SteeringResult:
    """A published steering evaluation, read lazily: ``manifest``, ``summary`` and the tables
    ``sweep``, ``generations``, ``picks``, ``vocabulary`` as DataFrames."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None):
        self.uri = uri
        self.storage_options = storage_options
        self.manifest = storage.read_manifest(uri, storage_options, kind="steering")
        self._cache: dict[str, Any] = {}

    def read(self, name: str) -> bytes:
        if name not in self.manifest["files"]:
            raise FileNotFoundError(f"{self.uri!r} has no {name!r}")
        return storage.read_bytes(storage.join(self.uri, name), self.storage_options)

    def _table(self, name: str) -> pd.DataFrame:
        if name not in self._cache:
            self._cache[name] = pd.read_parquet(io.BytesIO(self.read(name)))
        return self._cache[name]

    @property
    def sweep(self) -> pd.DataFrame:
        return self._table("sweep.parquet")

    table = sweep

    @property
    def generations(self) -> pd.DataFrame:
        return self._table("generations.parquet")

    @property
    def picks(self) -> pd.DataFrame:
        return self._table("latents.parquet")

    @property
    def vocabulary(self) -> pd.DataFrame:
        return self._table("vocabulary.parquet")

    @property
    def summary(self) -> dict[str, Any]:
        if "summary" not in self._cache:
            self._cache["summary"] = json.loads(self.read("summary.json"))
        return self._cache["summary"]

    def figure(self) -> Figure:
        """The sweep plot, redrawn from the table (the PNG/SVG are ``read('sweep.png')``)."""
        return plot_sweep(self.sweep, self.summary.get("ppl_ratio_max"))


def load_steering(uri: str, storage_options: Mapping[str, Any] | None = None) -> SteeringResult:
    """Open a published steering evaluation."""
    return SteeringResult(uri, storage_options)


def side_by_side(
    result: SteeringEval | SteeringResult | str,
    latent: int | None = None,
    strength: float | None = None,
    *,
    prompts: str = "neutral",
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Unsteered and steered continuations of the same prompts: ``prompt, unsteered, steered``.

    ``latent``: default the first steered latent. ``strength``: default the summary's best
    strength within the fluency bound (else the largest). ``prompts``: ``neutral`` or
    ``own_label``.
    """
    if isinstance(result, str):
        result = load_steering(result, storage_options)
    g = result.generations
    summ = {int(s["latent"]): s for s in result.summary.get("latents", [])}
    if latent is None:
        latent = int(g.loc[g["control"] == "steer", "latent"].iloc[0])
    if latent not in set(g["latent"].astype(int)):
        raise ValueError(
            f"latent={latent}: not steered in this evaluation (latents {sorted(summ)})"
        )
    steered_rows = g[
        (g["latent"] == latent)
        & (g["prompts"] == prompts)
        & g["strength"].notna()
        & g["control"].isin(["steer", "own_label"])
    ]
    if strength is None:
        best = summ.get(latent, {}).get("best_strength")
        strength = float(best) if best is not None else float(steered_rows["strength"].max())
    st = steered_rows[np.isclose(steered_rows["strength"], strength)]
    if st.empty:
        raise ValueError(
            f"strength={strength}: not in the sweep {sorted(steered_rows['strength'].unique())}"
        )
    base_control = "unsteered" if prompts == "neutral" else "own_label"
    base = g[
        (g["latent"] == latent)
        & (g["control"] == base_control)
        & g["strength"].isna()
        & (g["prompts"] == prompts)
    ]
    label = str(st["label"].iloc[0])
    return pd.DataFrame(
        {
            "prompt": st["prompt"].to_numpy(),
            "unsteered": base["text"].to_numpy()[: len(st)],
            f"steered ({latent} {label}, strength {strength:g})": st["text"].to_numpy(),
        }
    )


def steering_section(
    result: SteeringEval | SteeringResult | str, storage_options: Mapping[str, Any] | None = None
):
    """A :class:`~integral_superposition.viz.report.ReportSection` with the sweep table, the
    plot and side-by-side generations of every steered latent."""
    from integral_superposition.viz.report import ReportSection

    if isinstance(result, str):
        result = load_steering(result, storage_options)
    s = result.summary
    clf = s.get("classifier", {})
    lines = [
        f"Steering at {s.get('hook_point')} ({s.get('mode')}, positions {s.get('positions')}) over "
        f"{s.get('n_prompts')} neutral prompts. Label classifier: held-out accuracy "
        f"{clf.get('held_out_accuracy', float('nan')):.3f} (chance {clf.get('chance', float('nan')):.2f})."
    ]
    for lat in s.get("latents", []):
        best = lat.get("best_strength")
        lines.append(
            f"Latent {lat['latent']} ({lat['label']}): classifier share {lat['baseline_share']:.2f} unsteered"
            + (
                f", {lat['best_share']:.2f} at strength {best:g} (perplexity x{lat['best_ppl_ratio']:.2f})"
                if best is not None
                else ", no strength within the fluency bound"
            )
            + (
                f"; random latent {lat['random_latent']} moves it by at most {lat['random_max_shift']:.2f}."
                if lat.get("random_max_shift") is not None
                else "."
            )
        )
    cols = [
        "latent",
        "label",
        "control",
        "strength",
        "share",
        "vocab_mass",
        "perplexity",
        "ppl_ratio",
        "distinct2",
        "classifier_accuracy",
    ]
    table = result.table[cols].round(4)
    gens = []
    for lat in s.get("latents", []):
        try:
            gens.append(side_by_side(result, int(lat["latent"])))
        except ValueError:
            continue
    frame = pd.concat(gens, ignore_index=True) if gens else None
    if frame is not None:  # one steered column per latent: merge them under one header
        steered = frame.filter(like="steered (").bfill(axis=1).iloc[:, 0]
        frame = pd.DataFrame(
            {"prompt": frame["prompt"], "unsteered": frame["unsteered"], "steered": steered}
        )
    return ReportSection(
        "Steering",
        text="\n\n".join(lines),
        tables=[("Strength sweep with controls", table)],
        figures=[("Effect against perplexity", result.figure())],
        generations=frame,
        anchor="steering",
    )
