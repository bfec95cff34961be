"""The MLflow UI as users compare runs: a real `mlflow server` on 127.0.0.1 with two finished tiny runs,
Debian's Chromium driven headless by Playwright (the system browser, no download): the experiment opens
on its runs (not the GenAI view), both runs show their dataset inputs, both are selected and compared,
the comparison page lists both, and the chart view draws both runs' per-stage loss curves. The
screenshot's path is printed."""
from __future__ import annotations

import shutil

import pytest

from tests.helpers import mlflow_client


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RUNS = ("tracked-run", "ui-b")  # conftest.server_runs, on the session's server


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/install_browser.sh installs it)")
def test_browser_compares_two_runs_with_stage_losses_and_datasets(mlflow_server, server_runs, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    server, tmp = mlflow_server, tmp_path
    client = mlflow_client(server.uri)
    experiment = client.get_experiment_by_name("mshg")
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    shot = tmp / "mlflow-compare.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        page.set_default_timeout(60_000)
        expect.set_options(timeout=30_000)  # the charts render in seconds on a loaded 2-core machine (5 s failed)
        # the link the trainer prints: MLflow 3.17 picks GenAI or model-training pages from a global toggle
        # (this URL parameter, else the browser's last choice, GenAI at first), not from the experiment's tag
        page.goto(f"{server.uri}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning")
        # the runs table, not the GenAI overview: both runs with their dataset inputs
        for name in RUNS:
            expect(page.get_by_text(name, exact=True).first).to_be_visible()
        expect(page.get_by_text("lspet-train").first).to_be_visible()
        # select both runs and compare them
        for name in RUNS:
            row = page.get_by_role("row").filter(has_text=name)
            row.get_by_role("checkbox").first.check()
        page.get_by_role("button", name="Compare").first.click()
        page.wait_for_url("**compare-runs**")
        for name in RUNS:  # the page keeps hidden copies of the names (failed once on the first match)
            expect(page.get_by_text(name).filter(visible=True).first).to_be_visible()
        expect(page.get_by_text("loss/stage_1").filter(visible=True).first).to_be_visible()
        # MLflow 3's comparison of curves: the experiment page's chart view, one chart per metric, a line per run
        page.go_back()
        page.locator("label:has(input[name=runs-view-mode][value=CHART])").click()
        close = page.get_by_role("button", name="Close")
        if close.count():
            close.first.click()  # the assistant panel: room for the charts
        for name in RUNS:
            expect(page.get_by_text(f"{name} (loss/stage_1)").first).to_be_visible()
        page.get_by_placeholder("Search metric charts").fill("loss/stage")  # all eight, and nothing else
        for name in RUNS:
            for stage in (1, 8):
                expect(page.get_by_text(f"{name} (loss/stage_{stage})").first).to_be_attached()
        # the curves are drawn, not only their legends: Plotly's line paths, one per run and chart, each
        # through several points (the runs logged 6 steps)
        lines = page.locator(".js-plotly-plot path.js-line")
        expect(lines.first).to_be_attached()
        drawn = [d for d in lines.evaluate_all("paths => paths.map(p => p.getAttribute('d') || '')") if d.count("L") >= 2]
        assert len(drawn) >= 2 * len(RUNS), f"{len(drawn)} curves with several points drawn"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    print(f"screenshot of the comparison: {shot}")
