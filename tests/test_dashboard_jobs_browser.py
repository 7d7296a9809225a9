"""The jobs list's search, tag filters and sortable columns, and deleting a job with its
confirmation, in a real browser against a real `shardgrad serve` (tests/dashboard.py)."""

from __future__ import annotations

import pytest

from tests import dashboard
from tests.dashboard import LONG, badge, expect, screenshot
from tests.fakes import spec
from tests.helpers import wait_job

pytestmark = pytest.mark.slow

browser = dashboard.browser
server = dashboard.server
api = dashboard.api
shots = dashboard.shots
allowed_statuses = dashboard.allowed_statuses
page = dashboard.page


@pytest.fixture(scope="module")
def cancelled(api) -> dict[str, str]:
    """Three finished jobs (cancelled before they could do much), by name, with tags."""
    ids = {}
    for name, team in (("zeta-run", "a"), ("alpha-run", "a"), ("mid-other", "b")):
        body = spec(name=name, **LONG) | {"tags": {"team": team}}
        ids[name] = job_id = api.post("/jobs", json=body).json()["id"]
        api.post(f"/jobs/{job_id}/cancel").raise_for_status()
    for job_id in ids.values():
        wait_job(api, job_id, lambda job: job["status"] == "cancelled")
    return ids


def shown(page) -> list[str]:
    return page.locator(".job-row").evaluate_all("rows => rows.map(r => r.dataset.id)")


def test_search_by_tag_and_name_and_sort_by_a_column(page, server, cancelled, shots):
    page.goto(server.url + "/#/?tag=team:a")
    expect(page.locator(".job-row")).to_have_count(2)
    expect(page.locator(".job-row .tag").first).to_have_text("team:a")
    page.locator(".job-head a.sort", has_text="Job").click()  # by name, A to Z
    expect(page.locator(".job-row").first).to_have_attribute("data-id", cancelled["alpha-run"])
    assert shown(page) == [cancelled["alpha-run"], cancelled["zeta-run"]]
    assert "sort=name" in page.url and "tag=team%3Aa" in page.url
    page.locator(".job-head a.sort", has_text="Job").click()  # again: Z to A
    expect(page.locator(".job-row").first).to_have_attribute("data-id", cancelled["zeta-run"])

    page.fill("#name-filter", "ALPHA")
    page.press("#name-filter", "Enter")
    expect(page.locator(".job-row")).to_have_count(1)
    screenshot(page, shots, "dashboard-jobs-search")
    page.click("a.tag-chip")  # remove the tag filter: the name filter stays
    expect(page.locator(".job-row")).to_have_count(1)
    page.fill("#name-filter", "")
    page.fill("#tag-filter", "team:b")
    page.press("#tag-filter", "Enter")
    expect(page.locator(".job-row")).to_have_count(1)
    expect(page.locator(".job-row").first).to_have_attribute("data-id", cancelled["mid-other"])
    page.select_option("#sort", "-val_accuracy")
    expect(page.locator("#sort")).to_have_value("-val_accuracy")
    assert "sort=-val_accuracy" in page.url


def test_delete_asks_first_and_then_removes_the_job(page, server, api, cancelled, shots):
    job_id = cancelled["mid-other"]
    page.goto(f"{server.url}/#/jobs/{job_id}")
    expect(badge(page)).to_have_text("cancelled")
    page.click("#delete")
    expect(page.locator("#delete-dialog")).to_be_visible()
    screenshot(page, shots, "dashboard-delete")
    page.click("#delete-keep")
    expect(page.locator("#delete-dialog")).to_have_count(0)
    assert api.get(f"/jobs/{job_id}").status_code == 200

    page.click("#delete")
    page.click("#delete-confirm")
    expect(page.locator(".page-head h1")).to_have_text("Jobs")
    assert api.get(f"/jobs/{job_id}").status_code == 404
    expect(page.locator(f'.job-row[data-id="{job_id}"]')).to_have_count(0)
