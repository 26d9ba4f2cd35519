"""A dump directory's own files: what a dump may write, remove and resume from.

A dump never mixes with data it did not write: a folder holding anything else is refused
before anything is written or removed, and files are removed only by the names a dump gives
them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from integral_superposition import storage
from integral_superposition.dump.shards import files_intact, verify_dump

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^shard-(\d{5})\.json$")
_OWN_NAME_RE = re.compile(
    r"^(manifest\.json|docs\.parquet|shard-\d{5}\.(json|safetensors|parquet))$"
)
_OWN_TMP_RE = re.compile(
    r"^\.tmp-(manifest\.json|docs\.parquet|shard-\d{5}\.(json|safetensors|parquet))-"
)
_PART_DIR_RE = re.compile(r"^part-\d{3}-of-\d{3}$")
_LEASE_RE = re.compile(r"^(\.tmp-)?\.lease\.json")


def _listing(out_dir: str, storage_options) -> tuple[dict[str, int], set[str]]:
    """``({file name: size}, {directory name})`` directly under ``out_dir`` (empty if it
    does not exist)."""
    fs, path = storage.get_fs(out_dir, storage_options)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}, set()
    files: dict[str, int] = {}
    dirs: set[str] = set()
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") == "file":
            files[name] = int(e.get("size") or 0)
        elif e.get("type") == "directory" and name:
            dirs.add(name)
    return files, dirs


def own_listing(out_dir: str, storage_options, part_dirs: Sequence[str] = ()) -> dict[str, int]:
    """The files under ``out_dir``, after checking that every entry is one a dump writes.

    A folder holding anything else (a user's files, another kind of output) is refused
    before anything is written or removed: a dump never mixes with data it did not write.
    """
    if storage.is_local(out_dir):
        _, path = storage.get_fs(out_dir, storage_options)
        if os.path.exists(path) and not os.path.isdir(path):
            raise FileExistsError(f"out_dir={out_dir!r} is a file: expected a directory")
    files, dirs = _listing(out_dir, storage_options)
    # the lease of a partition writer (lease.py) sits next to its shards while it writes
    files = {n: v for n, v in files.items() if not _LEASE_RE.match(n)}
    foreign = sorted(n for n in files if not (_OWN_NAME_RE.match(n) or _OWN_TMP_RE.match(n)))
    foreign += sorted(f"{d}/" for d in dirs if not (_PART_DIR_RE.match(d) or d in part_dirs))
    if not foreign and storage.MANIFEST_NAME in files:
        try:
            m = storage.read_manifest(out_dir, storage_options)
        except ValueError:
            m = {}
        if m.get("kind") != "activations" or "identity" not in m:
            foreign = [f"{storage.MANIFEST_NAME} of a {m.get('kind')!r} output"]
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise FileExistsError(
            f"out_dir={out_dir!r} holds files an activation dump did not write ({shown}); "
            "choose a new or empty directory (nothing was changed)"
        )
    return files


def remove_named(out_dir: str, names, storage_options) -> None:
    """Remove files of a dump by name (never a folder, never a name a dump does not write)."""
    for name in names:
        base = name.split("/")[-1]
        head = name[: -len(base)].rstrip("/")
        if not (_OWN_NAME_RE.match(base) or _OWN_TMP_RE.match(base)) or (
            head and not _PART_DIR_RE.match(head)
        ):
            continue
        uri = storage.join(out_dir, *name.split("/"))
        if storage.exists(uri, storage_options):
            storage.remove(uri, storage_options, recursive=False)


def _unpublish(out_dir: str, manifest: Mapping[str, Any], storage_options) -> None:
    """Remove an earlier dump of ours from ``out_dir``: its manifest first (readers stop
    trusting it), then the files it lists and its parts' files, each by name."""
    remove_named(out_dir, [storage.MANIFEST_NAME], storage_options)
    remove_named(out_dir, list(manifest.get("files") or {}), storage_options)
    for rel in manifest.get("parts") or []:
        if isinstance(rel, str) and _PART_DIR_RE.match(rel):
            part = storage.join(out_dir, rel)
            files, _ = _listing(part, storage_options)
            remove_named(part, sorted(files), storage_options)


def _intact(
    out_dir: str,
    files: Mapping[str, Mapping[str, Any]],
    listing: Mapping[str, int],
    storage_options,
) -> bool:
    """True when every file of a shard record is there with its size and SHA-256."""
    if any(listing.get(name) != entry["size"] for name, entry in files.items()):
        return False
    return files_intact(out_dir, files, storage_options)


def reusable_shards(
    out_dir: str,
    identity: str,
    shard_ids: Sequence[str],
    overwrite: bool,
    storage_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any] | None] | None:
    """What a dump of ``identity`` (shards ``shard_ids``) can keep in ``out_dir``.

    None when the complete dump is already there and verifies; else the completion record of
    each planned shard whose files are intact (None for the shards to compute). Temporary
    files of interrupted writes are removed; a different dump there is an error unless
    ``overwrite``, which removes it (its own files only, by name).
    """
    listing = own_listing(out_dir, storage_options)
    if storage.MANIFEST_NAME in listing:
        existing = storage.read_manifest(out_dir, storage_options)
        if existing.get("identity") == identity:
            if verify_dump(out_dir, storage_options):
                log.info("dump at %s is complete and verified; reusing it", out_dir)
                return None
            log.warning("dump at %s is damaged; recomputing its damaged shards", out_dir)
            # same dump, damaged: unpublish it, then recompute what is missing
            remove_named(out_dir, [storage.MANIFEST_NAME], storage_options)
            listing.pop(storage.MANIFEST_NAME)
        elif not overwrite:
            raise FileExistsError(
                f"out_dir={out_dir!r} already holds a different dump; pass overwrite=True or choose another directory"
            )
        else:
            # overwrite replaces our own earlier dump, file by file; nothing else is touched
            _unpublish(out_dir, existing, storage_options)
            listing = own_listing(out_dir, storage_options)
    tmp = [n for n in listing if _OWN_TMP_RE.match(n)]
    # temporary files of writes that a crash interrupted: never published, never read
    remove_named(out_dir, tmp, storage_options)
    for name in tmp:
        listing.pop(name)
    records: list[dict[str, Any] | None] = [None] * len(shard_ids)
    foreign = []
    for name in listing:
        m = _SHARD_RE.match(name)
        if not m:
            continue
        s = int(m.group(1))
        try:
            rec = storage.read_json(storage.join(out_dir, name), storage_options)
        except ValueError:
            rec = {}
        if s >= len(shard_ids) or rec.get("shard_id") != shard_ids[s]:
            foreign.append(name)
        elif _intact(out_dir, rec["files"], listing, storage_options):
            records[s] = rec
        else:
            log.warning("%s: shard %d is damaged; recomputing it", out_dir, s)
    if foreign:
        if not overwrite:
            raise FileExistsError(
                f"out_dir={out_dir!r} holds shards of a different dump ({foreign[0]}); pass overwrite=True or choose another directory"
            )
        # shards of an earlier dump of ours: removed by name, shard by shard
        stems = [n.removesuffix(".json") for n in foreign]
        remove_named(
            out_dir,
            [f"{st}.{ext}" for st in stems for ext in ("json", "safetensors", "parquet")],
            storage_options,
        )
    return records
