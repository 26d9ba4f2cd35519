"""Every public entry point that writes, pointed at folders it must not damage: a user's file
with the name of one of its outputs, a folder of other user files, a folder holding another
kind of output, and a failure half-way; locally and on S3 (moto server through s3fs).

Each writer either refuses (``FileExistsError`` naming the folder) or writes beside the
user's files; either way every byte it did not write is as it was, and a failure leaves no
half-written output (no manifest, none of its files)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from integral_superposition import storage
from integral_superposition.config import SAEConfig

D = 8


def _sae():
    from integral_superposition.sae import SparseAutoencoder

    torch.manual_seed(0)
    return SparseAutoencoder(D, 16, architecture="topk", top_k=4)


def _save_sae(uri, opts, ctx):
    from integral_superposition.sae import save_sae

    save_sae(_sae(), uri, storage_options=opts)


def _train_saes(uri, opts, ctx):
    from integral_superposition.sae import train_saes

    cfg = SAEConfig(k=16, architecture="topk", top_k=4, batch_size=64, epochs=1, log_every=1000)
    train_saes(ctx["store"], [cfg], [uri], storage_options=opts, progress=False, evaluate=False)


def _report(uri, opts, ctx):
    from integral_superposition.viz.report import build_report

    build_report(uri, config={"experiment": "hostile"}, storage_options=opts)


def _dashboards(uri, opts, ctx):
    from integral_superposition.outputs import publish_folder
    from integral_superposition.viz.panels import _DASHBOARD_FILE_RE

    publish_folder(uri, {"index.html": b"<html></html>"}, opts, _DASHBOARD_FILE_RE)


def _synthetic_store(uri, opts, ctx):
    from integral_superposition.dump.synthetic import write_activation_store

    write_activation_store(torch.randn(64, D), uri, storage_options=opts)


def _dump(uri, opts, ctx):
    from integral_superposition import DumpConfig
    from integral_superposition.dump import dump_layer_activations

    dump_layer_activations(
        ctx["df"], "title", "topic", ctx["backend"],
        DumpConfig(layer=1, max_len=8, batch_size=8, shard_size_mb=0.02), uri,
        storage_options=opts, overwrite=True, progress=False,
    )  # fmt: skip


def _analysis_writer(uri, opts, ctx):
    """What run_analysis, run_steering_eval and run_merge's SAE publish do through it."""
    from integral_superposition.outputs import OutputWriter

    with OutputWriter(uri, "analysis", opts) as out:
        out.json("notes.md.json", {"n": 1})
        out.json("summary.json", {"n": 2})
        out.publish(None)


def _checkpoints(uri, opts, ctx):
    from integral_superposition.sae.checkpoint import Checkpoints

    class _T:
        def state_tensors(self):
            return {"w": torch.zeros(2)}

        def state_json(self):
            return {}

    Checkpoints(uri, opts).write(1, {"run": 1}, [_T()], {})


@dataclass
class Writer:
    write: Callable
    output_name: str  # a file name it writes (a user's file of that name must survive)
    kind: str | None  # the manifest kind it publishes (None: no manifest)
    other_kind: str = "sae"  # a kind of output it must not mix with


WRITERS = {
    "save_sae": Writer(_save_sae, "cfg.json", "sae", other_kind="analysis"),
    "train_saes": Writer(_train_saes, "sae_weights.safetensors", "sae", "activations"),
    "build_report": Writer(_report, "report.html", "report"),
    "write_dashboards": Writer(_dashboards, "index.html", None),
    "write_activation_store": Writer(_synthetic_store, "docs.parquet", "activations"),
    "dump_layer_activations": Writer(_dump, "docs.parquet", "activations"),
    "output_writer": Writer(_analysis_writer, "summary.json", "analysis"),
    "checkpoints": Writer(_checkpoints, "latest.json", None),
}


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    if request.param == "s3":
        bucket, opts = request.getfixturevalue("s3_bucket")
        return bucket, opts
    return str(tmp_path), None


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_backend):
    from integral_superposition.data import demo_corpus
    from integral_superposition.dump.synthetic import write_activation_store

    torch.manual_seed(0)
    store = write_activation_store(
        torch.randn(512, D), str(tmp_path_factory.mktemp("store") / "acts")
    )
    return {"store": store, "backend": tiny_backend, "df": demo_corpus(12)}


def _tree(uri, opts) -> dict[str, bytes]:
    fs, path = storage.get_fs(uri, opts)
    fs.invalidate_cache()
    if not fs.exists(path):
        return {}
    root = path.rstrip("/") + "/"
    return {p[len(root) :]: fs.cat_file(p) for p in fs.find(path)}


def _put(uri, files: dict[str, bytes], opts) -> None:
    for name, data in files.items():
        storage.write_bytes(storage.join(uri, name), data, opts)


def _writer(name: str, where) -> tuple[Writer, str, dict | None]:
    w = WRITERS[name]
    return w, storage.join(where[0], "target"), where[1]


@pytest.mark.parametrize("name", WRITERS)
def test_a_users_file_named_like_an_output_is_refused_and_kept(name, where, ctx):
    w, uri, opts = _writer(name, where)
    user = {w.output_name: b"the user's own bytes", "notes.txt": b"keep"}
    _put(uri, user, opts)
    with pytest.raises(FileExistsError) as err:
        w.write(uri, opts, ctx)
    assert "target" in str(err.value) and (
        w.output_name in str(err.value) or "notes.txt" in str(err.value)
    )
    assert _tree(uri, opts) == user


@pytest.mark.parametrize("name", WRITERS)
def test_other_user_files_are_left_as_they_were(name, where, ctx):
    w, uri, opts = _writer(name, where)
    user = {"notes.txt": b"keep", "data/table.csv": b"a,b\n1,2\n"}
    _put(uri, user, opts)
    try:
        w.write(uri, opts, ctx)
    except FileExistsError as e:  # refusing is allowed: nothing may have changed
        assert "target" in str(e)
        assert _tree(uri, opts) == user
        return
    after = _tree(uri, opts)
    assert {k: after.get(k) for k in user} == user
    if w.kind is not None:
        assert storage.verify_output(uri, opts, deep=True)
        assert storage.read_manifest(uri, opts)["kind"] == w.kind


@pytest.mark.parametrize("name", WRITERS)
def test_a_folder_holding_another_kind_of_output_is_refused(name, where, ctx):
    w, uri, opts = _writer(name, where)
    _put(uri, {"weights.bin": b"theirs"}, opts)
    storage.write_manifest(uri, w.other_kind, {"by": "another run"}, {}, opts)
    before = _tree(uri, opts)
    with pytest.raises(FileExistsError, match="target"):
        w.write(uri, opts, ctx)
    assert _tree(uri, opts) == before


@pytest.mark.parametrize("name", [n for n, w in WRITERS.items() if w.kind is not None])
def test_rewriting_an_output_of_ours_leaves_no_mix(name, where, ctx):
    """Our earlier output of the same kind, with a user's file added since, is replaced as a
    whole (the new manifest lists exactly the files there, no file of the earlier output is
    left beside it) or refused; the user's file stays."""
    w, uri, opts = _writer(name, where)
    w.write(uri, opts, ctx)
    storage.write_bytes(storage.join(uri, "notes.txt"), b"user's", opts)
    before = _tree(uri, opts)
    try:
        w.write(uri, opts, ctx)
    except FileExistsError as e:  # a dump refuses a folder a user's file was added to
        assert "notes.txt" in str(e)
        assert _tree(uri, opts) == before
        return
    manifest = storage.read_manifest(uri, opts, kind=w.kind)
    assert storage.verify_output(uri, opts, deep=True)
    left = set(_tree(uri, opts)) - {storage.MANIFEST_NAME, "notes.txt"}
    assert left <= set(manifest["files"]) | {".published-folder.json"}
    assert _tree(uri, opts)["notes.txt"] == b"user's"


_FAILING = ["save_sae", "build_report", "output_writer"]


@pytest.mark.parametrize("name", _FAILING)
def test_a_failure_half_way_leaves_nothing_half_written(name, where, ctx, monkeypatch):
    """The second file write fails (a full disk, a dropped connection): the first file is
    removed again, no manifest is written, and the user's file beside it is untouched."""
    w, uri, opts = _writer(name, where)
    _put(uri, {"notes.txt": b"keep"}, opts)
    real = storage.write_bytes
    calls = []

    def flaky(u, data, so=None):
        if not u.endswith(".manifest-pending.json"):
            calls.append(u)
            if len(calls) == 2 or u.endswith(storage.MANIFEST_NAME):
                raise OSError(28, "No space left on device")
        return real(u, data, so)

    monkeypatch.setattr(storage, "write_bytes", flaky)
    with pytest.raises(OSError, match="No space left"):
        w.write(uri, opts, ctx)
    monkeypatch.undo()
    assert calls, "the writer wrote nothing"
    assert _tree(uri, opts) == {"notes.txt": b"keep"}


# -- single files and run-root records ---------------------------------------------------------
def test_save_figure_never_replaces_an_existing_file_unless_asked(where):
    from integral_superposition.viz.figures import new_figure, save_figure

    root, opts = where
    base = storage.join(root, "fig")
    storage.write_bytes(base + ".svg", b"<svg>the user's</svg>", opts)
    fig = new_figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    with pytest.raises(FileExistsError, match=r"fig\.svg' exists; pass overwrite=True"):
        save_figure(fig, base, storage_options=opts)
    assert _tree(root, opts) == {"fig.svg": b"<svg>the user's</svg>"}  # not even the .png
    uris = save_figure(fig, base, storage_options=opts, overwrite=True)
    assert storage.read_bytes(uris["png"], opts)[:4] == b"\x89PNG"


@pytest.mark.parametrize("content", [b"my notes", b'{"lease": "of another tool"}'])
def test_a_run_lease_never_takes_over_a_file_it_did_not_write(where, content):
    from integral_superposition.lease import LEASE_NAME, RunLease

    root, opts = where
    storage.write_bytes(storage.join(root, LEASE_NAME), content, opts)
    with pytest.raises(FileExistsError, match="not a lease this project wrote"):
        RunLease(root, opts, owner="test").acquire()
    assert _tree(root, opts) == {LEASE_NAME: content}


def test_a_lease_file_left_half_written_by_a_crash_is_taken_over(tmp_path):
    from integral_superposition.lease import LEASE_NAME, RunLease

    (tmp_path / LEASE_NAME).write_bytes(b'{\n  "acquired": 17965')  # killed mid-write
    with RunLease(str(tmp_path), owner="test") as lease:
        assert lease.held
    assert not (tmp_path / LEASE_NAME).exists()


def test_isup_schema_out_never_replaces_a_users_file(tmp_path):
    from integral_superposition.flows.cli import app
    from typer.testing import CliRunner

    target = tmp_path / "schema.json"
    target.write_text('{"title": "my own schema"}')
    result = CliRunner().invoke(app, ["schema", "--out", str(target)])
    assert result.exit_code == 2
    assert "is not a schema of the experiment config" in result.output
    assert target.read_text() == '{"title": "my own schema"}'
    target.unlink()
    assert CliRunner().invoke(app, ["schema", "--out", str(target)]).exit_code == 0
    first = target.read_bytes()
    assert CliRunner().invoke(app, ["schema", "--out", str(target)]).exit_code == 0  # ours
    assert target.read_bytes() == first


# -- long steps refuse before they compute -----------------------------------------------------
def test_analysis_merge_and_steering_refuse_a_users_file_before_computing(
    demo_store, tmp_path, monkeypatch
):
    """A user's file named like one of their outputs is refused before the analysis scan,
    the merge or the steering evaluation runs (the long part), and stays as it was."""
    from integral_superposition import pipelines
    from integral_superposition.merge import evaluate as ev
    from integral_superposition.pipelines import steer_eval
    from integral_superposition.sae import SparseAutoencoder, save_sae

    sae_uri = str(tmp_path / "sae")
    save_sae(
        SparseAutoencoder(demo_store.d_model, 16, architecture="topk", top_k=4, seed=0), sae_uri,
        activation_manifest_hash=demo_store.content_hash,
    )  # fmt: skip

    def never(*a, **k):
        raise AssertionError("computed before the output folder was checked")

    monkeypatch.setattr(ev, "check_params_for", never)
    monkeypatch.setattr(steer_eval, "evaluate_steering", never)
    monkeypatch.setattr("integral_superposition.pipelines.analyze.scan_latents", never)
    for i, (name, run) in enumerate(
        [
            (
                "summary.json",
                lambda out: pipelines.run_analysis(sae_uri, demo_store.uris[0], out, {"n_top": 5}),
            ),
            (
                "merge_eval.parquet",
                lambda out: pipelines.run_merge(sae_uri, demo_store.uris[0], out),
            ),
            (
                "summary.json",
                lambda out: steer_eval.run_steering_eval(
                    sae_uri, demo_store.uris[0], out, backend=_Generating()
                ),
            ),
        ]
    ):
        out = tmp_path / f"out-{i}"
        out.mkdir()
        (out / name).write_bytes(b"the user's")
        with pytest.raises(FileExistsError, match=name.replace(".", r"\.")):
            run(str(out))
        assert {p.name: p.read_bytes() for p in out.iterdir()} == {name: b"the user's"}


class _Generating:
    """Enough of a causal LM backend to pass the steering runner's argument check."""

    def generate(self, *a, **k):
        raise AssertionError("generated before the output folder was checked")


@pytest.mark.parametrize("name", ["run.json", "process.json"])
def test_run_records_never_replace_a_users_file(where, name):
    from integral_superposition.runs import write_run_record

    root, opts = where
    run_root = storage.join(root, "exp", "run1")
    storage.write_bytes(storage.join(run_root, name), b'{"mine": true}', opts)
    doc = {"experiment": "exp", "run": "run1", "steps": [], "process": "h:1", "started": "t"}
    with pytest.raises(FileExistsError, match=f"holds a {name} that is not a run record"):
        write_run_record(run_root, name, doc, opts)
    assert _tree(run_root, opts) == {name: b'{"mine": true}'}
    storage.remove(storage.join(run_root, name), opts)
    write_run_record(run_root, name, doc, opts)
    write_run_record(run_root, name, {**doc, "run": "again"}, opts)  # our own: replaced
    assert storage.read_json(storage.join(run_root, name), opts)["run"] == "again"


def test_copying_a_reused_partition_never_mixes_with_other_files(where):
    """combine-partitions copies a partition dump reused from an earlier run into this run:
    a folder there holding a user's file is refused; an earlier copy is replaced whole."""
    from integral_superposition.dump.synthetic import write_activation_store
    from integral_superposition.dump.writer import copy_dump

    root, opts = where
    src, dst = storage.join(root, "earlier"), storage.join(root, "now", "part-000-of-002")
    write_activation_store(torch.randn(64, D), src, storage_options=opts)
    storage.write_bytes(storage.join(dst, "docs.parquet"), b"the user's", opts)
    storage.write_bytes(storage.join(dst, "notes.txt"), b"keep", opts)
    before = _tree(dst, opts)
    with pytest.raises(FileExistsError, match="did not write"):
        copy_dump(src, dst, opts)
    assert _tree(dst, opts) == before
    for name in before:
        storage.remove(storage.join(dst, name), opts)
    copy_dump(src, dst, opts)
    copy_dump(src, dst, opts)  # an earlier copy of ours: replaced
    assert storage.verify_output(dst, opts, deep=True)
    copied = set(storage.read_manifest(src, opts)["files"]) | {storage.MANIFEST_NAME}
    assert set(_tree(dst, opts)) == copied


def test_copying_a_dump_that_changed_since_it_was_published_copies_nothing(where):
    """A source file whose bytes no longer match its manifest (same size, other content) stops
    the copy: the destination is left without a manifest and without the dump's files."""
    from integral_superposition.dump.synthetic import write_activation_store
    from integral_superposition.dump.writer import copy_dump

    root, opts = where
    src, dst = storage.join(root, "earlier"), storage.join(root, "now", "part-000-of-002")
    write_activation_store(torch.randn(64, D), src, storage_options=opts)
    copy_dump(src, dst, opts)  # an earlier, good copy: unpublished before the new one
    files = storage.read_manifest(src, opts)["files"]
    last = sorted(files)[-1]  # the copy reaches it after every other file
    data = bytearray(storage.read_bytes(storage.join(src, last), opts))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(storage.join(src, last), bytes(data), opts)
    with pytest.raises(ValueError, match=f"{last} has {len(data)} bytes with SHA-256"):
        copy_dump(src, dst, opts, chunk=7)
    assert not storage.exists(storage.join(dst, storage.MANIFEST_NAME), opts)
    assert not storage.verify_output(dst, opts)
    assert _tree(dst, opts) == {}  # neither this copy's files nor the earlier copy's remain
    other = storage.join(root, "other")
    storage.write_manifest(other, "sae", None, {}, opts)
    with pytest.raises(ValueError, match="holds a 'sae' output, expected 'activations'"):
        copy_dump(other, storage.join(root, "x"), opts)
    assert _tree(storage.join(root, "x"), opts) == {}
