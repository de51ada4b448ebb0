"""Restore from the MLflow UI, really: a headless Chromium walks from the run page to the
logged model, and the URL it lands on restores exactly that checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import ckpt_track as ct

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parents[1] / "artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def test_restore_from_a_url_copied_out_of_the_mlflow_ui(mlflow_env) -> None:
    from playwright.sync_api import sync_playwright

    settings = {"backend": "mlflow", "mlflow": {"tracking_uri": mlflow_env.uri}}
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    with ct.init(project="ui-restore", name="ui-run", settings=settings) as run:
        for step, loss in ((100, 0.8), (200, 0.3), (300, 0.5)):
            with torch.no_grad():
                model.weight.fill_(step)
            run.log_checkpoint(step, model=model, metrics={"val/loss": loss})
    exp = MlflowClient(mlflow_env.uri).get_run(run.id).info.experiment_id

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{mlflow_env.uri}/#/experiments/{exp}/runs/{run.id}")
            link = page.locator("a[href*='/models/m-']", has_text="ui-run-step-200").first
            link.wait_for(timeout=60_000)
            link.click()
            page.wait_for_url("**/models/m-*", timeout=60_000)
            page.wait_for_timeout(1500)  # let the model page render for the screenshot
            url = page.url
            page.screenshot(path=str(ARTIFACTS / "mlflow_logged_model.png"))
        finally:
            browser.close()

    assert "/#/experiments/" in url and "/models/m-" in url
    fresh = torch.nn.Linear(3, 2)
    restored = ct.restore(url, model=fresh)  # nothing configured: the tracking URI comes from the URL
    assert restored.step == 200 and restored.metrics == {"val/loss": pytest.approx(0.3)}
    assert torch.equal(fresh.weight, torch.full((2, 3), 200.0))
