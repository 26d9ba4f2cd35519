"""Each step's cache key holds the code that step runs: an edit elsewhere keeps it."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from integral_superposition import version
from integral_superposition.tasks.analyze import analyze_sae
from integral_superposition.tasks.dump import combine_partitions, dump_activations, resolve_dataset
from integral_superposition.tasks.fanout import dump_partitions_remote
from integral_superposition.tasks.merge import merge_sae
from integral_superposition.tasks.policy import OutputCache
from integral_superposition.tasks.report import build_experiment_report
from integral_superposition.tasks.steer import evaluate_steering
from integral_superposition.tasks.train import train_saes

STEPS = [
    resolve_dataset,
    dump_activations,
    combine_partitions,
    dump_partitions_remote,
    train_saes,
    analyze_sae,
    merge_sae,
    evaluate_steering,
    build_experiment_report,
]


@pytest.fixture
def edit_source(monkeypatch):
    """``edit("viz/report.py")``: from now on the hashes read that file with a line added."""
    edited: set[Path] = set()
    real = version.read_source

    def read(path: Path) -> bytes:
        data = real(path)
        return data + b"\n# edited\n" if Path(path).resolve() in edited else data

    def edit(relative: str) -> None:
        path = (version.LIBRARY_ROOT / relative).resolve()
        assert path.is_file(), path
        edited.add(path)
        version.clear_caches()

    version.clear_caches()
    monkeypatch.setattr(version, "read_source", read)
    yield edit
    monkeypatch.undo()
    version.clear_caches()


def _keys() -> dict[str, str]:
    keys = {}
    for step in STEPS:
        ctx = SimpleNamespace(task=step)
        keys[step.name] = step.cache_policy.base_key(ctx, {"x": 1}, None)
    return keys


def test_every_step_names_what_it_runs():
    for step in STEPS:
        assert isinstance(step.cache_policy, OutputCache), step.name
        assert step.cache_policy.entry_points, step.name


def test_a_template_edit_changes_the_steps_that_render_pages(edit_source):
    before, whole = _keys(), version.code_version()
    edit_source("viz/templates/report.html.j2")
    after = _keys()
    assert version.code_version() != whole
    assert after["build-report"] != before["build-report"]
    for name in ("resolve-dataset", "dump-activations", "train-saes"):
        assert after[name] == before[name], name


def test_viz_edit_keeps_dump_and_training_keys_and_changes_the_report(edit_source):
    before, whole = _keys(), version.code_version()
    edit_source("viz/report.py")
    after = _keys()
    assert version.code_version() != whole  # the whole-library version sees every edit
    for name in ("resolve-dataset", "dump-activations", "combine-partitions", "train-saes"):
        assert after[name] == before[name], name
    assert after["build-report"] != before["build-report"]
    assert after["analyze-sae"] != before["analyze-sae"]  # it publishes figures and pages


def test_sae_edit_changes_training_key_not_the_dump(edit_source):
    before = _keys()
    edit_source("sae/model.py")
    after = _keys()
    assert after["train-saes"] != before["train-saes"]
    assert after["dump-activations"] == before["dump-activations"]
    assert after["dump-partitions-remote"] == before["dump-partitions-remote"]


def test_backend_edit_changes_the_dump_key(edit_source):
    before = _keys()
    edit_source("backends/hf_causal_lm.py")
    after = _keys()
    assert after["dump-activations"] != before["dump-activations"]
    assert after["combine-partitions"] == before["combine-partitions"]


def test_demo_corpus_data_edit_changes_the_dataset_key(edit_source):
    before, whole = _keys(), version.code_version()
    edit_source("data/demo_corpus.yaml")
    assert version.code_version() != whole
    assert _keys()["resolve-dataset"] != before["resolve-dataset"]


def test_training_checkpoints_follow_the_training_code(edit_source):
    from integral_superposition.tasks.train import TRAIN_CACHE

    before = TRAIN_CACHE.code_version()
    edit_source("viz/panels.py")
    assert TRAIN_CACHE.code_version() == before
    edit_source("sae/train.py")
    assert TRAIN_CACHE.code_version() != before


def _library_imports(fn) -> set[str]:
    """Library modules imported in ``fn``'s body (the tasks package excluded)."""
    modules = version.library_graph()
    found = set()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn)))):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules}


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.name)
def test_entry_points_cover_the_library_modules_the_step_imports(step):
    covered = version.step_modules(*step.cache_policy.entry_points)
    assert _library_imports(step.fn) <= covered


def test_unknown_entry_point_is_named():
    with pytest.raises(ValueError, match=r"integral_superposition\.nope"):
        OutputCache(entry_points=("integral_superposition.nope",))
    with pytest.raises(TypeError, match="entry_points"):
        OutputCache(entry_points="integral_superposition.dump")


def test_the_import_graph_is_parsed_once_by_one_thread(monkeypatch):
    """Tasks of one flow run ask for their code versions from several threads at once. The
    graph's ASTs are built by one thread while the others wait (two threads building ASTs at
    once can fail on CPython 3.11 with 'AST constructor recursion depth mismatch')."""
    import threading
    import time

    real = version.import_graph
    calls, inside, most = [], [0], [0]
    guard = threading.Lock()

    def slow_graph(roots):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        calls.append(1)
        time.sleep(0.05)  # long enough for every other thread to arrive
        try:
            return real(roots)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(version, "import_graph", slow_graph)
    version.clear_caches()
    results, errors = [], []

    def ask():
        try:
            results.append(version.code_version("integral_superposition.sae.train"))
        except Exception as e:  # pragma: no cover - the failure this test guards against
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    version.clear_caches()
    assert not errors
    assert len(calls) == 1 and most[0] == 1
    assert len(set(results)) == 1 and len(results) == 8
