"""Saving and loading SAEs (no pickles).

``save_sae`` writes the SAELens folder format to any fsspec URI::

    cfg.json                  SAELens config (architecture, d_in, d_sae, k, metadata, ...)
    sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec (+ threshold)
    sparsity.safetensors      optional: "sparsity" = log10 firing frequency [d_sae]
    manifest.json             training config, metrics, activation manifest hash (written last)

``load_sae`` reads our folders, SAELens folders, EleutherAI sparsify folders, and legacy
seed state dicts (``torch.load(weights_only=True)`` only); the foreign formats are read by
``sae.formats``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import save as st_save

from integral_superposition import storage
from integral_superposition.outputs import OutputWriter
from integral_superposition.sae.formats import (
    ISUP_KEYS,
    SAELENS_COMMON_KEYS,
    check_finite_weights,
    from_tensors,
    legacy_saelens_config,
    load_legacy_state_dict,
    load_sparsify,
    read_cfg,
    read_tensors,
    refuse_unknown,
    saelens_tensors,
    saelens_version,
)
from integral_superposition.sae.model import SparseAutoencoder

log = logging.getLogger(__name__)

SAELENS_VERSION = "6.0.0"
OURS_ONLY = "isup"
"""``cfg.json`` ``architecture`` of an SAE SAELens cannot compute (groupmax, skip
connection): SAELens refuses the folder; ``load_sae`` reads it from the ``isup`` block."""
_SAELENS_ARCH = {
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
}


def _resolve_save_path(path: str, warn: bool = True) -> str:
    path = str(path)
    if path.endswith((".pt", ".pth")):
        folder = path.rsplit(".", 1)[0]
        if not warn:
            return folder
        msg = (
            f"save_sae({path!r}): SAEs are saved as a SAELens folder (cfg.json + "
            f"sae_weights.safetensors + manifest.json), never as a pickled .pt file; writing the "
            f"folder {folder!r} instead. load_sae({path!r}) or load_sae({folder!r}) reads it back, "
            f"and so does sae_lens.SAE.load_from_disk({folder!r})"
        )
        warnings.warn(msg, UserWarning, stacklevel=3)
        log.info(msg)
        return folder
    return path


def saelens_config(
    sae: SparseAutoencoder, metadata: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``cfg.json`` dict SAELens (>= 6) reads, plus an ``isup`` block with our fields."""
    meta = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION}
    meta.update(
        {
            "model_name": None,
            "hook_name": None,
            "hook_head_index": None,
            "context_size": None,
            "prepend_bos": True,
            "dataset_path": None,
            "model_from_pretrained_kwargs": {},
        }
    )
    meta.update(sae.metadata)
    meta.update(metadata or {})
    cfg: dict[str, Any] = {
        # SAELens has no groupmax and no SAE with a skip connection: name an architecture
        # it refuses rather than one it would read with different math
        "architecture": _SAELENS_ARCH.get(sae.architecture, OURS_ONLY)
        if sae.W_skip is None
        else OURS_ONLY,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        "isup": {**sae.config_dict(), "format": 1},
    }
    if cfg["architecture"] == OURS_ONLY:
        return cfg
    if sae.architecture == "topk":
        cfg["k"] = sae.top_k
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg


SAE_FILES = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")
"""The files :func:`save_sae` writes into every SAE folder (besides its ``extra_files``)."""


def check_sae_folder(
    path: str, storage_options: Mapping[str, Any] | None = None, extra: Sequence[str] = ()
) -> None:
    """Refuse ``path`` as :func:`save_sae` would (a file, a folder holding another kind of
    output, a file named like an SAE file that this project did not write), changing
    nothing: checked before training, so that a long run never ends in a refused save."""
    folder = _resolve_save_path(path, warn=False)
    OutputWriter(folder, "sae", storage_options, names=[*SAE_FILES, *extra]).check()


def save_sae(
    model: SparseAutoencoder,
    path: str,
    *,
    metadata: Mapping[str, Any] | None = None,
    sparsity: torch.Tensor | None = None,
    training_config: Any = None,
    metrics: Mapping[str, Any] | None = None,
    activation_manifest_hash: str | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    **manifest_extra: Any,
) -> str:
    """Save ``model`` as a SAELens folder at ``path`` (any URI); returns the folder URI.

    ``metadata`` fills SAELens's ``metadata`` (``model_name``, ``hook_name``, ...).
    ``sparsity`` (``[d_sae]`` log10 firing frequencies) goes to ``sparsity.safetensors``.
    ``extra_files`` (name -> bytes) are published with the SAE (e.g. a merge map).
    """
    if not isinstance(model, SparseAutoencoder):
        raise TypeError(f"model: expected a SparseAutoencoder, got {type(model).__name__}")
    folder = _resolve_save_path(path)
    cfg = saelens_config(model, metadata)
    tensors = {
        "W_enc": model.W_enc.detach().float().cpu().contiguous(),
        "W_dec": model.W_dec.detach().float().cpu().contiguous(),
        "b_enc": model.b_enc.detach().float().cpu().contiguous(),
        "b_dec": model.b_dec.detach().float().cpu().contiguous(),
    }
    if model.architecture in ("jumprelu", "batchtopk"):
        tensors["threshold"] = model.threshold.detach().float().cpu().contiguous()
    if model.merge_index is not None:
        tensors["merge_index"] = model.merge_index.detach().cpu().contiguous()
    if model.merge_weight is not None:
        tensors["merge_weight"] = model.merge_weight.detach().float().cpu().contiguous()
    if model.W_skip is not None:
        tensors["W_skip"] = model.W_skip.detach().float().cpu().contiguous()
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"refusing to save: {name} has NaN or inf values")
    payloads = {
        "sae_weights.safetensors": st_save(tensors),
        "cfg.json": storage.canonical_json(cfg, indent=2).encode(),
    }
    if sparsity is not None:
        sp = torch.as_tensor(sparsity).detach().float().cpu().contiguous()
        if sp.shape != (model.d_sae,):
            raise ValueError(f"sparsity has shape {tuple(sp.shape)}, expected ({model.d_sae},)")
        payloads["sparsity.safetensors"] = st_save({"sparsity": sp})
    payloads.update(extra_files or {})
    if cfg["metadata"].get("model_source") is not None:  # shown beside the metrics as well
        manifest_extra.setdefault("model_source", cfg["metadata"]["model_source"])
    # refuses a file of these names that this project did not write, before writing any
    with OutputWriter(folder, "sae", storage_options, names=payloads) as out:
        for name, data in payloads.items():
            out.write(name, data)
        out.publish(
            training_config,
            sae=model.config_dict(),
            metrics=dict(metrics or {}),
            activation_manifest_hash=activation_manifest_hash,
            **manifest_extra,
        )
    return folder


def load_sae(
    path: str,
    *,
    device: str | torch.device | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> SparseAutoencoder:
    """Load an SAE folder (ours, SAELens or sparsify) or a legacy ``.pt`` state dict.

    Folders may be local or remote URIs. A folder loads exactly (the same codes and
    reconstructions as the library that wrote it) or not at all: an architecture, option or
    ``cfg.json`` key that the loader does not understand is a ``ValueError`` (the known keys
    per format: ``sae.formats.SAELENS_*_KEYS``, ``SPARSIFY_KEYS``). Legacy files are read with
    ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
    """
    path = str(path)
    if path.endswith((".pt", ".pth")) and not storage.exists(
        storage.join(path, "cfg.json"), storage_options
    ):
        folder = path.rsplit(".", 1)[0]
        if not storage.exists(path, storage_options) and storage.exists(
            storage.join(folder, "cfg.json"), storage_options
        ):  # save_sae(model, "x.pt") wrote the folder "x": read it back from the same name
            return load_sae(folder, device=device, storage_options=storage_options)
        return check_finite_weights(path, load_legacy_state_dict(path, device, storage_options))
    if storage.exists(storage.join(path, "sae_weights.safetensors"), storage_options):
        manifest = _own_manifest(path, storage_options)
        cfg = read_cfg(path, storage_options, manifest=manifest)
        tensors = read_tensors(path, "sae_weights.safetensors", storage_options, manifest)
        ours = cfg.get("isup") or {}
        if cfg.get("architecture") == OURS_ONLY and ours:
            refuse_unknown(path, "cfg.json", cfg, SAELENS_COMMON_KEYS | {"isup"})
            known = {
                "W_enc",
                "W_dec",
                "b_enc",
                "b_dec",
                "threshold",
                "merge_index",
                "merge_weight",
                "W_skip",
            }
            refuse_unknown(path, "sae_weights.safetensors", tensors, known)
            top_k = 32
        else:
            if saelens_version(cfg) is None:
                cfg = legacy_saelens_config(path, cfg)
            arch, top_k, tensors = saelens_tensors(path, cfg, tensors)
        bw, merge_mode = 0.001, "sum"
        if ours:
            refuse_unknown(path, "cfg.json's isup block", ours, ISUP_KEYS)
            arch, top_k = ours["architecture"], int(ours.get("top_k", 32))
            bw = float(ours.get("jumprelu_bandwidth", 0.001))
            merge_mode = ours.get("merge_mode", "sum")
        d_in, d_sae = tensors["W_enc"].shape
        if "merge_index" in tensors:  # a merged SAE: d_sae merged latents over d_pre codes
            d_sae = tensors["W_dec"].shape[0]
        try:
            sae = from_tensors(arch, int(d_in), int(d_sae), top_k, tensors, bw, merge_mode)
        except ValueError as e:
            raise ValueError(f"path={path!r}: {e}") from e
        sae.metadata = dict(cfg.get("metadata") or {})
    elif storage.exists(storage.join(path, "sae.safetensors"), storage_options):
        sae = load_sparsify(path, storage_options)
    else:
        raise FileNotFoundError(
            f"path={path!r}: no sae_weights.safetensors (SAELens/ours) or sae.safetensors (sparsify) found"
        )
    check_finite_weights(path, sae)
    return sae.to(device) if device is not None else sae


def _own_manifest(path: str, storage_options) -> dict[str, Any] | None:
    """Our ``sae`` manifest of the folder (None for a SAELens or sparsify folder without one)."""
    try:
        return storage.read_manifest(path, storage_options, kind="sae")
    except (FileNotFoundError, ValueError):
        return None


def read_sae_manifest(
    path: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The manifest of a saved SAE (metrics, training config, activation hash)."""
    return storage.read_manifest(str(path), storage_options, kind="sae")


def check_training_store(
    sae_uri: Any,
    store: Any,
    storage_options: Mapping[str, Any] | None = None,
    allow_other_store: bool = False,
) -> None:
    """Refuse to use an SAE with a store other than the one it was trained on.

    The SAE's manifest records the content hash of its training activations
    (``activation_manifest_hash``); ``store`` (an ``ActivationStore``) must hold the same
    content, else a ``ValueError`` names both (a dump replaced under a trained SAE must not
    be analysed silently). SAEs without our manifest (SAELens, sparsify) record nothing and
    pass; ``allow_other_store=True`` uses another store on purpose (e.g. held-out data).
    """
    if allow_other_store or not isinstance(sae_uri, str | os.PathLike):
        return
    try:
        manifest = read_sae_manifest(str(sae_uri), storage_options)
    except (FileNotFoundError, ValueError):
        return
    recorded = manifest.get("activation_manifest_hash")
    if recorded and recorded != store.content_hash:
        raise ValueError(
            f"sae_uri={str(sae_uri)!r} was trained on activations {recorded[:16]}, but the store "
            f"{list(store.uris)} holds activations {store.content_hash[:16]}: the store was "
            "replaced or is another dump. Use the store the SAE was trained on, or pass "
            "allow_other_store=True (isup: --other-store) to use this one on purpose"
        )


def load_sparsity(
    path: str, storage_options: Mapping[str, Any] | None = None
) -> torch.Tensor | None:
    """``[d_sae]`` log10 firing frequencies saved with the SAE, if any."""
    uri = storage.join(str(path), "sparsity.safetensors")
    if not storage.exists(uri, storage_options):
        return None
    return read_tensors(str(path), "sparsity.safetensors", storage_options)["sparsity"]
