"""The fsspec storage layer: atomic writes, manifests and verification on local, memory and S3."""

from __future__ import annotations

import os
import uuid

import pytest
from integral_superposition import storage


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path):
    """``(directory URI, storage options)`` on each backend."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    if request.param == "memory":
        return f"memory://isup-{uuid.uuid4().hex[:8]}/out", None
    bucket, opts = request.getfixturevalue("s3_bucket")
    return f"{bucket}/out", opts


def _names(uri, opts):
    fs, path = storage.get_fs(uri, opts)
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.find(path)) if fs.exists(path) else []


def test_atomic_write_read_and_ranges(root):
    uri, opts = root
    target = storage.join(uri, "sub", "data.bin")
    storage.write_bytes(target, b"0123456789", opts)
    assert storage.read_bytes(target, opts) == b"0123456789"
    assert storage.read_bytes(target, opts, 2, 5) == b"234"
    storage.write_json(storage.join(uri, "x.json"), {"b": 1, "a": [1.5, None]}, opts)
    assert storage.read_json(storage.join(uri, "x.json"), opts) == {"a": [1.5, None], "b": 1}
    assert storage.listdir(uri, opts) == ["sub", "x.json"]


def test_failed_write_leaves_nothing(root):
    """A reader never sees a half-written file: not during the write, not after a failure."""
    uri, opts = root
    target = storage.join(uri, "shard.bin")
    with pytest.raises(RuntimeError, match="disk on fire"), storage.atomic_open(target, opts) as f:
        f.write(b"half of the data")
        assert not storage.exists(target, opts)  # invisible while being written
        raise RuntimeError("disk on fire")
    assert not storage.exists(target, opts)
    assert [n for n in _names(uri, opts) if "tmp" in n] == []
    # an existing file is replaced whole or not at all
    storage.write_bytes(target, b"old", opts)
    with pytest.raises(RuntimeError), storage.atomic_open(target, opts) as f:
        f.write(b"new but unfinished")
        raise RuntimeError("interrupted")
    assert storage.read_bytes(target, opts) == b"old"


def test_manifest_is_written_last_and_verified(root):
    uri, opts = root
    assert not storage.verify_output(uri, opts)  # nothing published yet
    files = {}
    for name, data in (("a.bin", b"a" * 100), ("b.bin", b"b" * 10)):
        storage.write_bytes(storage.join(uri, name), data, opts)
        files[name] = storage.file_entry("", data)
    assert not storage.verify_output(uri, opts)  # data without a manifest is not an output
    manifest = storage.write_manifest(uri, "analysis", {"k": 1}, files, opts, note="x")
    assert manifest["files"]["a.bin"] == {"size": 100, "sha256": storage.sha256_bytes(b"a" * 100)}
    assert {"format", "kind", "config", "versions", "code_version", "content_hash"} <= set(manifest)
    assert manifest["versions"]["torch"] and manifest["note"] == "x"
    assert storage.read_manifest(uri, opts, kind="analysis") == manifest
    with pytest.raises(ValueError, match="holds a 'analysis' output, expected 'sae'"):
        storage.read_manifest(uri, opts, kind="sae")
    assert storage.verify_output(uri, opts, deep=True)
    # same-size corruption is caught by the deep check only
    storage.write_bytes(storage.join(uri, "b.bin"), b"c" * 10, opts)
    assert storage.verify_output(uri, opts) and not storage.verify_output(uri, opts, deep=True)
    # a truncated file and a missing file are caught by the size check
    storage.write_bytes(storage.join(uri, "a.bin"), b"a" * 99, opts)
    assert not storage.verify_output(uri, opts)
    storage.write_bytes(storage.join(uri, "a.bin"), b"a" * 100, opts)
    storage.write_bytes(storage.join(uri, "b.bin"), b"b" * 10, opts)
    assert storage.verify_output(uri, opts, deep=True)
    storage.remove(storage.join(uri, "b.bin"), opts)
    assert not storage.verify_output(uri, opts)


def test_missing_manifest_error_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no manifest\.json"):
        storage.read_manifest(str(tmp_path))
    with pytest.raises(ValueError, match="uri=''"):
        storage.get_fs("")


def test_content_hash_ignores_volatile_fields():
    m = {"kind": "sae", "config": {"k": 1}, "files": {"a": {"size": 1, "sha256": "x"}}}
    assert storage.content_hash(m) == storage.content_hash({**m, "versions": {"torch": "9"}})
    assert storage.content_hash(m) != storage.content_hash({**m, "config": {"k": 2}})


def test_s3_options_from_the_environment(s3_bucket, monkeypatch):
    """Endpoint and credentials come from the environment when no options are passed."""
    bucket, opts = s3_bucket
    monkeypatch.setenv("ISUP_S3_ENDPOINT_URL", opts["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", opts["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", opts["secret"])
    fs, _ = storage.get_fs(bucket + "/env.txt")
    fs.invalidate_cache()
    storage.write_bytes(bucket + "/env.txt", b"from env")
    assert storage.read_bytes(bucket + "/env.txt", opts) == b"from env"
    storage.set_default_storage_options("s3", {"endpoint_url": "http://127.0.0.1:1"})
    try:
        fs, _ = storage.get_fs(bucket + "/x", {"endpoint_url": opts["endpoint_url"]})
        assert fs.exists(bucket.removeprefix("s3://") + "/env.txt")  # explicit options win
    finally:
        storage.set_default_storage_options("s3", {})


def test_browser_urls_of_local_memory_and_s3_outputs(s3_bucket, tmp_path, monkeypatch):
    """``file://`` for a local file, a presigned HTTPS URL for S3 (never one carrying a
    session token), the URI itself where there is no such URL."""
    monkeypatch.chdir(tmp_path)
    assert storage.browser_url("report/report.html") == f"file://{tmp_path}/report/report.html"
    assert storage.browser_url("memory://x/report.html") == "memory://x/report.html"
    bucket, opts = s3_bucket
    page = bucket + "/e/r/report/report.html"
    storage.write_bytes(page, b"<html></html>", opts)
    url = storage.browser_url(page, opts)
    assert url.startswith(opts["endpoint_url"]) and "Signature=" in url
    with_token = {**opts, "token": "session-token"}
    assert storage.browser_url(page, with_token) == page
