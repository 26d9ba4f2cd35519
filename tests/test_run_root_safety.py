"""Run-root safety: storage roots, buckets, file modes, run-root ownership and the run lease."""

from __future__ import annotations

import os
import stat

import pytest
import s3fs
from integral_superposition import storage
from integral_superposition.experiment import ConfigError, load_preset
from integral_superposition.flows.cli import app
from typer.testing import CliRunner


# -- storage roots -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("s3://", "bucket is missing"),
        ("file:///", "names no directory"),
        ("/", "names no directory"),
        ("~", "YAML reads a bare `~`"),
        ("s3:", "YAML read the value as a mapping"),
        ("s3:bucket", "URI without '//'"),
    ],
)
def test_a_storage_root_without_a_path_is_refused(value, expected):
    with pytest.raises(ConfigError, match="storage") as e:
        load_preset("smoke", [f"storage={value}"])
    assert expected in str(e.value)


def test_a_storage_root_keeps_its_path_without_trailing_slashes():
    assert load_preset("smoke", ["storage=s3://bucket/prefix/"]).storage == "s3://bucket/prefix"
    assert load_preset("smoke", ["storage=runs/"]).storage == "runs"
    with pytest.raises(ValueError, match="bucket is missing"):
        storage.get_fs("s3://")


@pytest.mark.parametrize("value", ["s3://", "file:///", "~"])
def test_isup_run_refuses_a_storage_root_without_a_path(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "--preset", "smoke", "--storage", value])
    assert result.exit_code == 2
    assert "storage" in result.output
    assert os.listdir(tmp_path) == []  # no ./s3: or ./file: folder


# -- buckets -----------------------------------------------------------------------------------
def test_a_missing_bucket_is_an_error_and_is_never_created(s3_server):
    fs = s3fs.S3FileSystem(**s3_server)
    uri = "s3://isup-no-such-bucket/run/x.json"
    with pytest.raises(FileNotFoundError, match=r"isup-no-such-bucket.*does not exist"):
        storage.write_json(uri, {"a": 1}, s3_server)
    with pytest.raises(FileNotFoundError, match="storage_create_bucket"):
        storage.ensure_bucket("s3://isup-no-such-bucket/run", s3_server)
    fs.invalidate_cache()
    assert not fs.exists("isup-no-such-bucket")


def test_a_bucket_is_created_only_when_asked(s3_server):
    fs = s3fs.S3FileSystem(**s3_server)
    storage.ensure_bucket("s3://isup-made-on-request/prefix", s3_server, create=True)
    fs.invalidate_cache()
    assert fs.exists("isup-made-on-request")
    storage.write_json("s3://isup-made-on-request/prefix/x.json", {"a": 1}, s3_server)
    assert storage.read_json("s3://isup-made-on-request/prefix/x.json", s3_server) == {"a": 1}


# -- file modes --------------------------------------------------------------------------------
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_published_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        storage.write_bytes(str(tmp_path / "a.bin"), b"x")
        storage.write_json(str(tmp_path / "b.json"), {"a": 1})
        storage.write_manifest(str(tmp_path), "analysis", {}, {})
    finally:
        os.umask(old)
    for name in ("a.bin", "b.json", storage.MANIFEST_NAME):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name
