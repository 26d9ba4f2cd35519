"""Dashboards and the report in a real headless Chromium: hostile tokens stay text, nothing
runs, nothing is fetched, and every latent row is there."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from integral_superposition.pipelines import run_analysis
from integral_superposition.sae import SparseAutoencoder, save_sae
from integral_superposition.viz import ReportSection, build_report
from integral_superposition.viz.browser import find_chromium

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        find_chromium() is None, reason="chromium is not installed (apt-get install chromium)"
    ),
]

HOSTILE = [
    "</script><script>alert(1)</script>",
    "<img src=x onerror=alert(2)>",
    "\"'&",
    "\u2028",
    "\u200f",
    '<img src="http://127.0.0.1:9/leak.png">',
    "<style>body{display:none}</style>",
    "<!--",
    "\u2029</script>",
    "{{7*7}}",
]
HOSTILE_LABELS = ["<script>alert(3)</script>", "A&B \u200f", "plain"]


class _HostileTokenizer:
    def batch_decode(self, seqs, **_):
        return [HOSTILE[s[0] % len(HOSTILE)] for s in seqs]


class _Backend:
    tokenizer = _HostileTokenizer()


@pytest.fixture(scope="module")
def hostile_run(demo_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    sae = SparseAutoencoder(demo_store.d_model, 40, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-1.2)
        sae.b_enc[11] = -1e4  # dead
    sae_dir = save_sae(sae, str(root / "sae"))
    docs = demo_store.docs["doc_id"].to_numpy()
    labels = pd.DataFrame({"doc_id": docs, "label": np.array(HOSTILE_LABELS)[docs % 3]})
    out = str(root / "analysis")
    run_analysis(sae_dir, demo_store, out, {"reducer": "pca", "n_top": 6, "n_bands": 2, "per_band": 2},
                 backend=_Backend(), labels=labels, clusters=np.arange(40) % 5)  # fmt: skip
    report = build_report(
        str(root / "report"),
        ReportSection(
            "Steering",
            text=HOSTILE[0],
            generations=[{"prompt": HOSTILE[1], "steered": HOSTILE[5] + HOSTILE[3]}],
            tables=[pd.DataFrame({"token": HOSTILE})],
        ),
        analysis=out,
    )
    return out, report


def _assert_clean(visit):
    assert visit.dialogs == [], visit.dialogs
    assert visit.foreign_requests == [], visit.foreign_requests
    assert visit.exceptions == [], visit.exceptions
    bad = [m for m in visit.console if "Content Security Policy" in m[1] or "Refused" in m[1]]
    assert bad == [], bad


def test_latent_page_renders_hostile_tokens_as_text(hostile_run, browser):
    out, _ = hostile_run
    for j in (0, 5, 11):
        visit = browser.open(os.path.join(out, "dashboards", "latents", f"{j:05d}.html"))
        _assert_clean(visit)
        assert (
            browser.evaluate(
                "document.querySelectorAll('script,img,style:not(head style),iframe,object').length"
            )
            == 0
        )
        text = browser.evaluate("document.body.innerText")
        assert f"Latent {j}" in text and "Co-activation neighbours" in text  # the page is whole
        if j != 11:
            for s in (HOSTILE[0], HOSTILE[1], HOSTILE[5], "{{7*7}}"):
                assert s in text, s
            assert "⟨U+2028⟩" in text and "⟨U+200F⟩" in text
            tips = browser.evaluate(
                "Array.from(document.querySelectorAll('.ex span[title]')).map(e => e.title)"
            )
            assert tips and all(float(t) > 0 for t in tips)  # activation values in tooltips
            assert (
                browser.evaluate("document.querySelectorAll('.ex .h').length") >= 1
            )  # the example token
        else:
            assert "never fires" in text
        assert browser.evaluate("getComputedStyle(document.body).display") != "none"


def test_index_lists_every_latent_and_filters(hostile_run, browser):
    out, _ = hostile_run
    visit = browser.open(os.path.join(out, "dashboards", "index.html"))
    _assert_clean(visit)
    assert browser.evaluate("document.body.dataset.ready") == "1"  # our script ran
    assert browser.evaluate("document.querySelectorAll('#rows > .r').length") == 40
    assert browser.evaluate("document.querySelectorAll('script').length") == 2  # data + ours
    assert browser.evaluate("document.querySelectorAll('img,iframe').length") == 0
    text = browser.evaluate("document.body.innerText")
    assert HOSTILE_LABELS[0] in text and HOSTILE[0] in text
    # filtering by cluster and hiding dead latents, then sorting by q
    shown = browser.evaluate(
        "(function(){var c=document.getElementById('f-cluster');c.value='1';c.dispatchEvent(new Event('input'));"
        "var a=document.getElementById('f-alive');a.checked=true;a.dispatchEvent(new Event('change'));"
        "return Array.from(document.querySelectorAll('#rows > .r')).filter(r=>!r.hidden).length;})()"
    )
    assert shown == 8 - 1  # latents 1, 6, 11, ..., 36; latent 11 is dead
    order = browser.evaluate(
        "(function(){document.getElementById('f-cluster').value='';document.getElementById('f-cluster').dispatchEvent(new Event('input'));"
        "document.querySelector('[data-k=q]').click();"
        "return Array.from(document.querySelectorAll('#rows > .r')).map(r=>r.children[2].textContent);})()"
    )
    qs = [float(v) for v in order if v != "-"]
    assert qs == sorted(qs) and len(qs) >= 39


def test_report_page_is_clean(hostile_run, browser):
    _, report = hostile_run
    visit = browser.open(report)
    _assert_clean(visit)
    assert browser.evaluate("document.querySelectorAll('script,iframe').length") == 0
    srcs = browser.evaluate("Array.from(document.images).map(i => i.src.slice(0, 22))")
    assert srcs and set(srcs) == {"data:image/png;base64,"}
    assert browser.evaluate("Array.from(document.images).every(i => i.naturalWidth > 0)")
    text = browser.evaluate("document.body.innerText")
    assert HOSTILE[0] in text and HOSTILE[1] in text and "Top latents per label" in text


def test_the_harness_catches_an_unsafe_page(tmp_path, browser):
    """A control: raw injection without escaping or CSP must be caught by the same checks."""
    page = tmp_path / "unsafe.html"
    page.write_text(
        f"<html><body>{HOSTILE[1]}<img src='http://127.0.0.1:9/leak.png'></body></html>"
    )
    visit = browser.open(page, settle_s=1.0)
    assert visit.dialogs == ["2"]
    assert any(u.startswith("http://127.0.0.1:9/") for u in visit.foreign_requests)


LONG_TOKEN = "y" * 10_000 + "\u202e"
BIDI_LABELS = ["He\u202ealth", "Sp\u2028orts", "World"]


class _LongTokenizer:
    def batch_decode(self, seqs, **_):
        return [LONG_TOKEN if s[0] % 2 == 0 else f" w{s[0]}" for s in seqs]


class _LongBackend:
    tokenizer = _LongTokenizer()


@pytest.fixture(scope="module")
def bidi_run(demo_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("bidi")
    sae = SparseAutoencoder(demo_store.d_model, 12, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-1.2)
    sae_dir = save_sae(sae, str(root / "sae"))
    docs = demo_store.docs["doc_id"].to_numpy()
    labels = pd.DataFrame({"doc_id": docs, "label": np.array(BIDI_LABELS)[docs % 3]})
    out = str(root / "analysis")
    run_analysis(sae_dir, demo_store, out, {"reducer": "pca", "n_top": 6, "n_bands": 2, "per_band": 2},
                 backend=_LongBackend(), labels=labels)  # fmt: skip
    report = build_report(str(root / "report"), analysis=out, title="exp\u202eriment / r\u2028un")
    return out, report


def _no_raw_bidi(browser) -> None:
    text = browser.evaluate("document.title + document.body.innerText")
    assert "\u202e" not in text and "\u2028" not in text


def test_labels_and_names_render_escaped_and_long_tokens_cut_with_a_tooltip(bidi_run, browser):
    from integral_superposition.viz.panels import MAX_TOKEN_CHARS

    out, report = bidi_run
    visit = browser.open(os.path.join(out, "dashboards", "latents", "00000.html"))
    _assert_clean(visit)
    _no_raw_bidi(browser)
    text = browser.evaluate("document.body.innerText")
    assert "He⟨U+202E⟩alth" in text and "Sp⟨U+2028⟩orts" in text
    assert "y" * (MAX_TOKEN_CHARS + 1) not in text  # the long token is cut ...
    cut = browser.evaluate(
        "Array.from(document.querySelectorAll('.cut')).map(e => [e.textContent, e.title])"
    )
    assert cut, "no cut token on the page"
    shown, tip = cut[0]
    assert shown == "y" * MAX_TOKEN_CHARS + "…"
    assert tip == "y" * 10_000 + "⟨U+202E⟩"  # ... and whole, escaped, in its tooltip

    visit = browser.open(os.path.join(out, "dashboards", "index.html"))
    _assert_clean(visit)
    _no_raw_bidi(browser)
    options = browser.evaluate(
        "Array.from(document.querySelectorAll('#f-label option')).map(o => o.textContent)"
    )
    assert "He⟨U+202E⟩alth" in options and "Sp⟨U+2028⟩orts" in options
    assert "y" * 200 not in browser.evaluate("document.body.innerText")

    visit = browser.open(report)
    _assert_clean(visit)
    _no_raw_bidi(browser)
    assert browser.evaluate("document.querySelector('h1').textContent") == (
        "exp⟨U+202E⟩riment / r⟨U+2028⟩un"
    )
    assert "y" * 200 not in browser.evaluate("document.body.innerText")
