"""The dashboard in a real browser (Debian's headless Chromium, driven by Playwright) against `mixq serve`.

Screenshots go to a temporary folder; `make screenshots` (MIXQ_UPDATE_SCREENSHOTS=1) refreshes the
README's copies in docs/screenshots/.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from stack import free_port, mixq_serve
from worker.engine.pipeline import PHASES

ROOT = Path(__file__).resolve().parents[1]
SHOTS = (ROOT / "docs" / "screenshots" if os.environ.get("MIXQ_UPDATE_SCREENSHOTS")
         else Path(tempfile.mkdtemp(prefix="mixq-screenshots-")))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MODEL = "builtin:digits-resnet"  # the submitted conv net (see test_submit_watch_and_inspect_a_job)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run must install it")
        pytest.skip("chromium not installed (apt-get install chromium)")
    data = tmp_path_factory.mktemp("dashboard")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MIXQ_") or k in ("MIXQ_CACHE_DIR", "MIXQ_PROFILE_SECONDS_PER_LAYER")}
    # A short per-layer profile: these jobs are about the pages, and a job that goes to a full search (no format
    # is faster on every layer of this CPU) would spend 0.5 s per layer and format on it by default.
    env.update(MIXQ_DATA_DIR=str(data), MIXQ_HEARTBEAT_SECONDS="0.5",
               MIXQ_PROFILE_SECONDS_PER_LAYER=env.get("MIXQ_PROFILE_SECONDS_PER_LAYER", "0.02"))
    with mixq_serve(env, data / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server)
        yield page
        browser.close()


def submit(page, model: str, **advanced):
    page.fill("#f-model", model)
    if advanced:
        page.click("details summary")
        for name, value in advanced.items():
            page.fill(f"#f-{name}", str(value))
    page.click("#new-job button[type=submit]")


def test_submit_watch_and_inspect_a_job(page, server):
    # A conv net with real (digits) weights whose job takes about a minute on any CPU: EfficientNet-Lite0's took
    # over ten on an AVX2-only EPYC, where static int8 ran 5x slower than fp32 and the job went through a full
    # leave-one-out profile. A 20-sample test split makes the report warn that its figure is coarse, and the page
    # must show that.
    submit(page, MODEL, calibration_samples=16, eval_samples=32, test_samples=20, hutchinson_samples=2)
    row = page.wait_for_selector('tr.job-row[data-status="succeeded"]', timeout=600_000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "jobs.png"), full_page=True)
    job_id = row.get_attribute("data-job")
    row.click()
    page.wait_for_selector("#layer-chart")
    page.wait_for_function("() => window.Chart && Chart.getChart('layer-chart') && Chart.getChart('search-chart')")
    report = httpx.get(f"{server}/v1/jobs/{job_id}/report").json()
    points = page.evaluate("() => Chart.getChart('search-chart').data.datasets[0].data.length")
    bars = page.evaluate("() => Chart.getChart('layer-chart').data.datasets.map(d => d.data.length)")
    savings = page.evaluate("() => Chart.getChart('layer-chart').data.datasets[2].data")
    layers = len(report["layers"])
    assert points == len(report["search"]["steps"]) >= 1
    # one mark per layer: Hessian part, inter-layer part, and the measured latency saving
    assert bars == [layers] * 3 and layers == 13
    assert savings == pytest.approx([layer["latency_saving_ms"] for layer in report["layers"]])
    assert page.locator("#layer-table tbody tr").count() == layers
    assert page.locator("#timeline div").count() == len(PHASES)
    onnx = report["exports"]["onnx"]
    if onnx.get("file"):  # the plan as deployed in onnxruntime, and its download
        assert f"{onnx['latency_reduction'] * 100:.1f}%" in page.inner_text("#onnx")
        with page.expect_download() as download:
            page.click("#download-onnx")
        assert Path(download.value.path()).stat().st_size == onnx["size_bytes"]
    else:
        assert (onnx["error"] or onnx["skipped"]) in page.inner_text("#onnx")
        assert page.locator("#download-onnx").count() == 0
    assert "Latency reduction" in page.inner_text("#summary")
    reduction = report["latency"]["reduction"]  # the timing's interval, or that nothing was timed
    assert (f"95% interval {reduction['low'] * 100:.1f}% to {reduction['high'] * 100:.1f}%" if reduction
            else "nothing timed") in page.inner_text("#latency-reduction")
    assert f"{report['cost']['total']['seconds']:.0f} s" in page.inner_text("#cost")  # what the job spent
    assert f"{report['final']['test_metric']:.4f}" in page.inner_text("#test-metric")
    assert f"{report['final']['k']}/{layers} layers" in page.inner_text("#size")  # layers, not layer@format items
    assert report["warnings"] and "test split has only 20 samples" in page.inner_text("#warnings")
    page.click('#layer-table th[data-key="rank"]')  # sortable: by rank, ascending
    first_rank = page.inner_text("#layer-table tbody tr:first-child td:nth-child(10)")
    assert page.locator('#layer-table th[data-key="latency_saving_ms"]').count() == 1
    assert first_rank == "0"
    page.screenshot(path=str(SHOTS / "job-detail.png"), full_page=True)
    with page.expect_download() as download:
        page.click("text=Download report")
    assert json.loads(Path(download.value.path()).read_text())["source"] == MODEL


def test_bad_budget_shows_the_api_message_next_to_the_field(page, server):
    page.goto(server)
    page.fill("#f-max_drop", "1.5")
    submit(page, "builtin:minilm")
    page.wait_for_function("() => document.getElementById('f-max_drop-error').textContent.length > 0")
    assert "less than 1" in page.inner_text("#f-max_drop-error")
    page.fill("#f-max_drop", "0.01")
    page.fill("#f-model", "hf:../../etc/passwd")
    page.click("#new-job button[type=submit]")
    page.wait_for_function("() => document.getElementById('f-model-error').textContent.length > 0")
    assert "invalid Hugging Face model ID" in page.inner_text("#f-model-error")


def test_cancel_from_the_detail_page(page, server):
    page.goto(server)
    page.fill("#f-max_drop", "0.01")
    submit(page, "builtin:minilm")
    # A locator, not an element handle: the list re-renders as it polls, and a locator finds the row again.
    page.locator('tr.job-row[data-status="queued"], tr.job-row[data-status="running"]').first.click()
    page.click("#cancel-job")
    page.wait_for_function("() => document.getElementById('job-status').textContent === 'cancelled'",
                           timeout=120_000)


def test_phone_width_has_no_horizontal_scroll(page, server):
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(server)
    page.wait_for_selector("tr.job-row")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 391
    page.screenshot(path=str(SHOTS / "jobs-phone.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})


def test_registry_page_lists_entries_with_history(page, server):
    entry = httpx.post(f"{server}/v1/registry", json={
        "model": "builtin:digits-resnet", "budget": {"max_drop": 0.01}, "schedule": {"cron": "0 3 * * *"},
        "calibration_samples": 32, "eval_samples": 64, "hutchinson_samples": 2}).json()
    httpx.post(f"{server}/v1/registry/{entry['id']}/run")
    deadline = time.time() + 300
    while httpx.get(f"{server}/v1/registry/{entry['id']}/history").json()["runs"][0]["job_status"] != "succeeded":
        assert time.time() < deadline
        time.sleep(1)
    page.goto(f"{server}/#/registry")
    row = page.wait_for_selector(f'tr[data-entry="{entry["id"]}"]')
    assert "cron 0 3 * * *" in row.inner_text() and "digits-resnet-v1" in row.inner_text()
    page.wait_for_function(f"() => Chart.getChart('spark-{entry['id']}')")
    assert page.evaluate(f"() => Chart.getChart('spark-{entry['id']}').data.datasets[0].data.length") == 1
    page.screenshot(path=str(SHOTS / "registry.png"), full_page=True)


def test_api_key_entered_once_unlocks_the_dashboard(page, tmp_path):
    """With authentication on, the page asks for a key, keeps it for the session, and shows the tenant's jobs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXQ_")}
    env["MIXQ_DATA_DIR"] = str(tmp_path)
    run = lambda *a: subprocess.run([sys.executable, "-m", "app.cli", *a], env=env, cwd=ROOT, check=True,  # noqa: E731
                                    capture_output=True, text=True).stdout.strip()
    run("db", "upgrade")
    key = run("keys", "create", "--tenant", "browser")
    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
                            "--port", str(port)], env=env, cwd=ROOT, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                httpx.get(f"{url}/healthz")
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        job = httpx.post(f"{url}/v1/jobs", json={"model": "builtin:minilm", "budget": {"max_drop": 0.01}},
                         headers={"Authorization": f"Bearer {key}"}).json()
        context = page.context.browser.new_context()  # a fresh browser session: no key stored yet
        fresh = context.new_page()
        fresh.goto(url)
        fresh.wait_for_selector("#banner:not([hidden])")
        assert "needs an API key" in fresh.inner_text("#banner")
        fresh.fill("#api-key", key)
        fresh.click("#key-form button")
        fresh.wait_for_selector(f'tr.job-row[data-job="{job["id"]}"]')
        assert fresh.is_hidden("#banner")
        fresh.reload()  # kept for the browser session
        fresh.wait_for_selector(f'tr.job-row[data-job="{job["id"]}"]')
        context.close()
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait(timeout=30)
