"""The compare page: tick jobs in the list, Compare, and read their overlaid curves and the
table of differing parameters and final metrics, in a real browser. The app runs on a fake
dispatcher (no Ray): the jobs and their metric points are written to its store."""

from __future__ import annotations

import pytest

from tests import dashboard
from tests.dashboard import expect, open_page, screenshot, served
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
            client, store, curve(60, 10, slope), name=name, optimizer={"type": "sgd", "lr": lr}
        )
        for name, lr, slope in (("lr-0.1", 0.1, 1.0), ("lr-0.5", 0.5, 2.0), ("lr-1", 1.0, 3.0))
    }
    with served(client.app) as url:
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
    page.goto(url + "/#/")
    expect(page.locator(".job-row")).to_have_count(3)
    expect(page.locator(".compare-bar")).to_be_hidden()
    for name in ("lr-0.1", "lr-0.5"):
        page.locator(f'input.pick[data-id="{ids[name]}"]').check()
    expect(page.locator("#picked-count")).to_have_text("2 selected")
    assert page.url.endswith("/#/")  # ticking a row's box does not open the job
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

    page.goto(url + "/#/")  # the ticks stay for this tab until cleared
    expect(page.locator("input.pick:checked")).to_have_count(2)
    page.click("#picked-clear")
    expect(page.locator("input.pick:checked")).to_have_count(0)
    expect(page.locator(".compare-bar")).to_be_hidden()
