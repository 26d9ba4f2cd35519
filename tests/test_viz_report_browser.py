"""The report leads with the answer, checked in headless Chromium: the first table is the
headline, every number is marked held-out or training, absent numbers read "-", merge and
steering sit beside their controls, and the configurations come last, folded."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from integral_superposition import storage
from integral_superposition.config import SAEConfig
from integral_superposition.pipelines import run_analysis
from integral_superposition.sae import (
    SparseAutoencoder,
    load_sae,
    read_sae_manifest,
    save_sae,
    train_saes,
)
from integral_superposition.viz import build_report
from integral_superposition.viz.browser import find_chromium

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        find_chromium() is None, reason="chromium is not installed (apt-get install chromium)"
    ),
]


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def report_page(demo_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("headline")
    # a short real training run: held-out metrics, the decoder refit, the curve, converged
    cfg = SAEConfig(
        k=32, architecture="topk", top_k=4, batch_size=64, train_tokens=40 * 64, lr=1e-2,
        lr_warmup_steps=4, log_every=2,
    )  # fmt: skip
    (trained,) = train_saes(demo_store, [cfg], [str(root / "sae")], progress=False)
    sae_dir, ev = trained.uri, read_sae_manifest(trained.uri)["metrics"]
    sae = load_sae(sae_dir)
    out = str(root / "analysis")
    run_analysis(
        sae_dir,
        demo_store,
        out,
        {"reducer": "pca", "n_top": 6, "n_bands": 1, "per_band": 2, "lead_doc_tokens": 1},
    )
    # a published merge (its evaluation and sweep tables) and a steering evaluation
    merge_eval = pd.DataFrame(
        [
            {"sae": "original", "n_latents": 32, "fvu": 0.31, "ce_recovered": 0.93},
            {"sae": "merged", "n_latents": 16, "fvu": 0.37, "ce_recovered": 0.88,
             "enrichment_retention": 0.75},
        ]
    )  # fmt: skip
    sweep = pd.DataFrame(
        [
            {"k_prime": 16, "partition": "cluster", "fvu": 0.37, "ce_recovered": 0.88},
            {"k_prime": 16, "partition": "random", "fvu": 0.52, "ce_recovered": 0.61,
             "enrichment_retention": 0.25},
        ]
    )  # fmt: skip
    merge_dir = save_sae(
        sae, str(root / "merge"),
        extra_files={"merge_eval.parquet": _parquet(merge_eval), "merge_sweep.parquet": _parquet(sweep)},
    )  # fmt: skip
    steer_dir = str(root / "steering")
    summary = {
        "n_prompts": 12,
        "ppl_ratio_max": 2.0,
        "latents": [
            {"latent": 3, "label": "sports", "n": 48, "baseline_share": 0.1,
             "best_share": 0.58, "best_share_lo": 0.41, "best_share_hi": 0.73,
             "random_latent": 7, "random_share_at_best": 0.12,
             "random_share_at_best_lo": 0.05, "random_share_at_best_hi": 0.25,
             "classifier_valid": True},
        ],
    }  # fmt: skip
    data = storage.canonical_json(summary).encode()
    storage.write_bytes(storage.join(steer_dir, "summary.json"), data)
    storage.write_manifest(
        steer_dir, "steering", {}, {"summary.json": storage.file_entry("", data)}, summary=summary
    )
    return build_report(
        str(root / "report"),
        analysis=out,
        sae=sae_dir,
        merge=merge_dir,
        steering=steer_dir,
        config={"preset": "smoke"},
    ), ev


ROWS = """Array.from(document.querySelectorAll('table.headline tbody tr:not(.group)')).map(
  r => Array.from(r.children).map(c => c.innerText.trim()))"""


def test_the_first_table_is_the_headline_and_the_configs_come_last_folded(report_page, browser):
    page, _ = report_page
    visit = browser.open(page)
    assert visit.exceptions == [] and visit.foreign_requests == []
    assert browser.evaluate("document.querySelector('table').className") == "headline"
    # nothing but the title, the legend and the contents sits above the headline table
    assert browser.evaluate(
        "document.querySelector('table.headline').getBoundingClientRect().top"
    ) < browser.evaluate("window.innerHeight")
    details = browser.evaluate(
        "Array.from(document.querySelectorAll('details')).map(d => [d.id, d.open])"
    )
    assert details == [["configuration", False]]
    # the configurations follow every result section and are hidden until opened
    after_all = browser.evaluate(
        "(function(){var d=document.getElementById('configuration');"
        "return Array.from(document.querySelectorAll('section')).every("
        "s => s.compareDocumentPosition(d) & Node.DOCUMENT_POSITION_FOLLOWING);})()"
    )
    assert after_all
    assert (
        browser.evaluate("document.querySelector('#configuration pre').checkVisibility()") is False
    )
    assert "sae_lens_version" not in browser.evaluate("document.body.innerText")
    assert browser.evaluate("document.querySelectorAll('pre:not(#configuration pre)').length") == 0
    text = browser.evaluate("document.getElementById('configuration').textContent")
    assert "cfg.json" in text and "smoke" in text


def test_headline_numbers_are_marked_and_missing_ones_read_a_dash(report_page, browser):
    page, ev = report_page
    browser.open(page)
    rows = {r[0]: r[1:] for r in browser.evaluate(ROWS)}
    value, control, on = rows["FVU"]
    assert float(value) == pytest.approx(ev["fvu"], abs=5e-5) and on.startswith("held-out")
    assert f"{ev['n_tokens']:,} tokens" in on
    dead, _, on = rows["dead latents"]
    assert dead == f"{100 * ev['dead_frac']:.2f}%" and f"{ev['dead_tokens']:,} tokens" in on
    # the SAE's evaluation had no language model: CE recovered comes from the merge's
    # evaluation of the original SAE; delta CE and KL were never computed
    assert rows["CE loss recovered"][0] == "0.9300"
    assert "held-out" in rows["CE loss recovered"][2] and "merge" in rows["CE loss recovered"][2]
    for name in ("delta CE (nats per token)", "KL to the clean model (nats per token)"):
        assert rows[name][0] == "-", name
    assert rows["training"][0] == ("converged" if ev["converged"] else "not converged")
    assert (
        rows["training"][2].startswith("training") and "before the LR decay" in rows["training"][2]
    )
    # the decoder refit beside the FVU before it, both held out
    value, control, on = rows["FVU after the decoder refit"]
    assert float(value) == pytest.approx(ev["refit_fvu_after"], abs=5e-5)
    assert control == f"before the refit: {ev['refit_fvu_before']:.4f}" and on.startswith(
        "held-out"
    )
    # the training curve section says whether training converged, and by which rule
    title = browser.evaluate("document.querySelector('#training h2').innerText")
    assert ("not converged" in title) != bool(ev["converged"])
    assert "Converged means: the smoothed training FVU" in browser.evaluate(
        "document.querySelector('#training').innerText"
    )
    # every number says which tokens it was measured on
    marks = browser.evaluate(
        "Array.from(document.querySelectorAll('table.headline tbody tr:not(.group)')).map("
        "r => (r.querySelector('.mark') || {}).textContent || '')"
    )
    assert marks and set(marks) <= {"held-out", "training", "all tokens"}, marks
    # the best latent per label links to its dashboard, with q, purity and document AUROC
    best = [k for k in rows if k.startswith("best latent: ")]
    assert best
    found = [rows[k][0] for k in best if rows[k][0] != "no significant non-generic latent"]
    assert found
    for cell in found:
        assert cell.startswith("L") and "q " in cell and "purity" in cell and "doc AUROC" in cell
    # beside them, the shuffled-label control: the smallest q reached with permuted labels
    for k in best:
        assert rows[k][1].startswith("shuffled labels (3 seeds), smallest q: "), rows[k]
        assert "token level" in rows[k][2] or rows[k][0].startswith("no significant")
    value, control, on = rows["significant latent-label pairs (token level)"]
    assert int(value) >= len(found) and control.startswith("shuffled labels, mean of 3 seeds: ")
    assert len(control.rsplit(": ", 1)[1]) <= 5  # three significant digits
    hrefs = browser.evaluate(
        "Array.from(document.querySelectorAll('table.headline a')).map(a => a.getAttribute('href'))"
    )
    assert hrefs and all("dashboards/latents/" in h for h in hrefs)
    # sparse probing against the dense probe (held-out documents)
    value, control, on = rows["accuracy, top 1 latent"]
    acc, interval = value.split(" [", 1)
    low, high = (float(v) for v in interval.rstrip("]").split(", "))
    assert 0 <= low <= float(acc) <= high <= 1, value
    assert control.startswith("dense probe: ") and on.startswith("held-out")


def test_merge_and_steering_sit_beside_their_controls(report_page, browser):
    page, _ = report_page
    browser.open(page)
    rows = {r[0]: r[1:] for r in browser.evaluate(ROWS)}
    assert rows["merged FVU"][:2] == ["0.3700", "random partition: 0.5200"]
    assert rows["merged CE loss recovered"][:2] == ["0.8800", "random partition: 0.6100"]
    assert rows["enrichment retained"][:2] == ["0.7500", "random partition: 0.2500"]
    assert "32 -> 16 latents" in rows["merged FVU"][2]
    (steer,) = [k for k in rows if k.startswith("share of 'sports'")]
    assert "L3" in steer and "2x perplexity" in steer
    assert rows[steer][:2] == ["0.58 [0.41, 0.73]", "random latent 7: 0.12 [0.05, 0.25]"]
    on = rows[steer][2]
    assert on.startswith("held-out") and "12 neutral prompts, 48 per strength" in on
    assert "unsteered 0.10" in on


def test_a_report_of_an_sae_alone_has_a_headline_of_dashes(tmp_path, browser):
    """Only training-batch metrics: every headline number is marked training; what was not
    measured reads "-"; no group for analyses, merges or steering that did not run."""
    sae = SparseAutoencoder(8, 16, seed=0)
    sae_dir = save_sae(
        sae, str(tmp_path / "sae"), metrics={"train_fvu": 0.4, "train_l0": np.float64(5.5)}
    )
    browser.open(build_report(str(tmp_path / "report"), sae=sae_dir))
    rows = {r[0]: r[1:] for r in browser.evaluate(ROWS)}
    assert rows["FVU"][0] == "0.4000" and rows["FVU"][2] == "training"
    assert rows["L0 (active latents per token)"][0] == "5.5"
    assert rows["dead latents"][0] == "-" and rows["CE loss recovered"][0] == "-"
    groups = browser.evaluate(
        "Array.from(document.querySelectorAll('table.headline tr.group')).map(r => r.innerText.trim())"
    )
    assert groups == ["SAE"]


def test_a_sweep_compares_every_sae_one_row_each_under_the_headline(tmp_path, browser):
    dirs = {}
    for name, fvu, dead in (("k32", 0.31, 0.5), ("k64", 0.22, None)):
        metrics = {"fvu": fvu, "l0": 12.0, "split": "test", "n_tokens": 900}
        if dead is not None:
            metrics.update(dead_frac=dead, dead_tokens=900)
        dirs[name] = save_sae(
            SparseAutoencoder(8, 16, seed=0), str(tmp_path / name), metrics=metrics
        )
    page = build_report(
        str(tmp_path / "report"),
        sae=dirs["k32"],
        sweep=[
            {"name": "k32", "sae": dirs["k32"]},
            {"name": "k64", "sae": dirs["k64"], "href": "saes/k64/report.html"},
        ],
    )
    browser.open(page)
    assert browser.evaluate("document.querySelector('table').className") == "headline"
    head = browser.evaluate(
        "Array.from(document.querySelectorAll('table.sweep th')).map(c => c.innerText.trim())"
    )
    assert head[:4] == ["SAE", "FVU", "L0", "dead"]
    rows = browser.evaluate(
        "Array.from(document.querySelectorAll('table.sweep tbody tr')).map("
        "r => Array.from(r.children).map(c => c.innerText.trim()))"
    )
    assert [r[0] for r in rows] == ["k32", "k64"]
    assert rows[0][1:4] == ["0.3100", "12.0", "50.00%"] and rows[1][1:4] == ["0.2200", "12.0", "-"]
    assert rows[1][4] == "-"  # CE recovered was not computed
    link = browser.evaluate("document.querySelector('table.sweep a').getAttribute('href')")
    assert link == "saes/k64/report.html"
    with pytest.raises(ValueError, match="sweep: expected mappings with 'name' and 'sae'"):
        build_report(str(tmp_path / "bad"), sae=dirs["k32"], sweep=[{"sae": dirs["k64"]}])
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_top_latents_are_the_analysis_groups_of_near_duplicates(report_page, browser):
    import os

    from integral_superposition.analysis.result import load_analysis

    page, _ = report_page
    grouped = load_analysis(os.path.join(os.path.dirname(os.path.dirname(page)), "analysis"))
    grouped = grouped.top_latents
    browser.open(page)
    head = browser.evaluate(
        "Array.from(document.querySelectorAll('#top-latents th')).map(c => c.innerText.trim())"
    )
    assert "near-duplicates" in head and "in set" in head and "top-set purity (N)" in head
    shown = browser.evaluate(
        "Array.from(document.querySelectorAll('#top-latents tbody tr')).map("
        "r => r.children[1].innerText.trim())"
    )
    assert shown == [f"L{int(j)}" for j in grouped["latent"]]
    assert "token level" in browser.evaluate("document.querySelector('#top-latents p').innerText")
