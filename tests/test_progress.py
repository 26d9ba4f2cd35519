"""Progress reporting: lines with done/total, rate, ETA and phase off a terminal, a heartbeat
while a step is quiet, and callbacks with or without a ``phase`` keyword."""

from __future__ import annotations

import io
import re
import time

import pytest
from integral_superposition.progress import Reporter, format_duration

LINE = re.compile(
    r"^(?P<label>.+?) (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<pct>\d+)%\) \| "
    r"(?P<rate>[\d.e+]+) ?\w*/s \| ETA (?P<eta>[\dhms?]+)(?: \| (?P<rest>.*))?$"
)


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 75, 3600 + 6 * 60, float("nan"))] == [
        "0s",
        "59s",
        "1m15s",
        "1h06m",
        "?",
    ]


def test_a_slow_step_prints_periodic_lines_and_a_heartbeat_off_a_terminal():
    out = io.StringIO()  # not a TTY: plain lines, no bar
    seen: list[tuple[int, int, str | None]] = []
    rep = Reporter(
        "merge",
        lambda done, total, phase=None: seen.append((done, total, phase)),
        unit="steps",
        total=6,
        show=True,
        stream=out,
        line_every_s=0.15,
        interval_s=0.4,
    )
    with rep:
        rep.set_phase("similarity")
        for i in range(1, 4):
            time.sleep(0.2)
            rep.advance(phase=f"sweep K'={64 >> i} cluster")
        time.sleep(1.0)  # a quiet stretch: the heartbeat must speak
        rep.update(6)
    lines = out.getvalue().splitlines()
    parsed = [LINE.match(line) for line in lines]
    progress = [m for m in parsed if m]
    assert len(progress) >= 5, lines
    assert all(m["label"] == "merge" and m["total"] == "6" for m in progress)
    assert [int(m["done"]) for m in progress] == sorted(int(m["done"]) for m in progress)
    assert any(m["rest"] and m["rest"].startswith("sweep K'=8 cluster") for m in progress)
    # a rate and an ETA once work has been done
    mid = next(m for m in progress if m["done"] == "2")
    assert float(mid["rate"]) > 0 and mid["eta"] != "?"
    beats = [m for m in progress if m["rest"] and "still running, last update" in m["rest"]]
    assert beats, lines
    assert lines[-1].startswith("merge: done in ")
    assert seen[0] == (0, 6, "similarity") and seen[-1][:2] == (6, 6)


def test_a_two_argument_callback_still_works_and_show_false_prints_nothing(capsys):
    seen = []
    rep = Reporter("scan", lambda d, t: seen.append((d, t)), total=3)
    for _ in range(3):
        rep.advance(phase="scan")
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="interval_s=0"):
        Reporter("x", interval_s=0)


def test_dump_prints_progress_lines_with_phase_off_a_terminal(tiny_backend, tmp_path, capsys):
    from integral_superposition import DumpConfig
    from integral_superposition.data import demo_corpus
    from integral_superposition.dump import dump_layer_activations

    store = dump_layer_activations(
        demo_corpus(60), "title", "topic", tiny_backend,
        DumpConfig(layer=1, batch_size=8, shard_size_mb=0.01), tmp_path / "d", progress=True,
    )  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    lines = [m for m in map(LINE.match, err) if m]
    assert lines, err
    assert all(m["unit"] == "tok" and int(m["total"]) == store.n_tokens for m in lines)
    assert lines[0]["rest"].startswith("shard 1/") and int(lines[-1]["done"]) == store.n_tokens
    assert err[-1].startswith("dump layer.1: done in ")


def test_merge_reports_every_sweep_point_with_its_phase(demo_store, tmp_path):
    from integral_superposition.pipelines.merge import run_merge
    from integral_superposition.sae import SparseAutoencoder, save_sae

    sae = SparseAutoencoder(demo_store.d_model, 32, architecture="topk", top_k=4)
    save_sae(sae, str(tmp_path / "sae"))
    seen: list[tuple[int, int, str | None]] = []
    run_merge(
        str(tmp_path / "sae"),
        demo_store.uris[0],
        str(tmp_path / "merged"),
        {"fraction": 0.5, "sweep_fractions": [0.5, 0.25], "ce_docs": 0, "top_n": 5},
        on_progress=lambda d, t, phase=None: seen.append((d, t, phase)),
    )
    phases = [p for _, _, p in seen]
    for want in ("sweep K'=16 cluster", "sweep K'=16 random", "sweep K'=8 random"):
        assert want in phases, phases
    totals = {t for _, t, _ in seen}
    # 6 run steps; the sweep: 3 stages, the refit control, 2 sizes x (cluster, random), one CE pass
    assert totals == {6 + 3 + 1 + 2 * 2 + 1}
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen) and seen[-1][0] == 15


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_bar_is_drawn_instead_of_lines():
    term = _Terminal()
    with Reporter("train", unit="steps", total=4, show=True, stream=term) as rep:
        for step in range(1, 5):
            time.sleep(0.12)  # tqdm redraws at most every 0.1 s
            rep.postfix(loss="0.12")
            rep.update(step, phase="train")
    out = term.getvalue()
    assert "4/4" in out and "loss=0.12" in out and "train [train]" in out
    assert not any(LINE.match(line) for line in out.splitlines())


def test_a_step_waiting_for_the_shared_model_says_so(monkeypatch, caplog):
    """While another step holds the model, the waiting step's heartbeat names the wait; once
    it runs, its lines come from the work."""
    import functools
    import logging
    import threading
    from types import SimpleNamespace

    from integral_superposition.experiment import ModelSpec
    from integral_superposition.tasks import backends, ui

    fast = functools.partialmethod(ui.Progress.__init__, line_every_s=0.1, interval_s=0.3)
    monkeypatch.setattr(ui.Progress, "__init__", fast)
    spec = ModelSpec(model_id="tiny:gemma", dtype="fp32")
    _backend, lock = backends.load_backend(spec)

    def step(sae_uri, store_uri, out_uri, params, backend, storage_options, on_progress, **kw):
        for i in range(1, 4):
            on_progress(i, 3, phase=f"part {i}")
        return {"kind": "analysis"}

    sae = SimpleNamespace(name="sae-a", uri="mem://sae")
    loc = SimpleNamespace(storage_options={})
    out: list[dict] = []
    with caplog.at_level(logging.INFO):
        with lock:  # another step holds the model
            args = (step, "analysis", sae, SimpleNamespace(uri="mem://acts"), None, loc)
            rest = ("mem://out", SimpleNamespace(spec=spec), None)
            t = threading.Thread(target=lambda: out.append(backends.run_sae_step(*args, *rest)))
            t.start()
            time.sleep(1.0)
        t.join(timeout=30)
    assert out == [{"kind": "analysis"}]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("analysis sae-a")]
    waiting = [x for x in lines if "waiting for a GPU slot and the shared model" in x]
    assert any("still running, last update" in x for x in waiting), lines
    assert any(x.startswith("analysis sae-a 3/3 steps (100%)") for x in lines), lines
