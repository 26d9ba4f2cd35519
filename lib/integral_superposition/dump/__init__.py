"""Activation dumping and the ``ActivationStore`` reader."""

from integral_superposition.dump.activations import (
    combine_dumps,
    dump_layer_activations,
    plan_shards,
)
from integral_superposition.dump.batches import Batch
from integral_superposition.dump.shards import CorruptShardError
from integral_superposition.dump.store import ActivationStore

__all__ = [
    "ActivationStore",
    "Batch",
    "CorruptShardError",
    "combine_dumps",
    "dump_layer_activations",
    "plan_shards",
]
