"""The compare page (tick jobs in the list, Compare, read their overlaid curves and the table
of differing parameters and final metrics) and the sweep page, in a real browser. The app
runs on a fake dispatcher (no Ray): jobs and their metric points are written to its store.

The sweep page reads GET /sweeps[/{id}] and its event stream from stubs (Playwright route
interception), checked against the sweeps API's models where they are importable: the sweep
is made up, its trials' jobs and curves are real."""

from __future__ import annotations

import json
import time

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
from tests.fakes import curve, finished_job, make_client

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
    trials = {
        name: finished_job(client, store, curve(steps, 10, slope), finish=end, name=name)
        for name, steps, slope, end in (
            ("trial-0", 60, 1.5, "succeeded"),
            ("trial-1", 60, 1.0, "succeeded"),
            ("trial-2", 20, 3.0, "cancelled"),  # pruned
            ("trial-3", 60, 0.5, "succeeded"),  # running, as the sweep first tells
        )
    }
    with on_a_thread(client.app) as url:
        yield url, ids | trials


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

SWEEP_ID = "sw-1"
AT = "2026-01-01T12:00:00Z"


def trial(number, job_id, state, lr, sizes, value, best_value, best_step, pruned=False):
    return {
        "number": number,
        "job_id": job_id,
        "state": state,
        "params": {"optimizer.lr": lr, "model.sizes": sizes},
        "pruned": pruned,
        "value": value,
        "best_value": best_value,
        "best_step": best_step,
        "step": best_step,
        "error": None,
    }


def sweep_answer(ids, live: bool) -> dict:
    """GET /sweeps/{id}: four trials, one pruned; `live`: trial 3 still running."""
    small, big = [2, 8, 2], [2, 16, 2]
    trials = [
        trial(0, ids["trial-0"], "succeeded", 0.3, small, 0.05, 0.05, 60),
        trial(1, ids["trial-1"], "succeeded", 0.03, big, 2 / 60, 2 / 60, 60),
        trial(2, ids["trial-2"], "cancelled", 0.9, small, None, 0.3, 20, pruned=True),
        trial(3, ids["trial-3"], "running", 0.01, big, None, 1 / 30, 30),
    ]
    counts = {"succeeded": 2, "pruned": 1, "running": 1}
    if not live:
        done = {"state": "succeeded", "value": 1 / 60, "best_value": 1 / 60, "best_step": 60}
        trials[3] |= done | {"step": 60}
        counts = {"succeeded": 3, "pruned": 1}
    best = min((t for t in trials if t["value"] is not None), key=lambda t: t["value"])
    spec = {
        "name": "moons-lr",
        "base": spec_of_the_fakes(),
        "parameters": {
            "optimizer.lr": {"type": "log_uniform", "low": 0.001, "high": 1.0},
            "model.sizes": {"values": [small, big]},
        },
        "trials": 4,
        "parallel": 2,
        "metric": "val_loss",
        "mode": "min",
        "sampler": {"type": "tpe", "seed": 0},
        "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
    }
    return {
        "id": SWEEP_ID,
        "name": "moons-lr",
        "status": "running" if live else "finished",
        "priority": 0,
        "metric": "val_loss",
        "mode": "min",
        "created_at": AT,
        "updated_at": AT,
        "finished_at": None if live else AT,
        "error": None,
        "counts": counts,
        "best": best,
        "spec": spec,
        "trials": trials,
    }


def spec_of_the_fakes() -> dict:
    from tests.fakes import spec

    return spec(name="moons-lr")


def checked(answer: dict, model: str) -> dict:
    """`answer`, validated by the sweeps API's model `model` once that API is in the tree."""
    try:
        from service import sweep_schemas
    except ImportError:  # the sweeps API is on its own branch until merged
        return answer
    getattr(sweep_schemas, model).model_validate(answer)
    return answer


def stub_sweeps(page, state: dict, held: list) -> None:
    """The sweeps API as `state["sweep"]` has it; its event stream's requests go to `held`."""

    def sweeps(route):
        summary = {k: v for k, v in state["sweep"].items() if k not in ("spec", "trials")}
        route.fulfill(json=checked({"items": [summary], "next_cursor": None}, "SweepPage"))

    page.route("**/api/v1/sweeps?*", sweeps)
    page.route(f"**/api/v1/sweeps/{SWEEP_ID}", lambda r: r.fulfill(json=state["sweep"]))
    page.route(f"**/api/v1/sweeps/{SWEEP_ID}/events*", lambda r: held.append(r))


def test_the_lists_fit_a_phone(browser, app, allowed_statuses):
    url, ids = app
    page, errors = open_page(browser, allowed_statuses, viewport=NARROW)
    stub_sweeps(page, {"sweep": sweep_answer(ids, live=True)}, held=[])
    for route in ("/#/", "/#/sweeps"):
        page.goto(url + route)
        expect(page.locator(".page-head h1")).to_be_visible()
        assert page.evaluate(WIDER_THAN_THE_WINDOW) == [], route
    page.close()
    assert not errors, errors


def test_the_sweep_page_ranks_plots_and_follows_the_trials(page, app, shots):
    url, ids = app
    state = {"sweep": checked(sweep_answer(ids, live=True), "Sweep")}
    held = []  # the event stream's request, answered when the test says
    stub_sweeps(page, state, held)

    page.goto(url + "/#/sweeps")
    page.locator("#sweeps a", has_text="moons-lr").click()
    expect(page.locator(".job-title h1")).to_contain_text("moons-lr")
    rows = page.locator("#trials tbody tr")
    expect(rows).to_have_count(4)
    # by val loss, lowest first; trials without a result last
    assert numbers(page) == ["1", "0", "2", "3"]
    page.locator('button[data-sort="best val loss"]').click()
    expect(rows.first).to_have_attribute("data-number", "1")
    assert numbers(page) == ["1", "3", "0", "2"]
    page.locator('button[data-sort="best val loss"]').click()  # again: highest first
    expect(rows.first).to_have_attribute("data-number", "2")
    expect(page.locator('tr[data-number="2"]')).to_have_attribute("data-state", "pruned")
    expect(page.locator("#best-trial h2")).to_have_text("Best trial: #1")
    expect(page.locator("#best-job")).to_have_attribute("href", f"#/jobs/{ids['trial-1']}")

    expect(page.locator("#sweep-scatters .param-plot")).to_have_count(2)
    scatter = page.locator('.param-plot[data-param="optimizer.lr"] .js-plotly-plot')
    expect(scatter.locator(".scatterlayer .point")).to_have_count(4)
    assert scatter.evaluate("div => div.layout.xaxis.type") == "log"
    curves = page.locator("#sweep-curves")
    expect(curves.locator(".scatterlayer .trace")).to_have_count(4)
    dotted = curves.evaluate("div => div.data.filter(t => t.line.dash === 'dot').map(t => t.name)")
    assert dotted == ["#2"]  # the pruned trial

    deadline = time.monotonic() + 20  # the page opens the stream once the sweep is shown
    while not held:
        assert time.monotonic() < deadline, "the sweep page did not open its event stream"
        page.wait_for_timeout(50)
    state["sweep"] = checked(sweep_answer(ids, live=False), "Sweep")
    events = [("sweep", state["sweep"]), ("end", {"sweep_id": SWEEP_ID, "status": "finished"})]
    body = "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events)
    held[0].fulfill(body=body, headers={"Content-Type": "text/event-stream"})
    expect(page.locator("#best-trial h2")).to_have_text("Best trial: #3")
    expect(page.locator('tr[data-number="3"]')).to_have_attribute("data-state", "succeeded")
    expect(page.locator(".job-title h1 .badge")).to_have_text("finished")
    expect(page.locator("#sweep-cancel")).to_have_count(0)
    page.locator('button[data-sort="val loss"]').click()
    expect(rows.first).to_have_attribute("data-number", "3")
    best_first = ",".join(ids[f"trial-{n}"] for n in (3, 1, 0, 2))
    expect(page.locator("#compare-top")).to_have_attribute("href", f"#/compare?ids={best_first}")
    page.evaluate("window.scrollTo(0, 0)")  # the sticky header at the top of the shot
    screenshot(page, shots, "dashboard-sweep")


def numbers(page) -> list[str]:
    return page.locator("#trials tbody tr").evaluate_all("rs => rs.map(r => r.dataset.number)")
