"""Content hashes: the canonical JSON of configs and manifests, SHA-256, and the versions
of the packages that shape an output. Free of storage; ``storage`` re-exports every name
(``storage.canonical_json``, ``storage.content_hash``, ...)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["canonical_json", "content_hash", "package_versions", "sha256_bytes"]


def canonical_json(obj: Any, indent: int | None = None) -> str:
    """``obj`` as JSON with sorted keys: the text every content hash and manifest is made of.

    Pydantic models become ``model_dump(mode="json")``, paths strings, numpy/torch scalars
    (and size-1 arrays) numbers. This stays hand-written rather than
    ``pydantic_core.to_jsonable_python`` (as ``outputs.jsonable`` uses), because that would
    change existing content hashes, and so invalidate every cached output: it converts dict
    keys to strings before ``json`` sorts them (``{2: .., 10: ..}`` sorts as ``"10", "2"``
    instead of ``2, 10``), turns a size-1 array into a list instead of a number, writes a
    field's alias where ``model_dump`` writes its name, and encodes sets in iteration order
    (which varies between processes; here a set is refused). ``tests/test_canonical_json.py``
    pins the hashes."""
    return json.dumps(obj, sort_keys=True, indent=indent, default=_json_default, ensure_ascii=False)


def _json_default(o: Any) -> Any:
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        try:
            return o.item()
        except (ValueError, RuntimeError):
            pass  # an array of several numbers: refused below
    elif hasattr(o, "tolist"):
        return o.tolist()
    shape = f" of shape {tuple(o.shape)}" if hasattr(o, "shape") else ""
    raise TypeError(
        f"not JSON serialisable: {type(o).__name__}{shape}; expected JSON values, pydantic "
        "models, paths or numbers (convert arrays with .tolist())"
    )


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of the packages that shape an output."""
    names = (
        "integral-superposition",
        "torch",
        "transformers",
        "numpy",
        "safetensors",
        "pyarrow",
        "fsspec",
        *extra,
    )
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def content_hash(manifest: Mapping[str, Any]) -> str:
    """Hash of what an output *is*: its kind, config and file hashes (not timestamps)."""
    keyed = {k: manifest.get(k) for k in ("kind", "config", "files") if k in manifest}
    return sha256_bytes(canonical_json(keyed).encode("utf-8"))
