"""Prefect blocks for storage credentials.

S3 credentials live in a Prefect ``Secret`` block holding a JSON object of fsspec storage
options (``{"key": ..., "secret": ..., "endpoint_url": ...}``), named by the experiment's
``storage_secret``. They are read when a run starts and never written with the run's
config, its cache keys or its result records. :class:`SecretRemoteFileSystem` is the
result storage that goes with it: a ``RemoteFileSystem`` that reads the same Secret when it
first touches storage, so the saved block document holds no credentials either.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import Any

import fsspec
from prefect.filesystems import RemoteFileSystem
from pydantic import Field


def load_secret_options(name: str) -> dict[str, Any]:
    """The storage options stored in the Prefect Secret block ``name``."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError as e:
        raise ValueError(f"storage_secret={name!r}: no such Secret block ({e})") from None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"storage_secret={name!r}: expected a JSON object of fsspec storage options "
            f'(e.g. {{"key": ..., "secret": ...}}), got a {type(value).__name__}'
        )
    return dict(value)


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
                settings.update(load_secret_options(self.credentials_secret))
            scheme = urllib.parse.urlsplit(self.basepath).scheme
            self._filesystem = fsspec.filesystem(scheme, **settings)
        return self._filesystem
