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

import posixpath
from typing import Any

from integral_superposition import storage
from integral_superposition.analysis.params import AnalysisParams
from integral_superposition.compute import DTYPE_NAMES, short_name
from integral_superposition.experiment import ModelSpec, ReportOptions, make_run_id
from integral_superposition.flows.config import FlowExperimentConfig
from integral_superposition.flows.experiment import (
    _Steps,
    absolute_storage,
    check_deployments,
    dump_store,
    lease_owner,
    own_run_root,
    resolve_storage_options,
    result_storage_at,
    submit_training,
    task_options,
)
from integral_superposition.flows.process import record_process
from integral_superposition.lease import RunLease, check_delegate
from integral_superposition.merge.params import MergeParams
from integral_superposition.steering.sweep import SteeringParams
from integral_superposition.tasks.analyze import analyze_sae
from integral_superposition.tasks.backends import model_stamp
from integral_superposition.tasks.blocks import refuse_credentials, resolve_storage, secure_config
from integral_superposition.tasks.dump import dump_activations, partition_name
from integral_superposition.tasks.index import RUN_INDEX
from integral_superposition.tasks.merge import merge_sae
from integral_superposition.tasks.policy import retry_options
from integral_superposition.tasks.refs import ModelRef, OutputRef, RunLocation
from integral_superposition.tasks.report import build_experiment_report, publish_report_summary
from integral_superposition.tasks.steer import evaluate_steering
from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE


def _secured(
    cfg: FlowExperimentConfig, run: str | None = None
) -> tuple[FlowExperimentConfig, RunLocation]:
    """``cfg`` with inline credentials moved into a per-run Secret block, and where it writes."""
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


def location_of(
    run_root: str,
    storage_options: dict[str, Any] | None = None,
    storage_secret: str | None = None,
) -> RunLocation:
    """The :class:`RunLocation` of a run folder ``{storage}/{experiment}/{run}``
    (``storage_options``: those storage is opened with, the Secret's included)."""
    root = absolute_storage(run_root).rstrip("/")
    exp_root, run = posixpath.split(root) if "://" in root else _split_local(root)
    storage_root, experiment = (
        posixpath.split(exp_root) if "://" in exp_root else _split_local(exp_root)
    )
    return RunLocation(
        storage=storage_root,
        experiment=experiment,
        run=run,
        storage_options=storage_options or {},
        storage_secret=storage_secret,
    )


def _open_storage(
    storage_options: dict[str, Any] | None, storage_secret: str | None
) -> dict[str, Any]:
    """The options a step flow opens storage with; credentials as parameters are refused."""
    refuse_credentials(storage_options, "storage_options")
    return resolve_storage(storage_options, storage_secret)


def _split_local(path: str) -> tuple[str, str]:
    import os

    return os.path.dirname(path), os.path.basename(path)


def _parent(uri: str, levels: int = 1) -> str:
    for _ in range(levels):
        uri = (
            posixpath.dirname(uri.rstrip("/")) if "://" in uri else _split_local(uri.rstrip("/"))[0]
        )
    return uri


def _basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def find_store_of(sae_uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The activation store an SAE of an experiment run was trained on (from the run's
    ``run.json``); raises when the SAE does not sit in a run folder that records it."""
    root = _parent(sae_uri, 2)
    index = storage.join(root, RUN_INDEX)
    try:
        doc = storage.read_json(index, storage_options)
    except (FileNotFoundError, OSError, ValueError):
        raise ValueError(
            f"sae_uri={sae_uri!r}: no run index at {index!r} to find its activation store; "
            "pass store_uri explicitly"
        ) from None
    stores = [
        s["output"]["uri"]
        for s in doc.get("steps", [])
        if s.get("output")
        and s["output"]["kind"] == "activations"
        and s["step"] in ("dump", "combine")
    ]
    if not stores:
        raise ValueError(f"{index!r} records no activation store; pass store_uri explicitly")
    return stores[-1]


def _refs(sae_uri: str, store_uri: str | None, opts: dict[str, Any]) -> tuple[OutputRef, OutputRef]:
    store_uri = store_uri or find_store_of(sae_uri, opts)
    sae = OutputRef.read("sae", _basename(sae_uri), absolute_storage(sae_uri), opts)
    store = OutputRef.read("activations", _basename(store_uri), absolute_storage(store_uri), opts)
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
    cfg, loc = _secured(cfg)
    opts = task_options(cfg, loc.storage_options)
    model = ModelRef(spec=cfg.model, stamp=model_stamp(cfg.model))
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
    cfg, loc = _secured(cfg, run)
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
        model = ModelRef(spec=cfg.model, stamp=model_stamp(cfg.model))
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
    cfg, loc = _secured(cfg)
    opts = task_options(cfg, loc.storage_options)
    check_deployments(cfg, ("train",) if store_uri else ("dump", "train"))
    with own_run_root(cfg, loc, "train"):
        if store_uri:
            store = OutputRef.read(
                "activations",
                _basename(store_uri),
                absolute_storage(store_uri),
                loc.storage_options,
            )
        else:
            model = ModelRef(spec=cfg.model, stamp=model_stamp(cfg.model))
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
    cfg, loc = _secured(cfg, run)
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
            "activations", _basename(store_uri), absolute_storage(store_uri), loc.storage_options
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


@flow(name="analyze", persist_result=False, log_prints=True, on_running=[record_process])
def analyze_flow(
    sae_uri: str,
    store_uri: str | None = None,
    params: AnalysisParams | None = None,
    model_id: str | None = None,
    run_root: str | None = None,
    storage_options: dict[str, Any] | None = None,
    storage_secret: str | None = None,
    allow_other_store: bool = False,
) -> OutputRef:
    """Analyse the SAE at ``sae_uri`` on ``store_uri`` (default: the store recorded by the
    SAE's run). ``model_id`` adds the logit lens. Output: ``{run_root}/analysis/<sae>``.
    The store must be the one the SAE was trained on unless ``allow_other_store``."""
    opts = _open_storage(storage_options, storage_secret)
    sae, store = _refs(sae_uri, store_uri, opts)
    loc = location_of(run_root or _parent(sae.uri, 2), opts, storage_secret)
    model = _model_ref(model_id, store, opts) if model_id else None
    with RunLease(loc.root, opts, owner=lease_owner("analyze")):
        ref = analyze_sae.with_options(**_standalone_options(loc))(
            sae,
            store,
            params or AnalysisParams(),
            loc,
            model=model,
            **_other_store(allow_other_store),
        )
    get_run_logger().info("analysis of %s: %s", sae.name, ref.uri)
    return ref


@flow(name="merge", persist_result=False, log_prints=True, on_running=[record_process])
def merge_flow(
    sae_uri: str,
    store_uri: str | None = None,
    params: MergeParams | None = None,
    model_id: str | None = None,
    run_root: str | None = None,
    storage_options: dict[str, Any] | None = None,
    storage_secret: str | None = None,
    allow_other_store: bool = False,
) -> OutputRef:
    """Merge the latents of the SAE at ``sae_uri``; ``model_id`` enables the spliced CE / KL
    metrics. Output: ``{run_root}/merge/<sae>``."""
    opts = _open_storage(storage_options, storage_secret)
    sae, store = _refs(sae_uri, store_uri, opts)
    loc = location_of(run_root or _parent(sae.uri, 2), opts, storage_secret)
    model = _model_ref(model_id, store, opts) if model_id else None
    with RunLease(loc.root, opts, owner=lease_owner("merge")):
        ref = merge_sae.with_options(**_standalone_options(loc))(
            sae,
            store,
            params or MergeParams(),
            loc,
            model=model,
            **_other_store(allow_other_store),
        )
    get_run_logger().info("merged SAE of %s: %s", sae.name, ref.uri)
    return ref


def sae_model_id(sae_uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The model an SAE was trained on, from its ``cfg.json`` (SAELens ``metadata.model_name``)."""
    try:
        cfg = storage.read_json(storage.join(sae_uri, "cfg.json"), storage_options)
    except (FileNotFoundError, OSError, ValueError):
        cfg = {}
    name = (cfg.get("metadata") or {}).get("model_name") or cfg.get("model_name")
    if not name:
        raise ValueError(f"sae_uri={sae_uri!r}: its cfg.json names no model; pass model_id")
    return str(name)


def _short_dtype(name: str) -> str | None:
    """``"bfloat16"`` (a manifest's model dtype) -> ``"bf16"``; None for an unknown name."""
    return short_name(DTYPE_NAMES[name]) if name in DTYPE_NAMES else None


def _model_ref(
    model_id: str, store: OutputRef | None = None, storage_options: dict[str, Any] | None = None
) -> ModelRef:
    """The model ``model_id``; when it is the model ``store`` was dumped from, in the dtype it
    ran in then, so a step run on its own shares the experiment's cached results."""
    spec = ModelSpec(model_id=model_id)
    if store is not None:
        try:
            dumped = storage.read_manifest(store.uri, storage_options).get("model") or {}
        except (FileNotFoundError, OSError, ValueError):
            dumped = {}
        dtype = _short_dtype(str(dumped.get("dtype")))
        if dumped.get("model_id") == model_id and dtype:
            spec = ModelSpec(model_id=model_id, dtype=dtype)
    return ModelRef(spec=spec, stamp=model_stamp(spec))


@flow(name="steer-eval", persist_result=False, log_prints=True, on_running=[record_process])
def steer_eval_flow(
    sae_uri: str,
    store_uri: str | None = None,
    params: SteeringParams | None = None,
    model_id: str | None = None,
    run_root: str | None = None,
    storage_options: dict[str, Any] | None = None,
    storage_secret: str | None = None,
    allow_other_store: bool = False,
) -> OutputRef:
    """Evaluate steering with the SAE at ``sae_uri`` inside ``model_id`` (default: the model
    the SAE was trained on). Output: ``{run_root}/steering/<sae>``."""
    opts = _open_storage(storage_options, storage_secret)
    sae, store = _refs(sae_uri, store_uri, opts)
    loc = location_of(run_root or _parent(sae.uri, 2), opts, storage_secret)
    model = _model_ref(model_id or sae_model_id(sae.uri, opts), store, opts)
    with RunLease(loc.root, opts, owner=lease_owner("steer-eval")):
        ref = evaluate_steering.with_options(**_standalone_options(loc))(
            sae,
            store,
            params or SteeringParams(),
            loc,
            model=model,
            **_other_store(allow_other_store),
        )
    get_run_logger().info("steering evaluation of %s: %s", sae.name, ref.uri)
    return ref


@flow(name="report", persist_result=False, log_prints=True, on_running=[record_process])
def report_flow(
    run_root: str,
    options: ReportOptions | None = None,
    storage_options: dict[str, Any] | None = None,
    storage_secret: str | None = None,
) -> OutputRef:
    """(Re)build the report of the experiment run at ``run_root`` from its ``run.json``."""
    opts = _open_storage(storage_options, storage_secret)
    root = absolute_storage(run_root)
    doc = storage.read_json(storage.join(root, RUN_INDEX), opts)
    by_kind: dict[str, list[OutputRef]] = {}
    for s in doc.get("steps", []):
        if s.get("output") and s["step"] != "report":
            ref = OutputRef.model_validate(s["output"])
            by_kind.setdefault(ref.kind, []).append(ref)
    loc = location_of(root, opts, storage_secret)
    with RunLease(loc.root, opts, owner=lease_owner("report")):
        ref = build_experiment_report.with_options(**_standalone_options(loc))(
            doc.get("config", {}), by_kind.get("sae", []), by_kind.get("analysis", []),
            by_kind.get("merge", []), by_kind.get("steering", []), options or ReportOptions(), loc,
        )  # fmt: skip
        publish_report_summary(
            ref, by_kind.get("sae", []), by_kind.get("analysis", []), by_kind.get("merge", []),
            by_kind.get("steering", []), options or ReportOptions(), loc,
        )  # fmt: skip
    get_run_logger().info("report: %s", ref.summary.get("page"))
    return ref
