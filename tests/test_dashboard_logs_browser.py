"""The job page's Logs card and a failed job's traceback, in a real browser (see
tests/dashboard.py). Its own server: the failed job here must not show in the other browser
module's lists."""

from __future__ import annotations

import pytest

from tests import dashboard
from tests.dashboard import badge, expect, screenshot
from tests.fakes import spec
from tests.helpers import OVERFLOWING

pytestmark = pytest.mark.slow

browser = dashboard.browser
server = dashboard.server
api = dashboard.api
shots = dashboard.shots
allowed_statuses = dashboard.allowed_statuses
page = dashboard.page


def test_the_logs_card_searches_and_a_failed_job_shows_its_traceback(page, server, api, shots):
    trained = api.post("/jobs", json=spec(name="logged", workers=0, epochs=2)).json()["id"]
    page.goto(f"{server.url}/#/jobs/{trained}")
    expect(badge(page)).to_have_text("succeeded", timeout=120_000)
    log = page.locator("#log-lines")
    expect(log).to_contain_text("INFO workers.trainer: succeeded at step 16")
    lines = api.get(f"/jobs/{trained}/logs").text.splitlines()
    expect(page.locator("#log-count")).to_have_text(f"{len(lines)} lines")
    page.fill("#log-search", "TRAINING FROM STEP")
    expect(page.locator("#log-count")).to_have_text(f"1 of {len(lines)} lines")
    expect(log).to_have_text(next(line for line in lines if "training from step" in line))
    assert not page.locator("#traceback pre").count()
    page.fill("#log-search", "")
    # Auto-scroll: at the end while on; scrolling up turns it off, back to the end on again.
    page.add_style_tag(content="#log-lines { max-height: 3em; }")  # a few lines overflow it
    follow = page.locator("#log-follow")
    page.uncheck("#log-follow")
    page.check("#log-follow")
    expect(follow).to_be_checked()
    assert log.evaluate("e => e.scrollHeight - e.scrollTop - e.clientHeight < 2")
    log.evaluate("e => { e.scrollTop = 0; }")
    expect(follow).not_to_be_checked()
    log.evaluate("e => { e.scrollTop = e.scrollHeight; }")
    expect(follow).to_be_checked()

    body = spec(name="overflows", workers=0, **OVERFLOWING)
    failed = api.post("/jobs", json=body).json()["id"]
    page.goto(f"{server.url}/#/jobs/{failed}")
    expect(badge(page)).to_have_text("failed", timeout=120_000)
    traceback = page.locator("#traceback pre")
    expect(traceback).to_contain_text("Traceback (most recent call last)")
    expect(traceback).to_contain_text("Diverged: diverged at step 1 (parameters not finite)")
    expect(page.locator("#log-lines")).to_contain_text("ERROR workers.trainer: failed at step 1")
    screenshot(page, shots, "dashboard-logs")
