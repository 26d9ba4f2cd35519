"""One storage layer over fsspec URIs: local paths, ``s3://bucket/prefix`` and ``memory://``.

Every output directory is *published*: its data files are written atomically first and
``manifest.json`` is written last, so a reader that finds a manifest finds complete files.

Atomicity per backend:
- local files are written to a temporary sibling and ``os.replace``-d into place;
- object stores (S3, memory) receive a finished local temp file through one ``put_file``
  (S3 makes an object visible only when its single or multipart upload completes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tempfile
from collections.abc import Iterator, Mapping
from typing import IO, Any

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

from integral_superposition.hashing import (
    canonical_json,
    content_hash,
    package_versions,
    sha256_bytes,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})
"""Object stores whose first path component is a bucket (or container), never created here."""

_DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {}


def set_default_storage_options(protocol: str, options: Mapping[str, Any]) -> None:
    """Register storage options used for every URI of ``protocol`` (e.g. an S3 endpoint)."""
    _DEFAULT_OPTIONS[protocol] = dict(options)


def _env_s3_options() -> dict[str, Any]:
    """S3 options from the environment: endpoint, region and profile (credentials are read
    by botocore itself from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or a profile)."""
    opts: dict[str, Any] = {}
    endpoint = (
        os.environ.get("ISUP_S3_ENDPOINT_URL")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if endpoint:
        opts["endpoint_url"] = endpoint
    if os.environ.get("AWS_PROFILE"):
        opts["profile"] = os.environ["AWS_PROFILE"]
    return opts


def get_fs(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for ``uri`` with merged storage options."""
    if not isinstance(uri, str | os.PathLike) or not str(uri):
        raise ValueError(f"uri={uri!r}: expected a non-empty path or URL string")
    uri = os.fspath(uri)
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    opts: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        opts.update(_env_s3_options())
    opts.update(_DEFAULT_OPTIONS.get(protocol, {}))
    opts.update(storage_options or {})
    fs, path = url_to_fs(uri, **opts)
    if protocol in _BUCKET_PROTOCOLS and not path.strip("/"):
        raise ValueError(f"uri={uri!r}: expected {protocol}://bucket[/path], the bucket is missing")
    return fs, path


def check_root(uri: Any, name: str | None = "storage") -> str:
    """Validate an output root: a local directory or ``protocol://bucket[/prefix]``.

    Parsed with fsspec; refuses an empty value, an object-store URI without a bucket
    (``s3://``), the filesystem root (``/``, ``file:///``) and a protocol written without
    ``//`` (``s3:bucket``, which would silently become a local folder named ``s3:bucket``).
    Returns the URI without trailing slashes. Errors start with ``name=<value>`` (left out
    when ``name`` is None, e.g. when pydantic names the field itself).
    """

    def bad(msg: str) -> ValueError:
        return ValueError(f"{name}={uri!r}: {msg}" if name else msg)

    if uri is None:
        raise bad(
            "expected a directory or a URI such as s3://bucket/prefix (YAML reads a bare `~` "
            "or `null` as None; write the directory out, e.g. /home/me/runs)"
        )
    if isinstance(uri, dict):
        raise bad(
            "expected a directory or a URI string; YAML read the value as a mapping "
            "(a value like `s3:` or `key: value`), quote it"
        )
    if not isinstance(uri, str | os.PathLike):
        raise bad(f"expected a directory or a URI string, got {type(uri).__name__}")
    text = os.fspath(uri).strip()
    if not text:
        raise bad("expected a directory or a URI such as s3://bucket/prefix")
    refuse_uri_credentials(text, name or "storage")
    protocol, _ = split_protocol(text)
    if protocol is None:
        m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):", text)
        if m and m.group(1).lower() in fsspec.available_protocols():
            raise bad(
                f"looks like a {m.group(1)!r} URI without '//'; expected "
                f"{m.group(1)}://bucket/prefix (or a local directory not named like a URI)"
            )
    try:
        fs_cls = fsspec.get_filesystem_class(protocol or "file")
    except (ValueError, ImportError) as e:
        raise bad(f"unknown or unavailable storage protocol ({e})") from None
    path = str(fs_cls._strip_protocol(text))
    if protocol in _BUCKET_PROTOCOLS and not path.strip("/"):
        raise bad(f"expected {protocol}://bucket[/prefix], the bucket is missing")
    if not path.strip("/") or ((protocol or "file") in ("file", "local") and _is_fs_root(path)):
        raise bad(
            "names no directory (the path is empty or the filesystem root); expected a "
            "directory such as runs or /data/runs, or a URI such as s3://bucket/prefix"
        )
    return text.rstrip("/")


def refuse_uri_credentials(uri: str, name: str) -> None:
    """Refuse a URI that carries a credential (``sftp://user:password@host/...``,
    ``https://host/data.csv?token=...``): a URI is written into manifests, run records, Prefect
    parameters and logs, so credentials go in storage options (or the environment) instead.
    The error shows the URI with the credential masked."""
    from integral_superposition.credentials import masked_uri, uri_credentials

    found = uri_credentials(uri)
    if found:
        raise ValueError(
            f"{name}={masked_uri(uri)!r}: the URI carries a credential ({', '.join(found)}), "
            "which would be written with every output and record that names it; give it as "
            "a storage option (or through the environment or a secret block) instead"
        )


def _is_fs_root(path: str) -> bool:
    p = os.path.abspath(os.path.expanduser(path))
    return os.path.dirname(p) == p


def bucket_of(uri: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The bucket of an object-store URI, None for local and other stores."""
    protocol = split_protocol(os.fspath(uri))[0]
    if protocol not in _BUCKET_PROTOCOLS:
        return None
    _, path = get_fs(uri, storage_options)
    return path.strip("/").split("/", 1)[0]


def ensure_bucket(
    uri: str, storage_options: Mapping[str, Any] | None = None, create: bool = False
) -> None:
    """Check that the bucket of ``uri`` exists (nothing to check for local storage).

    A missing bucket is a :class:`FileNotFoundError`, never created silently (a misspelled
    bucket must not become a new one); ``create=True`` creates it.
    """
    bucket = bucket_of(uri, storage_options)
    if bucket is None:
        return
    fs, _ = get_fs(uri, storage_options)
    if fs.exists(bucket):
        return
    if not create:
        raise FileNotFoundError(
            f"storage={uri!r}: bucket {bucket!r} does not exist (or is not visible with these "
            "credentials); create it first, or set storage_create_bucket: true to create it"
        )
    fs.mkdir(bucket)


def is_local(uri: str) -> bool:
    """True when ``uri`` names a local file path."""
    fs, _ = get_fs(uri)
    return isinstance(fs, LocalFileSystem)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (keeps the protocol)."""
    uri = os.fspath(uri)
    if "://" in uri:
        proto, rest = uri.split("://", 1)
        return (
            f"{proto}://" + posixpath.join(rest, *parts)
            if rest
            else f"{proto}://" + posixpath.join(*parts)
        )
    return os.path.join(uri, *parts)


def browser_url(uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """A URL a browser can open for ``uri``: ``file://`` for local files, a presigned
    HTTPS URL (7 days) for S3, else the URI itself. No presigned URL is made from session
    credentials: it would carry their session token into the artifacts and events it is
    shown in."""
    fs, path = get_fs(uri, storage_options)
    if is_local(uri):
        return "file://" + os.path.abspath(path)
    sign = getattr(fs, "url", None)
    if sign is not None and "s3" in (
        fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    ):
        try:
            url = sign(path, expires=7 * 24 * 3600)
        except Exception as e:
            log.debug("no presigned URL for %s: %s", uri, e)
        else:
            if "x-amz-security-token" not in url.lower():
                return url
            log.debug("no presigned URL for %s: the credentials are session credentials", uri)
    return uri


def exists(uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = get_fs(uri, storage_options)
    return fs.exists(path)


def read_bytes(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    start: int | None = None,
    end: int | None = None,
) -> bytes:
    """Read a whole file or the byte range ``[start, end)`` of it."""
    fs, path = get_fs(uri, storage_options)
    if start is None and end is None:
        return fs.cat_file(path)
    return fs.cat_file(path, start=start, end=end)


def read_json(uri: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    return json.loads(read_bytes(uri, storage_options).decode("utf-8"))


def _umask() -> int:
    """The process umask, read without changing it (Linux), else by setting it back at once."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a newly published file: ``0o666`` less the umask, as ``open`` would give."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Mode of a newly made directory: ``0o777`` less the umask."""
    return 0o777 & ~_umask()


def _publish_local_file(tmp_path: str, uri: str, storage_options: Mapping[str, Any] | None) -> None:
    fs, path = get_fs(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        os.replace(tmp_path, path)
        return
    bucket = bucket_of(uri, storage_options)
    parent = posixpath.dirname(path)
    if bucket is None and parent:
        # stores with real directories need them; object stores have none, and creating
        # "directories" there would create a missing (misspelled) bucket
        with contextlib.suppress(Exception):
            fs.makedirs(parent, exist_ok=True)
    try:
        fs.put_file(tmp_path, path)
    except FileNotFoundError:
        if bucket is not None and not fs.exists(bucket):
            raise FileNotFoundError(
                f"uri={uri!r}: bucket {bucket!r} does not exist; create it first "
                "(an experiment creates it with storage_create_bucket: true)"
            ) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)


@contextlib.contextmanager
def atomic_open(uri: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[IO[bytes]]:
    """Open ``uri`` for binary writing; the file appears whole on success, not at all on error."""
    fs, path = get_fs(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; a published file follows the umask
    else:
        fd, tmp = tempfile.mkstemp(prefix="isup-upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if isinstance(fs, LocalFileSystem):
                os.fsync(f.fileno())
        _publish_local_file(tmp, uri, storage_options)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Atomically write ``data`` to ``uri``."""
    with atomic_open(uri, storage_options) as f:
        f.write(data)


def write_json(uri: str, obj: Any, storage_options: Mapping[str, Any] | None = None) -> None:
    write_bytes(uri, canonical_json(obj, indent=2).encode("utf-8"), storage_options)


def sha256_file(
    uri: str, storage_options: Mapping[str, Any] | None = None, chunk: int = 8 << 20
) -> str:
    """SHA-256 of a file, streamed in ``chunk``-byte pieces."""
    fs, path = get_fs(uri, storage_options)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def file_entry(
    uri: str, data: bytes | None = None, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a written file (hashing ``data`` when given, avoiding a re-read)."""
    if data is not None:
        return {"size": len(data), "sha256": sha256_bytes(data)}
    fs, path = get_fs(uri, storage_options)
    return {"size": int(fs.size(path)), "sha256": sha256_file(uri, storage_options)}


def write_manifest(
    dir_uri: str,
    kind: str,
    config: Any,
    files: Mapping[str, Mapping[str, Any]],
    storage_options: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write ``manifest.json`` into ``dir_uri`` (call it after every data file is published).

    Returns the manifest, including ``content_hash``.
    """
    from integral_superposition.version import code_version

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "config": json.loads(canonical_json(config)) if config is not None else None,
        "files": {k: dict(v) for k, v in sorted(files.items())},
        "versions": package_versions(),
        "code_version": code_version(),
        **json.loads(canonical_json(extra)),
    }
    manifest["content_hash"] = content_hash(manifest)
    write_json(join(dir_uri, MANIFEST_NAME), manifest, storage_options)
    return manifest


def read_manifest(
    dir_uri: str, storage_options: Mapping[str, Any] | None = None, kind: str | None = None
) -> dict[str, Any]:
    """Read ``manifest.json`` of a published output; error if missing or of another kind."""
    uri = join(dir_uri, MANIFEST_NAME)
    try:
        manifest = read_json(uri, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{dir_uri!r} has no {MANIFEST_NAME}: it is not a published output (or it is incomplete)"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(
            f"{uri!r}: not valid JSON ({e}): the manifest is truncated or damaged; rerun the "
            "step that wrote it (or restore it)"
        ) from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{uri!r}: expected a JSON object, got {type(manifest).__name__}")
    if kind is not None and manifest.get("kind") != kind:
        raise ValueError(f"{dir_uri!r} holds a {manifest.get('kind')!r} output, expected {kind!r}")
    return manifest


def own_manifest(
    dir_uri: str, kind: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The manifest of an earlier ``kind`` output in ``dir_uri`` (None when there is none).
    A manifest of another kind, or one that is not ours, is refused: that folder is not this
    step's to replace."""
    uri = join(dir_uri, MANIFEST_NAME)
    if not exists(uri, storage_options):
        return None
    try:
        found = read_json(uri, storage_options)
    except ValueError:
        found = None
    if not isinstance(found, dict) or found.get("kind") != kind or "content_hash" not in found:
        what = f"a {found.get('kind')!r} output" if isinstance(found, dict) else "a foreign file"
        raise FileExistsError(
            f"{dir_uri!r} holds {what} ({MANIFEST_NAME}), not an earlier {kind!r} output: "
            "choose another folder (nothing was changed)"
        )
    return found


def unpublish(dir_uri: str, kind: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove the manifest of an earlier ``kind`` output in ``dir_uri`` before it is rewritten
    (readers must never see an old manifest next to new files); see :func:`own_manifest`."""
    if own_manifest(dir_uri, kind, storage_options) is not None:
        remove(join(dir_uri, MANIFEST_NAME), storage_options)


def verify_output(
    dir_uri: str, storage_options: Mapping[str, Any] | None = None, deep: bool = False
) -> bool:
    """True when the manifest exists and every listed file exists with its size (and hash if ``deep``)."""
    try:
        manifest = read_manifest(dir_uri, storage_options)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return False
    fs, root = get_fs(dir_uri, storage_options)
    for name, entry in manifest.get("files", {}).items():
        path = (
            posixpath.join(root, name)
            if not isinstance(fs, LocalFileSystem)
            else os.path.join(root, name)
        )
        try:
            if int(fs.size(path)) != int(entry["size"]):
                return False
        except FileNotFoundError:
            return False
        if deep and sha256_file(join(dir_uri, name), storage_options) != entry["sha256"]:
            return False
    return True


def remove(
    uri: str, storage_options: Mapping[str, Any] | None = None, recursive: bool = False
) -> None:
    """Remove a file if it exists (a whole tree only with ``recursive=True``; the pipeline
    removes the files it wrote by name and never asks for that)."""
    fs, path = get_fs(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def remove_empty_dir(uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Remove a local directory if it is empty (object stores have no directories to remove).
    True when it is gone."""
    fs, path = get_fs(uri, storage_options)
    if not isinstance(fs, LocalFileSystem):
        return not fs.exists(path)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def listdir(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names (not paths) of the entries directly under ``uri``; empty when it does not exist."""
    fs, path = get_fs(uri, storage_options)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def bytes_io(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)
