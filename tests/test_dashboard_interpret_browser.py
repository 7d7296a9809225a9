"""The job page's interpretability panels in a real browser (Debian's Chromium, Playwright,
a real `shardgrad serve`): the computational graph, training health and explanations, each
checked against what the API answers for the same job."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from core.graph import _norm as norm  # of an exported output or gradient, as the DOT colours
from tests import dashboard
from tests.dashboard import (
    LONG,
    NARROW,
    WIDE,
    WIDER_THAN_THE_WINDOW,
    badge,
    expect,
    open_page,
    screenshot,
)
from tests.fakes import spec
from tests.helpers import wait_job

pytestmark = pytest.mark.slow

# The dashboard tests' fixtures, for this module's own server and browser.
browser = dashboard.browser
server = dashboard.server
api = dashboard.api
shots = dashboard.shots
allowed_statuses = dashboard.allowed_statuses
page = dashboard.page

HEALTH = {"epochs": 3, "health_every": 4}  # 24 steps, 6 health checks


@pytest.fixture(scope="module")
def healthy(api) -> str:
    """A tanh net that trains well: no warnings."""
    r = api.post("/jobs", json=spec(name="healthy", **HEALTH))
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def dead(api) -> str:
    """A relu net whose biases start at -10: its hidden units never fire."""
    model = {"type": "mlp", "sizes": [2, 8, 2], "activation": "relu", "bias_init": -10}
    r = api.post("/jobs", json=spec(name="dead-relu", model=model, **HEALTH))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def finished(api, job_id) -> dict:
    return wait_job(api, job_id, lambda j: j["status"] in ("succeeded", "failed"))


def open_job(page, server, job_id):
    page.goto(f"{server.url}/#/jobs/{job_id}")
    expect(badge(page)).to_have_text("succeeded", timeout=120_000)


def panels_shot(page, folder: Path, name: str) -> None:
    """The three panels, from the health card to the explain box (docs/dashboard-interpret.png)."""
    top, bottom = page.evaluate(
        """() => {
          const top = document.getElementById("health").getBoundingClientRect().top + scrollY;
          const row = document.getElementById("explain-output").closest(".grid-2");
          return [top - 12, row.getBoundingClientRect().bottom + scrollY + 12];
        }"""
    )
    path = folder / f"{name}.png"
    clip = {"x": 0, "y": top, "width": WIDE["width"], "height": bottom - top}
    page.screenshot(path=str(path), full_page=True, clip=clip)
    print(f"screenshot: {path}")


# -- the graph ----------------------------------------------------------------------------


def test_graph_view_draws_every_node_of_the_apis_graph(page, server, api, healthy, shots):
    assert finished(api, healthy)["status"] == "succeeded"
    graph = api.get(f"/jobs/{healthy}/graph").json()
    open_job(page, server, healthy)
    nodes = page.locator("#graph-svg .g-node")
    expect(nodes).to_have_count(len(graph["nodes"]))
    for n in graph["nodes"]:
        node = page.locator(f'#graph-svg .g-node[data-id="{n["id"]}"]')
        expect(node.locator("text.g-op")).to_have_text(n["operation"])
        if "name" in n:  # a parameter: its name in the model, e.g. layers.0.weight
            expect(node).to_contain_text(n["name"])
    ops = {n["operation"] for n in graph["nodes"]}
    assert {"parameter", "source", "linear+tanh"} <= ops
    root = page.locator("#graph-svg .g-root")
    expect(root).to_have_count(1)
    assert root.get_attribute("data-id") == str(graph["root"])
    assert page.locator("#graph-svg .g-parameter").count() == sum(
        n["operation"] == "parameter" for n in graph["nodes"]
    )

    # The fill follows the gradient's norm: the largest and smallest differ, equal norms match.
    norms = {n["id"]: norm(n["gradient"]) for n in graph["nodes"]}
    fills = {
        int(k): v
        for k, v in nodes.evaluate_all("gs => gs.map(g => [g.dataset.id, g.dataset.fill])")
    }
    finite = {i: v for i, v in norms.items() if v is not None and 0 < v < math.inf}
    biggest, smallest = max(finite, key=finite.get), min(finite, key=finite.get)
    assert finite[biggest] > 10 * finite[smallest]
    assert fills[biggest] != fills[smallest]
    assert len(set(fills.values())) >= 3

    # A click shows the node's values; the DOT link downloads the same graph as Graphviz.
    root.click()
    detail = page.locator("#graph-detail")
    expect(detail).to_contain_text(f"#{graph['root']} {graph['nodes'][graph['root']]['operation']}")
    expect(detail.locator("pre.values")).to_have_count(2)  # output and gradient
    with page.expect_download() as info:
        page.click("#graph-dot")
    dot = Path(info.value.path()).read_text(encoding="utf-8")
    assert dot.startswith("digraph")
    assert dot.count("[label=") == len(graph["nodes"])
    screenshot(page, shots, "dashboard-graph")


# -- training health ----------------------------------------------------------------------


def health_traces(page) -> list[dict]:
    page.wait_for_function("() => document.getElementById('health-chart').data !== undefined")
    return page.locator("#health-chart").evaluate(
        "div => div.data.map(t => ({name: t.name, x: t.x, y: t.y}))"
    )


def test_health_panel_charts_every_layer_of_a_healthy_job_without_warnings(
    page, server, api, healthy
):
    job = finished(api, healthy)
    assert job["health"] is not None and job["health"]["warnings"] == []
    checks = [p for p in api.get(f"/jobs/{healthy}/metrics").json()["points"] if p["layers"]]
    assert len(checks) > 1
    names = [layer["layer"] for layer in checks[0]["layers"]]
    open_job(page, server, healthy)
    traces = health_traces(page)
    assert [t["name"] for t in traces] == names  # one trace per layer
    for k, t in enumerate(traces):
        assert t["x"] == [p["step"] for p in checks]
        assert t["y"] == pytest.approx([p["layers"][k]["grad_norm"] for p in checks])
    assert page.locator("#health-chart").evaluate("div => div.layout.yaxis.type") == "log"
    expect(page.locator("#health-ok")).to_be_visible()
    expect(page.locator("#health-warnings li")).to_have_count(0)
    rows = page.locator("#health-layers tbody tr")
    expect(rows).to_have_count(len(names))
    latest = job["health"]["layers"][0]
    expect(rows.first).to_contain_text(latest["layer"])


def test_health_panel_warns_of_dead_relu_units(page, server, api, dead, shots):
    job = finished(api, dead)
    dead_warnings = [w for w in job["health"]["warnings"] if w["kind"] == "dead"]
    assert dead_warnings, job["health"]
    open_job(page, server, dead)
    warnings = page.locator("#health-warnings li")
    expect(warnings).to_have_count(len(job["health"]["warnings"]))
    shown = page.locator(
        f'#health-warnings li[data-kind="dead"][data-layer="{dead_warnings[0]["layer"]}"]'
    )
    expect(shown).to_contain_text(dead_warnings[0]["message"])
    expect(shown.locator(".badge")).to_have_text("dead")
    expect(page.locator("#health-ok")).to_have_count(0)
    traces = health_traces(page)
    assert len(traces) == len(job["health"]["layers"])
    dead_pct = page.locator(f'#health-layers tr[data-layer="{dead_warnings[0]["layer"]}"] td').last
    expect(dead_pct).to_have_text("100.0%")
    screenshot(page, shots, "dashboard-health-dead")


def test_a_warnings_advice_opens_the_jobs_spec_with_that_change_as_a_template(
    page, server, api, dead
):
    job = finished(api, dead)
    warning = next(w for w in job["health"]["warnings"] if w["kind"] == "dead")
    change = {"model": {"bias_init": 0.0}}
    assert warning["advice"] == {"field": "model.bias_init", "change": change}
    open_job(page, server, dead)
    shown = page.locator(f'#health-warnings li[data-kind="dead"][data-layer="{warning["layer"]}"]')
    expect(shown.locator(".advice code")).to_have_text("model.bias_init")
    shown.locator("a.advice-template").click()
    page.wait_for_url(server.url + "/#/submit")
    expect(page.locator("#spec-editor")).not_to_have_value("")
    edited = json.loads(page.locator("#spec-editor").input_value())
    assert edited == job["spec"] | {"model": job["spec"]["model"] | {"bias_init": 0.0}}


# -- explain ------------------------------------------------------------------------------


def test_explain_panel_draws_the_apis_attributions_and_shows_422s_inline(
    page, server, api, healthy, allowed_statuses, shots
):
    allowed_statuses.add(422)
    assert finished(api, healthy)["status"] == "succeeded"
    open_job(page, server, healthy)
    field = page.locator("#explain-input")
    expect(field).to_have_value("0, 0")  # zeros of the model's input width
    field.fill("0.5, -0.25")
    page.select_option("#explain-method", "integrated_gradients")
    expect(page.locator("#explain-steps")).to_be_enabled()
    page.click("#explain-run")
    bars = page.locator("#explain-chart .bars .point")
    expect(bars).to_have_count(2)  # one per input feature
    body = {"inputs": [[0.5, -0.25]], "method": "integrated_gradients", "steps": 64}
    expected = api.post(f"/jobs/{healthy}/explain", json=body).json()
    shown = page.locator("#explain-chart").evaluate("div => div.data[0].x")
    assert shown == pytest.approx(expected["attributions"][0])
    gap = page.locator("#explain-gap")
    expect(gap).to_contain_text("completeness gap")
    assert float(gap.get_attribute("data-gap")) == pytest.approx(expected["completeness_gap"][0])
    outputs = expected["outputs"][0]
    target = page.locator("#explain-target-used")
    assert target.get_attribute("data-target") == str(outputs.index(max(outputs)))
    page.locator("#graph-svg .g-root").click()  # its values, for the picture
    page.evaluate("scrollTo(0, 0)")  # else the sticky top bar lands mid-picture
    panels_shot(page, shots, "dashboard-interpret")

    # The server checks the width; its 422 stands under the field it names.
    field.fill("1, 2, 3")
    page.click("#explain-run")
    bad = api.post(f"/jobs/{healthy}/explain", json=body | {"inputs": [[1, 2, 3]]})
    assert bad.status_code == 422
    message = bad.json()["detail"][0]["msg"]
    expect(page.locator("#explain-inputs-error")).to_have_text(message)
    expect(field).to_have_attribute("aria-invalid", "true")
    page.select_option("#explain-method", "gradient")
    page.fill("#explain-target", "7")  # the model has 2 outputs
    field.fill("0.5, -0.25")
    page.click("#explain-run")
    expect(page.locator("#explain-target-error")).to_contain_text("out of range")
    expect(page.locator("#explain-inputs-error")).to_be_hidden()


def test_a_job_without_checkpoints_says_when_the_panels_fill_in(
    page, server, api, allowed_statuses
):
    allowed_statuses.add(409)
    hog = spec(name="hog", workers=2, cpus_per_worker=1.0, **LONG)  # both of the 2 CPUs
    hog_id = api.post("/jobs", json=hog).json()["id"]
    job_id = None
    try:
        wait_job(api, hog_id, lambda j: j["status"] == "running")
        job_id = api.post("/jobs", json=spec(name="waiting")).json()["id"]
        assert api.get(f"/jobs/{job_id}/graph").status_code == 409
        page.goto(f"{server.url}/#/jobs/{job_id}")
        expect(badge(page)).to_have_text("queued")
        expect(page.locator("#graph-pending")).to_have_text(
            "The graph is available after the first checkpoint."
        )
        expect(page.locator("#graph-dot")).to_be_hidden()
        expect(page.locator("#health")).to_contain_text("No health checks yet")
        page.click("#explain-run")
        expect(page.locator("#explain-error")).to_contain_text("no checkpoint")
    finally:
        for cancel in (job_id, hog_id):
            if cancel:
                api.post(f"/jobs/{cancel}/cancel")


# -- a narrow window ----------------------------------------------------------------------


def test_the_panels_fit_a_narrow_window(browser, server, api, dead, shots):
    finished(api, dead)
    page, errors = open_page(browser, set(), NARROW)
    try:
        open_job(page, server, dead)
        expect(page.locator("#graph-svg .g-node").first).to_be_visible()
        expect(page.locator("#health-chart .main-svg").first).to_be_visible()
        page.click("#explain-run")
        expect(page.locator("#explain-chart .bars .point")).to_have_count(2)
        page.wait_for_timeout(300)  # let plotly settle on its width
        wide = page.evaluate(WIDER_THAN_THE_WINDOW)
        assert not wide, f"the job page is wider than the window: {wide}"
        svg = page.locator("#graph-svg").bounding_box()
        assert svg["width"] <= NARROW["width"]
        screenshot(page, shots, "narrow-interpret")
    finally:
        page.close()
    assert not errors, errors
