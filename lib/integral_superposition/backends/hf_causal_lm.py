"""HuggingFace backends: :class:`HFCausalLM` (decoder LMs) and :class:`HFEncoder` (BERT-style)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from integral_superposition.backends.base_model import HFBackend, as_torch_dtype
from integral_superposition.backends.sources import (
    _HUB_TO_EMBEDDED,
    DEFAULT_MODEL,
    ModelSource,
    dequantized_cache_dir,
    embedded_gguf_path,
    resolve_model_source,
)
from integral_superposition.compute import resolve_device, resolve_dtype

log = logging.getLogger(__name__)


def _map_device(device_map: str | dict | None) -> torch.device:
    """The device a ``device_map`` puts (the first part of) the model on."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        first = next(iter(device_map.values()), "cpu")
        return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return resolve_device("auto")
    return resolve_device(device_map)


def _load(
    auto_model,
    model_id_or_path: str,
    dtype,
    device_map,
    gguf_file,
    revision,
    trust_remote_code,
    **kwargs: Any,
):
    from transformers import AutoTokenizer

    source: ModelSource = resolve_model_source(model_id_or_path, gguf_file)
    torch_dtype = as_torch_dtype(dtype)
    if dtype is not None:  # "auto" picks by the hardware; bf16 on a CPU without it warns
        torch_dtype = resolve_dtype(dtype, _map_device(device_map))
    load_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **kwargs}
    if torch_dtype is not None:
        load_kwargs["dtype"] = torch_dtype
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    info: dict[str, Any] = {"source": source.kind}
    if source.kind == "hub":
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source.path, revision=revision, trust_remote_code=trust_remote_code
            )
            model = auto_model.from_pretrained(source.path, revision=revision, **load_kwargs)
        except OSError as e:
            embedded = _HUB_TO_EMBEDDED.get(source.path)
            if embedded is None:
                raise OSError(
                    f"model_id_or_path={model_id_or_path!r}: cannot load from the HuggingFace hub or cache ({e})"
                ) from e
            log.warning(
                "hub unreachable for %s (%s); loading the embedded GGUF copy instead",
                source.path,
                type(e).__name__,
            )
            source = embedded_gguf_path(embedded)
            info = {"source": "gguf", "hub_fallback": True}
        else:
            info["revision"] = getattr(model.config, "_commit_hash", None) or revision
            return model, tokenizer, source.model_id, info
    if source.kind == "gguf":
        folder, gguf_info = dequantized_cache_dir(source, auto_model)
        info.update(gguf_info)
        path = str(folder)
    else:
        path = source.path
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = auto_model.from_pretrained(path, **load_kwargs)
    return model, tokenizer, info.get("model_id", source.model_id), info


class HFCausalLM(HFBackend):
    """A causal LM (Gemma, Llama, Mistral, Qwen, GPT-2, GPT-NeoX, ...) with its tokenizer."""

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str = DEFAULT_MODEL,
        dtype: str | torch.dtype | None = torch.float32,
        device_map: str | dict | None = None,
        *,
        gguf_file: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> HFCausalLM:
        """Load from a hub id, a local directory, a ``.gguf`` file or ``"gemma-3-270m"``
        (the embedded default, offline).

        ``google/gemma-3-270m`` falls back to the embedded copy when the hub is unreachable.
        ``device_map`` is passed to accelerate (``"auto"`` spreads a large model over devices).
        ``dtype="auto"`` picks by hardware (:func:`integral_superposition.compute.resolve_dtype`);
        None keeps the checkpoint's own dtype.
        """
        from transformers import AutoModelForCausalLM

        model, tokenizer, model_id, info = _load(
            AutoModelForCausalLM,
            model_id_or_path,
            dtype,
            device_map,
            gguf_file,
            revision,
            trust_remote_code,
            **kwargs,
        )
        return cls(model, tokenizer, model_id=model_id, source_info=info)

    def output_embedding(self) -> torch.Tensor:
        """The unembedding matrix ``[vocab, d_model]``."""
        return self.model.get_output_embeddings().weight

    def final_norm(self) -> torch.nn.Module | None:
        """The norm applied before the LM head, when the architecture has one."""
        for path in (
            "model.norm",
            "model.language_model.norm",
            "transformer.ln_f",
            "gpt_neox.final_layer_norm",
        ):
            try:
                return self.model.get_submodule(path)
            except AttributeError:
                continue
        return None

    @torch.inference_mode()
    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full forward; returns logits ``[B, T, vocab]`` (float32)."""
        out = self.model(**self._model_inputs(input_ids, attention_mask), use_cache=False)
        return out.logits.float()

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``model.generate`` with inputs moved to the model's device; the pad id defaults to
        the tokenizer's."""
        kwargs = {
            k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()
        }
        args = tuple(a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args)
        if "pad_token_id" not in kwargs:
            from integral_superposition.data.tokenize import pad_token_id

            kwargs["pad_token_id"] = pad_token_id(self.tokenizer)
        with torch.inference_mode():
            return self.model.generate(*args, **kwargs)


class HFEncoder(HFBackend):
    """A BERT-style encoder (``AutoModel``) behind the same hook-point interface.

    It has no LM head and cannot generate; dumping, SAE training and analysis work the same.
    """

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        dtype: str | torch.dtype | None = torch.float32,
        device_map: str | dict | None = None,
        *,
        gguf_file: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> HFEncoder:
        from transformers import AutoModel

        model, tokenizer, model_id, info = _load(
            AutoModel,
            model_id_or_path,
            dtype,
            device_map,
            gguf_file,
            revision,
            trust_remote_code,
            **kwargs,
        )
        return cls(model, tokenizer, model_id=model_id, source_info=info)

    def _forward_for_capture(self, inputs: dict[str, Any]) -> Any:
        return self.model(**inputs)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise TypeError(
            f"{type(self.model).__name__} is an encoder: it cannot generate. Use an HFCausalLM for steering generations."
        )


def load_backend(model_id_or_path: str = DEFAULT_MODEL, **kwargs: Any) -> HFBackend:
    """Load a causal LM, or an encoder when the config says the model is not a decoder."""
    from transformers import AutoConfig

    source = resolve_model_source(model_id_or_path, kwargs.get("gguf_file"))
    if model_id_or_path == "tiny:bert":
        return HFEncoder.from_pretrained(model_id_or_path, **kwargs)
    if source.kind in ("dir", "hub"):
        try:
            cfg = AutoConfig.from_pretrained(
                source.path, trust_remote_code=kwargs.get("trust_remote_code", False)
            )
        except OSError:
            cfg = None
        if cfg is not None and cfg.model_type in (
            "bert",
            "roberta",
            "distilbert",
            "electra",
            "deberta",
            "deberta-v2",
        ):
            return HFEncoder.from_pretrained(model_id_or_path, **kwargs)
    return HFCausalLM.from_pretrained(model_id_or_path, **kwargs)
