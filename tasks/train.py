"""The training task: one or more SAEs trained on one store in a single pass over it."""

from __future__ import annotations

import time
from typing import Any

from integral_superposition import storage
from integral_superposition.config import DumpConfig
from integral_superposition.experiment import OnlineConfig, SAEJob
from integral_superposition.tasks.backends import using_backend
from integral_superposition.tasks.policy import TASK_DEFAULTS, OutputCache, gpu_slot
from integral_superposition.tasks.refs import DataRef, ModelRef, OutputRef, RunLocation
from integral_superposition.tasks.ui import (
    Progress,
    artifact_key,
    event,
    library_logs,
    producer,
    run_logger,
    table,
    timed_step,
)
from prefect import task

TRAIN_MODULES = ("integral_superposition.sae", "integral_superposition.sae.launch")
"""What training runs: the SAE package (the trainer, its sources and the SAE itself) and the
launcher that runs it on several processes."""
TRAIN_CACHE = OutputCache(
    entry_points=TRAIN_MODULES,
    # the number of processes does not change what is trained (a data-parallel SAE equals the
    # single-process one within float rounding; a module-parallel one exactly)
    exclude=["storage_options", "gpu_limit", "show_progress", "nproc", "distribute_modules"],
)


def sae_ref(
    job: SAEJob, uri: str, storage_options: dict[str, Any] | None = None, **summary: Any
) -> OutputRef:
    """The reference of ``job``'s SAE published at ``uri``, from its manifest: the same
    whether the SAE trained in this process or in a deployment run."""
    manifest = storage.read_manifest(uri, storage_options)
    metrics = dict(manifest.get("metrics") or {})
    return OutputRef.from_manifest(
        "sae", job.name, uri, manifest, hook_point=job.hook_point,
        architecture=job.cfg.architecture, d_sae=job.cfg.k, metrics=metrics,
        steps=metrics.get("train_steps"), **summary,
    )  # fmt: skip


def checkpoint_key(store: OutputRef, jobs: list[SAEJob]) -> str:
    """A folder name for the checkpoints of one training: a retry (same inputs) finds them,
    a changed config never does."""
    ident = storage.canonical_json(
        {
            "store": store.content_hash,
            "jobs": [j.model_dump(mode="json") for j in jobs],
            "code": TRAIN_CACHE.code_version(),
        }
    )
    return storage.sha256_bytes(ident.encode())[:16]


def _worker_line(logger):
    """Forward the training workers' output to the run log: warnings and errors always, other
    lines at most one every 15 s (the progress artifact shows the steps)."""
    last = [0.0]

    def on_line(line: str) -> None:
        now = time.monotonic()
        if any(w in line for w in ("WARNING", "ERROR", "Traceback", "Error")):
            logger.warning("%s", line)
        elif now - last[0] >= 15.0:
            last[0] = now
            logger.info("%s", line)

    return on_line


@task(name="train-saes", **{**TASK_DEFAULTS, "cache_policy": TRAIN_CACHE})
def train_saes(
    store: OutputRef,
    jobs: list[SAEJob],
    loc: RunLocation,
    out: str = "sae",
    gpu_limit: str | None = "gpu",
    show_progress: bool = False,
    nproc: int = 1,
    distribute_modules: bool = False,
) -> list[OutputRef]:
    """Train ``jobs`` (SAEs on the same store, read once) into ``{run}/{out}/{job.name}``.

    ``nproc > 1`` trains on that many processes under torchrun (one per GPU, holding as many
    slots of ``gpu_limit``): data-parallel, or each process its own SAEs with
    ``distribute_modules``. The result and the checkpoints are the same as on one process, so
    a retry may use another ``nproc``.

    Checkpoints go to ``{run}/checkpoints/<key>/``; a retry resumes from the last one
    instead of step 0. Cached on the store's content hash, the SAE configs and the code
    version. Emits ``isup.sae.trained`` with the metrics for every SAE.
    """
    from integral_superposition.sae.train import train_saes as _train

    out_uris = [loc.uri(out, j.name) for j in jobs]
    ckpt = loc.uri("checkpoints", checkpoint_key(store, jobs))
    label = ", ".join(j.name for j in jobs)
    progress = Progress(
        f"train-{jobs[0].name}" + ("-etc" if len(jobs) > 1 else ""), f"train {label}", unit="steps"
    )
    logger = run_logger()
    last_log = [0.0]

    def on_log(step: int, metrics: dict[str, float]) -> None:
        # at most one line every 15 s: the progress artifact shows the rest
        now = time.monotonic()
        if now - last_log[0] >= 15.0:
            last_log[0] = now
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
            logger.info("train step %d: %s", step, shown)

    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc={nproc!r}: expected a positive number of processes")
    with gpu_slot(gpu_limit, occupy=nproc), progress, timed_step(), library_logs():
        if nproc == 1:
            results = _train(
                [store.uri],
                [j.cfg for j in jobs],
                out_uris,
                checkpoint_uri=ckpt,
                storage_options=loc.storage_options,
                on_progress=progress,
                on_log=on_log,
                resume=True,
                progress=show_progress,
                distribute_modules=distribute_modules,
            )
        else:
            from integral_superposition.sae.launch import launch_train_saes

            results = launch_train_saes(
                store.uri,
                [j.cfg for j in jobs],
                out_uris,
                nproc=nproc,
                checkpoint_uri=ckpt,
                storage_options=loc.storage_options,
                distribute_modules=distribute_modules,
                on_progress=progress,
                on_line=_worker_line(logger),
            )
    progress.finish()
    refs = []
    for job, uri, res in zip(jobs, out_uris, results, strict=True):
        ref = sae_ref(job, uri, loc.storage_options, resumed_from_step=res.resumed_from_step)
        metrics = ref.summary["metrics"]
        refs.append(ref)
        table(
            artifact_key("sae-metrics", job.name),
            [{"metric": k, "value": v} for k, v in metrics.items()],
            f"Held-out metrics of {job.name}",
        )
        event(
            "isup.sae.trained",
            f"isup.sae.{ref.content_hash[:16]}",
            {
                "uri": uri,
                "store_uri": store.uri,
                "content_hash": ref.content_hash,
                "name": job.name,
                "hook_point": job.hook_point,
                "config": job.cfg.model_dump(mode="json"),
                "metrics": metrics,
                "model_id": store.summary.get("model"),
                **loc.storage_settings(),
            },
            labels={
                "prefect.resource.name": f"{loc.experiment}/{job.name}",
                "isup.experiment": loc.experiment,
                "isup.run": loc.run,
                "isup.producer": producer(),
            },
        )
    return refs


@task(name="train-saes-online", **{**TASK_DEFAULTS, "cache_policy": TRAIN_CACHE})
def train_saes_online(
    data: DataRef,
    model: ModelRef,
    dump: DumpConfig,
    online: OnlineConfig,
    jobs: list[SAEJob],
    loc: RunLocation,
    out: str = "sae",
    store_out: str = "acts",
    gpu_limit: str | None = "gpu",
    show_progress: bool = False,
) -> list[OutputRef]:
    """Train ``jobs`` (every SAE, on any of ``dump``'s hook points) online: straight from
    ``model``'s forward passes over ``data``, through a shuffle buffer, no dump first.

    ``{run}/{store_out}`` receives the full store (``online.write_store``) or a bounded sample
    of ``online.sample_tokens`` (held-out documents first) that the later steps read.
    Checkpoints go to ``{run}/checkpoints/<key>/``; a retry resumes from the last one and
    skips the documents consumed before it. Returns the SAEs' references, then the store's.
    """
    from integral_superposition.data.datasets import dataset_fingerprint
    from integral_superposition.dump.writer import dump_summary
    from integral_superposition.sae.online import OnlineActivations
    from integral_superposition.sae.train import train_saes as _train

    df = data.spec.load(loc.storage_options)
    spec = data.spec
    if dataset_fingerprint(df, spec.text_col, spec.label_col) != data.fingerprint:
        raise RuntimeError(
            f"dataset {spec.source!r} changed since it was resolved in this run; run again"
        )
    out_uris = [loc.uri(out, j.name) for j in jobs]
    key = storage.canonical_json(
        {
            "data": data.fingerprint,
            "model": model.model_dump(mode="json"),
            "dump": dump.model_dump(mode="json"),
            "online": online.model_dump(mode="json"),
            "jobs": [j.model_dump(mode="json") for j in jobs],
            "code": TRAIN_CACHE.code_version(),
        }
    )
    ckpt = loc.uri("checkpoints", "online-" + storage.sha256_bytes(key.encode())[:16])
    label = ", ".join(j.name for j in jobs)
    progress = Progress("train-online", f"train online {label}", unit="steps")
    with (
        gpu_slot(gpu_limit),
        using_backend(model.spec) as backend,
        progress,
        timed_step(),
        library_logs(),
    ):
        source = OnlineActivations(
            df, spec.text_col, spec.label_col, backend, dump, store_uri=loc.uri(store_out),
            write_store=online.write_store, sample_tokens=online.sample_tokens,
            label_names=data.labels or None, storage_options=loc.storage_options,
        )  # fmt: skip
        results = _train(
            source, [j.cfg for j in jobs], out_uris, checkpoint_uri=ckpt,
            storage_options=loc.storage_options, on_progress=progress, resume=True,
            progress=show_progress,
        )  # fmt: skip
    progress.finish()
    refs = [
        sae_ref(job, uri, loc.storage_options, resumed_from_step=res.resumed_from_step)
        for job, uri, res in zip(jobs, out_uris, results, strict=True)
    ]
    m = storage.read_manifest(loc.uri(store_out), loc.storage_options, kind="activations")
    store = OutputRef.from_manifest(
        "activations", store_out, loc.uri(store_out), m, **dump_summary(m), online=True,
        sample=not online.write_store,
    )  # fmt: skip
    return [*refs, store]
