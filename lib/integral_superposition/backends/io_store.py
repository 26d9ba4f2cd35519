"""File I/O for backends and outputs: re-exports the fsspec storage layer."""

from integral_superposition.storage import (
    atomic_open,
    exists,
    get_fs,
    join,
    read_bytes,
    read_json,
    read_manifest,
    write_bytes,
    write_json,
    write_manifest,
)

__all__ = [
    "atomic_open",
    "exists",
    "get_fs",
    "join",
    "read_bytes",
    "read_json",
    "read_manifest",
    "write_bytes",
    "write_json",
    "write_manifest",
]
