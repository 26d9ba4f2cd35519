"""Dumping a large corpus on N workers: one deployment run per partition, combined into one
store.

With ``fanout.mode: deployments`` the experiment flow starts ``fanout.partitions`` runs of the
``dump-partition`` deployment (``flows/steps.py:dump_partition_flow``), each on its own
worker (one GPU pod each on Kubernetes), waits for them, and publishes one store over their
outputs. The parts are written to ``{run}/acts/part-III-of-NNN``, so every worker must see
the same storage (S3, or a shared volume).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from integral_superposition.config import DumpConfig
from integral_superposition.flows.config import FanoutPlan, FlowExperimentConfig
from integral_superposition.lease import held_lease
from integral_superposition.tasks.dump import TASK_DEFAULTS, combine_partitions, partition_name
from integral_superposition.tasks.policy import DUMP_MODULES, OutputCache
from integral_superposition.tasks.refs import DataRef, ModelRef, OutputRef, RunLocation
from integral_superposition.tasks.ui import Progress, run_logger
from prefect import task


@dataclass
class _FanoutCache(OutputCache):
    # the whole config travels to the workers, but only the dump's inputs key the cache
    exclude: list[str] = field(
        default_factory=lambda: ["storage_options", "gpu_limit", "show_progress", "cfg", "poll_s"]
    )


class PartitionRunsFailed(RuntimeError):
    """Some partition runs did not complete."""


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
    poll_s: float = 5.0,
) -> OutputRef:
    """Run one ``fanout.deployment`` flow run per partition, wait for all, and combine their
    dumps. Cached on the dataset fingerprint, the model, the dump config and the fan-out."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = run_logger()
    n = fanout.partitions
    # the partition runs write under this run's root as its delegates: they check that
    # this run still holds the root's lease (by its token) and lease their own folders
    lease = held_lease(loc.root)
    token = lease.token if lease is not None else None
    params = cfg.model_dump(mode="json")
    params["run"] = loc.run
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
    progress = Progress(f"dump-partitions-{loc.run}", "partition runs", unit="runs")
    pending = {r.id: i for i, r in enumerate(runs)}
    failed: dict[int, str] = {}
    with get_client(sync_client=True) as client:
        while pending:
            for fr_id, i in list(pending.items()):
                state = client.read_flow_run(fr_id).state
                if state is not None and state.is_final():
                    pending.pop(fr_id)
                    if not state.is_completed():
                        failed[i] = f"{state.name}: {state.message}"
            progress(n - len(pending), n)
            if pending:
                time.sleep(poll_s)
    if failed:
        raise PartitionRunsFailed(
            f"{len(failed)} of {n} partition runs did not complete: "
            + "; ".join(f"{partition_name(i, n)} {msg}" for i, msg in sorted(failed.items()))
        )
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
