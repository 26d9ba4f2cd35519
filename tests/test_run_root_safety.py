"""Run-root safety: storage roots, buckets, file modes, run-root ownership and the run lease."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import s3fs
from integral_superposition import storage
from integral_superposition.experiment import ConfigError
from integral_superposition.flows.cli import app
from integral_superposition.flows.config import load_preset
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
    from integral_superposition.sae.checkpoint import Checkpoints

    ckpt = tmp_path / "ckpt"
    victim = tmp_path / "victim"
    before = _victim(victim)
    (ckpt / "step-000000001").mkdir(parents=True)
    (ckpt / "step-000000001" / "state.json").write_text("{}")
    (ckpt / "user-notes.txt").write_text("keep")
    (ckpt / "latest.json").write_text('{"step": 1, "dir": "../victim"}')
    c = Checkpoints(str(ckpt))
    c._remove_step("../victim")
    c.remove()
    assert _files_of(victim) == before
    assert _files_of(ckpt) == {Path("user-notes.txt"): b"keep"}  # ours gone, theirs kept


def test_dashboards_never_replace_a_users_folder(tmp_path):
    from integral_superposition.outputs import FOLDER_MARK, publish_folder
    from integral_superposition.viz.panels import _DASHBOARD_FILE_RE

    def _publish_folder(uri, files):
        return publish_folder(uri, files, None, _DASHBOARD_FILE_RE)

    victim = tmp_path / "victim"
    before = _victim(victim)
    with pytest.raises(FileExistsError, match="not ours to replace"):
        _publish_folder(str(victim), {"index.html": b"<html></html>"})
    assert _files_of(victim) == before
    _publish_folder(str(tmp_path / "dash"), {"index.html": b"a", "latents/00001.html": b"b"})
    _publish_folder(str(tmp_path / "dash"), {"index.html": b"c"})  # our own: replaced
    pages = _files_of(tmp_path / "dash")
    assert pages.pop(Path(FOLDER_MARK))
    assert pages == {Path("index.html"): b"c"}
    # a user's folder holding only files named like dashboard pages is not ours either
    (tmp_path / "site" / "latents").mkdir(parents=True)
    (tmp_path / "site" / "index.html").write_text("my site")
    (tmp_path / "site" / "latents" / "00001.html").write_text("my page")
    before = _files_of(tmp_path / "site")
    with pytest.raises(FileExistsError, match=r"not ours to replace \(index\.html, latents/"):
        _publish_folder(str(tmp_path / "site"), {"index.html": b"<html></html>"})
    assert _files_of(tmp_path / "site") == before


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


# -- the run lease -----------------------------------------------------------------------------
_HOLDER = """
import json, sys, time
from integral_superposition.lease import RunLease
root, opts = sys.argv[1], json.loads(sys.argv[2])
lease = RunLease(root, opts, owner="holder-A", ttl_s=float(sys.argv[3])).acquire()
print("held", flush=True)
sys.stdin.read()  # hold until the test closes stdin (or kills this process)
lease.release()
print("released", flush=True)
"""


def _start_holder(root: str, opts: dict, ttl_s: float = 30.0, prelude: str = ""):
    import json
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", prelude + _HOLDER, root, json.dumps(opts), str(ttl_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(params=["local", "s3"])
def lease_root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "exp" / "run"), {}
    bucket, opts = request.getfixturevalue("s3_bucket")
    return f"{bucket}/exp/run", opts


def test_a_second_writer_is_refused_naming_the_holder(lease_root):
    from integral_superposition.lease import LeaseHeldError, RunLease, read_lease

    root, opts = lease_root
    proc = _start_holder(root, opts)
    try:
        with pytest.raises(LeaseHeldError, match=rf"holder-A on host .* \(pid {proc.pid}\)"):
            RunLease(root, opts, owner="B").acquire()
        assert read_lease(root, opts)["owner"] == "holder-A"
        proc.stdin.close()  # the holder releases on exit
        assert proc.stdout.readline().strip() == "released"
        proc.wait(timeout=30)
        assert read_lease(root, opts) is None
        with RunLease(root, opts, owner="B") as lease:
            assert read_lease(root, opts)["token"] == lease.token
        assert read_lease(root, opts) is None
    finally:
        proc.kill()
        proc.wait()


def test_a_holder_whose_process_name_is_not_ascii_is_live(tmp_path):
    """A process may name itself with any bytes, and ``/proc`` shows that name: its lease is
    still written (its start time and the umask come from ``/proc``), and a second writer is
    refused while it lives."""
    from integral_superposition.lease import LeaseHeldError, RunLease, read_lease

    root = str(tmp_path / "exp" / "run")
    rename = "import ctypes; ctypes.CDLL(None).prctl(15, 'caf\\u00e9 (x)'.encode(), 0, 0, 0)\n"
    proc = _start_holder(root, {}, prelude=rename)
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            assert "café (x)".encode() in f.read()  # the name really is not ASCII
        assert read_lease(root)["pid_start"]
        with pytest.raises(LeaseHeldError, match="holder-A"):
            RunLease(root, owner="B").acquire()
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_on_this_host_is_taken_over_at_once(lease_root):
    from integral_superposition.lease import RunLease, read_lease

    root, opts = lease_root
    proc = _start_holder(root, opts, ttl_s=600.0)
    proc.kill()  # kill -9: no release, the lease stays behind, far from expiry
    proc.wait()
    assert read_lease(root, opts)["pid"] == proc.pid
    with RunLease(root, opts, owner="B") as lease:
        assert read_lease(root, opts)["owner"] == "B" and lease.held


def test_an_expired_lease_of_another_host_is_taken_over_and_its_holder_loses_it(lease_root):
    import time

    from integral_superposition.lease import LeaseHeldError, LeaseLostError, RunLease, read_lease

    root, opts = lease_root
    a = RunLease(root, opts, owner="A", ttl_s=0.6).acquire()
    a._stop.set()  # A stops renewing (a paused or partitioned process elsewhere)
    a._thread.join()
    with pytest.raises(LeaseHeldError, match="A on host"):
        RunLease(root, opts, owner="B").acquire()  # still within A's TTL
    time.sleep(1.0)
    b = RunLease(root, opts, owner="B", ttl_s=30).acquire()
    try:
        assert read_lease(root, opts)["owner"] == "B"
        with pytest.raises(LeaseLostError, match="taken over"):
            a.renew()
        with pytest.raises(LeaseLostError):
            a.check()
        a.release()  # a lost lease is not deleted: B keeps it
        assert read_lease(root, opts)["owner"] == "B"
    finally:
        b.release()


def test_the_heartbeat_keeps_a_short_lease_alive(tmp_path):
    import time

    from integral_superposition.lease import LeaseHeldError, RunLease, read_lease

    root = str(tmp_path / "run")
    with RunLease(root, owner="A", ttl_s=0.4) as lease:
        first = read_lease(root)["expires"]
        time.sleep(1.0)  # over twice the TTL: only the heartbeat keeps it
        with pytest.raises(LeaseHeldError):
            RunLease(root, owner="B").acquire()
        assert read_lease(root)["expires"] > first and lease.held


def test_a_delegate_needs_the_holders_token(tmp_path):
    from integral_superposition.lease import LeaseHeldError, RunLease, check_delegate

    root = str(tmp_path / "run")
    with RunLease(root, owner="parent") as lease:
        assert check_delegate(root, lease.token)["owner"] == "parent"
        with pytest.raises(LeaseHeldError, match="no longer holds"):
            check_delegate(root, "not-the-token")
    with pytest.raises(LeaseHeldError, match="held by nobody"):
        check_delegate(root, lease.token)


# -- a run root belongs to one config ----------------------------------------------------------
def _loc_of(cfg):
    from integral_superposition.tasks.refs import RunLocation

    return RunLocation(storage=cfg.storage, experiment=cfg.name, run=cfg.run)


def test_a_step_with_another_config_is_refused_naming_the_fields(tmp_path):
    from integral_superposition.tasks.index import RunConfigMismatch, write_run_config

    cfg = load_preset("smoke", {"storage": str(tmp_path), "run": "k1"})
    uri = write_run_config(cfg, _loc_of(cfg))
    recorded = Path(uri).read_text()
    # same config, other operational settings: accepted, record kept
    same = cfg.model_copy(update={"gpu_limit": None})
    assert write_run_config(same, _loc_of(same), "experiment") == uri
    other = load_preset("smoke", {"storage": str(tmp_path), "run": "k1", "dump.max_len": 16})
    for step in ("dump", "train", "experiment"):
        with pytest.raises(RunConfigMismatch, match=r"dump\.max_len: 24 recorded, 16 now"):
            write_run_config(other, _loc_of(other), step)
    assert Path(uri).read_text() == recorded
    # a later step's fields do not concern an earlier step
    sae_only = load_preset("smoke", {"storage": str(tmp_path), "run": "k1", "sae.lr": 0.01})
    write_run_config(sae_only, _loc_of(sae_only), "dump")
    with pytest.raises(RunConfigMismatch, match=r"sae\.lr"):
        write_run_config(sae_only, _loc_of(sae_only), "train")


@pytest.mark.prefect
def test_isup_dump_on_a_run_of_another_config_changes_nothing(prefect_api, tmp_path):
    from integral_superposition.flows.steps import dump_flow
    from integral_superposition.tasks.index import RunConfigMismatch, write_run_config

    cfg = load_preset("smoke", {"storage": str(tmp_path), "run": "k1"})
    write_run_config(cfg, _loc_of(cfg))
    other = load_preset("smoke", {"storage": str(tmp_path), "run": "k1", "dump.max_len": 16})
    state = dump_flow(other, return_state=True)
    assert state.is_failed()
    with pytest.raises(RunConfigMismatch, match=r"dump\.max_len"):
        state.result()
    assert sorted(os.listdir(tmp_path / "smoke" / "k1")) == ["config.yaml"]  # no acts/, no lease


@pytest.mark.prefect
def test_a_second_experiment_on_a_held_run_root_is_refused(prefect_api, tmp_path):
    from integral_superposition.flows.experiment import experiment_flow
    from integral_superposition.lease import LeaseHeldError

    cfg = load_preset("smoke", {"storage": str(tmp_path), "run": "busy"})
    proc = _start_holder(cfg.run_root(), {})
    try:
        state = experiment_flow(cfg, return_state=True)
        assert state.is_failed()
        with pytest.raises(LeaseHeldError, match=rf"holder-A on host .* \(pid {proc.pid}\)"):
            state.result()
        assert sorted(os.listdir(cfg.run_root())) == [".lease.json"]  # nothing else written
    finally:
        proc.kill()
        proc.wait()


# -- an SAE is used with the activations it was trained on --------------------------------------
@pytest.fixture
def sae_of_another_store(demo_store, tmp_path):
    from integral_superposition.sae import SparseAutoencoder, save_sae

    sae = SparseAutoencoder(demo_store.d_model, 16, seed=0)
    other_hash = "f" * 64  # the hash of a store that was replaced since training
    return save_sae(sae, str(tmp_path / "sae"), activation_manifest_hash=other_hash)


def test_analysis_merge_and_steering_refuse_a_store_the_sae_was_not_trained_on(
    demo_store, sae_of_another_store, tiny_backend, tmp_path
):
    from integral_superposition.pipelines.analyze import run_analysis
    from integral_superposition.pipelines.merge import run_merge
    from integral_superposition.pipelines.steer_eval import run_steering_eval

    sae, store = sae_of_another_store, demo_store.uris[0]
    match = rf"trained on activations ffffffffffffffff, but the store .* holds activations {demo_store.content_hash[:16]}"
    for fn, kw in (
        (run_analysis, {}),
        (run_merge, {}),
        (run_steering_eval, {"backend": tiny_backend}),
    ):
        out = tmp_path / fn.__name__
        with pytest.raises(ValueError, match=match):
            fn(sae, store, str(out), **kw)
        assert not out.exists()  # refused before anything was written


def test_an_sae_of_this_store_passes_the_check(demo_store, tmp_path):
    from integral_superposition.sae import SparseAutoencoder, check_training_store, save_sae

    sae = SparseAutoencoder(demo_store.d_model, 16, seed=0)
    mine = save_sae(sae, str(tmp_path / "mine"), activation_manifest_hash=demo_store.content_hash)
    check_training_store(mine, demo_store)
    other = save_sae(sae, str(tmp_path / "other"), activation_manifest_hash="0" * 64)
    with pytest.raises(ValueError, match="allow_other_store=True"):
        check_training_store(other, demo_store)
    check_training_store(other, demo_store, allow_other_store=True)  # on purpose


def test_the_report_refuses_outputs_of_other_activations(tmp_path):
    from integral_superposition.pipelines.report import check_same_activations
    from integral_superposition.tasks.refs import OutputRef

    sae_m = storage.write_manifest(
        str(tmp_path / "sae" / "s"), "sae", {}, {}, activation_manifest_hash="a" * 64
    )
    same = storage.write_manifest(
        str(tmp_path / "analysis" / "s"), "analysis", {}, {}, activations={"content_hash": "a" * 64}
    )
    other = storage.write_manifest(
        str(tmp_path / "steering" / "s"), "steering", {}, {}, activations={"content_hash": "b" * 64}
    )
    sae = OutputRef.from_manifest("sae", "s", str(tmp_path / "sae" / "s"), sae_m)
    ok = OutputRef.from_manifest("analysis", "s", str(tmp_path / "analysis" / "s"), same)
    bad = OutputRef.from_manifest("steering", "s", str(tmp_path / "steering" / "s"), other)
    check_same_activations([sae], [ok], None)
    with pytest.raises(ValueError, match=r"steering output .* on activations bbbbbbbbbbbbbbbb"):
        check_same_activations([sae], [ok, bad], None)


def test_a_writer_that_lost_its_lease_stops_at_its_next_output(tmp_path):
    import time

    from integral_superposition.lease import LeaseLostError, RunLease
    from integral_superposition.tasks.refs import RunLocation

    loc = RunLocation(storage=str(tmp_path), experiment="e", run="r")
    a = RunLease(loc.root, owner="A", ttl_s=0.5).acquire()
    try:
        assert loc.uri("acts").endswith("acts")  # held: steps write as usual
        a._stop.set()  # A stalls past its TTL ...
        a._thread.join()
        time.sleep(0.8)
        proc = _start_holder(loc.root, {})  # ... and another process takes the root over
        try:
            with pytest.raises(LeaseLostError):
                a.renew()
            with pytest.raises(LeaseLostError, match="taken over"):
                loc.uri("acts")
        finally:
            proc.kill()
            proc.wait()
    finally:
        a.release()
    assert loc.uri("acts").endswith("acts")  # released: nothing is held here any more


@pytest.mark.prefect
def test_combining_reused_parts_never_writes_into_the_earlier_run(
    prefect_api, tiny_backend, tmp_path
):
    from integral_superposition import DumpConfig
    from integral_superposition.data import demo_corpus
    from integral_superposition.dump import dump_layer_activations
    from integral_superposition.tasks.dump import combine_partitions
    from integral_superposition.tasks.refs import OutputRef, RunLocation

    earlier = RunLocation(storage=str(tmp_path), experiment="e", run="earlier")
    df = demo_corpus(30)
    parts = []
    for i in range(2):
        uri = earlier.uri("acts", f"part-00{i}-of-002")
        st = dump_layer_activations(
            df, "title", "topic", tiny_backend, DumpConfig(**SMALL_DUMP), uri,
            partition=(i, 2), progress=False,
        )  # fmt: skip
        parts.append(OutputRef.from_manifest("activations", f"part-00{i}-of-002", uri, st.manifest))
    before = _files_of(tmp_path / "e" / "earlier")
    now = RunLocation(storage=str(tmp_path), experiment="e", run="now")
    ref = combine_partitions.fn(parts, now, out="acts")
    assert ref.uri == now.uri("acts") and storage.verify_output(ref.uri, deep=True)
    assert _files_of(tmp_path / "e" / "earlier") == before  # the earlier run is untouched
