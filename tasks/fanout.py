"""Work spread over deployment runs: dump partitions and SAE trainings, one run (one GPU pod)
each.

With ``fanout.mode: deployments`` the experiment flow starts ``fanout.partitions`` runs of the
``dump-partition`` deployment (``flows/steps.py:dump_partition_flow``), each on its own
worker, waits for them, and publishes one store over their outputs. The parts are written to
``{run}/acts/part-III-of-NNN``. With ``fanout.train: per_hook_point`` (or ``per_sae``) each
hook point's SAEs (or each SAE) train as one run of the ``train-part`` deployment
(``flows/steps.py:train_part_flow``) into ``{run}/sae/<name>``, with ``fanout.gpus_per_run``
GPUs each (the job variable of that name). Every worker must see the same storage (S3, or a
shared volume). The child runs write as delegates of the experiment run's lease.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from integral_superposition.config import DumpConfig
from integral_superposition.experiment import SAEJob
from integral_superposition.flows.config import FanoutPlan, FlowExperimentConfig
from integral_superposition.lease import held_lease
from integral_superposition.tasks.dump import combine_partitions, partition_name
from integral_superposition.tasks.policy import DUMP_MODULES, TASK_DEFAULTS, OutputCache
from integral_superposition.tasks.refs import DataRef, ModelRef, OutputRef, RunLocation
from integral_superposition.tasks.train import TRAIN_MODULES, sae_ref
from integral_superposition.tasks.ui import Progress, run_logger
from prefect import task

POLL_ENV = "ISUP_FANOUT_POLL_S"
"""Environment variable: seconds between checks of the deployment runs a task waits for
(default 5; a small value suits a local worker and tests)."""


def poll_interval(poll_s: float | None = None) -> float:
    """``poll_s`` when given, else ``$ISUP_FANOUT_POLL_S``, else 5 seconds; a positive number
    or a clear error naming the value."""
    source = "poll_s"
    if poll_s is None:
        raw = os.environ.get(POLL_ENV, "").strip()
        if not raw:
            return 5.0
        source = POLL_ENV
        try:
            poll_s = float(raw)
        except ValueError:
            raise ValueError(f"{POLL_ENV}={raw!r}: expected a number of seconds") from None
    if not poll_s > 0 or poll_s == float("inf"):
        raise ValueError(f"{source}={poll_s!r}: expected a positive, finite number of seconds")
    return float(poll_s)


class DeploymentRunsFailed(RuntimeError):
    """Some deployment runs started by a task did not complete."""


class PartitionRunsFailed(DeploymentRunsFailed):
    """Some partition runs did not complete."""


class TrainRunsFailed(DeploymentRunsFailed):
    """Some training runs did not complete."""


def _parent_params(
    cfg: FlowExperimentConfig, loc: RunLocation
) -> tuple[dict[str, Any], str | None]:
    """The config a child run gets (this run's name set) and this run's lease token: the
    children write under this run's root as its delegates, checking that this run still
    holds the root's lease (by its token) and leasing their own folders."""
    lease = held_lease(loc.root)
    params = cfg.model_dump(mode="json")
    params["run"] = loc.run
    return params, (lease.token if lease is not None else None)


def wait_for_runs(
    runs: Sequence[Any],
    what: str,
    error: type[DeploymentRunsFailed] = DeploymentRunsFailed,
    poll_s: float | None = None,
    progress_key: str | None = None,
    report_s: float = 60.0,
) -> None:
    """Wait until every flow run in ``runs`` is final; raise ``error`` naming each run that did
    not complete, with its state and message. Every ``report_s`` seconds the runs still
    pending are logged with their states (a ``Late`` run waits for a worker of its pool).
    The runs are checked every ``poll_s`` seconds (default: :func:`poll_interval`)."""
    from prefect.client.orchestration import get_client

    poll_s = poll_interval(poll_s)
    logger = run_logger()
    progress = Progress(progress_key or f"{what}-runs", f"{what} runs", unit="runs")
    pending = {r.id: r for r in runs}
    failed: list[str] = []
    last_report = time.monotonic()
    with get_client(sync_client=True) as client:
        while pending:
            waiting = []
            for fr_id, r in list(pending.items()):
                state = client.read_flow_run(fr_id).state
                if state is not None and state.is_final():
                    pending.pop(fr_id)
                    if not state.is_completed():
                        failed.append(f"{r.name} ({fr_id}) {state.name}: {state.message}")
                else:
                    waiting.append(f"{r.name} {state.name if state is not None else 'no state'}")
            progress(len(runs) - len(pending), len(runs))
            if waiting and time.monotonic() - last_report >= report_s:
                last_report = time.monotonic()
                logger.info("waiting for %d %s runs: %s", len(waiting), what, ", ".join(waiting))
            if pending:
                time.sleep(poll_s)
    if failed:
        raise error(
            f"{len(failed)} of {len(runs)} {what} runs did not complete: "
            + "; ".join(sorted(failed))
        )


@dataclass
class _FanoutCache(OutputCache):
    # the whole config travels to the workers, but only the dump's inputs key the cache
    exclude: list[str] = field(
        default_factory=lambda: ["storage_options", "gpu_limit", "show_progress", "cfg", "poll_s"]
    )


@task(
    name="dump-partitions-remote",
    **{**TASK_DEFAULTS, "cache_policy": _FanoutCache(entry_points=DUMP_MODULES)},
)
def dump_partitions_remote(
    data: DataRef,
    model: ModelRef,
    dump: DumpConfig,
    fanout: FanoutPlan,
    loc: RunLocation,
    cfg: FlowExperimentConfig,
    poll_s: float | None = None,
) -> OutputRef:
    """Run one ``fanout.deployment`` flow run per partition, wait for all, and combine their
    dumps. Cached on the dataset fingerprint, the model, the dump config and the fan-out."""
    from prefect.deployments import run_deployment

    logger = run_logger()
    n = fanout.partitions
    params, token = _parent_params(cfg, loc)
    runs = [
        run_deployment(
            fanout.deployment,
            parameters={"cfg": params, "partition": i, "run": loc.run, "lease_token": token},
            flow_run_name=f"{loc.experiment}/{loc.run}/{partition_name(i, n)}",
            timeout=0,
            tags=["isup-partition"],
        )
        for i in range(n)
    ]
    logger.info("started %d partition runs of %s", n, fanout.deployment)
    wait_for_runs(runs, "partition", PartitionRunsFailed, poll_s, f"dump-partitions-{loc.run}")
    out = cfg.paths.shards_dir
    parts = [
        OutputRef.read(
            "activations",
            partition_name(i, n),
            loc.uri(out, partition_name(i, n)),
            loc.storage_options,
        )
        for i in range(n)
    ]
    return combine_partitions.fn(parts, loc, out=out)


@dataclass
class _RemoteTrainCache(OutputCache):
    # keyed like in-process training (the store, the SAE configs, the code); where the run
    # goes and how many GPUs it gets shape no output
    exclude: list[str] = field(
        default_factory=lambda: [
            "storage_options",
            "gpu_limit",
            "show_progress",
            "cfg",
            "poll_s",
            "deployment",
            "gpus_per_run",
        ]
    )


def train_run_name(jobs: Sequence[SAEJob]) -> str:
    """The name of the training run of ``jobs``: the SAE's name for one SAE, else
    ``train-<hook point>`` for a hook point's SAEs."""
    if len(jobs) == 1:
        return jobs[0].name
    return "train-" + re.sub(r"[^A-Za-z0-9]+", "", jobs[0].hook_point)


def train_run_request(
    store: OutputRef,
    jobs: Sequence[SAEJob],
    loc: RunLocation,
    cfg: FlowExperimentConfig,
    gpus_per_run: int = 1,
) -> dict[str, Any]:
    """The ``run_deployment`` arguments of the training run of ``jobs`` (one hook point's
    SAEs): parameters, run name, tags, and the ``gpus_per_run`` job variable when it asks for
    more than the deployment's default, which the pool's job template turns into the pod's
    ``nvidia.com/gpu`` limit (or Docker's device request count)."""
    hooks = {j.hook_point for j in jobs}
    if len(hooks) != 1:
        raise ValueError(f"jobs: expected SAEs of one hook point, got {sorted(hooks)}")
    if not isinstance(gpus_per_run, int) or gpus_per_run < 1:
        raise ValueError(f"gpus_per_run={gpus_per_run!r}: expected a positive number of GPUs")
    params, token = _parent_params(cfg, loc)
    return {
        "parameters": {
            "cfg": params,
            "run": loc.run,
            "sae_names": [j.name for j in jobs],
            "store_uri": store.uri,
            "lease_token": token,
        },
        "flow_run_name": f"{loc.experiment}/{loc.run}/{train_run_name(jobs)}",
        "timeout": 0,
        "tags": ["isup-train-part"],
        "job_variables": {"gpus_per_run": gpus_per_run} if gpus_per_run > 1 else None,
    }


@task(
    name="train-saes-remote",
    **{**TASK_DEFAULTS, "cache_policy": _RemoteTrainCache(entry_points=TRAIN_MODULES)},
)
def train_saes_remote(
    store: OutputRef,
    jobs: list[SAEJob],
    loc: RunLocation,
    deployment: str,
    cfg: FlowExperimentConfig,
    out: str = "sae",
    gpus_per_run: int = 1,
    poll_s: float | None = None,
) -> list[OutputRef]:
    """Train ``jobs`` as one run of ``deployment`` (e.g. one GPU pod with ``gpus_per_run``
    GPUs), wait for it, and return references to the SAEs it published under
    ``{run}/{out}/<name>``. Cached like the in-process training task."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, **train_run_request(store, jobs, loc, cfg, gpus_per_run))
    label = train_run_name(jobs)
    run_logger().info("started training run %s of %s for %s", run.name, deployment, label)
    wait_for_runs([run], "training", TrainRunsFailed, poll_s, f"train-run-{label}")
    return [
        sae_ref(j, loc.uri(out, j.name), loc.storage_options, trained_by=run.name) for j in jobs
    ]
