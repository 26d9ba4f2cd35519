"""How the processes of one training run share the work: the :class:`Layout` of this process
(one process, data-parallel or module-parallel), joining the torchrun process group, the
initial weights broadcast from rank 0, and checkpoints written alike whatever the layout."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from integral_superposition import compute, distributed
from integral_superposition.config import SAEConfig
from integral_superposition.sae.checkpoint import Checkpoints
from integral_superposition.sae.trainee import Trainee

__all__ = ["Layout", "join_processes", "process_layout", "sync_from_main", "write_checkpoint"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """How this process takes part in training.

    ``single``: one process holds every SAE. ``data``: every rank holds every SAE and steps on
    its part of each batch; gradients and statistics are summed over ranks, rank 0 writes.
    ``modules``: every rank holds its own SAEs (``indices``) and reads whole batches of their
    hook points; each rank writes its SAEs' checkpoint files and outputs, rank 0 the rest.
    """

    mode: str = "single"
    indices: tuple[int, ...] = (0,)
    """Positions (in the caller's config list) of the SAEs this process trains."""
    n_saes: int = 1
    is_main: bool = True


def process_layout(
    info: distributed.DistInfo, n_saes: int, costs: Sequence[float], modules: bool
) -> Layout:
    """This process's :class:`Layout` among ``info.world_size`` processes; ``costs`` (one per
    SAE) balance the SAEs over ranks when ``modules`` (module-parallel) is set."""
    if not info.enabled:
        return Layout("single", tuple(range(n_saes)), n_saes, True)
    if not modules:
        return Layout("data", tuple(range(n_saes)), n_saes, info.is_main)
    if n_saes < info.world_size:
        raise ValueError(
            f"distribute_modules=True with {info.world_size} processes for {n_saes} SAE(s): every "
            "process needs at least one SAE; start at most as many processes as SAEs, or train "
            "data-parallel"
        )
    owner = distributed.assign_modules(costs, info.world_size)
    mine = tuple(i for i, o in enumerate(owner) if o == info.rank)
    log.info("module-parallel: rank %d trains SAE(s) %s", info.rank, list(mine))
    return Layout("modules", mine, n_saes, info.is_main)


def join_processes(device: Any, cfg: SAEConfig) -> distributed.DistInfo:
    """The process group when torchrun started this process (joined on first use), else a
    single process on the resolved device."""
    if distributed.launched():
        return distributed.init(device if device is not None else cfg.device)
    return distributed.DistInfo(
        device=compute.resolve_device(device if device is not None else cfg.device)
    )


@torch.no_grad()
def sync_from_main(t: Trainee) -> None:
    """Rank 0's initialised weights and scales on every rank (the data-dependent
    initialisation must not differ by a rounding between ranks)."""
    for p in t.sae.parameters():
        distributed.broadcast_(p.data)
    for b in t.sae.buffers():
        distributed.broadcast_(b)
    t.scale, t.max_norm = distributed.broadcast_object((t.scale, t.max_norm))


def write_checkpoint(
    ckpt: Checkpoints,
    layout: Layout,
    step: int,
    fingerprint: dict[str, Any],
    trainees: list[Trainee],
    extra: dict[str, Any],
) -> None:
    """One checkpoint in the same format whatever the layout, so any layout resumes it."""
    if layout.mode == "single":
        ckpt.write(step, fingerprint, trainees, extra)
    elif layout.mode == "data":
        if layout.is_main:  # every rank holds the same state
            ckpt.write(step, fingerprint, trainees, extra)
    else:
        files = ckpt.write_trainees(step, dict(zip(layout.indices, trainees, strict=True)))
        own = {i: t.state_json() for i, t in zip(layout.indices, trainees, strict=True)}
        parts = distributed.gather_objects((files, own))  # also: every rank's files are written
        if layout.is_main:
            all_files: dict[str, Any] = {}
            js: dict[int, dict[str, Any]] = {}
            for f, j in parts:
                all_files.update(f)
                js.update(j)
            ordered = {k: all_files[k] for k in sorted(all_files)}
            ckpt.commit(step, fingerprint, [js[i] for i in range(layout.n_saes)], ordered, extra)
