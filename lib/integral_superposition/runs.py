"""Run folders ``{storage}/{experiment}/{run}``: where a step's output sits in one, and what
its ``run.json`` index and the outputs' manifests say (the store an SAE was trained on, the
model and dtype it was dumped with, every output of a finished run).

An SAE of a run sits at ``{run}/sae/<name>``; the steps after training write next to it
(``{run}/analysis/<name>``, ``{run}/merge/<name>``, ...).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from typing import Any

from integral_superposition import storage

__all__ = [
    "RUN_INDEX",
    "absolute_storage",
    "basename",
    "dumped_dtype",
    "find_store_of",
    "parent",
    "read_run_outputs",
    "sae_model_id",
    "split_run_root",
]

RUN_INDEX = "run.json"
"""The index a finished run writes into its folder: its config and every step's output."""


def absolute_storage(uri: str) -> str:
    """Local storage made absolute (a worker may run a flow from another directory)."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _split(uri: str) -> tuple[str, str]:
    uri = uri.rstrip("/")
    return posixpath.split(uri) if "://" in uri else os.path.split(uri)


def parent(uri: str, levels: int = 1) -> str:
    """The folder ``levels`` up from ``uri`` (a local path or a URI)."""
    for _ in range(levels):
        uri = _split(uri)[0]
    return uri


def basename(uri: str) -> str:
    """The last part of ``uri`` (a folder's name)."""
    return posixpath.basename(uri.rstrip("/"))


def split_run_root(run_root: str) -> tuple[str, str, str]:
    """``(storage, experiment, run)`` of a run folder ``{storage}/{experiment}/{run}``."""
    root = absolute_storage(run_root).rstrip("/")
    exp_root, run = _split(root)
    storage_root, experiment = _split(exp_root)
    if not (run and experiment and storage_root):
        raise ValueError(
            f"run_root={run_root!r}: expected a folder {{storage}}/{{experiment}}/{{run}}"
        )
    return storage_root, experiment, run


def find_store_of(sae_uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The activation store an SAE of an experiment run was trained on (from the run's
    ``run.json``); raises when the SAE does not sit in a run folder that records it."""
    index = storage.join(parent(sae_uri, 2), RUN_INDEX)
    try:
        doc = storage.read_json(index, storage_options)
    except (FileNotFoundError, OSError, ValueError):
        raise ValueError(
            f"sae_uri={sae_uri!r}: no run index at {index!r} to find its activation store; "
            "pass store_uri explicitly"
        ) from None
    stores = [
        s["output"]["uri"]
        for s in doc.get("steps", [])
        if s.get("output")
        and s["output"]["kind"] == "activations"
        and s["step"] in ("dump", "combine")
    ]
    if not stores:
        raise ValueError(f"{index!r} records no activation store; pass store_uri explicitly")
    return stores[-1]


def sae_model_id(sae_uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The model an SAE was trained on, from its ``cfg.json`` (SAELens ``metadata.model_name``)."""
    try:
        cfg = storage.read_json(storage.join(sae_uri, "cfg.json"), storage_options)
    except (FileNotFoundError, OSError, ValueError):
        cfg = {}
    name = (cfg.get("metadata") or {}).get("model_name") or cfg.get("model_name")
    if not name:
        raise ValueError(f"sae_uri={sae_uri!r}: its cfg.json names no model; pass model_id")
    return str(name)


def dumped_dtype(
    store_uri: str, model_id: str, storage_options: Mapping[str, Any] | None = None
) -> str | None:
    """The dtype (``bf16``, ``fp32``, ...) model ``model_id`` ran in when it dumped the store
    at ``store_uri``; None when the store was dumped from another model or does not say."""
    from integral_superposition.compute import DTYPE_NAMES, short_name

    try:
        dumped = storage.read_manifest(store_uri, storage_options).get("model") or {}
    except (FileNotFoundError, OSError, ValueError):
        return None
    name = str(dumped.get("dtype"))
    if dumped.get("model_id") != model_id or name not in DTYPE_NAMES:
        return None
    return short_name(DTYPE_NAMES[name])


def read_run_outputs(
    run_root: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The config of a finished run and its outputs by kind (``{"sae": [output, ...], ...}``,
    each output as recorded in ``run.json``; the report's own left out)."""
    doc = storage.read_json(storage.join(run_root, RUN_INDEX), storage_options)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for s in doc.get("steps", []):
        if s.get("output") and s["step"] != "report":
            by_kind.setdefault(s["output"]["kind"], []).append(s["output"])
    return doc.get("config", {}), by_kind
