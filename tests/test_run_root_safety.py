"""Run-root safety: storage roots, buckets, file modes, run-root ownership and the run lease."""

from __future__ import annotations

import os
import stat
from pathlib import Path

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


# -- output paths stay inside the run root -----------------------------------------------------
@pytest.mark.parametrize(
    "override",
    [
        "paths.shards_dir=/some/dir",
        "paths.shards_dir=../../victim",
        "paths.shards_dir=acts/../../../victim",
        "paths.sae_path=s3://bucket/elsewhere",
        "paths.sae_path=~/sae",
        "paths.summary_csv=run.json",
        "paths.sae_path=acts/sae",
    ],
)
def test_output_paths_that_leave_the_run_root_are_refused(override):
    with pytest.raises(ConfigError, match=r"paths\."):
        load_preset("smoke", [override])


def test_a_run_location_refuses_parts_that_leave_it():
    from integral_superposition.tasks.refs import RunLocation

    loc = RunLocation(storage="/data/runs", experiment="e", run="r")
    assert loc.uri("acts", "part-000-of-002") == "/data/runs/e/r/acts/part-000-of-002"
    for bad in ("/etc", "../x", "a/../../x", "s3://b/x", ""):
        with pytest.raises(ValueError, match="inside the run root"):
            loc.uri(bad)


def _victim(path):
    """A user's folder with files of their own."""
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("years of work")
    (path / "data").mkdir()
    (path / "data" / "table.csv").write_text("a,b\n1,2\n")
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def _files_of(path):
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}


SMALL_DUMP = {"layer": 1, "max_len": 16, "batch_size": 8, "shard_size_mb": 0.02}


def test_a_dump_never_touches_a_users_folder(tiny_backend, tmp_path):
    from integral_superposition import DumpConfig
    from integral_superposition.data import demo_corpus
    from integral_superposition.dump import dump_layer_activations

    df = demo_corpus(30)
    victim = tmp_path / "victim"
    before = _victim(victim)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"did not write \(thesis.txt, data/\)"):
            dump_layer_activations(
                df, "title", "topic", tiny_backend, DumpConfig(**SMALL_DUMP), str(victim),
                overwrite=overwrite, progress=False,
            )  # fmt: skip
        assert _files_of(victim) == before


def test_overwrite_replaces_only_our_own_earlier_dump(tiny_backend, tmp_path):
    from integral_superposition import DumpConfig
    from integral_superposition.data import demo_corpus
    from integral_superposition.dump import dump_layer_activations

    df = demo_corpus(30)
    out = tmp_path / "acts"
    dump_layer_activations(
        df, "title", "topic", tiny_backend, DumpConfig(**SMALL_DUMP), str(out), progress=False
    )
    # a user file dropped into our output folder later makes it not ours to replace
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        dump_layer_activations(
            df, "title", "topic", tiny_backend, DumpConfig(**{**SMALL_DUMP, "max_len": 8}),
            str(out), overwrite=True, progress=False,
        )  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    old = set(_files_of(out))
    store = dump_layer_activations(
        df, "title", "topic", tiny_backend, DumpConfig(**{**SMALL_DUMP, "max_len": 8}),
        str(out), overwrite=True, progress=False,
    )  # fmt: skip
    assert store.manifest["config"]["max_len"] == 8
    assert storage.verify_output(str(out), deep=True)
    assert set(_files_of(out)) <= old | set(store.manifest["files"]) | {storage.MANIFEST_NAME}


def test_a_tampered_checkpoint_pointer_removes_nothing_outside(tmp_path):
    from integral_superposition.sae.train import _Checkpoints

    ckpt = tmp_path / "ckpt"
    victim = tmp_path / "victim"
    before = _victim(victim)
    (ckpt / "step-000000001").mkdir(parents=True)
    (ckpt / "step-000000001" / "state.json").write_text("{}")
    (ckpt / "user-notes.txt").write_text("keep")
    (ckpt / "latest.json").write_text('{"step": 1, "dir": "../victim"}')
    c = _Checkpoints(str(ckpt))
    c._remove_step("../victim")
    c.remove()
    assert _files_of(victim) == before
    assert _files_of(ckpt) == {Path("user-notes.txt"): b"keep"}  # ours gone, theirs kept


def test_dashboards_never_replace_a_users_folder(tmp_path):
    from integral_superposition.viz.panels import _publish_folder

    victim = tmp_path / "victim"
    before = _victim(victim)
    with pytest.raises(FileExistsError, match="not dashboard pages"):
        _publish_folder(str(victim), {"index.html": b"<html></html>"}, None)
    assert _files_of(victim) == before
    _publish_folder(str(tmp_path / "dash"), {"index.html": b"a", "latents/00001.html": b"b"}, None)
    _publish_folder(str(tmp_path / "dash"), {"index.html": b"c"}, None)  # our own: replaced
    assert _files_of(tmp_path / "dash") == {Path("index.html"): b"c"}


def test_an_output_folder_of_another_kind_is_not_unpublished(tmp_path):
    storage.write_manifest(str(tmp_path / "sae"), "sae", {}, {})
    with pytest.raises(FileExistsError, match="holds a 'sae' output"):
        storage.unpublish(str(tmp_path / "sae"), "analysis")
    assert storage.read_manifest(str(tmp_path / "sae"))["kind"] == "sae"
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "manifest.json").write_text("not json")
    with pytest.raises(FileExistsError, match="foreign file"):
        storage.unpublish(str(tmp_path / "user"), "steering")
    assert (tmp_path / "user" / "manifest.json").read_text() == "not json"


def test_isup_run_refuses_a_shards_dir_outside_the_run(tmp_path):
    victim = tmp_path / "victim"
    before = _victim(victim)
    result = CliRunner().invoke(
        app,
        ["run", "--preset", "smoke", "--storage", str(tmp_path / "runs"),
         "--set", f"paths.shards_dir={victim}"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "paths.shards_dir" in result.output and "absolute path" in result.output
    assert _files_of(victim) == before and not (tmp_path / "runs").exists()
