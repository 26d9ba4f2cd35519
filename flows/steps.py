"""One flow per step, for running a step alone (``isup dump``, ``isup train``, ...) and for
deployments (``prefect.yaml``): each composes the same cached tasks as ``experiment_flow``.

Steps after training take plain URIs, so an automation can start them from an event: the
``analyze`` deployment runs ``analyze_flow(sae_uri=..., store_uri=...)`` when an
``isup.sae.trained`` event arrives. Their outputs go next to the SAE's run folder: for an
SAE at ``{storage}/{experiment}/{run}/sae/<name>``, the analysis is written to
``{storage}/{experiment}/{run}/analysis/<name>`` (or under ``run_root`` when given).

Every step flow takes the storage settings: the flows on a config through its
``storage_secret`` and ``storage_options``, the others through parameters of those names,
which the event that starts them carries. ``storage_secret`` names the Prefect Secret block
holding the credentials; ``storage_options`` holds only what is not a credential (an
endpoint, a region): a credential there is refused, since Prefect stores parameters in
clear text.
"""

from __future__ import annotations

from typing import Any

from integral_superposition import runs
from integral_superposition.experiment import ModelSpec
from integral_superposition.flows.config import FlowExperimentConfig
from integral_superposition.flows.experiment import (
    _Steps,
    absolute_storage,
    check_deployments,
    dump_store,
    lease_owner,
    own_run_root,
    result_storage_at,
    secure_run,
    submit_training,
    task_options,
)
from integral_superposition.flows.process import record_process
from integral_superposition.flows.sae_steps import STEPS, Step
from integral_superposition.lease import RunLease, check_delegate
from integral_superposition.tasks.blocks import refuse_credentials, resolve_storage
from integral_superposition.tasks.dump import dump_activations, partition_name
from integral_superposition.tasks.policy import retry_options
from integral_superposition.tasks.refs import ModelRef, OutputRef, RunLocation
from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE


def _open_storage(
    storage_options: dict[str, Any] | None, storage_secret: str | None
) -> dict[str, Any]:
    """The options a step flow opens storage with; credentials as parameters are refused."""
    refuse_credentials(storage_options, "storage_options")
    return resolve_storage(storage_options, storage_secret)


def _refs(sae_uri: str, store_uri: str | None, opts: dict[str, Any]) -> tuple[OutputRef, OutputRef]:
    store_uri = store_uri or runs.find_store_of(sae_uri, opts)
    sae = OutputRef.read("sae", runs.basename(sae_uri), absolute_storage(sae_uri), opts)
    store = OutputRef.read(
        "activations", runs.basename(store_uri), absolute_storage(store_uri), opts
    )
    return sae, store


def _other_store(allow: bool) -> dict[str, Any]:
    # passed only when set, so a default call keeps the experiment's cache key
    return {"allow_other_store": True} if allow else {}


def _standalone_options(loc: RunLocation) -> dict[str, Any]:
    """Retries and result storage for a step run on its own: results with the outputs."""
    return {
        **retry_options(3, 10.0, 0.2),
        "result_storage": result_storage_at(
            loc.experiment_root, loc.storage_options, loc.storage_secret
        ),
    }


@flow(name="dump", persist_result=False, log_prints=True, on_running=[record_process])
def dump_flow(cfg: FlowExperimentConfig, show_progress: bool = False) -> OutputRef:
    """Resolve the dataset of ``cfg`` and dump its activations (one store, or partitions
    combined into one); cached like the experiment's dump step."""
    cfg, loc = secure_run(cfg)
    opts = task_options(cfg, loc.storage_options)
    model = ModelRef.of(cfg.model)
    check_deployments(cfg, ("dump",))
    with own_run_root(cfg, loc, "dump"):
        store = dump_store(
            cfg, loc, model, lambda t: t.with_options(**opts), _Steps(), show_progress
        )
    get_run_logger().info(
        "activation store: %s (%s tokens)", store.uri, store.summary.get("n_tokens")
    )
    return store


@flow(name="dump-partition", persist_result=False, log_prints=True, on_running=[record_process])
def dump_partition_flow(
    cfg: FlowExperimentConfig, partition: int, run: str, lease_token: str | None = None
) -> OutputRef:
    """Dump partition ``partition`` of ``cfg.fanout.partitions`` into run ``run`` (one GPU
    worker each when the experiment fans out with ``fanout.mode: deployments``).

    Started by an experiment run, it gets that run's ``lease_token``: it writes as the
    run's delegate (refused unless that run still holds the run root) and leases only its
    own partition folder. Started alone, it takes the run root's lease itself."""
    from integral_superposition.tasks.dump import resolve_dataset

    n = cfg.fanout.partitions
    if not 0 <= partition < n:
        raise ValueError(f"partition={partition}: expected 0 <= partition < fanout.partitions={n}")
    cfg, loc = secure_run(cfg, run)
    opts = task_options(cfg, loc.storage_options)
    if lease_token:
        check_delegate(loc.root, lease_token, loc.storage_options)
        guard: Any = RunLease(
            loc.uri(cfg.paths.shards_dir, partition_name(partition, n)),
            loc.storage_options,
            owner=lease_owner("dump-partition"),
            parent_token=lease_token,
        )
    else:
        guard = own_run_root(cfg, loc, "dump")
    with guard:
        data = resolve_dataset.with_options(**opts)(
            cfg.data, cfg.data.stamp(loc.storage_options), loc
        )
        model = ModelRef.of(cfg.model)
        # not cached here: the orchestrating task caches the whole fan-out, and the part
        # must land in this run's folder, where the orchestrator reads it
        ref = dump_activations.with_options(**opts, cache_policy=NO_CACHE)(
            data, model, cfg.dump, loc, out=cfg.paths.shards_dir, partition=(partition, n),
            gpu_limit=cfg.gpu_limit,
        )  # fmt: skip
    get_run_logger().info("partition %s: %s", partition_name(partition, n), ref.uri)
    return ref


@flow(name="train", persist_result=False, log_prints=True, on_running=[record_process])
def train_flow(
    cfg: FlowExperimentConfig, store_uri: str | None = None, show_progress: bool = False
) -> list[OutputRef]:
    """Train the SAEs of ``cfg`` (the base SAE and its sweep) on ``store_uri``, or on the
    store of ``cfg``'s dump step (run first, cached)."""
    cfg, loc = secure_run(cfg)
    opts = task_options(cfg, loc.storage_options)
    check_deployments(cfg, ("train",) if store_uri else ("dump", "train"))
    with own_run_root(cfg, loc, "train"):
        if store_uri:
            store = OutputRef.read(
                "activations",
                runs.basename(store_uri),
                absolute_storage(store_uri),
                loc.storage_options,
            )
        else:
            model = ModelRef.of(cfg.model)
            store = dump_store(
                cfg, loc, model, lambda t: t.with_options(**opts), _Steps(), show_progress
            )
        futs = [
            fut
            for _, fut in submit_training(
                cfg, store, loc, lambda t: t.with_options(**opts), show_progress
            )
        ]
        saes = [r for f in futs for r in f.result()]
    for s in saes:
        get_run_logger().info("SAE %s: %s", s.name, s.uri)
    return saes


@flow(name="train-part", persist_result=False, log_prints=True, on_running=[record_process])
def train_part_flow(
    cfg: FlowExperimentConfig,
    run: str,
    sae_names: list[str],
    store_uri: str,
    lease_token: str | None = None,
) -> list[OutputRef]:
    """Train the SAEs ``sae_names`` of ``cfg`` (one hook point's) on ``store_uri`` into run
    ``run``, on ``cfg.fanout.gpus_per_run`` GPUs (one GPU pod each when the experiment fans
    training out with ``fanout.train: per_hook_point`` or ``per_sae``).

    Started by an experiment run, it gets that run's ``lease_token``: it writes as the run's
    delegate (refused unless that run still holds the run root) and leases only its SAEs'
    folders. Started alone, it takes the run root's lease itself."""
    import contextlib

    from integral_superposition.tasks.train import train_saes

    by_name = {j.name: j for j in cfg.sae_jobs()}
    unknown = [n for n in sae_names if n not in by_name]
    if unknown or not sae_names:
        raise ValueError(
            f"sae_names={sae_names!r}: expected a non-empty list of this config's SAEs "
            f"({sorted(by_name)})"
        )
    jobs = [by_name[n] for n in sae_names]
    if len({j.hook_point for j in jobs}) != 1:
        raise ValueError(
            f"sae_names={sae_names!r}: expected SAEs of one hook point, got "
            f"{sorted({j.hook_point for j in jobs})}"
        )
    cfg, loc = secure_run(cfg, run)
    opts = task_options(cfg, loc.storage_options)
    out = cfg.paths.sae_path
    with contextlib.ExitStack() as guard:
        if lease_token:
            check_delegate(loc.root, lease_token, loc.storage_options)
            for j in jobs:
                guard.enter_context(
                    RunLease(
                        loc.uri(out, j.name),
                        loc.storage_options,
                        owner=lease_owner("train-part"),
                        parent_token=lease_token,
                    )
                )
        else:
            guard.enter_context(own_run_root(cfg, loc, "train"))
        store = OutputRef.read(
            "activations",
            runs.basename(store_uri),
            absolute_storage(store_uri),
            loc.storage_options,
        )
        # not cached here: the orchestrating task caches the training, and the SAEs must
        # land in this run's folder, where the orchestrator reads them
        refs = train_saes.with_options(**opts, cache_policy=NO_CACHE)(
            store,
            jobs,
            loc,
            out=out,
            gpu_limit=cfg.gpu_limit,
            nproc=cfg.fanout.gpus_per_run,
            distribute_modules=cfg.fanout.distribute_modules,
        )
    for r in refs:
        get_run_logger().info("SAE %s: %s", r.name, r.uri)
    return refs


def _model_ref(
    model_id: str, store: OutputRef | None = None, storage_options: dict[str, Any] | None = None
) -> ModelRef:
    """The model ``model_id``; when it is the model ``store`` was dumped from, in the dtype it
    ran in then, so a step run on its own shares the experiment's cached results."""
    dtype = runs.dumped_dtype(store.uri, model_id, storage_options) if store is not None else None
    spec = ModelSpec(model_id=model_id, dtype=dtype) if dtype else ModelSpec(model_id=model_id)
    return ModelRef.of(spec)


def _sae_step_flow(step: Step):
    """The flow of one step on a trained SAE (a row of :data:`SAE_STEPS`)."""

    def run_step(
        sae_uri: str,
        store_uri: str | None = None,
        params: Any = None,
        model_id: str | None = None,
        run_root: str | None = None,
        storage_options: dict[str, Any] | None = None,
        storage_secret: str | None = None,
        allow_other_store: bool = False,
    ) -> OutputRef:
        opts = _open_storage(storage_options, storage_secret)
        sae, store = _refs(sae_uri, store_uri, opts)
        loc = RunLocation.at(run_root or runs.parent(sae.uri, 2), opts, storage_secret)
        if model_id is None and step.model_from_sae:
            model_id = runs.sae_model_id(sae.uri, opts)
        model = _model_ref(model_id, store, opts) if model_id else None
        with RunLease(loc.root, opts, owner=lease_owner(step.name)):
            ref = step.load_task().with_options(**_standalone_options(loc))(
                sae,
                store,
                params or step.load_params()(),
                loc,
                model=model,
                **_other_store(allow_other_store),
            )
        get_run_logger().info("%s of %s: %s", step.output, sae.name, step.where(ref))
        return ref

    run_step.__annotations__ = {**run_step.__annotations__, "params": step.load_params() | None}
    return _as_flow(step, run_step)


def _run_step_flow(step: Step):
    """The flow of one step on a finished run (a row of :data:`RUN_STEPS`)."""

    def run_step(
        run_root: str,
        options: Any = None,
        storage_options: dict[str, Any] | None = None,
        storage_secret: str | None = None,
    ) -> OutputRef:
        opts = _open_storage(storage_options, storage_secret)
        root = absolute_storage(run_root)
        config, outputs = runs.read_run_outputs(root, opts)
        inputs = [[OutputRef.model_validate(o) for o in outputs.get(k, [])] for k in step.inputs]
        options = options or step.load_params()()
        loc = RunLocation.at(root, opts, storage_secret)
        with RunLease(loc.root, opts, owner=lease_owner(step.name)):
            ref = step.load_task().with_options(**_standalone_options(loc))(
                config, *inputs, options, loc
            )
            if step.publish:
                step.load_publish()(ref, *inputs, options, loc)
        get_run_logger().info("%s: %s", step.output, step.where(ref))
        return ref

    run_step.__annotations__ = {**run_step.__annotations__, "options": step.load_params() | None}
    return _as_flow(step, run_step)


def _as_flow(step: Step, fn: Any) -> Any:
    fn.__name__ = fn.__qualname__ = step.flow_name
    fn.__doc__ = step.help
    return flow(name=step.name, persist_result=False, log_prints=True, on_running=[record_process])(
        fn
    )


STEP_FLOWS = {
    step.name: (_sae_step_flow if step.scope == "sae" else _run_step_flow)(step) for step in STEPS
}
"""The flow of each step run on its own (:data:`~integral_superposition.flows.sae_steps.STEPS`),
by step name."""
analyze_flow = STEP_FLOWS["analyze"]
merge_flow = STEP_FLOWS["merge"]
steer_eval_flow = STEP_FLOWS["steer-eval"]
report_flow = STEP_FLOWS["report"]
