"""What every step runner reads first: the SAE and the activation store it runs on, checked
against each other before anything is written."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["load_inputs"]


def load_inputs(
    sae_uri: Any,
    store_uri: Any,
    storage_options: Mapping[str, Any] | None,
    allow_other_store: bool = False,
) -> tuple[Any, dict[str, Any], Any]:
    """The SAE, its provenance (``uri``, ``content_hash``) and the activation store.

    ``sae_uri`` / ``store_uri``: a URI or an already loaded ``SparseAutoencoder`` /
    ``ActivationStore``. Raises when the store's ``d_model`` is not the SAE's ``d_in``, or
    when the store is not the one the SAE was trained on (unless ``allow_other_store``)."""
    from integral_superposition.dump.store import ActivationStore
    from integral_superposition.sae import (
        SparseAutoencoder,
        check_training_store,
        load_sae,
        read_sae_manifest,
    )

    if isinstance(sae_uri, SparseAutoencoder):
        sae, sae_info = sae_uri, {"uri": None, "content_hash": None}
    else:
        sae = load_sae(str(sae_uri), storage_options=storage_options)
        try:
            m = read_sae_manifest(str(sae_uri), storage_options)
            sae_info = {"uri": str(sae_uri), "content_hash": m.get("content_hash")}
        except (FileNotFoundError, ValueError):  # a SAELens/sparsify folder without our manifest
            sae_info = {"uri": str(sae_uri), "content_hash": None}
    store = (
        store_uri
        if isinstance(store_uri, ActivationStore)
        else ActivationStore(store_uri, storage_options=storage_options)
    )
    if store.d_model != sae.d_in:
        raise ValueError(
            f"sae.d_in={sae.d_in} does not match the store's d_model={store.d_model} ({store.uris}): "
            "the SAE was trained on another model or hook point"
        )
    check_training_store(sae_uri, store, storage_options, allow_other_store)
    return sae, sae_info, store
