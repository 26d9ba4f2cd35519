"""Model backends: HuggingFace causal LMs and encoders behind one hook-point interface."""

from integral_superposition.backends.base_model import (
    HFBackend,
    HookPoint,
    count_hooks,
    resolve_blocks,
)
from integral_superposition.backends.hf_causal_lm import HFCausalLM, HFEncoder, load_backend
from integral_superposition.backends.sources import DEFAULT_MODEL

__all__ = [
    "DEFAULT_MODEL",
    "HFBackend",
    "HFCausalLM",
    "HFEncoder",
    "HookPoint",
    "count_hooks",
    "load_backend",
    "resolve_blocks",
]
