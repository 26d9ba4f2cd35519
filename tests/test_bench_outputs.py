"""bench/common.py's output folders: a benchmark empties only a folder an earlier benchmark made."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_users_folder_is_refused_and_left_unchanged(common, tmp_path):
    user = tmp_path / "sae_quality"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (user / "sub").mkdir()
    (user / "sub" / "data.bin").write_bytes(b"\x00\x01")
    with pytest.raises(SystemExit, match="holds files no benchmark wrote"):
        common.fresh_bench_dir(user)
    assert (user / "notes.txt").read_text() == "mine"
    assert (user / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert not (user / common.BENCH_MARK).exists()


def test_a_file_in_the_way_is_refused(common, tmp_path):
    f = tmp_path / "out"
    f.write_text("mine")
    with pytest.raises(SystemExit, match="not a folder"):
        common.fresh_bench_dir(f)
    assert f.read_text() == "mine"


def test_the_benchmarks_own_folder_is_emptied_on_the_next_run(common, tmp_path):
    out = common.fresh_bench_dir(tmp_path / "a" / "seed0")
    assert (out / common.BENCH_MARK).is_file()
    (out / "ours_topk").mkdir()
    (out / "ours_topk" / "sae.safetensors").write_bytes(b"old")
    again = common.fresh_bench_dir(out)
    assert sorted(p.name for p in again.iterdir()) == [common.BENCH_MARK]


def test_an_empty_folder_is_taken(common, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = common.fresh_bench_dir(empty)
    assert sorted(p.name for p in out.iterdir()) == [common.BENCH_MARK]
