"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, against real
`shardgrad serve` processes (embedded Ray, 2 CPUs). No browser is ever downloaded."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests import dashboard
from tests.dashboard import (
    LONG,
    NARROW,
    TOKEN,
    WIDER_THAN_THE_WINDOW,
    badge,
    expect,
    open_page,
    screenshot,
)
from tests.fakes import spec
from tests.helpers import wait_job

pytestmark = pytest.mark.slow

# The dashboard tests' fixtures (tests/dashboard.py), for this module's own server and browser.
browser = dashboard.browser
server = dashboard.server
locked = dashboard.locked
api = dashboard.api
shots = dashboard.shots
allowed_statuses = dashboard.allowed_statuses
page = dashboard.page


@pytest.fixture(scope="module")
def trained(api) -> str:
    """A short job, submitted once: the chart and predict tests watch it."""
    r = api.post("/jobs", json=spec(name="trained", epochs=8))
    assert r.status_code == 201, r.text
    return r.json()["id"]


# -- the jobs list ------------------------------------------------------------------------


def test_a_submitted_job_appears_and_succeeds_without_a_reload(page, server, api, shots, trained):
    # (`trained` only starts the job the chart and predict tests watch, to save their time)
    page.goto(server.url + "/")
    expect(page.locator("#live")).to_have_attribute("data-state", "open")
    page.evaluate("window.notReloaded = true")
    job_id = api.post("/jobs", json=spec(name="live-list", epochs=4)).json()["id"]
    row = page.locator(f'.job-row[data-id="{job_id}"]')
    expect(row).to_be_visible()
    expect(row).to_have_attribute("data-status", "succeeded", timeout=120_000)
    expect(row).to_contain_text("32 / 32 steps")
    job = api.get(f"/jobs/{job_id}").json()
    expect(row.locator(".c-num .v").first).not_to_have_text("–")  # the latest train loss
    assert job["status"] == "succeeded"
    assert page.evaluate("window.notReloaded") is True
    page.goto(server.url + "/#/?status=succeeded")
    expect(page.locator(f'.job-row[data-id="{job_id}"]')).to_be_visible()
    assert not page.locator('.job-row:not([data-status="succeeded"])').count()
    page.goto(server.url + "/#/")
    expect(row).to_be_visible()
    screenshot(page, shots, "dashboard-jobs")


def test_the_list_pages_with_cursors(page, server, api):
    for i in range(5):  # cancelled at once: listed, but never holding the CPUs
        job_id = api.post("/jobs", json=spec(name=f"page-{i}", **LONG)).json()["id"]
        api.post(f"/jobs/{job_id}/cancel").raise_for_status()
    pages = []
    cursor = None
    while len(pages) < 3:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        body = api.get("/jobs", params=params).json()
        pages.append([j["id"] for j in body["items"]])
        cursor = body["next_cursor"]
    page.goto(server.url + "/#/?limit=2")
    for n, ids in enumerate(pages):
        expect(page.locator(".pager")).to_contain_text(f"jobs {2 * n + 1}–{2 * n + 2}")
        shown = page.locator(".job-row").evaluate_all("rows => rows.map(r => r.dataset.id)")
        assert shown == ids
        if n < len(pages) - 1:
            page.click("text=Older →")
    page.click("text=← Newest")
    expect(page.locator(".job-row").first).to_have_attribute("data-id", pages[0][0])


# -- the job page -------------------------------------------------------------------------


def test_loss_chart_holds_every_metric_point(page, server, api, trained, shots):
    page.goto(f"{server.url}/#/jobs/{trained}")
    expect(badge(page)).to_have_text("succeeded", timeout=120_000)
    points = api.get(f"/jobs/{trained}/metrics").json()["points"]
    assert len(points) == 64  # 160 rows / 20 a batch, 8 epochs
    chart = page.locator("#loss-chart")
    page.wait_for_function(
        "n => document.getElementById('loss-chart').data?.[0]?.x.length === n",
        arg=len(points),
        timeout=60_000,  # the whole curve, over the event stream, on a loaded machine
    )
    box = chart.bounding_box()
    assert box["width"] > 200 and box["height"] > 200
    data = chart.evaluate("div => div.data.map(t => ({x: t.x, y: t.y}))")
    assert data[0]["x"] == [p["step"] for p in points]
    assert data[0]["y"] == pytest.approx([p["train_loss"] for p in points])
    val = [p for p in points if p["val_loss"] is not None]
    assert data[1]["x"] == [p["step"] for p in val] and len(val) == 8
    acc = page.locator("#acc-chart").evaluate("div => div.data[0].y")
    assert acc == pytest.approx([p["val_accuracy"] for p in val])
    # The checkpoints table and the timeline come from the same job.
    names = [c["name"] for c in api.get(f"/jobs/{trained}/checkpoints").json()]
    expect(page.locator("#checkpoints tbody tr").first).to_contain_text(names[-1])
    link = page.locator("#checkpoints a").first
    assert link.get_attribute("href").endswith(f"/checkpoints/{names[-1]}/model.safetensors")
    expect(page.locator(".timeline li")).to_have_count(3)  # queued, running, succeeded
    screenshot(page, shots, "dashboard-job")


def test_the_loss_chart_draws_each_steps_learning_rate(page, server, api):
    schedule = {"type": "cosine", "warmup_steps": 10}
    optimizer = {"type": "adamw", "lr": 0.05, "schedule": schedule}
    job_id = api.post("/jobs", json=spec(name="cosine", epochs=4, optimizer=optimizer)).json()["id"]
    page.goto(f"{server.url}/#/jobs/{job_id}")
    expect(badge(page)).to_have_text("succeeded", timeout=120_000)
    points = api.get(f"/jobs/{job_id}/metrics").json()["points"]
    assert len(points) == 32 and points[0]["lr"] == pytest.approx(0.005)
    assert points[10]["lr"] == 0.05  # warmed up, the cosine starts
    page.wait_for_function(
        "n => document.getElementById('loss-chart').data?.[2]?.x.length === n",
        arg=len(points),
        timeout=60_000,  # the whole curve, over the event stream, on a loaded machine
    )
    lr = page.locator("#loss-chart").evaluate("div => div.data[2]")
    assert (lr["name"], lr["yaxis"]) == ("learning rate", "y2")
    assert lr["y"] == pytest.approx([p["lr"] for p in points], rel=1e-12)


def test_the_job_page_shows_the_worker_count_auto_chose_and_why(page, server, api):
    r = api.post("/jobs", json=spec(name="auto", epochs=1, workers="auto"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    page.goto(f"{server.url}/#/jobs/{job_id}")
    expect(badge(page)).to_have_text("succeeded", timeout=120_000)
    job = api.get(f"/jobs/{job_id}").json()
    assert job["workers_reason"].startswith("chose ")
    n = job["workers"]
    count = "in-process" if n == 0 else f"{n} worker{'' if n == 1 else 's'}"
    expect(page.locator("#workers-reason")).to_have_text(job["workers_reason"])
    expect(page.locator(".tile", has_text="Workers").locator(".v")).to_have_text(count)


def test_predict_box_returns_the_apis_outputs(page, server, api, trained):
    wait_job(api, trained, lambda j: j["status"] == "succeeded")
    page.goto(f"{server.url}/#/jobs/{trained}")
    page.fill("#predict-input", "0.3, -0.2\n1.0 0.5")
    page.click("#predict-run")
    table = page.locator("#predict-output table")
    expect(table).to_be_visible()
    shown = json.loads(table.get_attribute("data-outputs"))
    inputs = [[0.3, -0.2], [1.0, 0.5]]
    expected = api.post(f"/jobs/{trained}/predict", json={"inputs": inputs}).json()["outputs"]
    assert shown == expected
    expect(table.locator("tbody tr")).to_have_count(2)
    expect(table.locator("tbody tr").first).to_contain_text("class ")
    page.fill("#predict-input", "0.3")
    page.click("#predict-run")
    expect(page.locator("#predict-output .form-error")).to_contain_text("takes 2")


def test_template_from_a_jobs_weights_submits_a_warm_start(page, server, api, trained):
    wait_job(api, trained, lambda j: j["status"] == "succeeded")
    page.goto(f"{server.url}/#/jobs/{trained}")
    page.click("#warm-start")
    editor = page.locator("#spec-editor")
    expect(editor).to_have_value(re.compile("init_from"))
    draft = json.loads(editor.input_value())
    assert draft["init_from"] == {"job": trained}
    editor.fill(json.dumps(draft | {"name": "warm", "epochs": 1}, indent=2))
    page.click("#submit-job")
    page.wait_for_url(re.compile(r"#/jobs/\w+$"))
    warm = api.get(f"/jobs/{page.url.rsplit('/', 1)[1]}").json()
    source = api.get(f"/jobs/{trained}/checkpoints").json()[-1]  # no best kept: the newest
    expected = {"job": trained, "checkpoint": source["name"], "sha256": source["sha256"]}
    assert warm["spec"]["init_from"] == expected | {"load_optimizer": False, "path": None}
    ended = wait_job(api, warm["id"], lambda j: j["status"] in ("succeeded", "failed"))
    assert ended["status"] == "succeeded", ended["error"]


def test_cancel_button_cancels_a_running_job(page, server, api):
    job_id = api.post("/jobs", json=spec(name="to-cancel", **LONG)).json()["id"]
    page.goto(f"{server.url}/#/jobs/{job_id}")
    expect(badge(page)).to_have_text("running", timeout=60_000)
    page.click("#cancel")
    expect(badge(page)).to_have_text("cancelled", timeout=60_000)
    assert api.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    page.click("#resume")  # queued again, and the page follows it live
    expect(badge(page)).to_have_text(re.compile("queued|running"))
    expect(page.locator(".timeline li").last).to_contain_text(re.compile("queued|running"))
    api.post(f"/jobs/{job_id}/cancel").raise_for_status()
    expect(badge(page)).to_have_text("cancelled", timeout=60_000)


# -- submit -------------------------------------------------------------------------------


def test_submit_shows_422_next_to_the_field_then_opens_the_job(
    page, server, api, allowed_statuses, shots
):
    allowed_statuses.add(422)
    page.goto(server.url + "/#/submit")
    expect(page.locator('button.template[data-name="moons"]')).to_be_visible()
    editor = page.locator("#spec-editor")
    assert json.loads(editor.input_value())["name"] == "moons"  # the default template

    editor.fill('{"name": "x",')
    expect(page.locator("#json-status")).to_have_class(re.compile(r"\bbad\b"))
    expect(page.locator("#submit-job")).to_be_disabled()

    bad = spec(name="from-the-form", optimizer={"type": "sgd", "lr": -1})
    editor.fill(json.dumps(bad, indent=2))
    expect(page.locator("#json-status")).to_have_class(re.compile(r"\bok\b"))
    page.click("#submit-job")
    errors = page.locator("#submit-errors li")
    expect(errors).to_have_count(1)
    expect(errors).to_have_text("optimizer.lr — Input should be greater than 0")
    screenshot(page, shots, "dashboard-submit-422")
    errors.locator("button").click()  # selects the field in the editor
    selected = editor.evaluate("t => t.value.slice(t.selectionStart, t.selectionEnd)")
    assert selected.startswith('"lr": -1')

    good = spec(name="from-the-form", epochs=1)
    editor.fill(json.dumps(good, indent=2))
    page.click("#submit-job")
    page.wait_for_url(re.compile(r"#/jobs/\w+$"))
    job_id = page.url.rsplit("/", 1)[1]
    expect(page.locator(".job-title h1")).to_contain_text("from-the-form")
    assert api.get(f"/jobs/{job_id}").json()["name"] == "from-the-form"


# -- every page, narrow windows, the token --------------------------------------------------


def test_every_page_renders_without_javascript_errors(page, server, api, allowed_statuses):
    allowed_statuses.add(404)
    job_id = api.get("/jobs", params={"limit": 1}).json()["items"][0]["id"]
    visits = {
        "#/": ".job-row",
        "#/?status=failed": ".empty",
        "#/submit": "button.template",
        "#/cluster": ".tiles",
        f"#/jobs/{job_id}": "#loss-chart .main-svg",
        "#/jobs/doesnotexist": ".empty",
        "#/no-such-page": ".empty",
    }
    for route, selector in visits.items():
        page.goto(f"{server.url}/{route}")
        expect(page.locator(selector).first).to_be_visible()
    page.goto(server.url + "/#/cluster")
    expect(page.locator(".tiles")).to_contain_text("/ 2")  # CPUs in use / total
    expect(page.locator("table").first).to_contain_text("alive")


def test_a_narrow_window_fits_without_sideways_scrolling(browser, server, api, trained, shots):
    wait_job(api, trained, lambda j: j["status"] == "succeeded")
    page, errors = open_page(browser, set(), NARROW)
    try:
        for route, selector, name in (
            ("#/", ".job-row", "narrow-jobs"),
            (f"#/jobs/{trained}", "#loss-chart .main-svg", "narrow-job"),
            ("#/submit", "button.template", "narrow-submit"),
        ):
            page.goto(f"{server.url}/{route}")
            expect(page.locator(selector).first).to_be_visible()
            page.wait_for_timeout(300)  # let plotly settle on its width
            wide = page.evaluate(WIDER_THAN_THE_WINDOW)
            assert not wide, f"{route} is wider than the window: {wide}"
            screenshot(page, shots, name)
    finally:
        page.close()
    assert not errors, errors


def test_the_page_asks_for_the_token_once(browser, locked):
    page, errors = open_page(browser, {401})
    try:
        # `/` and its static files need no token; the API does.
        assert httpx.get(locked + "/").status_code == 200
        assert httpx.get(locked + "/static/js/app.js").status_code == 200
        assert httpx.get(locked + "/api/v1/jobs").status_code == 401
        page.goto(locked + "/")
        dialog = page.locator("#token-dialog")
        expect(dialog).to_be_visible()
        page.fill("#token-input", "wrong")
        page.click("#token-dialog button[type=submit]")
        expect(page.locator("#token-error")).to_be_visible()
        page.fill("#token-input", TOKEN)
        page.click("#token-dialog button[type=submit]")
        expect(dialog).to_be_hidden()
        expect(page.locator(".empty-title")).to_have_text("No jobs yet — submit one")
        expect(page.locator("#live")).to_have_attribute("data-state", "open")  # ?token= works
        page.reload()
        expect(page.locator(".cluster-strip")).to_contain_text("dispatcher paused")
        expect(dialog).to_be_hidden()
        assert page.evaluate("sessionStorage.getItem('shardgrad.token')") == TOKEN
    finally:
        page.close()
    assert not errors, errors
