"""What tasks hand each other: small references to published outputs, never tensors or frames.

An :class:`OutputRef` names a published output directory (``uri``) and its manifest's
``content_hash``; downstream cache keys use the hash, so an output recomputed elsewhere with
the same content does not invalidate later steps. :class:`RunLocation` says where a run
writes; only its experiment root enters cache keys, so a new run of the same experiment
reuses every unchanged step of earlier runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from integral_superposition import storage
from integral_superposition.credentials import masked_options, split_secret_options
from integral_superposition.experiment import DataSpec, ModelSpec
from integral_superposition.lease import check_writer
from integral_superposition.runs import split_run_root
from pydantic import BaseModel, ConfigDict, Field, field_serializer


class OutputRef(BaseModel):
    """A published output: ``kind`` (activations, sae, analysis, merge, steering, report),
    ``name``, ``uri``, the manifest's ``content_hash`` and a few summary numbers."""

    model_config = ConfigDict(frozen=True)

    kind: str
    name: str
    uri: str
    content_hash: str
    summary: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_manifest(
        cls, kind: str, name: str, uri: str, manifest: Mapping[str, Any], **summary: Any
    ) -> OutputRef:
        return cls(
            kind=kind,
            name=name,
            uri=uri,
            content_hash=str(manifest["content_hash"]),
            summary=json.loads(storage.canonical_json(summary)),
        )

    @classmethod
    def read(
        cls, kind: str, name: str, uri: str, storage_options: Mapping[str, Any] | None = None
    ) -> OutputRef:
        """The reference of an output already published at ``uri``."""
        manifest = storage.read_manifest(uri, storage_options)
        return cls.from_manifest(kind, name, uri, manifest)

    def is_valid(self, storage_options: Mapping[str, Any] | None = None) -> bool:
        """True when the output is still there, complete, and holds the same content."""
        try:
            manifest = storage.read_manifest(self.uri, storage_options)
        except (FileNotFoundError, ValueError, OSError):
            return False
        if manifest.get("content_hash") != self.content_hash:
            return False
        if manifest.get("kind") == "activations":
            # hashed in full: a same-size damaged shard is caught here and the dump step reruns
            # (and recomputes it) instead of handing it downstream
            from integral_superposition.dump.store import verify_dump

            return verify_dump(self.uri, storage_options)
        return storage.verify_output(self.uri, storage_options)

    def cache_identity(self) -> dict[str, str]:
        """What a downstream cache key sees: the content, not the location."""
        return {"kind": self.kind, "content_hash": self.content_hash}


class RunLocation(BaseModel):
    """Where one run writes: ``{storage}/{experiment}/{run}``. ``storage_options`` are the
    options storage is opened with (those of the Secret block ``storage_secret`` included);
    only their public part and the Secret's name are ever passed on (:meth:`storage_settings`),
    and a JSON dump masks the credentials."""

    model_config = ConfigDict(frozen=True)

    storage: str
    experiment: str
    run: str
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    storage_secret: str | None = None

    @field_serializer("storage_options", when_used="json")
    def _mask_credentials(self, v: dict[str, Any]) -> dict[str, Any]:
        return masked_options(v)

    @classmethod
    def at(
        cls,
        run_root: str,
        storage_options: Mapping[str, Any] | None = None,
        storage_secret: str | None = None,
    ) -> RunLocation:
        """The location of the run folder ``run_root`` (``{storage}/{experiment}/{run}``;
        ``storage_options``: those storage is opened with, the Secret's included)."""
        storage_root, experiment, run = split_run_root(run_root)
        return cls(
            storage=storage_root,
            experiment=experiment,
            run=run,
            storage_options=dict(storage_options or {}),
            storage_secret=storage_secret,
        )

    def storage_settings(self) -> dict[str, Any]:
        """What a step started elsewhere needs to open this storage, without a credential:
        ``{"storage_secret": name or None, "storage_options": options without credentials}``
        (an event payload; a trigger passes both to the step flow it starts)."""
        public, _ = split_secret_options(self.storage_options)
        if self.storage_secret:
            from integral_superposition.tasks.blocks import load_secret_options

            # what the Secret holds is read from it again where the step runs (an event is
            # best effort: a Secret that cannot be read now leaves its public options in)
            try:
                held = load_secret_options(self.storage_secret)
            except Exception:
                held = {}
            public = {k: v for k, v in public.items() if k not in held or held[k] != v}
        return {"storage_secret": self.storage_secret, "storage_options": public}

    @property
    def experiment_root(self) -> str:
        return storage.join(self.storage, self.experiment)

    @property
    def root(self) -> str:
        return storage.join(self.storage, self.experiment, self.run)

    def uri(self, *parts: str) -> str:
        """A location inside the run root; a part that would leave it (absolute, a URI,
        ``..``) is refused, so no step writes outside ``{storage}/{experiment}/{run}``; and
        once this process has lost the run root's lease, every step stops here
        (:class:`~integral_superposition.lease.LeaseLostError`)."""
        check_writer(self.root)
        for part in parts:
            pieces = str(part).replace("\\", "/").split("/")
            if (
                not str(part)
                or "://" in str(part)
                or str(part).startswith(("/", "~"))
                or any(p in ("", ".", "..") for p in pieces)
            ):
                raise ValueError(
                    f"{part!r}: expected a relative path inside the run root {self.root!r}"
                )
        return storage.join(self.root, *parts)

    def cache_identity(self) -> dict[str, str]:
        # the run name is left out: runs of one experiment share their cached steps
        return {"experiment_root": self.experiment_root}


class DataRef(BaseModel):
    """A resolved dataset: its spec, content fingerprint and size."""

    model_config = ConfigDict(frozen=True)

    spec: DataSpec
    fingerprint: str
    n_rows: int
    labels: list[str] = Field(default_factory=list)

    def cache_identity(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "spec": self.spec.model_dump(mode="json")}


class ModelRef(BaseModel):
    """A model spec plus a stamp of its weights' source (size and mtime of local files, the
    revision of a hub id, the package version of an embedded model)."""

    model_config = ConfigDict(frozen=True)

    spec: ModelSpec
    stamp: str

    @classmethod
    def of(cls, spec: ModelSpec) -> ModelRef:
        """``spec`` stamped with its weights' source (:func:`backends.sources.model_stamp`)."""
        from integral_superposition.backends.sources import model_stamp

        return cls(spec=spec, stamp=model_stamp(spec.model_id, spec.revision))

    def cache_identity(self) -> dict[str, Any]:
        # where the model runs does not change what it computes (up to float noise)
        spec = self.spec.model_dump(mode="json", exclude={"device", "device_map"})
        # the dtype it computes in, so that "auto" and the dtype it picked share results
        spec["dtype"] = self.spec.resolved_dtype()
        return {"spec": spec, "stamp": self.stamp}


def collect_refs(obj: Any) -> list[OutputRef]:
    """Every :class:`OutputRef` inside a (nested) result."""
    if isinstance(obj, OutputRef):
        return [obj]
    if isinstance(obj, BaseModel):
        return [r for v in obj.__dict__.values() for r in collect_refs(v)]
    if isinstance(obj, Mapping):
        return [r for v in obj.values() for r in collect_refs(v)]
    if isinstance(obj, list | tuple):
        return [r for v in obj for r in collect_refs(v)]
    return []
