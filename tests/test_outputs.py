"""The outputs module: one writer publishes a step's files and manifest (last), removes them on
failure, and reads them back; locally and on S3 (moto server through s3fs)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from integral_superposition import storage
from integral_superposition.outputs import (
    PENDING_NAME,
    Output,
    OutputWriter,
    jsonable,
    publish_folder,
    read_output,
)
from integral_superposition.viz.figures import new_figure


def _write_some(out: OutputWriter) -> pd.DataFrame:
    df = pd.DataFrame({"latent": np.arange(4), "value": np.linspace(0, 1, 4)})
    out.parquet("tables/t.parquet", df)
    out.json("summary.json", {"n": np.int64(4), "fvu": np.float32(0.25), "ce": float("nan")})
    fig = new_figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    out.figure("figures/line", fig)
    return df


@pytest.mark.parametrize("where", ["local", "s3"])
def test_writer_publishes_files_then_manifest_and_reads_back(where, tmp_path, request):
    if where == "s3":
        bucket, opts = request.getfixturevalue("s3_bucket")
        uri = f"{bucket}/run/analysis"
    else:
        uri, opts = str(tmp_path / "analysis"), None
    with OutputWriter(uri, "analysis", opts) as out:
        df = _write_some(out)
        assert not storage.exists(storage.join(uri, "manifest.json"), opts)  # manifest last
        manifest = out.publish({"n_top": 3}, model={"id": np.str_("m")}, score=np.float64(0.5))
    assert sorted(manifest["files"]) == [
        "figures/line.png",
        "figures/line.svg",
        "summary.json",
        "tables/t.parquet",
    ]
    assert manifest["config"] == {"n_top": 3} and manifest["score"] == 0.5
    assert storage.verify_output(uri, opts, deep=True)
    back = read_output(uri, opts, kind="analysis")
    pd.testing.assert_frame_equal(back.parquet("tables/t.parquet"), df)
    assert back.parquet("tables/missing.parquet") is None
    assert back.json("summary.json") == {"ce": None, "fvu": 0.25, "n": 4}
    assert back.read("figures/line.png")[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="expected 'steering'"):
        read_output(uri, opts, kind="steering")
    with pytest.raises(FileNotFoundError, match=r"no 'nope\.json'"):
        back.read("nope.json")


def test_a_failure_inside_the_writer_removes_what_it_wrote(tmp_path):
    uri = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="boom"), OutputWriter(uri, "analysis") as out:
        _write_some(out)
        raise RuntimeError("boom")
    left = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert left == []
    with pytest.raises(FileNotFoundError, match="not a published output"):
        Output(uri)


def test_rewriting_unpublishes_first_and_another_kind_is_refused(tmp_path):
    uri = str(tmp_path / "out")
    with OutputWriter(uri, "analysis") as out:
        out.json("summary.json", {"a": 1})
        out.publish(None)
    # a rerun: the old manifest goes before any new file is written
    with pytest.raises(RuntimeError), OutputWriter(uri, "analysis") as out:
        assert not (tmp_path / "out" / "manifest.json").exists()
        raise RuntimeError("stop")
    storage.write_manifest(str(tmp_path / "sae"), "sae", {}, {})
    with pytest.raises(FileExistsError, match="holds a 'sae' output"):
        OutputWriter(str(tmp_path / "sae"), "analysis").__enter__()
    assert storage.read_manifest(str(tmp_path / "sae"))["kind"] == "sae"


def test_writer_checks_its_folder_argument():
    with pytest.raises(TypeError, match=r"out_uri=None: expected a non-empty folder URI"):
        OutputWriter(None, "analysis")  # type: ignore[arg-type]


def test_jsonable_numpy_and_non_finite():
    got = jsonable(
        {1: np.float32(1.5), "a": np.arange(3), "b": (np.bool_(True), math.inf), "c": -math.inf}
    )
    assert got == {"1": 1.5, "a": [0, 1, 2], "b": [True, None], "c": None}
    json.dumps(got, allow_nan=False)  # strict JSON


def test_publish_folder_replaces_only_its_own_folder_on_s3(s3_bucket):
    bucket, opts = s3_bucket
    allowed = re.compile(r"^(index\.html|pages/\d+\.html)$")
    uri = f"{bucket}/dash"
    publish_folder(uri, {"index.html": b"a", "pages/1.html": b"b"}, opts, allowed)
    entries = publish_folder(uri, {"index.html": b"c"}, opts, allowed)
    assert entries == {"index.html": storage.file_entry("", b"c")}
    assert storage.read_bytes(f"{uri}/index.html", opts) == b"c"
    assert not storage.exists(f"{uri}/pages/1.html", opts)  # the old folder went as a whole
    storage.write_bytes(f"{bucket}/mine/notes.txt", b"keep", opts)
    with pytest.raises(FileExistsError, match="not ours to replace"):
        publish_folder(f"{bucket}/mine", {"index.html": b"x"}, opts, allowed)
    assert storage.read_bytes(f"{bucket}/mine/notes.txt", opts) == b"keep"


def test_a_published_steering_evaluation_reads_back_every_table(tmp_path):
    from integral_superposition.pipelines.steer_eval import load_steering

    names = {
        "sweep": "sweep.parquet",
        "generations": "generations.parquet",
        "picks": "latents.parquet",
        "vocabulary": "vocabulary.parquet",
        "check": "classifier_check.parquet",
        "check_generations": "check_generations.parquet",
    }
    uri = str(tmp_path / "steering")
    with OutputWriter(uri, "steering") as out:
        for i, name in enumerate(names.values()):
            out.parquet(name, pd.DataFrame({"i": [i]}))
        out.json("summary.json", {"latents": []})
        out.publish(None)
    result = load_steering(uri)
    for i, attr in enumerate(names):
        assert getattr(result, attr)["i"].tolist() == [i], attr
    assert result.summary == {"latents": []}


def test_a_failed_writer_in_a_users_folder_removes_only_its_own_files(tmp_path):
    """Rollback removes the files this writer wrote, by name; the user's files stay as they were."""
    user = tmp_path / "mine"
    (user / "data").mkdir(parents=True)
    (user / "notes.txt").write_text("keep me")
    (user / "data" / "keep.csv").write_text("a,b\n1,2\n")
    before = {p.relative_to(user): p.read_bytes() for p in user.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="boom"), OutputWriter(str(user), "analysis") as out:
        _write_some(out)
        assert len(out.files) > 0
        raise RuntimeError("boom")
    after = {p.relative_to(user): p.read_bytes() for p in user.rglob("*") if p.is_file()}
    assert after == before


def _where(where, tmp_path, request, name):
    if where == "s3":
        bucket, opts = request.getfixturevalue("s3_bucket")
        return f"{bucket}/{name}", opts
    return str(tmp_path / name), None


def _listing(uri, opts) -> dict[str, bytes]:
    fs, path = storage.get_fs(uri, opts)
    fs.invalidate_cache()
    root = path.rstrip("/") + "/"
    return {p[len(root) :]: fs.cat_file(p) for p in fs.find(path)}


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("declared", [False, True])
def test_a_users_file_of_an_output_name_is_refused_and_kept(where, declared, tmp_path, request):
    """A user's summary.json in the folder is never replaced: refused naming folder and file,
    the folder left exactly as it was (with ``names``: before anything is written)."""
    uri, opts = _where(where, tmp_path, request, "mine")
    storage.write_bytes(storage.join(uri, "summary.json"), b'{"mine": true}', opts)
    storage.write_bytes(storage.join(uri, "notes.txt"), b"keep", opts)
    before = _listing(uri, opts)
    names = ("tables/t.parquet", "summary.json") if declared else ()
    with (
        pytest.raises(
            FileExistsError, match=r"'summary\.json', not written by this project"
        ) as err,
        OutputWriter(uri, "analysis", opts, names=names) as out,
    ):
        if declared:
            pytest.fail("entering should have refused")
        _write_some(out)
    assert uri in str(err.value)
    assert _listing(uri, opts) == before


def test_a_rerun_replaces_its_own_files_and_removes_stale_ones(tmp_path):
    uri = str(tmp_path / "out")
    with OutputWriter(uri, "analysis") as out:
        out.json("summary.json", {"run": 1})
        out.json("old.json", {"only": "first"})
        out.publish(None)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with OutputWriter(uri, "analysis", names=["summary.json"]) as out:
        out.json("summary.json", {"run": 2})
        out.publish(None)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == {"run": 2}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json",
        "notes.txt",
        "summary.json",
    ]
    assert storage.verify_output(uri, deep=True)


def test_a_file_changed_since_it_was_published_is_not_replaced(tmp_path):
    uri = str(tmp_path / "out")
    with OutputWriter(uri, "analysis") as out:
        out.json("summary.json", {"run": 1})
        out.json("extra.json", {"run": 1})
        out.publish(None)
    (tmp_path / "out" / "summary.json").write_text('{"edited": "by hand"}')
    (tmp_path / "out" / "extra.json").write_text('{"edited": "too"}')
    with pytest.raises(FileExistsError, match="changed since this project wrote it"):
        OutputWriter(uri, "analysis", names=["summary.json"]).__enter__()
    assert (tmp_path / "out" / "summary.json").read_text() == '{"edited": "by hand"}'
    with OutputWriter(uri, "analysis") as out:  # the edited extra.json is not removed as stale
        out.json("other.json", {"run": 2})
        out.publish(None)
    assert (tmp_path / "out" / "extra.json").read_text() == '{"edited": "too"}'
    assert (tmp_path / "out" / "summary.json").read_text() == '{"edited": "by hand"}'


def test_files_of_a_crashed_writer_are_its_own_on_the_rerun(tmp_path):
    """A writer killed before its manifest leaves its pending list: the rerun replaces those
    files (they are ours) and removes the list when it publishes."""
    uri = str(tmp_path / "out")
    out = OutputWriter(uri, "analysis").__enter__()
    out.json("summary.json", {"crashed": True})  # no __exit__: the process died here
    assert (tmp_path / "out" / PENDING_NAME).exists()
    with OutputWriter(uri, "analysis", names=["summary.json"]) as out:
        out.json("summary.json", {"crashed": False})
        out.publish(None)
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == {"crashed": False}
    assert not (tmp_path / "out" / PENDING_NAME).exists()
    # a pending list of another kind, or a user's file of that name, is refused
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / PENDING_NAME).write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier 'steering' output"):
        OutputWriter(str(tmp_path / "other"), "steering").__enter__()
    assert (tmp_path / "other" / PENDING_NAME).read_text() == "mine"


def test_a_failed_rerun_keeps_the_earlier_files_its_own(tmp_path):
    uri = str(tmp_path / "out")
    with OutputWriter(uri, "analysis") as out:
        out.json("summary.json", {"run": 1})
        out.json("table.json", {"run": 1})
        out.publish(None)
    with pytest.raises(RuntimeError, match="stop"), OutputWriter(uri, "analysis") as out:
        out.json("summary.json", {"run": 2})
        raise RuntimeError("stop")
    assert not (tmp_path / "out" / "summary.json").exists()  # what the failed run wrote
    with OutputWriter(uri, "analysis", names=["table.json"]) as out:  # still ours
        out.json("table.json", {"run": 3})
        out.publish(None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "table.json"]


def test_a_users_subfolder_of_an_output_folder_name_is_refused(tmp_path):
    from integral_superposition.viz.panels import _DASHBOARD_FILE_RE

    user = tmp_path / "mine"
    (user / "dashboards").mkdir(parents=True)
    (user / "dashboards" / "index.html").write_text("my page")
    with (
        pytest.raises(FileExistsError, match=r"'dashboards/index\.html'"),
        OutputWriter(str(user), "analysis") as out,
    ):
        out.folder("dashboards", {"index.html": b"ours"}, _DASHBOARD_FILE_RE)
    assert (user / "dashboards" / "index.html").read_text() == "my page"
    assert sorted(p.name for p in user.iterdir()) == ["dashboards"]
