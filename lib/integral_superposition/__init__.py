"""Integral Superposition: dump activations, train sparse autoencoders, analyse, merge and
steer their latents on any HuggingFace model.

Subpackages are imported lazily, so ``import integral_superposition`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from integral_superposition.config import (
    DumpConfig,
    Paths,
    SAEArchitectureConfig,
    SAEConfig,
    TrainSchedule,
)
from integral_superposition.version import __version__, code_version

_SUBMODULES = {
    "analysis",
    "backends",
    "data",
    "dump",
    "merge",
    "outputs",
    "pipelines",
    "sae",
    "steering",
    "storage",
    "viz",
}

if TYPE_CHECKING:  # pragma: no cover
    from integral_superposition import (
        analysis,
        backends,
        data,
        dump,
        merge,
        outputs,
        pipelines,
        sae,
        steering,
        storage,
        viz,
    )


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"integral_superposition.{name}")
        globals()[name] = module
        return module
    if name == "ActivationStore":
        from integral_superposition.dump.store import ActivationStore

        return ActivationStore
    raise AttributeError(f"module 'integral_superposition' has no attribute {name!r}")


__all__ = [
    "ActivationStore",
    "DumpConfig",
    "Paths",
    "SAEArchitectureConfig",
    "SAEConfig",
    "TrainSchedule",
    "__version__",
    "analysis",
    "backends",
    "code_version",
    "data",
    "dump",
    "merge",
    "outputs",
    "pipelines",
    "sae",
    "steering",
    "storage",
    "viz",
]
