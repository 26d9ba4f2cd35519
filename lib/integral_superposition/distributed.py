"""Training on several processes with ``torch.distributed`` under ``torchrun``.

``torchrun --nproc_per_node N`` starts N copies of a program and tells each who it is through
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`init` reads it, joins the process group (NCCL on CUDA, gloo on the CPU) and gives every
rank its device (``cuda:LOCAL_RANK`` on a GPU machine). Outside torchrun everything here is a
no-op: one process of rank 0 in a world of 1, so the same training code runs either way.

The collectives the trainer needs are thin wrappers: :func:`all_reduce_` (sum, min or max in
place), :func:`broadcast_`, :func:`broadcast_object`, :func:`gather_objects`,
:func:`barrier`, :func:`all_reduce_metrics`. :func:`shard_range` cuts a global batch into the
rank's contiguous part; :func:`assign_modules` gives each rank its SAEs for module-parallel
training. :func:`torchrun_command` / :func:`run_torchrun` start N processes of a module
through ``torch.distributed.run`` (what the ``torchrun`` script runs).
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_reduce_",
    "all_reduce_metrics",
    "assign_modules",
    "barrier",
    "broadcast_",
    "broadcast_object",
    "current",
    "destroy",
    "gather_objects",
    "init",
    "is_main",
    "launched",
    "run_torchrun",
    "shard_range",
    "torchrun_command",
]

log = logging.getLogger(__name__)

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "ISUP_DIST_TIMEOUT_S"
"""Seconds a collective waits for the other ranks before failing (default 1800)."""


@dataclass(frozen=True)
class DistInfo:
    """Who this process is in the process group."""

    rank: int = 0
    """Global rank, ``0 .. world_size - 1``."""
    world_size: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this machine (picks the GPU)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """This rank's device."""
    backend: str | None = None
    """``"nccl"``, ``"gloo"`` or None (not distributed)."""

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes checkpoints and outputs."""
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by torchrun (its environment names a rank and world)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE"))


def _env_int(name: str) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={raw!r}: expected an integer (set by torchrun)"
        ) from None


def init(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group torchrun describes; a no-op (rank 0 of 1) outside torchrun.

    ``device``: ``None``/``"auto"`` gives each rank ``cuda:LOCAL_RANK`` when CUDA is there,
    else the CPU; ``"cpu"`` forces the CPU (and gloo); ``"cuda"`` requires a GPU per local
    rank. The backend is NCCL for CUDA devices, gloo otherwise. Calling it again returns the
    same group.
    """
    if not launched():
        from integral_superposition.compute import resolve_device

        dev = resolve_device(device if device is not None else "auto")
        return DistInfo(device=dev)
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise ValueError(
            f"torchrun environment incomplete: {', '.join(missing)} not set; start the program "
            "with torchrun (or python -m torch.distributed.run)"
        )
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    want = str(device) if device is not None else "auto"
    if want in ("auto", "cuda") and torch.cuda.is_available():
        n_gpu = torch.cuda.device_count()
        if local >= n_gpu:
            raise ValueError(
                f"LOCAL_RANK={local}: this machine has {n_gpu} GPU(s); start at most {n_gpu} "
                "processes per node (torchrun --nproc_per_node)"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif want == "cuda" or want.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={want!r}: CUDA is not available on this machine")
        dev = torch.device(want)
        torch.cuda.set_device(dev)
    elif want in ("auto", "cpu"):
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device={want!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
        dist.init_process_group(backend=backend, timeout=timeout)
        log.info("process group: rank %d of %d (%s on %s)", rank, world, backend, dev)
    return DistInfo(rank, world, local, dev, dist.get_backend())


def current() -> DistInfo:
    """This process's place in the initialised group (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = dist.get_backend()
    dev = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, backend)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return not _active() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active():
        dist.barrier()


_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over all ranks in place (``op``: sum, min or max); returns it."""
    if op not in _OPS:
        raise ValueError(f"op={op!r}: expected one of {sorted(_OPS)}")
    if _active():
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]))
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s value; returns it."""
    if _active():
        dist.broadcast(tensor, src)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable, small: configs, results) on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (small objects only)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_metrics(metrics: Mapping[str, float], weight: float = 1.0) -> dict[str, float]:
    """The ``weight``-weighted mean over ranks of each metric (e.g. weight = tokens seen).

    Every rank must pass the same keys. In a single process the metrics come back unchanged.
    """
    keys = sorted(metrics)
    if not _active():
        return {k: float(metrics[k]) for k in keys}
    t = torch.tensor(
        [float(metrics[k]) * weight for k in keys] + [float(weight)], dtype=torch.float64
    )
    dev = current().device
    t = t.to(dev)
    dist.all_reduce(t)
    w = float(t[-1]) or 1.0
    return {k: float(v) / w for k, v in zip(keys, t[:-1].tolist(), strict=True)}


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part ``[start, stop)`` of ``n`` rows split over ``world_size``.

    Parts differ in size by at most one row and are in rank order, so concatenating them gives
    back the ``n`` rows: a global batch is the same whatever the number of ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def assign_modules(costs: Sequence[float], world_size: int) -> list[int]:
    """The owning rank of each module for module-parallel training: the most expensive first,
    each to the rank with the least cost so far (ties to the lower rank). Deterministic, so
    every rank computes the same assignment. Returns ``owner[i]`` for ``costs[i]``."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: expected at least 1")
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += float(costs[i])
    return owner


def destroy() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- starting N processes ----------------------------------------------------------------------
def torchrun_command(
    nproc: int,
    module: str,
    args: Sequence[str] = (),
    *,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    node_rank: int | None = None,
    max_restarts: int = 0,
    python: str | None = None,
) -> list[str]:
    """The command line that starts ``nproc`` processes of ``python -m module args`` per node
    (``python module args`` when ``module`` is a ``.py`` file).

    One node (``nnodes=1``, the default): torchrun's standalone rendezvous on a free local port.
    Several nodes: ``rdzv_endpoint`` (``host:port``) and ``rdzv_id`` are required, and every
    node runs the same command (the c10d rendezvous assigns node ranks, or ``node_rank``).
    ``max_restarts``: how often torchrun restarts all workers after one fails (each restart
    resumes from the last checkpoint).
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc={nproc!r}: expected a positive number of processes per node")
    if not isinstance(nnodes, int) or nnodes < 1:
        raise ValueError(f"nnodes={nnodes!r}: expected a positive number of nodes")
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd += ["--standalone", "--nnodes", "1"]  # a local rendezvous on a free port
    else:
        if not rdzv_endpoint or not rdzv_id:
            raise ValueError(
                f"nnodes={nnodes}: a multi-node run needs rdzv_endpoint='host:port' and rdzv_id "
                f"(got rdzv_endpoint={rdzv_endpoint!r}, rdzv_id={rdzv_id!r})"
            )
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id]
        if node_rank is not None:
            cmd += ["--node-rank", str(node_rank)]
    cmd += ["--nproc-per-node", str(nproc), "--max-restarts", str(int(max_restarts))]
    # a script path runs as a file (torchrun's default), anything else as a module
    cmd += [module] if module.endswith(".py") else ["-m", module]
    return [*cmd, *map(str, args)]


def run_torchrun(
    nproc: int,
    module: str,
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> None:
    """Run ``python -m module args`` on ``nproc`` processes under torchrun and wait for it.

    ``env`` adds environment variables (e.g. credentials, which never go on the command
    line). ``on_line`` receives every output line of the workers (default: this process's
    stderr). Raises ``RuntimeError`` with the last output lines when any worker fails.
    ``kwargs`` go to :func:`torchrun_command`.
    """
    cmd = torchrun_command(nproc, module, args, **kwargs)
    full_env = {**os.environ, **(env or {})}
    # one thread per worker on a shared CPU: N processes x all cores would oversubscribe it
    full_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    log.info("starting %d processes: %s", nproc, " ".join(cmd))
    tail: list[str] = []
    with subprocess.Popen(
        cmd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = [*tail[-39:], line]
            if on_line is not None:
                on_line(line)
            else:
                print(line, file=sys.stderr, flush=True)
        rc = proc.wait()
    if rc != 0:
        shown = "\n".join(tail)
        raise RuntimeError(f"torchrun ({nproc} processes of {module}) exited with {rc}:\n{shown}")
