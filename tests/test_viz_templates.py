"""The Jinja2 templates: shipped as package data, found from an installed wheel, and every
printed value escaped with visible marks for invisible characters."""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import jinja2
import pytest
from integral_superposition.viz.templates import environment, render, template_names

ROOT = Path(__file__).resolve().parents[1]


def test_every_template_is_package_data():
    shipped = sorted(
        p.name for p in (importlib.resources.files("integral_superposition.viz") / "templates").iterdir()
        if p.name.endswith(".j2")
    )  # fmt: skip
    assert shipped == template_names()
    assert {"page.html.j2", "report.html.j2", "macros.html.j2", "section.html.j2"} <= set(shipped)
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["integral_superposition.viz"]
    for name in shipped:
        assert any(fnmatch.fnmatch(f"templates/{name}", g) for g in globs), name


def test_templates_render_from_an_installed_wheel(tmp_path):
    """Build the wheel from a copy of the sources, unpack it, and render from there."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("lib", "tasks", "flows"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(src)],
        check=True, capture_output=True, timeout=240,
    )  # fmt: skip
    (wheel,) = wheels.glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    for name in template_names():
        assert f"integral_superposition/viz/templates/{name}" in names, name
    # every package and every data file of the sources is in the wheel
    lib = ROOT / "lib" / "integral_superposition"
    for f in lib.rglob("*"):
        if f.is_file() and "__pycache__" not in f.parts:
            rel = f"integral_superposition/{f.relative_to(lib).as_posix()}"
            assert rel in names, (
                f"{rel} is missing from the wheel (pyproject packages/package-data)"
            )
    for sub in ("tasks", "flows"):
        assert f"integral_superposition/{sub}/__init__.py" in names, sub
    code = (
        "import integral_superposition.viz.templates as t, json, sys;"
        "print(json.dumps([t.__file__, t.template_names(),"
        " t.render('section.html.j2', s={'anchor': 'a', 'title': '<b>\u202e', 'split': None,"
        " 'paragraphs': [], 'html_text': None, 'links': [], 'tables': [], 'figures': [],"
        " 'generations': None})]))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
        check=True, timeout=120,
    )  # fmt: skip
    file, names_there, html = json.loads(out.stdout.strip().splitlines()[-1])
    assert file.startswith(str(site))  # the unpacked wheel, not the checkout
    assert names_there == template_names()
    assert "&lt;b&gt;⟨U+202E⟩" in html and "<b>" not in html


def test_printed_values_are_escaped_marked_and_missing_reads_a_dash():
    tpl = environment().from_string(
        "{{ a }}|{{ b }}|{{ c }}|{{ d }}|{{ e | token }}|{{ f | num('.2f') }}|{{ g | cut(3) }}"
    )
    out = tpl.render(
        a="<script>x</script>",
        b="r\u200fl",
        c=None,
        d=float("nan"),
        e="\n" + "y" * 50,
        f=float("inf"),
        g="abcdef",
    )
    a, b, c, d, e, f, g = out.split("|")
    assert a == "&lt;script&gt;x&lt;/script&gt;"
    assert b == "r⟨U+200F⟩l"
    assert c == d == f == "-"
    assert e.startswith('<span class=cut title="↵' + "y" * 50) and e.endswith("…</span>")
    assert g == '<span class=cut title="abcdef">abc…</span>'
    with pytest.raises(jinja2.UndefinedError):
        tpl.render(a=1)  # a misspelt or absent name fails instead of printing nothing
    assert "&lt;i&gt;" in render(
        "section.html.j2",
        s={"anchor": "x", "title": "<i>", "split": "held-out", "paragraphs": ["p"],
           "html_text": None, "links": [], "tables": [], "figures": [], "generations": None},
    )  # fmt: skip


class _HostileTokenizer:
    def batch_decode(self, seqs, **_):
        return ["<script>alert(1)</script>\u202e" if s[0] % 2 else "\n" for s in seqs]


def test_the_notebook_panel_shows_tokens_as_text(demo_store):
    import html.parser

    import torch
    from integral_superposition.sae import SparseAutoencoder
    from integral_superposition.viz.activations_panel import top_activations_panel

    sae = SparseAutoencoder(demo_store.d_model, 8, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # every latent fires: shaded tokens
    panel = top_activations_panel(0, demo_store, sae, tokenizer=_HostileTokenizer(), top_titles=3)
    tags, text = [], []
    parser = html.parser.HTMLParser()
    parser.handle_starttag = lambda tag, attrs: tags.append((tag, dict(attrs)))
    parser.handle_data = text.append
    parser.feed(panel._repr_html_())
    assert "script" not in [t for t, _ in tags]
    body = "".join(text)
    assert "<script>alert(1)</script>⟨U+202E⟩" in body and "↵" in body
    rows = [a for t, a in tags if t == "div" and a.get("class") == "ex"]
    assert len(rows) == 3
    shaded = [a for t, a in tags if t == "span" and a.get("class", "").startswith("a")]
    assert shaded and all(float(a["title"]) > 0 for a in shaded if a["class"] != "a0")
