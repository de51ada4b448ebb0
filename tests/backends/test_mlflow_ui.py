"""The MLflow UI, really, in a headless Chromium: the URL of a logged model's page restores
exactly that checkpoint, and the page shows the checkpoint's step, aliases and restore command.
Screenshots go to tests/artifacts/mlflow_ui/ (kept by CI)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import ckpt_track as ct

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parents[1] / "artifacts" / "mlflow_ui"
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

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
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


def test_the_logged_model_page_shows_step_aliases_and_how_to_restore(mlflow_env) -> None:
    from playwright.sync_api import sync_playwright

    settings = {"backend": "mlflow", "mlflow": {"tracking_uri": mlflow_env.uri}}
    with ct.init(project="ui-page", name="page-run", config={"lr": 0.01, "batch": 32}, settings=settings) as run:
        for step, loss in ((100, 0.8), (200, 0.3), (300, 0.5)):
            run.log_checkpoint(step, model=torch.nn.Linear(3, 2), metrics={"val/loss": loss})
    best = {s.step: s for s in ct.list_checkpoints(run.ref, ct.load_settings(settings))}[200]
    exp = MlflowClient(mlflow_env.uri).get_run(run.id).info.experiment_id

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2200})
            page.goto(f"{mlflow_env.uri}/#/experiments/{exp}/models/{best.native.model_id}")
            page.get_by_text("ckpt_track checkpoint: step 200").first.wait_for(timeout=60_000)
            page.wait_for_timeout(1000)  # the rest of the page (params, tags) renders
            text = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "logged_model_page.png"), full_page=True)
            page.goto(f"{mlflow_env.uri}/#/experiments/{exp}/models/{best.native.model_id}/artifacts")
            page.get_by_text("ckpt_track_files.json").first.click(timeout=60_000)
            page.get_by_text("model/weight").first.wait_for(timeout=60_000)  # the listing, previewed
            page.screenshot(path=str(ARTIFACTS / "logged_model_artifacts.png"))
        finally:
            browser.close()

    assert "step 200" in text
    assert "Aliases: best, step-200" in text  # the description names the aliases it holds now
    assert f"ckpt-track restore mlflow://{run.id}@step=200 -o DIR" in text
    assert f'ct.restore("mlflow://{run.id}@step=200", model=model, optimizer=optimizer)' in text
    assert "Parameters (2)" in text  # the run config, on the model's page
