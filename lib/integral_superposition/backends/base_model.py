"""The backend interface shared by causal LMs and encoders: hook points, early-stopping
capture forwards and activation edits.

Hook points
-----------
A hook point is named either by a layer index or by a module path.

- ``"layer.i"`` (also ``i``, ``"i"`` or SAELens's ``"blocks.i.hook_resid_pre"``) is the
  residual stream *entering* block ``i``: it is read by a forward pre-hook on block ``i``.
  This is exactly HuggingFace's ``hidden_states[i]`` with ``output_hidden_states=True``
  (``hidden_states[0]`` is the embedding output, ``hidden_states[i]`` the output of block
  ``i - 1``), so the seed's ``layer=13`` reads ``hidden_states[13]`` and its steering hook on
  ``layers[13]`` edits the same tensor. Valid indices are ``0 .. n_layers - 1``.
- A module path such as ``"model.layers.3.mlp"`` is the *output* of that module (the first
  element when the module returns a tuple).

Capture forwards stop as soon as every requested hook point has been read, so nothing
after the last hook point - later blocks, the final norm, the LM head - is computed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BLOCK_PATHS: dict[str, tuple[str, ...]] = {
    "gemma/llama/mistral/qwen": (
        "model.layers",
        "model.language_model.layers",
        "language_model.model.layers",
    ),
    "gpt2": ("transformer.h",),
    "gpt_neox": ("gpt_neox.layers",),
    "bert": ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"),
}

_LAYER_RE = re.compile(r"^(?:layer\.|blocks\.)?(\d+)(?:\.hook_resid_pre)?$")


class _StopForward(Exception):
    """Raised inside a hook once every requested activation is captured."""


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def resolve_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the transformer block list: ``(path, ModuleList)``.

    Supports Gemma, Llama, Mistral and Qwen (``model.layers``), GPT-2 (``transformer.h``),
    GPT-NeoX (``gpt_neox.layers``) and BERT (``encoder.layer``); other architectures get a
    ``ValueError`` listing these.
    """
    for paths in BLOCK_PATHS.values():
        for path in paths:
            try:
                blocks = _get_path(model, path)
            except (AttributeError, IndexError):
                continue
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return path, blocks
    families = ", ".join(f"{fam} ({'/'.join(p)})" for fam, p in BLOCK_PATHS.items())
    raise ValueError(
        f"cannot find the transformer blocks of {type(model).__name__}: supported families are {families}. "
        "Name hook points by module path for other architectures."
    )


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook point. ``layer`` is set for residual-stream (pre-block) hook points."""

    name: str
    module: nn.Module
    layer: int | None
    module_path: str

    @property
    def saelens_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_pre" if self.layer is not None else self.name


class HFBackend:
    """A HuggingFace model with its tokenizer, behind the project's hook-point interface.

    Subclasses: :class:`~integral_superposition.backends.HFCausalLM` (generation, logits)
    and :class:`~integral_superposition.backends.HFEncoder` (BERT-style encoders).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        model_id: str | None = None,
        source_info: dict[str, Any] | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = (
            model_id or getattr(model.config, "_name_or_path", None) or type(model).__name__
        )
        self.source_info = dict(source_info or {})
        self.blocks_path, self.blocks = resolve_blocks(model)
        self._fingerprint: str | None = None
        self._tokenizer_fingerprint: str | None = None

    # -- properties -------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        for name in ("hidden_size", "n_embd", "d_model"):
            if getattr(cfg, name, None):
                return int(getattr(cfg, name))
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # -- hook points ------------------------------------------------------------------------
    def hook_point(self, name: str | int) -> HookPoint:
        """Resolve ``name`` (layer index or module path) to a :class:`HookPoint`."""
        key = str(name).strip()
        m = _LAYER_RE.match(key)
        if m:
            i = int(m.group(1))
            if not 0 <= i < self.n_layers:
                raise ValueError(
                    f"layer={i} out of range: expected 0..{self.n_layers - 1} for {self.model_id} "
                    f"(layer i is the input of block i, i.e. hidden_states[i]); for the last block's output "
                    f"use the module path '{self.blocks_path}.{self.n_layers - 1}'"
                )
            return HookPoint(f"layer.{i}", self.blocks[i], i, f"{self.blocks_path}.{i}")
        try:
            module = self.model.get_submodule(key)
        except AttributeError:
            raise ValueError(
                f"hook point {name!r}: not a layer index ('layer.i', 0..{self.n_layers - 1}) nor a module path of {type(self.model).__name__}"
            ) from None
        for i, block in enumerate(self.blocks):
            # A block's output is the next block's input; keep one name per tensor.
            if module is block and i + 1 < self.n_layers:
                return self.hook_point(i + 1)
        return HookPoint(key, module, None, key)

    def hook_points(self, names: Sequence[str | int]) -> list[HookPoint]:
        if isinstance(names, str | int):
            names = [names]
        if len(names) == 0:
            raise ValueError("hook_points is empty: expected at least one hook point")
        return [self.hook_point(n) for n in names]

    @contextlib.contextmanager
    def edit(
        self, hook: str | int | HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]
    ) -> Iterator[HookPoint]:
        """Within the block, replace the activation at ``hook`` by ``fn(x)`` (``x``: ``[B, T, d]``).

        ``fn`` may return ``None`` to leave ``x`` unchanged. The hook is removed on exit, also
        after an exception.
        """
        hp = hook if isinstance(hook, HookPoint) else self.hook_point(hook)
        handle = register_edit_hook(hp, fn)
        try:
            yield hp
        finally:
            handle.remove()

    # -- forwards ---------------------------------------------------------------------------
    def _model_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> dict[str, Any]:
        inputs: dict[str, Any] = {"input_ids": input_ids.to(self.device)}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask.to(self.device)
        return inputs

    @torch.inference_mode()
    def capture(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        hook_points: Sequence[str | int | HookPoint],
        stop_early: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Run one forward and return ``{hook name: activations [B, T, d]}``.

        With ``stop_early`` the forward is aborted right after the last hook point fires.
        """
        hps = [h if isinstance(h, HookPoint) else self.hook_point(h) for h in hook_points]
        captured: dict[str, torch.Tensor] = {}
        wanted = {h.name for h in hps}
        handles = []

        def make(hp: HookPoint):
            def store(x: torch.Tensor) -> None:
                captured[hp.name] = x.detach()
                if stop_early and wanted.issubset(captured):
                    raise _StopForward

            return store

        for hp in hps:
            handles.append(register_read_hook(hp, make(hp)))
        try:
            self._forward_for_capture(self._model_inputs(input_ids, attention_mask))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = wanted - set(captured)
        if missing:
            raise RuntimeError(
                f"hook points {sorted(missing)} never fired in the forward of {type(self.model).__name__}"
            )
        return captured

    def _forward_for_capture(self, inputs: dict[str, Any]) -> Any:
        return self.model(**inputs, use_cache=False)

    def fingerprint(self) -> str:
        """A content identity for the weights: the GGUF/hub revision when known, else a hash
        of every parameter (computed once)."""
        if self._fingerprint is None:
            for key in ("gguf_sha256", "revision", "weights_sha256"):
                if self.source_info.get(key):
                    self._fingerprint = f"{key}:{self.source_info[key]}"
                    break
            else:
                h = hashlib.sha256()
                for name, p in sorted(self.model.state_dict().items()):
                    h.update(name.encode())
                    t = p.detach().to("cpu").contiguous()
                    h.update(
                        t.view(torch.uint8).numpy().tobytes()
                        if t.dtype == torch.bfloat16
                        else t.numpy().tobytes()
                    )
                self._fingerprint = f"params_sha256:{h.hexdigest()}"
        return self._fingerprint

    def tokenizer_fingerprint(self) -> str:
        """SHA-256 of the tokenizer's full definition (vocabulary, merges, normaliser, special
        tokens), computed once."""
        if self._tokenizer_fingerprint is None:
            tok = self.tokenizer
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is not None:
                # truncation/padding are call-time state that a tokenizer call leaves behind
                spec = json.loads(backend.to_str())
                spec.pop("truncation", None)
                spec.pop("padding", None)
                payload = json.dumps(spec, sort_keys=True)
            else:  # slow tokenizers: the vocabulary and special tokens
                payload = repr(sorted(tok.get_vocab().items())) + repr(tok.all_special_tokens)
            self._tokenizer_fingerprint = hashlib.sha256(payload.encode("utf-8")).hexdigest()
        return self._tokenizer_fingerprint

    def describe(self) -> dict[str, Any]:
        """Model identity for manifests: id, class, size, tokenizer and weight fingerprint."""
        tok = self.tokenizer
        return {
            "model_id": self.model_id,
            "model_class": type(self.model).__name__,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "dtype": str(self.dtype).replace("torch.", ""),
            "fingerprint": self.fingerprint(),
            "tokenizer": {
                "class": type(tok).__name__,
                # the id the model was loaded by, not a machine-specific cache folder
                "name": self.model_id,
                "vocab_size": len(tok),
                "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id,
                "fingerprint": self.tokenizer_fingerprint(),
            },
            **{k: v for k, v in self.source_info.items() if k not in ("gguf_sha256",)},
        }


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple | list) else x


def register_read_hook(hp: HookPoint, fn: Callable[[torch.Tensor], None]):
    """Call ``fn(activation)`` when ``hp`` is computed; returns a removable handle."""
    if hp.layer is not None:

        def pre(_module, args, kwargs):
            fn(args[0] if args else kwargs["hidden_states"])

        return hp.module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_module, _args, output):
        fn(_first(output))

    return hp.module.register_forward_hook(post)


def register_edit_hook(hp: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Replace the activation at ``hp`` by ``fn(x)``; returns a removable handle."""
    if hp.layer is not None:

        def pre(_module, args, kwargs):
            if args:
                new = fn(args[0])
                if new is None:
                    return None
                return (new, *args[1:]), kwargs
            new = fn(kwargs["hidden_states"])
            if new is None:
                return None
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = new
            return args, kwargs

        return hp.module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_module, _args, output):
        new = fn(_first(output))
        if new is None:
            return None
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, list):
            return [new, *output[1:]]
        return new

    return hp.module.register_forward_hook(post)


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks registered anywhere in ``model`` (for leak checks)."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return n


def as_torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` -> ``torch.bfloat16``; ``None``/``"auto"`` -> None
    (see :func:`integral_superposition.compute.resolve_dtype` for what ``auto`` picks)."""
    from integral_superposition.compute import parse_dtype

    return parse_dtype(dtype)
