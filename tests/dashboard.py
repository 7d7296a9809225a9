"""The dashboard's browser tests' fixtures and page helpers: Debian's Chromium driven by
Playwright (never downloaded), a real `shardgrad serve` per test module. A test module
imports the fixtures it uses (each module gets its own server and browser)."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.fakes import make_client
from tests.helpers import Server, free_port, require

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOKEN = "dashboard-token"
WIDE = {"width": 1400, "height": 900}
NARROW = {"width": 400, "height": 800}
LONG = {"epochs": 300, "batch_size": 10}  # minutes of steps: only ever cancelled


@pytest.fixture(scope="module")
def browser():
    require("playwright")
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, browser):
    server = Server(tmp_path_factory.mktemp("dashboard") / "var").start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@contextmanager
def served(app) -> Iterator[str]:
    """`app` served by uvicorn on a thread, at the URL this yields."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, port=port, log_level="warning", timeout_graceful_shutdown=1)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """The app with an API token and a paused fake dispatcher (no Ray), served by uvicorn on
    a thread: enough for the token's round trip through the page."""
    client, _, _ = make_client(tmp_path_factory.mktemp("locked"), api_token=TOKEN, paused=True)
    with served(client.app) as url:
        yield url


@pytest.fixture(scope="module")
def api(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("dashboard-screenshots")


def screenshot(page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


@pytest.fixture
def allowed_statuses() -> set[int]:
    """HTTP error statuses a test provokes on purpose; Chromium logs each as a console error."""
    return set()


def open_page(browser, allowed: set[int], viewport=WIDE):
    page = browser.new_page(viewport=viewport)
    errors: list[str] = []

    def on_console(msg):
        if msg.type != "error":
            return
        status = re.search(r"status of (\d{3})", msg.text)
        if status and int(status.group(1)) in allowed:
            return
        errors.append(f"console: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda err: errors.append(f"pageerror: {err}"))
    page.set_default_timeout(20_000)
    return page, errors


@pytest.fixture
def page(browser, server, allowed_statuses):
    """A wide browser tab; any JavaScript error on any page it visits fails the test."""
    page, errors = open_page(browser, allowed_statuses)
    yield page
    page.close()
    assert not errors, errors


def expect(locator):
    from playwright.sync_api import expect

    expect.set_options(timeout=20_000)  # a loaded 2-CPU machine parses plotly.js slowly
    return expect(locator)


def badge(page):
    return page.locator(".job-title h1 .badge")


WIDER_THAN_THE_WINDOW = """() => document.documentElement.scrollWidth <= innerWidth ? [] :
  [...document.querySelectorAll("body *")]
    .filter((el) => el.getBoundingClientRect().right > innerWidth + 0.5)
    .map((el) => `${el.tagName}.${el.className} ${Math.round(el.getBoundingClientRect().right)}`)
    .slice(0, 8)"""
