"""Training checkpoints: atomic step directories, and the run fingerprint a resume must match.

``{uri}/step-NNNNNNNNN/`` holds one safetensors file per SAE in training (weights, Adam
moments, dead-latent counters: whatever the trainee's ``state_tensors()`` returns),
``rng.safetensors`` and ``state.json`` (step, the trainees' ``state_json()``, the run
fingerprint); ``latest.json`` is replaced last, so a crash at any point leaves the previous
checkpoint readable. A resume compares the stored fingerprint with the new run's and refuses
a different run, naming the first field that differs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from integral_superposition import storage
from integral_superposition.config import SAEConfig

CHECKPOINT_FORMAT = 1
_NOT_FINGERPRINTED = {"checkpoint_every", "log_every", "device", "refit_decoder"}
_FINGERPRINTED_WHEN_SET = {"decoder_norm": "unit", "decoder_init_norm": 1.0}
"""Fields added after checkpoints were first written: part of the fingerprint only when they
differ from these defaults, so that a checkpoint written before them still resumes."""
"""Config fields a resume may change: they leave the training state as it is."""


class Checkpointable(Protocol):
    """One SAE in training, as a checkpoint sees it."""

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def state_json(self) -> dict[str, Any]: ...


_STEP_DIR_RE = re.compile(r"^step-\d{9}$")
_STEP_FILE_RE = re.compile(r"^(\.tmp-)?(state\.json|rng\.safetensors|sae-\d{2}\.safetensors)")


class Checkpoints:
    """Atomic step directories under ``uri`` with ``latest.json`` published last.

    Only files a checkpoint writes are ever removed, by name: a step directory's files
    (``step-NNNNNNNNN/{state.json, rng.safetensors, sae-NN.safetensors}``) and ``latest.json``;
    folders (step directories and ``uri``) are removed only when nothing else is left in them.
    """

    def __init__(self, uri: str, storage_options=None):
        self.uri = str(uri).rstrip("/")
        self.so = storage_options

    def _remove_step(self, name: str) -> None:
        if not _STEP_DIR_RE.match(str(name)):
            return  # not a name we write (e.g. a tampered latest.json): leave it alone
        d = storage.join(self.uri, name)
        for f in storage.listdir(d, self.so):
            if _STEP_FILE_RE.match(f):
                storage.remove(storage.join(d, f), self.so)
        storage.remove_empty_dir(d, self.so)

    def latest(self) -> dict[str, Any] | None:
        """The ``latest.json`` pointer (None when there is none); one this project did not
        write is refused, never read as a checkpoint nor replaced."""
        p = storage.join(self.uri, "latest.json")
        if not storage.exists(p, self.so):
            return None
        try:
            found = storage.read_json(p, self.so)
        except ValueError:
            found = None
        if (
            not isinstance(found, dict)
            or not isinstance(found.get("step"), int)
            or not _STEP_DIR_RE.match(str(found.get("dir")))
        ):
            raise FileExistsError(
                f"checkpoint_uri={self.uri!r} holds a latest.json that training checkpoints "
                "did not write: choose another checkpoint folder (nothing was changed)"
            )
        return found

    def check(self) -> None:
        """Refuse a folder holding a published output (``manifest.json``) or a
        ``latest.json`` that is not a checkpoint's (see :meth:`latest`), changing nothing."""
        if storage.exists(storage.join(self.uri, storage.MANIFEST_NAME), self.so):
            raise FileExistsError(
                f"checkpoint_uri={self.uri!r} holds a published output ({storage.MANIFEST_NAME}):"
                " choose a folder of its own for checkpoints (nothing was changed)"
            )
        self.latest()

    def write(
        self,
        step: int,
        fingerprint: dict,
        trainees: Sequence[Checkpointable],
        extra: dict[str, Any],
    ) -> None:
        """Write every trainee's state, then commit the step (one process holding all SAEs)."""
        self.check()
        files = self.write_trainees(step, dict(enumerate(trainees)))
        self.commit(step, fingerprint, [t.state_json() for t in trainees], files, extra)

    def write_trainees(self, step: int, trainees: Mapping[int, Checkpointable]) -> dict[str, Any]:
        """Write ``sae-NN.safetensors`` of step ``step`` for ``{NN: trainee}``; returns their
        file entries. Module-parallel ranks each write their own SAEs, then rank 0 commits."""
        d = storage.join(self.uri, f"step-{step:09d}")
        files = {}
        for i, t in trainees.items():
            data = st_save(t.state_tensors())
            storage.write_bytes(storage.join(d, f"sae-{i:02d}.safetensors"), data, self.so)
            files[f"sae-{i:02d}.safetensors"] = storage.file_entry("", data)
        return files

    def commit(
        self,
        step: int,
        fingerprint: dict,
        trainee_json: Sequence[dict[str, Any]],
        files: Mapping[str, Any],
        extra: dict[str, Any],
    ) -> None:
        """Write ``rng.safetensors`` and ``state.json`` of step ``step`` (whose SAE files are
        written), publish it in ``latest.json`` and remove the previous step."""
        name = f"step-{step:09d}"
        d = storage.join(self.uri, name)
        files = dict(files)
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng.update({f"torch_cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        data = st_save(rng)
        storage.write_bytes(storage.join(d, "rng.safetensors"), data, self.so)
        files["rng.safetensors"] = storage.file_entry("", data)
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "fingerprint": fingerprint,
            "trainees": list(trainee_json),
            "files": files,
            **extra,
        }
        storage.write_json(storage.join(d, "state.json"), state, self.so)
        previous = self.latest()
        storage.write_json(
            storage.join(self.uri, "latest.json"), {"step": step, "dir": name}, self.so
        )
        if previous and previous.get("dir") != name:
            self._remove_step(str(previous.get("dir")))

    def read(
        self, indices: Sequence[int] | None = None
    ) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None:
        """``(state.json, SAE tensors, RNG states)`` of the latest step, or None. ``indices``:
        read only these SAEs' files (in that order; default all)."""
        latest = self.latest()
        if latest is None:
            return None
        d = storage.join(self.uri, latest["dir"])
        state = storage.read_json(storage.join(d, "state.json"), self.so)
        which = range(len(state["trainees"])) if indices is None else indices
        tensors = [
            st_load(storage.read_bytes(storage.join(d, f"sae-{i:02d}.safetensors"), self.so))
            for i in which
        ]
        rng = st_load(storage.read_bytes(storage.join(d, "rng.safetensors"), self.so))
        return state, tensors, rng

    def remove(self) -> None:
        # latest.json first: a crash half-way leaves no pointer to a half-removed step
        storage.remove(storage.join(self.uri, "latest.json"), self.so)
        for name in storage.listdir(self.uri, self.so):
            self._remove_step(name)
        storage.remove_empty_dir(self.uri, self.so)  # only when nothing else is left in it


def _fingerprinted(cfg: SAEConfig) -> dict[str, Any]:
    d = cfg.model_dump(mode="json", exclude=_NOT_FINGERPRINTED)
    for name, default in _FINGERPRINTED_WHEN_SET.items():
        if d[name] == default:
            del d[name]
    return d


def run_fingerprint(
    cfgs: Sequence[SAEConfig], source_desc: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint: configs (less the cadence and the
    device), the data source and ``extra`` (e.g. the step total)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "cfgs": [_fingerprinted(c) for c in cfgs],
        "source": source_desc,
        **extra,
    }


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """First differing path between two JSON-like values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            r = first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if r:
                return r
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            r = first_difference(x, y, f"{path}[{i}]")
            if r:
                return r
        return None
    return None if a == b else f"{path}: checkpoint has {a!r}, this run has {b!r}"
