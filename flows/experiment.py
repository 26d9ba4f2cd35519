"""``experiment_flow``: dump -> train -> analyse -> merge -> steering evaluation -> report.

Each step is a task from ``integral_superposition.tasks``; tasks pass references to published
outputs (URI + content hash), never tensors or DataFrames. Every task is cached on its
inputs' content hashes, its config and the code version, with results kept in the
experiment's storage, so a rerun of an unchanged experiment finishes in seconds with every
task Cached, and changing one SAE parameter reruns only training and what follows it.

With ``online.enabled`` there is no dump step: one task trains every SAE straight from the
model's forward passes and leaves the store the later steps read (a bounded sample of
``online.sample_tokens``, or the full store with ``online.write_store``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from integral_superposition import storage
from integral_superposition.credentials import split_secret_options
from integral_superposition.experiment import SAEJob, make_run_id
from integral_superposition.flows.config import FlowExperimentConfig
from integral_superposition.flows.process import record_process
from integral_superposition.lease import RunLease
from integral_superposition.runs import absolute_storage
from integral_superposition.tasks.analyze import analyze_sae
from integral_superposition.tasks.blocks import secure_config
from integral_superposition.tasks.dump import (
    combine_partitions,
    dump_activations,
    partition_name,
    resolve_dataset,
)
from integral_superposition.tasks.index import (
    ExperimentResult,
    StepRecord,
    publish_run_outputs,
    write_run_config,
    write_run_index,
    write_run_process,
)
from integral_superposition.tasks.merge import merge_sae
from integral_superposition.tasks.policy import retry_options
from integral_superposition.tasks.refs import ModelRef, OutputRef, RunLocation
from integral_superposition.tasks.report import build_experiment_report, publish_report_summary
from integral_superposition.tasks.steer import evaluate_steering
from integral_superposition.tasks.train import train_saes, train_saes_online
from integral_superposition.tasks.ui import event, step_seconds
from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run as runtime_flow_run


def result_storage_at(
    experiment_root: str,
    storage_options: dict[str, Any] | None = None,
    credentials_secret: str | None = None,
) -> Any:
    """Result storage kept with an experiment's outputs, in ``{experiment_root}/.prefect-results``:
    a path for local storage, else a saved remote file-system block that holds no credentials
    (they come from the worker's environment or profile, or from ``credentials_secret``)."""
    base = storage.join(absolute_storage(experiment_root), ".prefect-results")
    if storage.is_local(base):
        return Path(base)
    from integral_superposition.tasks.blocks import SecretRemoteFileSystem

    fs, _ = storage.get_fs(base, storage_options)
    settings, _ = split_secret_options(fs.storage_options)
    if credentials_secret:  # options the Secret gives are read from it at run time
        from integral_superposition.tasks.blocks import load_secret_options

        for k in load_secret_options(credentials_secret):
            settings.pop(k, None)
    block = SecretRemoteFileSystem(
        basepath=base, settings=settings, credentials_secret=credentials_secret
    )
    block.save("isup-results-" + storage.sha256_bytes(base.encode())[:12], overwrite=True)
    return block


def resolve_storage_options(cfg: FlowExperimentConfig) -> dict[str, Any]:
    """``cfg.storage_options`` over those of its ``storage_secret`` block (config wins)."""
    from integral_superposition.tasks.blocks import resolve_storage

    return resolve_storage(cfg.storage_options, cfg.storage_secret)


def secure_run(
    cfg: FlowExperimentConfig, run: str | None = None
) -> tuple[FlowExperimentConfig, RunLocation]:
    """``cfg`` with inline credentials moved into a per-run Secret block, and where its run
    ``run`` (default: ``cfg.run``, else a new id) writes."""
    run = run or cfg.run or make_run_id()
    cfg = secure_config(cfg, run)
    loc = RunLocation(
        storage=absolute_storage(cfg.storage),
        experiment=cfg.name,
        run=run,
        storage_options=resolve_storage_options(cfg),
        storage_secret=cfg.storage_secret,
    )
    return cfg, loc


def result_storage_for(
    cfg: FlowExperimentConfig, storage_options: dict[str, Any] | None = None
) -> Any:
    """Where task results (the cache records that let a rerun skip finished steps) live:
    ``auto`` keeps them with the outputs (:func:`result_storage_at`), a block slug is used
    as given, None leaves Prefect's default."""
    if cfg.result_storage is None:
        return None
    if cfg.result_storage != "auto":
        return cfg.result_storage
    opts = resolve_storage_options(cfg) if storage_options is None else storage_options
    return result_storage_at(storage.join(cfg.storage, cfg.name), opts, cfg.storage_secret)


def task_options(
    cfg: FlowExperimentConfig, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Per-experiment task options: retries and result storage."""
    opts = retry_options(cfg.retries.retries, cfg.retries.delay_s, cfg.retries.jitter)
    rs = result_storage_for(cfg, storage_options)
    if rs is not None:
        opts["result_storage"] = rs
    return opts


def _flow_run_name() -> str:
    cfg = runtime_flow_run.parameters.get("cfg")
    if isinstance(cfg, dict):
        name, run = cfg.get("name", "demo"), cfg.get("run")
    else:
        name, run = getattr(cfg, "name", "demo"), getattr(cfg, "run", None)
    return f"{name}/{run}" if run else f"{name}/new-run"


def _rename_flow_run(name: str) -> None:
    from prefect.client.orchestration import get_client

    fr_id = runtime_flow_run.id
    if fr_id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(fr_id, name=name)


class _Steps:
    """Collects the task futures of a flow run, in order, for the run's record."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, PrefectFuture]] = []

    def add(self, step: str, name: str, fut: PrefectFuture) -> PrefectFuture:
        self.items.append((step, name, fut))
        return fut

    def records(self) -> list[StepRecord]:
        out = []
        for step, name, fut in self.items:
            state = fut.state
            value = fut.result(raise_on_failure=False) if state.is_completed() else None
            refs = value if isinstance(value, list) else [value]
            for ref in refs:
                out.append(
                    StepRecord(
                        step=step,
                        name=ref.name if isinstance(ref, OutputRef) else name,
                        state=state.name or state.type.value,
                        seconds=step_seconds(fut.task_run_id),
                        output=ref if isinstance(ref, OutputRef) else None,
                    )
                )
        return out


def lease_owner(kind: str) -> str:
    """Who holds a lease: the flow run (name and id) or, outside Prefect, the process."""
    if runtime_flow_run.id:
        return f"{kind} flow run {runtime_flow_run.name} ({runtime_flow_run.id})"
    return f"isup {kind} (pid {os.getpid()})"


def check_deployments(
    cfg: FlowExperimentConfig, steps: tuple[str, ...] = ("dump", "train")
) -> None:
    """Before anything is written: every deployment the fan-out of ``steps`` will start
    exists on the Prefect server (else a ``ValueError`` names the field and the fix)."""
    needed = []
    if "dump" in steps and cfg.fanout.mode == "deployments" and cfg.fanout.partitions > 1:
        needed.append(("fanout.deployment", cfg.fanout.deployment, "dump-partition-gpu"))
    if "train" in steps and cfg.fanout.train != "in_process":
        needed.append(("fanout.train_deployment", cfg.fanout.train_deployment, "train-part-gpu"))
    if not needed:
        return
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for field, name, entry in needed:
            try:
                client.read_deployment_by_name(name)
            except ObjectNotFound:
                raise ValueError(
                    f"{field}={name!r}: no such deployment on the Prefect server at "
                    f"{client.api_url}; deploy prefect.yaml's {entry} (`prefect deploy --all`) "
                    "and start a worker on its pool, or run the step in this flow "
                    "(fanout.mode: tasks, fanout.train: in_process)"
                ) from None


@contextlib.contextmanager
def own_run_root(
    cfg: FlowExperimentConfig, loc: RunLocation, step: str = "experiment"
) -> Iterator[RunLease]:
    """Hold the run root for one flow run: check its bucket, take its lease (a second
    writer is refused, naming the holder), and record or check its config (a step whose
    config differs from the run's is refused, naming the fields). Released on exit."""
    storage.ensure_bucket(loc.root, loc.storage_options, create=cfg.storage_create_bucket)
    with RunLease(loc.root, loc.storage_options, owner=lease_owner(step)) as lease:
        write_run_config(cfg, loc, step)
        yield lease


def resolve_data(cfg: FlowExperimentConfig, loc: RunLocation, T: Callable, steps: _Steps):
    """The dataset's reference (loaded once to fingerprint it)."""
    fut = T(resolve_dataset).submit(cfg.data, cfg.data.stamp(loc.storage_options), loc)
    return steps.add("data", cfg.data.source, fut).result()


def train_online(
    cfg: FlowExperimentConfig,
    loc: RunLocation,
    model: ModelRef,
    T: Callable,
    steps: _Steps,
    show_progress: bool = False,
) -> tuple[list[OutputRef], OutputRef]:
    """Resolve the dataset and train every SAE online in one task, on one stream of forward
    passes (no dump step); returns the SAEs and the store the later steps read: the full
    store with ``online.write_store``, else the bounded sample."""
    data = resolve_data(cfg, loc, T, steps)
    fut = T(train_saes_online).submit(
        data, model, cfg.dump, cfg.online, cfg.sae_jobs(), loc, out=cfg.paths.sae_path,
        store_out=cfg.paths.shards_dir, gpu_limit=cfg.gpu_limit, show_progress=show_progress,
    )  # fmt: skip
    refs = steps.add("train", "online", fut).result()
    return refs[:-1], refs[-1]


def dump_store(
    cfg: FlowExperimentConfig,
    loc: RunLocation,
    model: ModelRef,
    T: Callable,
    steps: _Steps,
    show_progress: bool = False,
) -> OutputRef:
    """Resolve the dataset and dump it, as one task or as ``cfg.fanout.partitions`` partition
    tasks (or deployment runs) combined into one store."""
    data = resolve_data(cfg, loc, T, steps)
    n = cfg.fanout.partitions
    out = cfg.paths.shards_dir
    common = {"gpu_limit": cfg.gpu_limit, "show_progress": show_progress}
    if n == 1:
        fut = T(dump_activations).submit(data, model, cfg.dump, loc, out=out, **common)
        return steps.add("dump", out, fut).result()
    if cfg.fanout.mode == "deployments":
        from integral_superposition.tasks.fanout import dump_partitions_remote

        fut = T(dump_partitions_remote).submit(data, model, cfg.dump, cfg.fanout, loc, cfg)
        return steps.add("dump", out, fut).result()
    parts = [
        steps.add(
            "dump",
            partition_name(i, n),
            T(dump_activations).submit(
                data, model, cfg.dump, loc, out=out, partition=(i, n), **common
            ),
        )
        for i in range(n)
    ]
    refs = [p.result() for p in parts]
    return steps.add("combine", out, T(combine_partitions).submit(refs, loc, out=out)).result()


def report_config(cfg: FlowExperimentConfig) -> dict[str, Any]:
    """The config the report shows (and its cache key holds): all but the run name, so
    a rerun of an unchanged experiment reuses the report."""
    shown = cfg.public_dict()
    shown.pop("run", None)
    return shown


def group_jobs(jobs: list[SAEJob], fanout: str = "in_process") -> list[list[SAEJob]]:
    """The SAEs that train together: a hook point's SAEs share one pass over the store
    (``in_process``, ``per_hook_point``); ``per_sae`` trains every SAE on its own."""
    if fanout == "per_sae":
        return [[j] for j in jobs]
    groups: dict[str, list[SAEJob]] = {}
    for j in jobs:
        groups.setdefault(j.hook_point, []).append(j)
    return list(groups.values())


def submit_training(
    cfg: FlowExperimentConfig,
    store: OutputRef,
    loc: RunLocation,
    T: Callable[[Any], Any],
    show_progress: bool,
) -> list[tuple[list[SAEJob], PrefectFuture]]:
    """Submit one training task per group of SAEs (``T`` applies the task options): in this
    flow run (``fanout.train: in_process``), or each group as a run of
    ``fanout.train_deployment``; returns each group with its future."""
    groups = group_jobs(cfg.sae_jobs(), cfg.fanout.train)
    if cfg.fanout.train == "in_process":
        return [
            (
                jobs,
                T(train_saes).submit(
                    store,
                    jobs,
                    loc,
                    out=cfg.paths.sae_path,
                    gpu_limit=cfg.gpu_limit,
                    show_progress=show_progress,
                    nproc=cfg.fanout.gpus_per_run,
                    distribute_modules=cfg.fanout.distribute_modules,
                ),
            )
            for jobs in groups
        ]
    from integral_superposition.tasks.fanout import train_saes_remote

    return [
        (
            jobs,
            T(train_saes_remote).submit(
                store,
                jobs,
                loc,
                cfg.fanout.train_deployment,
                cfg,
                out=cfg.paths.sae_path,
                gpus_per_run=cfg.fanout.gpus_per_run,
            ),
        )
        for jobs in groups
    ]


@flow(
    name="experiment",
    flow_run_name=_flow_run_name,
    persist_result=False,  # the run's record is run.json; task results hold the cache
    log_prints=True,
    on_running=[record_process],
)
def experiment_flow(cfg: FlowExperimentConfig, show_progress: bool = False) -> ExperimentResult:
    """Run one experiment end to end (see the module docstring); returns the run's record,
    also written to ``{storage}/{name}/{run}/run.json``."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    run = cfg.run or make_run_id()
    if not cfg.run:
        _rename_flow_run(f"{cfg.name}/{run}")
    cfg, loc = secure_run(cfg, run)
    logger.info("run root: %s", loc.root)
    check_deployments(cfg)
    with own_run_root(cfg, loc, "experiment") as lease:
        write_run_process(loc, str(runtime_flow_run.id) if runtime_flow_run.id else None)
        return _experiment(cfg, loc, lease, t0, show_progress)


def _experiment(
    cfg: FlowExperimentConfig, loc: RunLocation, lease: RunLease, t0: float, show_progress: bool
) -> ExperimentResult:
    """The experiment's steps, run while ``lease`` holds the run root."""
    logger = get_run_logger()
    run, storage_options = loc.run, loc.storage_options
    opts = task_options(cfg, storage_options)

    def T(task_obj):
        return task_obj.with_options(**opts)

    steps = _Steps()
    model = ModelRef.of(cfg.model)
    if cfg.online.enabled:
        saes, store = train_online(cfg, loc, model, T, steps, show_progress)
    else:
        store = dump_store(cfg, loc, model, T, steps, show_progress)
        train_futs = [
            steps.add("train", jobs[0].name, fut)
            for jobs, fut in submit_training(cfg, store, loc, T, show_progress)
        ]
        saes = [ref for f in train_futs for ref in f.result()]

    def per_sae(step: str, task_obj, *args, after=(), **kwargs) -> list[PrefectFuture]:
        return [
            steps.add(
                step,
                s.name,
                T(task_obj).submit(
                    s, *args, **kwargs, gpu_limit=cfg.gpu_limit, wait_for=list(after)
                ),
            )
            for s in saes
        ]

    analysis_f = (
        per_sae("analyze", analyze_sae, store, cfg.analysis, loc, model=model)
        if cfg.steps.analyze
        else []
    )
    # the analysis is the central output: merge and steering evaluation wait for it rather
    # than race it for the GPU slot and the shared model
    merge_f = (
        per_sae("merge", merge_sae, store, cfg.merge, loc, model=model, after=analysis_f)
        if cfg.steps.merge
        else []
    )
    steer_f: list[PrefectFuture] = []
    if cfg.steps.steer_eval:
        steer_f = per_sae(
            "steer_eval", evaluate_steering, store, cfg.steering, loc, model=model, after=analysis_f
        )
    analyses = [f.result() for f in analysis_f]
    merges = [f.result() for f in merge_f]
    steering = [f.result() for f in steer_f]

    report_uri = None
    if cfg.steps.report:
        report = steps.add(
            "report",
            "report",
            T(build_experiment_report).submit(
                report_config(cfg),
                saes,
                analyses,
                merges,
                steering,
                cfg.report,
                loc,
                summary_csv=cfg.paths.summary_csv,
            ),
        ).result()
        report_uri = report.summary.get("page")
        publish_report_summary(report, saes, analyses, merges, steering, cfg.report, loc)

    result = ExperimentResult(
        experiment=cfg.name,
        run=run,
        run_root=loc.root,
        flow_run_id=str(runtime_flow_run.id) if runtime_flow_run.id else None,
        report_uri=report_uri,
        steps=steps.records(),
    )
    lease.check()  # a run that lost its lease does not overwrite the new holder's index
    index = write_run_index(result, cfg, loc)
    publish_run_outputs(result, loc)
    n_cached = sum(s.state == "Cached" for s in result.steps)
    logger.info(
        "experiment %s/%s done in %.1f s: %d task runs, %d cached; index %s",
        cfg.name, run, time.perf_counter() - t0, len(result.steps), n_cached, index,
    )  # fmt: skip
    if report_uri:
        logger.info("report: %s", report_uri)
    event(
        "isup.experiment.completed",
        f"isup.experiment.{cfg.name}.{run}",
        {
            "run_root": loc.root,
            "report_uri": report_uri,
            "cached": n_cached,
            "tasks": len(result.steps),
            **loc.storage_settings(),
        },
        labels={"prefect.resource.name": f"{cfg.name}/{run}", "isup.experiment": cfg.name},
    )
    return result
