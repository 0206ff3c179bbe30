"""The report a person reads: figures, report.html in a real headless Chromium, `cl-audit report`."""

from __future__ import annotations

import base64
import html as htmllib
import io
import json
import re
import shutil

import pandas as pd
import pytest
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from pipelines.plots import all_plots, sweep_heatmap_plot
from pipelines.report import (KNOWLEDGE_MEASURES, base_vs_aligned, knowledge_rows, load_run, rule_sentence,
                              transitions, verdict_sentence, write_report)

from conftest import ROOT
from test_cli import cli

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
BASIC = {"decomposition", "recovery", "kl_drift"}


def _png_size(png: bytes) -> tuple[int, int]:
    img = imread(io.BytesIO(png), format="png")
    return img.shape[1], img.shape[0]


def synthetic_summary() -> dict:
    """A hand-made summary: two recovery arms at n = 2 and 10."""
    def st(t, k, kb, ka):
        return {"task_acc": t, "knowledge_acc": k, "knowledge_chance": 0.25, "first_token_prob": 0.5,
                "perturb_acc": 0.1, "kl_to_base": kb, "kl_to_aligned": ka,
                "ci": {"task_acc": [t - 0.1, min(1, t + 0.1)], "knowledge_acc": [k - 0.1, min(1, k + 0.1)],
                       "kl_to_base": [kb, kb], "kl_to_aligned": [ka, ka]}}
    stages = {"base": st(0.9, 0.8, 0.0, 0.1), "aligned": st(0.95, 0.8, 0.1, 0.0), "perturbed": st(0.2, 0.75, 0.5, 0.4)}
    for arm, ts in (("in_task", (0.6, 0.9)), ("irrelevant", (0.4, 0.7))):
        for n, t in zip((2, 10), ts):
            stages[f"recovered/{arm}/{n}"] = st(t, 0.78, 0.4, 0.3)
    return {"suite": "capitals", "model": "m", "config_digest": "x" * 16, "stages": stages,
            "verdict": {"label": "spurious", "task_drop": 0.75, "task_drop_ci": [0.6, 0.9],
                        "knowledge_retention": 0.91, "knowledge_retention_ci": [0.8, 1.0],
                        "recovery_ratio": {"in_task/2": 0.53, "in_task/10": 0.93, "irrelevant/2": 0.27,
                                           "irrelevant/10": 0.67}},
            "mlflow": {"tracking_uri": "http://127.0.0.1:5000", "experiment_id": "3", "run_id": "abc"}}


def _text(fragment: str) -> str:
    """The text of an HTML fragment: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(htmllib.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def knowledge_table(html: str) -> dict[str, dict]:
    """The rows of report.html's knowledge-measures table: measure -> {"deciding", "cells": [text]}."""
    table = re.search(r'<table id="knowledge-table">(.*?)</table>', html, re.S)
    assert table, "no knowledge-measures table"
    return {m: {"deciding": bool(cls), "cells": [_text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]}
            for m, cls, row in re.findall(r'<tr data-measure="(\w+)"( class="deciding")?>(.*?)</tr>', table.group(1),
                                          re.S)}


def per_layer_rows(stages: list[str], n_layers: int) -> pd.DataFrame:
    """Rows as the probe / weight-drift stages write them: one per (stage, layer)."""
    rows = []
    for i, s in enumerate(stages):
        for layer in range(n_layers):
            v = 0.4 + 0.05 * layer - 0.02 * i
            rows.append({"stage": s, "metric": "probe_acc", "layer": layer, "value": v, "ci_low": v - 0.05,
                         "ci_high": v + 0.05})
            if s != "base":
                rows.append({"stage": s, "metric": "weight_drift", "layer": layer, "value": 0.01 * (layer + 1),
                             "ci_low": None, "ci_high": None})
    rows.append({"stage": "base", "metric": "probe_chance", "layer": None, "value": 0.2, "ci_low": None,
                 "ci_high": None})
    df = pd.DataFrame(rows, columns=["stage", "metric", "layer", "value", "ci_low", "ci_high"])
    df["layer"] = df["layer"].astype("Int64")
    return df


def test_figures_drawn_only_where_the_data_exists():
    s = synthetic_summary()
    basic = all_plots(s)
    assert [p.name for p in basic] == ["decomposition", "recovery", "kl_drift"]
    for p in basic:
        w, h = _png_size(p.png)
        assert w > 400 and h > 250
    # a metrics table without per-layer rows (the foundation's) draws no per-layer figure
    plain = pd.DataFrame([{"stage": "base", "metric": "task_acc", "layer": None, "value": 0.9,
                           "ci_low": 0.8, "ci_high": 1.0}])
    assert [p.name for p in all_plots(s, plain)] == [p.name for p in basic]

    sweep = pd.DataFrame([
        {"perturb.kl_penalty": kl, "recover.size": n, "recover.arm": arm, "recovery_ratio": r}
        for arm in ("in_task", "irrelevant") for kl in (0.0, 0.1, 1.0) for n, r in ((2, 0.3), (10, 0.9))
    ])
    full = all_plots(s, per_layer_rows(list(s["stages"]), 6), sweep)
    assert [p.name for p in full] == ["decomposition", "recovery", "kl_drift", "probe_layers", "weight_drift",
                                      "sweep_heatmap"]
    # the two-arm heatmap is wider than a one-arm one
    one_arm = sweep_heatmap_plot(sweep[sweep["recover.arm"] == "in_task"].drop(columns="recover.arm"))
    assert _png_size(full[-1].png)[0] > _png_size(one_arm.png)[0]
    # a sweep table without a recovery ratio has no heatmap
    assert sweep_heatmap_plot(sweep.drop(columns="recovery_ratio")) is None
    # same data, same bytes (no timestamps in the PNG)
    assert all_plots(s)[0].png == basic[0].png


def test_verdict_sentence_carries_the_numbers():
    text = verdict_sentence(synthetic_summary())
    assert text.startswith("Spurious forgetting: the fine-tune cost task alignment, not knowledge.")
    assert "from 0.95 (aligned) to 0.20 (perturbed), a drop of 0.75 (95% CI 0.60 to 0.90)" in text
    assert "against a chance level of 0.25, giving a knowledge retention of 0.91 (95% CI 0.80 to 1.00)" in text
    assert text.endswith("; 10 in-task recovery examples bring back 93% of the lost task accuracy.")
    s = synthetic_summary()
    s["verdict"]["recovery_ratio"] = {"in_task/2": 0.1, "irrelevant/2": -0.2}
    assert verdict_sentence(s).endswith(
        "; no recovery arm brings the task back (the best, 2 in-task examples, recovers 10% of the lost task accuracy).")


def test_rule_sentence_reads_the_deciding_measures_interval():
    s = synthetic_summary()
    assert rule_sentence(s) == ""  # a summary without thresholds: nothing to explain
    s["verdict"].update(
        decided_by="knowledge_mrr",
        thresholds={"retention_threshold": 0.8, "loss_threshold": 0.5, "recovery_target": 0.5, "small_n": 20},
        retention={"knowledge_acc": {"value": 0.91, "ci": [0.8, 1.0]},
                   "knowledge_mrr": {"value": 0.62, "ci": [0.41, 0.83]}})
    s["stages"]["aligned"]["knowledge_mrr"], s["stages"]["perturbed"]["knowledge_mrr"] = 0.9, 0.6
    text = rule_sentence(s)
    assert text.startswith("The label is decided on intervals, not on points, by the retention of knowledge_mrr "
                           f"({dict(KNOWLEDGE_MEASURES)['knowledge_mrr']})")
    assert "retained when the lower bound of the retention's 95% CI is at least the retention threshold 0.8" in text
    assert "lost when its upper bound is below the loss threshold 0.5" in text
    assert ("Here the retention by knowledge_mrr is 0.62 [0.41, 0.83]: lower bound 0.41 < 0.8, "
            "upper bound 0.83 ≥ 0.5 (straddles).") in text
    # the one-sentence verdict follows the deciding measure, not knowledge_acc
    assert ("while knowledge by knowledge_mrr went from 0.90 (aligned) to 0.60 (perturbed) against a chance level of "
            "–, giving a knowledge retention of 0.62 (95% CI 0.41 to 0.83)") in verdict_sentence(s)


def test_flipped_items_match_the_predictions(tiny_run):
    _, out, s = tiny_run
    tr = transitions(out, s)
    assert [(t["before"], t["after"]) for t in tr] == [
        ("aligned", "perturbed"), ("perturbed", "recovered/in_task/4"), ("perturbed", "recovered/irrelevant/4")]
    a = pd.read_parquet(out / "predictions" / "aligned.parquet")
    p = pd.read_parquet(out / "predictions" / "perturbed.parquet")
    assert tr[0]["lost"] == int((a.task_correct & ~p.task_correct).sum())
    assert tr[0]["gained"] == int((~a.task_correct & p.task_correct).sum())
    assert tr[0]["n"] == len(a) == 16
    assert len(tr[0]["sample"]) == min(6, tr[0]["lost"] + tr[0]["gained"])
    for row in tr[0]["sample"]:
        assert row["task_before"] != row["task_after"]
        match = a[a.question == row["question"]].iloc[0]
        assert row["expected"] == match.expected and row["before"] == match.response


def test_report_opens_in_headless_chromium(tiny_run):
    """report.html written by the run: every figure loads, no request leaves the file,
    the verdict is there; a screenshot is kept in test-artifacts/."""
    from playwright.sync_api import sync_playwright

    _, out, s = tiny_run
    html_path = out / "report.html"
    html = html_path.read_text()
    assert shutil.which("chromium") == CHROMIUM, "Debian's chromium is required (.ci/run installs it)"
    # self-contained: no stylesheet, script or image from elsewhere
    assert not re.search(r"<link|<script|src=\"(?!data:)|url\(", html)
    assert {p.stem for p in (out / "plots").glob("*.png")} == BASIC | {"probe_layers", "weight_drift"}

    requests: list[str] = []
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-tiny.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html_path.as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth}))")
            verdict = page.inner_text("#verdict")
            body = page.inner_text("body")
            krows = page.evaluate(
                "Array.from(document.querySelectorAll('#knowledge-table tr[data-measure]')).map(r => ({"
                "m: r.dataset.measure, deciding: r.classList.contains('deciding'),"
                "cells: Array.from(r.cells).map(c => c.innerText.trim().split('\\n')[0])}))")
            side_open = page.evaluate("document.querySelector('#base-vs-aligned').closest('details').open")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert len(images) == 5  # the tiny run has per-layer probes and weight drift too
    assert all(i["complete"] and i["w"] > 400 for i in images), images
    assert [u for u in requests if not u.startswith(("data:", "file:"))] == []
    assert f"VERDICT: {s['verdict']['label']}".lower() in verdict.lower()
    assert verdict_sentence(s) in verdict
    for needle in (s["model_digest"], s["data_digest"], s["mlflow"]["run_id"], "recovered/irrelevant/4",
                   "aligned → perturbed"):
        assert needle in body
    w, h = _png_size(shot.read_bytes())
    assert w == 1200 and h > 2000  # the full page, not only the first screen

    # the knowledge measures as the browser shows them, against the summary's numbers
    v, st = s["verdict"], s["stages"]
    decided = v["decided_by"]
    assert [r["m"] for r in krows] == [m for m, _ in KNOWLEDGE_MEASURES]
    assert [r["m"] for r in krows if r["deciding"]] == [decided]
    for r in krows:
        m, cells = r["m"], r["cells"]
        chance = v["knowledge_chances"][m]
        assert cells[1] == ("none" if chance is None else f"{chance:.3f}")
        assert cells[2:2 + len(st)] == [f"{x[m]:.3f}" for x in st.values()]
        retention, shift = cells[-2], cells[-1]
        if m == "gold_logprob":
            assert retention == f"{v['gold_logprob_change']['value']:.3f}"
        else:
            assert retention == f"{v['retention'][m]['value']:.3f}"
            assert shift == f"{v['tune_shift'][m]['value']:.3f}"
    kr = {r["measure"]: r for r in knowledge_rows(s)}
    assert kr[decided]["deciding"] and sum(r["deciding"] for r in kr.values()) == 1
    assert not kr["gold_logprob"]["decisive"]
    # the verdict names the deciding measure and reads intervals
    th = v["thresholds"]
    assert f"deciding measure: {decided}" in verdict
    assert f"The label is decided on intervals, not on points, by the retention of {decided}" in verdict
    lo, hi = v["retention"][decided]["ci"]
    rt, lt = th["retention_threshold"], th["loss_threshold"]
    assert f"lower bound {lo:.2f} {'≥' if lo >= rt else '<'} {rt}" in verdict
    assert f"upper bound {hi:.2f} {'<' if hi < lt else '≥'} {lt}" in verdict
    # the side-by-side answers are there, collapsed, when the audit is not inconclusive
    if not v["checks"]:
        assert side_open is False
        assert "#checks" not in html and 'id="checks"' not in html


def test_knowledge_table_in_the_html_carries_the_summary(tiny_run):
    """report.html's knowledge-measures table holds the summary's values: retention with its
    CI, the base -> aligned shift, the chance level; the deciding measure is marked."""
    _, out, s = tiny_run
    html = (out / "report.html").read_text()
    rows = knowledge_table(html)
    v = s["verdict"]
    assert list(rows) == [m for m, _ in KNOWLEDGE_MEASURES]
    assert [m for m, r in rows.items() if r["deciding"]] == [v["decided_by"]]
    assert "decides the label" in rows[v["decided_by"]]["cells"][0]
    assert all("decides the label" not in r["cells"][0] for m, r in rows.items() if m != v["decided_by"])
    for m, r in rows.items():
        if m == "gold_logprob":
            continue
        ret, ci = v["retention"][m]["value"], v["retention"][m]["ci"]
        assert r["cells"][-2].startswith(f"{ret:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"), (m, r["cells"][-2])
        sh = v["tune_shift"][m]
        assert r["cells"][-1].startswith(f"{sh['value']:.3f} [{sh['ci'][0]:.2f}, {sh['ci'][1]:.2f}]")
        assert r["cells"][1] == f"{v['knowledge_chances'][m]:.3f}"
    # one sentence per measure, in the legend
    legend = re.search(r'<table class="legend" id="knowledge-legend">(.*?)</table>', html, re.S).group(1)
    for m, meaning in KNOWLEDGE_MEASURES:
        assert f"{m} {meaning}" in _text(legend)
    # the existing per-stage metric table is still there, with the summary's task_acc
    metrics = html[html.index('id="metrics"'):html.index('id="knowledge"')]
    for st in s["stages"].values():
        assert f"{st['task_acc']:.3f}" in metrics


def test_inconclusive_report_shows_the_checks_first(tiny_run, tmp_path):
    """An inconclusive verdict: its checks come before everything else, with the base and
    aligned answers side by side, open."""
    _, out, s = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    check = ("the tune stage broke the task: task_acc fell from base to aligned by 0.62 [0.44, 0.81], "
             "more than tune_tolerance 0.2")
    summary = json.loads((run / "summary.json").read_text())
    summary["verdict"].update(label="inconclusive", checks=[check], reason=check)
    (run / "summary.json").write_text(json.dumps(summary))
    write_report(run)
    html = (run / "report.html").read_text()

    body = html[html.index("<body>"):]
    at = body.index(htmllib.escape(check))
    assert at < body.index('id="verdict"') and at < body.index('class="sub toc"')
    assert at < body.index('id="base-vs-aligned"') < body.index('id="verdict"')
    assert re.search(r'<section id="checks" class="checks">.*?<details open>.*?id="base-vs-aligned"', body, re.S)
    assert "VERDICT: INCONCLUSIVE" in _text(body).upper()
    # one row per evaluation item, each with the base and the aligned answer and their marks
    b = pd.read_parquet(run / "predictions" / "base.parquet")
    a = pd.read_parquet(run / "predictions" / "aligned.parquet").set_index("item_id")
    table = re.search(r'<table class="flips" id="base-vs-aligned">(.*?)</table>', body, re.S).group(1)
    rows = dict(re.findall(r'<tr data-item="([^"]+)">(.*?)</tr>', table, re.S))
    assert set(rows) == set(b.item_id) and len(rows) == len(b)
    for r in b.itertuples():
        cells = [_text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", rows[r.item_id], re.S)]
        ar = a.loc[r.item_id]
        assert cells[:6] == [" ".join(x.split()) for x in (r.question, r.expected, r.response)] + [
            "✓" if r.task_correct else "✗", " ".join(ar.response.split()), "✓" if ar.task_correct else "✗"]
    sb = base_vs_aligned(run)
    assert sb["lost"] == int((b.set_index("item_id").task_correct & ~a.task_correct).sum())
    lost_first = [row["task_base"] and not row["task_aligned"] for row in sb["rows"]]
    assert lost_first == sorted(lost_first, reverse=True)  # the items the tune stage lost come first


def test_report_of_an_older_summary(tiny_run, tmp_path):
    """A run folder written before the per-measure verdict (no checks, decided_by,
    retention, tune_shift, knowledge_chances, ...) still renders."""
    _, out, s = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    summary = json.loads((run / "summary.json").read_text())
    new_v = ("checks", "decided_by", "task_drop_significant", "retention", "after_recovery", "tune_shift",
             "tune_change", "gold_logprob_change", "knowledge_chances")
    for k in new_v:
        summary["verdict"].pop(k, None)
    old_keys = ("retention_threshold", "loss_threshold", "recovery_target", "small_n")
    summary["verdict"]["thresholds"] = {k: summary["verdict"]["thresholds"][k] for k in old_keys}
    new_st = [m for m, _ in KNOWLEDGE_MEASURES if m != "knowledge_acc"] + ["knowledge_chances"]
    for st in summary["stages"].values():
        for k in new_st:
            st.pop(k, None)
            st["ci"].pop(k, None)
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "predictions" / "base.parquet").unlink()  # an older run without base predictions: no side-by-side table
    write_report(run)
    html = (run / "report.html").read_text()
    rows = knowledge_table(html)
    assert list(rows) == ["knowledge_acc"] and rows["knowledge_acc"]["deciding"]
    v = summary["verdict"]
    assert rows["knowledge_acc"]["cells"][-2].startswith(f"{v['knowledge_retention']:.3f}")
    assert rows["knowledge_acc"]["cells"][1] == f"{v['knowledge_chance']:.3f}"
    assert 'id="checks"' not in html and 'id="base-vs-aligned"' not in html
    assert verdict_sentence(summary) in _text(html)
    assert "by the retention of knowledge_acc" in _text(html)


def test_report_on_mlflow_parent(tiny_run):
    _, out, s = tiny_run
    client = MlflowClient(s["mlflow"]["tracking_uri"])
    top = {f.path for f in client.list_artifacts(s["mlflow"]["run_id"])}
    assert {"report.html", "plots"} <= top
    plots = {f.path for f in client.list_artifacts(s["mlflow"]["run_id"], "plots")}
    assert plots == {f"plots/{n}.png" for n in BASIC | {"probe_layers", "weight_drift"}}


def test_report_command_redraws_with_per_layer_data(tiny_run, tmp_path):
    """`cl-audit report` on a copy of the run whose metrics gained per-layer rows."""
    _, out, s = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "report.html").unlink()
    m = pd.read_parquet(run / "metrics.parquet")
    m = pd.concat([m, per_layer_rows(list(s["stages"]), 3)], ignore_index=True)
    m.to_parquet(run / "metrics.parquet", index=False)
    r = cli("report", str(run), home=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"Wrote {run / 'report.html'} (5 figures" in r.stdout
    assert {p.stem for p in (run / "plots").glob("*.png")} == BASIC | {"probe_layers", "weight_drift"}
    html = (run / "report.html").read_text()
    assert html.count("<img src=\"data:image/png;base64,") == 5
    # the figure is embedded byte for byte
    assert (run / "plots" / "probe_layers.png").read_bytes() in [
        base64.b64decode(x) for x in re.findall(r"base64,([A-Za-z0-9+/=]+)", html)]
    # without per-layer rows the per-layer figures go away again
    plain = pd.read_parquet(out / "metrics.parquet")
    plain[plain["layer"].isna()].to_parquet(run / "metrics.parquet", index=False)
    write_report(run)
    assert {p.stem for p in (run / "plots").glob("*.png")} == BASIC


def test_report_of_a_folder_without_a_run(tmp_path):
    r = cli("report", str(tmp_path), home=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'summary.json'}: not found; expected the folder of a finished run"
    (tmp_path / "summary.json").write_text(json.dumps({"suite": "x"}))
    with pytest.raises(Exception, match="field 'stages' missing"):
        load_run(tmp_path)
