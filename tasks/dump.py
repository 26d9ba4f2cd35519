"""Tasks of the first step: resolve the dataset, dump activations (whole or by partition),
combine partition dumps into one store."""

from __future__ import annotations

import posixpath

from integral_superposition import storage
from integral_superposition.config import DumpConfig
from integral_superposition.experiment import DataSpec
from integral_superposition.tasks.backends import using_backend
from integral_superposition.tasks.policy import (
    DUMP_MODULES,
    TASK_DEFAULTS,
    gpu_slot,
    output_cache,
)
from integral_superposition.tasks.refs import DataRef, ModelRef, OutputRef, RunLocation
from integral_superposition.tasks.ui import Progress, event, library_logs, timed_step
from prefect import task


def partition_name(index: int, count: int) -> str:
    return f"part-{index:03d}-of-{count:03d}"


@task(
    name="resolve-dataset",
    **{**TASK_DEFAULTS, "cache_policy": output_cache("integral_superposition.data")},
)
def resolve_dataset(spec: DataSpec, stamp: str, loc: RunLocation) -> DataRef:
    """Load the dataset once to fingerprint it. Cached on the spec and the source's
    ``stamp`` (size and mtime or ETag), so an unchanged file is not read again."""
    from integral_superposition.data.datasets import dataset_fingerprint, label_mapping

    with timed_step():
        df = spec.load(loc.storage_options)
    labels = label_mapping(df[spec.label_col]) if spec.label_col else []
    return DataRef(
        spec=spec,
        fingerprint=dataset_fingerprint(df, spec.text_col, spec.label_col),
        n_rows=len(df),
        labels=labels,
    )


@task(name="dump-activations", **{**TASK_DEFAULTS, "cache_policy": output_cache(*DUMP_MODULES)})
def dump_activations(
    data: DataRef,
    model: ModelRef,
    cfg: DumpConfig,
    loc: RunLocation,
    out: str = "acts",
    partition: tuple[int, int] | None = None,
    gpu_limit: str | None = "gpu",
    show_progress: bool = False,
) -> OutputRef:
    """Dump ``data`` through ``model`` at ``cfg``'s hook points into ``{run}/{out}`` (or
    ``{run}/{out}/part-III-of-NNN`` for one partition). A retry resumes the dump: shards
    already written are kept."""
    from integral_superposition.data.datasets import dataset_fingerprint
    from integral_superposition.dump import dump_layer_activations
    from integral_superposition.dump.writer import dump_summary

    df = data.spec.load(loc.storage_options)
    spec = data.spec
    if dataset_fingerprint(df, spec.text_col, spec.label_col) != data.fingerprint:
        raise RuntimeError(
            f"dataset {spec.source!r} changed since it was resolved in this run; run again"
        )
    name = out if partition is None else partition_name(*partition)
    out_uri = loc.uri(out) if partition is None else loc.uri(out, name)
    progress = Progress(f"dump-{name}", f"dump {name}", unit="tok")
    with (
        gpu_slot(gpu_limit),
        using_backend(model.spec) as backend,
        progress,
        timed_step(),
        library_logs(),
    ):
        store = dump_layer_activations(
            df,
            spec.text_col,
            spec.label_col,
            backend,
            cfg,
            out_uri,
            storage_options=loc.storage_options,
            label_names=data.labels or None,
            partition=partition,
            overwrite=True,
            progress=show_progress,
            on_progress=progress,
        )
    progress.finish()
    m = store.manifest
    ref = OutputRef.from_manifest("activations", name, out_uri, m, **dump_summary(m))
    if partition is None:
        _announce(ref, loc)
    return ref


@task(
    name="combine-partitions",
    **{**TASK_DEFAULTS, "cache_policy": output_cache("integral_superposition.dump")},
)
def combine_partitions(parts: list[OutputRef], loc: RunLocation, out: str = "acts") -> OutputRef:
    """Publish one store over the partition dumps (their shards are referenced, not copied).

    The store is published in this run's folder ``{run}/{out}``, where this run's parts sit.
    Parts reused from an earlier run are copied next to them: that run's folder is its own to
    write (under its own lease), never this run's.
    """
    from integral_superposition.dump import combine_dumps
    from integral_superposition.dump.writer import copy_dump, dump_summary

    target = loc.uri(out)
    part_uris = []
    for p in parts:
        if posixpath.dirname(p.uri.rstrip("/")) != target.rstrip("/"):
            dst = storage.join(target, p.name)
            copy_dump(p.uri, dst, loc.storage_options)
            part_uris.append(dst)
        else:
            part_uris.append(p.uri)
    with timed_step():
        store = combine_dumps(part_uris, target, storage_options=loc.storage_options)
    m = store.manifest
    ref = OutputRef.from_manifest(
        "activations", out, target, m, **dump_summary(m), partitions=len(parts)
    )
    _announce(ref, loc)
    return ref


def _announce(ref: OutputRef, loc: RunLocation) -> None:
    event(
        "isup.activations.dumped",
        f"isup.activations.{ref.content_hash[:16]}",
        {"uri": ref.uri, "content_hash": ref.content_hash, **ref.summary, **loc.storage_settings()},
        labels={
            "prefect.resource.name": f"{loc.experiment}/{ref.name}",
            "isup.experiment": loc.experiment,
            "isup.run": loc.run,
        },
    )
