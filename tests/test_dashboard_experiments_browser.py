"""The compare page (tick jobs in the list, Compare, read their overlaid curves and the table
of differing parameters and final metrics) and the sweep page, in a real browser.

The compare page's app runs on a fake dispatcher (no Ray): jobs and their metric points are
written to its store. The sweep page's app runs a real sweep (POST /sweeps) on the real
dispatcher and Sweeps, its trials on the fake Trainer of tests/test_sweeps.py."""

from __future__ import annotations

import math
import threading

import pytest

from tests import dashboard
from tests.dashboard import (
    NARROW,
    WIDER_THAN_THE_WINDOW,
    expect,
    on_a_thread,
    open_page,
    screenshot,
)
from tests.fakes import API, SweepService, curve, finished_job, make_client, spec, sweep_train
from tests.helpers import wait_for

pytestmark = pytest.mark.slow

browser = dashboard.browser
shots = dashboard.shots
allowed_statuses = dashboard.allowed_statuses


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app on a file store, with three finished jobs (by name) that differ in lr."""
    tmp = tmp_path_factory.mktemp("compare")
    client, store, _ = make_client(tmp, store_url=f"sqlite:///{tmp / 'jobs.db'}")
    ids = {
        name: finished_job(
            client,
            store,
            curve(60, 10, slope),
            name=name,
            optimizer={"type": "sgd", "lr": lr},
            tags={"group": "lr"},
        )
        for name, lr, slope in (("lr-0.1", 0.1, 1.0), ("lr-0.5", 0.5, 2.0), ("lr-1", 1.0, 3.0))
    }
    with on_a_thread(client.app) as url:
        yield url, ids


@pytest.fixture
def page(browser, allowed_statuses):
    page, errors = open_page(browser, allowed_statuses)
    yield page
    page.close()
    assert not errors, errors


def plotted(page, chart: str) -> list[str]:
    return page.locator(f"#{chart}").evaluate("div => div.data.map(t => t.name)")


def test_tick_jobs_compare_their_curves_and_parameters(page, app, shots):
    url, ids = app
    page.goto(url + "/#/?tag=group:lr")
    expect(page.locator(".job-row")).to_have_count(3)
    expect(page.locator(".compare-bar")).to_be_hidden()
    for name in ("lr-0.1", "lr-0.5"):
        page.locator(f'input.pick[data-id="{ids[name]}"]').check()
    expect(page.locator("#picked-count")).to_have_text("2 selected")
    assert page.url.endswith("/#/?tag=group:lr")  # ticking a box does not open the job
    page.locator(f'input.pick[data-id="{ids["lr-1"]}"]').check()
    page.locator(f'input.pick[data-id="{ids["lr-1"]}"]').uncheck()
    page.click("#compare")

    expect(page.locator(".page-head h1")).to_have_text("Compare 2 jobs")
    assert f"ids={ids['lr-0.1']},{ids['lr-0.5']}" in page.url
    table = page.locator("#compare-table")
    expect(table.locator("thead th[data-id]")).to_have_count(2)
    expect(table.locator('tr[data-param="optimizer.lr"] td')).to_have_text(["0.1", "0.5"])
    expect(table.locator("tr[data-param]")).to_have_count(1)  # only lr differs (and names)
    best = table.locator('tr[data-metric="val_loss"] td.best')
    expect(best).to_have_count(1)  # the lower final val loss: lr-0.1's (slope 1)
    expect(table.locator('tr[data-metric="val_loss"] td').first).to_have_class("num best")
    expect(page.locator("#compare-loss .scatterlayer .trace")).to_have_count(4)
    assert plotted(page, "compare-loss") == [
        "lr-0.1 · train",
        "lr-0.1 · val",
        "lr-0.5 · train",
        "lr-0.5 · val",
    ]
    expect(page.locator("#compare-acc .scatterlayer .trace")).to_have_count(2)
    screenshot(page, shots, "dashboard-compare")

    page.goto(url + "/#/?tag=group:lr")  # the ticks stay for this tab until cleared
    expect(page.locator("input.pick:checked")).to_have_count(2)
    page.click("#picked-clear")
    expect(page.locator("input.pick:checked")).to_have_count(0)
    expect(page.locator(".compare-bar")).to_be_hidden()


# -- the sweep page ------------------------------------------------------------------------


def val_loss(lr: float, step: int) -> float:
    """1.0 throughout below lr 0.01 (a clearly bad trial: pruned at its first evaluation once
    a trial has finished), else 1/step, higher the farther lr is above 0.01."""
    return 1.0 if lr < 0.01 else (1 + math.log10(lr / 0.01)) / step


SWEEP = {
    "name": "moons-lr",
    "base": spec(name="moons-lr", workers=0, eval_every=2),
    "parameters": {
        "optimizer.lr": {"type": "log_uniform", "low": 0.001, "high": 1.0},
        "model.sizes": {"values": [[2, 8, 2], [2, 16, 2]]},
    },
    "trials": 4,
    "parallel": 2,
    "metric": "val_loss",
    "mode": "min",
    # Seed 3 asks lr 0.045 and 0.034 first, then 0.0024 (bad: pruned, as a trial has
    # finished before it is asked), then 0.021 (the best: better than the median, not pruned).
    "sampler": {"type": "random", "seed": 3},
    "pruner": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real sweep on the real dispatcher: its first two trials wait before their last step
    until the test sets `go`."""
    go = threading.Event()
    svc = SweepService(
        tmp_path_factory.mktemp("sweep"), sweep_train(go, val_loss), max_concurrent_jobs=2
    )
    try:
        r = svc.client.post(f"{API}/sweeps", json=SWEEP)
        assert r.status_code == 201, r.text
        with on_a_thread(svc.client.app) as url:
            yield url, r.json()["id"], svc, go
    finally:
        go.set()
        svc.dispatcher.shutdown()


def test_the_lists_fit_a_phone(browser, sweep, allowed_statuses):
    url = sweep[0]
    page, errors = open_page(browser, allowed_statuses, viewport=NARROW)
    for route in ("/#/", "/#/sweeps"):
        page.goto(url + route)
        expect(page.locator(".page-head h1")).to_be_visible()
        expect(page.locator("#sweeps tr[data-id], .job-row").first).to_be_visible()
        assert page.evaluate(WIDER_THAN_THE_WINDOW) == [], route
    page.close()
    assert not errors, errors


def test_the_sweep_page_follows_a_real_sweep_ranks_and_plots_its_trials(page, sweep, shots):
    url, sweep_id, svc, go = sweep
    # Trials 0 and 1 evaluated at steps 2 and 4; they wait before their last step (6).
    wait_for(lambda: [t["step"] for t in svc.sweep(sweep_id)["trials"]] == [4, 4], 120)
    page.goto(url + "/#/sweeps")
    page.locator("#sweeps a", has_text="moons-lr").click()
    title = page.locator(".job-title h1")
    expect(title).to_contain_text("moons-lr")
    rows = page.locator("#trials tbody tr")

    # Live: two trials at once, both waiting for `go`; nothing finished yet.
    expect(rows).to_have_count(2)
    expect(page.locator('#trials tr[data-state="running"]')).to_have_count(2)
    expect(title.locator(".badge")).to_have_text("running")
    expect(page.locator("#best-trial")).to_contain_text("None finished yet.")
    curves = page.locator("#sweep-curves")
    expect(curves.locator(".scatterlayer .trace")).to_have_count(2)  # their curves so far
    scatter = page.locator('.param-plot[data-param="optimizer.lr"] .js-plotly-plot')
    expect(scatter.locator(".scatterlayer .point")).to_have_count(2)  # their best so far
    go.set()
    # ... the page follows the sweep's event stream to its end, without a reload.
    expect(title.locator(".badge")).to_have_text("finished")
    expect(rows).to_have_count(4)
    expect(page.locator("#sweep-cancel")).to_have_count(0)

    done = svc.sweep(sweep_id)  # what the API says the page shows
    trials = {t["number"]: t for t in done["trials"]}
    pruned = [n for n, t in trials.items() if t["pruned"]]
    assert pruned == [2], done["trials"]
    assert done["best"]["number"] == 3  # lr 0.021
    expect(page.locator("#best-trial h2")).to_have_text("Best trial: #3")
    expect(page.locator("#best-job")).to_have_attribute("href", f"#/jobs/{trials[3]['job_id']}")
    expect(page.locator('tr[data-number="2"]')).to_have_attribute("data-state", "pruned")
    expect(page.locator('tr[data-number="2"] .badge')).to_have_text("pruned")

    # by val loss, lowest first; the pruned trial (no result) last
    by_value = sorted((t for t in trials.values() if t["value"] is not None), key=score)
    assert [t["number"] for t in by_value] == [3, 1, 0]
    assert numbers(page) == ["3", "1", "0", "2"]
    page.locator('button[data-sort="best val loss"]').click()
    expect(page.locator('button[data-sort="best val loss"]')).to_have_text("best val loss ↑")
    assert numbers(page) == ["3", "1", "0", "2"]  # the pruned trial's best: 1.0
    page.locator('button[data-sort="best val loss"]').click()  # again: highest first
    expect(rows.first).to_have_attribute("data-number", "2")
    assert numbers(page) == ["2", "0", "1", "3"]
    page.locator('button[data-sort="#"]').click()
    expect(rows.first).to_have_attribute("data-number", "0")
    assert numbers(page) == ["0", "1", "2", "3"]
    page.locator('button[data-sort="val loss"]').click()  # ranked again, for the shot
    expect(rows.first).to_have_attribute("data-number", "3")

    expect(page.locator("#sweep-scatters .param-plot")).to_have_count(2)
    expect(scatter.locator(".scatterlayer .point")).to_have_count(4)
    assert scatter.evaluate("div => div.layout.xaxis.type") == "log"
    sizes = page.locator('.param-plot[data-param="model.sizes"] .js-plotly-plot')
    expect(sizes.locator(".scatterlayer .point")).to_have_count(4)
    expect(curves.locator(".scatterlayer .trace")).to_have_count(4)
    # The curves are redrawn a moment after the end: until then trial 2 may not be marked.
    page.wait_for_function(
        """() => document.querySelector("#sweep-curves").data
            .filter((t) => t.line.dash === "dot").map((t) => t.name).join() === "#2" """
    )

    best_first = [t["job_id"] for t in sorted(trials.values(), key=score)]
    link = page.locator("#compare-top")
    expect(link).to_have_text("Compare the best 4")
    expect(link).to_have_attribute("href", f"#/compare?ids={','.join(best_first)}")
    page.evaluate("window.scrollTo(0, 0)")  # the sticky header at the top of the shot
    screenshot(page, shots, "dashboard-sweep")

    link.click()
    expect(page.locator(".page-head h1")).to_have_text("Compare 4 jobs")
    expect(page.locator("#compare-table thead th[data-id]")).to_have_count(4)
    expect(page.locator("#compare-loss .scatterlayer .trace")).to_have_count(8)


def score(trial: dict) -> float:
    """What the page ranks a trial by: its result, else the best it reported."""
    return trial["value"] if trial["value"] is not None else trial["best_value"]


def numbers(page) -> list[str]:
    return page.locator("#trials tbody tr").evaluate_all("rs => rs.map(r => r.dataset.number)")
