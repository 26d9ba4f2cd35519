"""Prefect blocks for storage credentials.

S3 credentials live in a Prefect ``Secret`` block holding a JSON object of fsspec storage
options (``{"key": ..., "secret": ..., "endpoint_url": ...}``), named by the experiment's
``storage_secret`` (or a step flow's ``storage_secret`` parameter). Only the block's name
travels: in flow-run parameters, events and the triggers that chain deployments; the
values are read where storage is touched and never written with the run's config, its
cache keys, its result records, its artifacts or its logs.

Credentials given inline (``storage_options.key`` and the like) are moved into a per-run
Secret block before a flow starts (:func:`move_credentials`, :func:`secure_config`) and
replaced by its name. :class:`SecretRemoteFileSystem` is the result storage that goes with
it: a ``RemoteFileSystem`` that reads the Secret when it first touches storage, so the
saved block document holds no credentials either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

import fsspec
from integral_superposition.credentials import (
    merge_options,
    option_paths,
    split_secret_options,
    without_values,
)
from integral_superposition.experiment import ExperimentConfig
from prefect.filesystems import RemoteFileSystem
from pydantic import Field

log = logging.getLogger(__name__)
_WARNED: set[str] = set()


def load_secret_options(name: str) -> dict[str, Any]:
    """The storage options stored in the Prefect Secret block ``name``: a JSON object, saved
    as a string (a string is masked when the block is read without its secrets; a mapping
    saved as such is not) or as a mapping."""
    from prefect.blocks.system import Secret

    try:
        block = Secret.load(name)
    except ValueError as e:
        raise ValueError(f"storage_secret={name!r}: no such Secret block ({e})") from None
    raw = (
        block.value.get_secret_value() if hasattr(block.value, "get_secret_value") else block.value
    )
    value: Any = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
    elif isinstance(raw, Mapping) and name not in _WARNED:
        _WARNED.add(name)
        log.warning(
            "Secret block %r holds a mapping, which Prefect shows in clear to anyone who can "
            "read blocks (UI, API); save it as a JSON string instead: "
            "Secret(value=json.dumps({...})).save(%r, overwrite=True)",
            name,
            name,
        )
    if not isinstance(value, Mapping):
        raise ValueError(
            f"storage_secret={name!r}: expected a JSON object of fsspec storage options "
            f'(e.g. {{"key": ..., "secret": ...}}), got a {type(value).__name__}'
        )
    return dict(value)


def save_secret_options(name: str, options: Mapping[str, Any]) -> None:
    """Save ``options`` as the Secret block ``name``, a JSON string (masked in the UI)."""
    from prefect.blocks.system import Secret

    Secret(value=json.dumps(dict(options))).save(name, overwrite=True)


def resolve_storage(
    storage_options: Mapping[str, Any] | None, storage_secret: str | None
) -> dict[str, Any]:
    """The options storage is opened with: those of the Secret block ``storage_secret`` (if
    any) under ``storage_options`` (which win, nested mappings merged key by key)."""
    base = load_secret_options(storage_secret) if storage_secret else {}
    return merge_options(base, storage_options)


def secret_block_name(*parts: str) -> str:
    """A valid block name (lowercase letters, digits, dashes) for ``isup-storage-<parts>``,
    distinct for distinct ``parts``."""
    exact = "/".join(parts)
    slug = re.sub(r"[^a-z0-9]+", "-", exact.lower()).strip("-")[:80]
    return f"isup-storage-{slug}-{hashlib.sha256(exact.encode()).hexdigest()[:8]}"


def refuse_credentials(storage_options: Mapping[str, Any] | None, argument: str) -> None:
    """Raise when ``storage_options`` holds credentials: a flow must get them by name."""
    _, secret = split_secret_options(storage_options)
    if secret:
        names = ", ".join(f"{argument}.{k}" for k in option_paths(secret))
        raise ValueError(
            f"{names}: credentials cannot be flow parameters (Prefect stores parameters in "
            "clear text); save them in a Prefect Secret block and pass its name as "
            "storage_secret, or give them through the worker's environment"
        )


def move_credentials(
    storage_options: Mapping[str, Any] | None,
    storage_secret: str | None,
    block_name: str,
    argument: str = "storage_options",
) -> tuple[dict[str, Any], str | None]:
    """``(public options, secret name)``: credentials in ``storage_options`` saved, with those
    of ``storage_secret``, into the Secret block ``block_name``, whose name replaces them.
    Returns the arguments unchanged when they hold no credentials. Raises ``ValueError``
    (naming the options) when the block cannot be saved: the credentials are never passed on."""
    public, secret = split_secret_options(storage_options)
    if not secret:
        return dict(storage_options or {}), storage_secret
    names = ", ".join(f"{argument}.{k}" for k in option_paths(secret))
    try:
        value = merge_options(load_secret_options(storage_secret) if storage_secret else {}, secret)
        save_secret_options(block_name, value)
    except Exception as e:
        raise ValueError(
            f"{names}: credentials given inline are moved into a Prefect Secret block before "
            f"a run starts, and saving the block {block_name!r} failed ({type(e).__name__}: "
            f"{without_values(str(e), secret)}); save them in a Secret block yourself and set "
            "storage_secret to its name, or give them through the environment "
            "(AWS_* variables, a profile)"
        ) from None
    return public, block_name


def secure_config(cfg: ExperimentConfig, run: str | None = None) -> ExperimentConfig:
    """``cfg`` with the credentials of its ``storage_options`` moved into the per-run Secret
    block ``isup-storage-<name>-<run>`` (see :func:`move_credentials`); ``cfg`` itself when
    it holds none."""
    if not cfg.inline_credentials():
        return cfg
    run = run or cfg.run or "run"
    public, name = move_credentials(
        cfg.storage_options, cfg.storage_secret, secret_block_name(cfg.name, run)
    )
    return cfg.model_copy(update={"storage_options": public, "storage_secret": name})


class SecretRemoteFileSystem(RemoteFileSystem):
    """A ``RemoteFileSystem`` whose credentials come from a Prefect Secret block at run time."""

    _block_type_name = "Integral Superposition Remote File System"

    credentials_secret: str | None = Field(
        default=None,
        description="Name of a Secret block with extra fsspec options (credentials).",
    )

    @property
    def filesystem(self) -> fsspec.AbstractFileSystem:
        if not self._filesystem:
            settings: dict[str, Any] = dict(self.settings)
            if self.credentials_secret:
                settings = merge_options(settings, load_secret_options(self.credentials_secret))
            scheme = urllib.parse.urlsplit(self.basepath).scheme
            self._filesystem = fsspec.filesystem(scheme, **settings)
        return self._filesystem
