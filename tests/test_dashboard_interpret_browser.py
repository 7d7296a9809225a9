"""The job page's interpretability panels in a real browser (Debian's Chromium, Playwright,
a real `shardgrad serve`): the computational graph, training health and explanations, and a
CNN's images (picked, uploaded, explained as a heatmap) and first-layer filters, each checked
against what the API answers for the same job."""

from __future__ import annotations

import io
import json
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
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
from tests.helpers import digits_cnn, wait_job

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


def panels_shot(page, folder: Path, name: str, first: str = "health") -> None:
    """The panels from the card `first` to the explain box (docs/dashboard-interpret.png)."""
    top, bottom = page.evaluate(
        """(first) => {
          const top = document.getElementById(first).getBoundingClientRect().top + scrollY;
          const row = document.getElementById("explain-output").closest(".grid-2");
          return [top - 12, row.getBoundingClientRect().bottom + scrollY + 12];
        }""",
        first,
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


# -- a CNN: images to predict and explain, the heatmap, the filters ---------------------------


@pytest.fixture(scope="module")
def cnn(api) -> str:
    """A tiny CNN on digits as 1x8x8 images, trained in-process for a few seconds."""
    r = api.post("/jobs", json=digits_cnn(epochs=2, batch_size=64))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def png(grey: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of `grey` (uint8, height x width)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", grey.shape[1], grey.shape[0], 8, 0, 0, 0, 0)
    raw = b"".join(b"\0" + row.tobytes() for row in grey)  # filter type 0 per row
    idat = chunk(b"IDAT", zlib.compress(raw))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def predicted(page, api, job_id: str, image) -> None:
    """Predict in the page; its outputs are the API's for `image`."""
    page.click("#predict-run")
    table = page.locator("#predict-output .predict-table")
    expect(table).to_be_visible()
    expected = api.post(f"/jobs/{job_id}/predict", json={"inputs": [image]}).json()["outputs"]
    (shown,) = json.loads(table.get_attribute("data-outputs"))
    assert shown == pytest.approx(expected[0])


def upload(page, name: str, content: bytes, mime: str) -> None:
    files = [{"name": name, "mimeType": mime, "buffer": content}]
    page.set_input_files("#image-file", files=files)


def test_a_cnns_images_predict_and_explain_as_a_heatmap_over_the_image(
    page, server, api, cnn, shots
):
    assert finished(api, cnn)["status"] == "succeeded"
    samples = api.get(f"/jobs/{cnn}/samples", params={"limit": 16}).json()["samples"]
    open_job(page, server, cnn)
    conv = page.locator('#graph-svg .g-node[data-op="conv2d+relu"]')
    expect(conv).to_contain_text("1×4×8×8")  # the graph: a conv layer is one node, with its shape
    expect(page.locator('#graph-svg .g-node[data-op="flatten"]')).to_contain_text("1×64")

    # A validation image, picked from the gallery, predicted and explained.
    thumbs = page.locator("#image-gallery .thumb")
    expect(thumbs).to_have_count(16)
    expect(thumbs.first).to_have_class(re.compile("selected"))
    sample = samples[3]
    thumbs.nth(3).click()
    text = f"validation image #{sample['index']}, label {sample['label']}"
    expect(page.locator("#image-picked-text")).to_have_text(text)
    predicted(page, api, cnn, sample["input"])
    expect(page.locator("#predict-label")).to_have_text(str(sample["label"]))
    expect(page.locator("#explain-input")).to_have_text(text)
    page.select_option("#explain-method", "integrated_gradients")
    page.click("#explain-run")
    page.wait_for_function("() => document.getElementById('explain-chart').data?.length === 2")
    body = {"inputs": [sample["input"]], "method": "integrated_gradients", "steps": 64}
    expected = api.post(f"/jobs/{cnn}/explain", json=body).json()
    picture, heat = page.locator("#explain-chart").evaluate("div => div.data.map(t => t.z)")
    np.testing.assert_allclose(picture, sample["input"][0])  # one channel: the image itself
    np.testing.assert_allclose(heat, expected["attributions"][0][0], rtol=1e-12)  # 8x8
    gap = float(page.locator("#explain-gap").get_attribute("data-gap"))
    assert gap == pytest.approx(expected["completeness_gap"][0])
    expect(page.locator("#filters-grid canvas")).to_have_count(4)
    page.evaluate("scrollTo(0, 0)")  # else the sticky top bar lands mid-picture
    panels_shot(page, shots, "dashboard-cnn", first="filters")

    # Uploads: a PNG (grey levels / 255, as digits' pixels), a .npy as it is, a wrong .npy.
    grey = np.round(np.asarray(samples[5]["input"][0]) * 255).astype(np.uint8)
    upload(page, "five.png", png(grey), "image/png")
    expect(page.locator("#image-picked-text")).to_have_text("uploaded five.png")
    predicted(page, api, cnn, (grey / 255.0)[None].tolist())
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    upload(page, "ramp.npy", npy(image), "application/octet-stream")
    expect(page.locator("#image-picked-text")).to_have_text("uploaded ramp.npy")
    predicted(page, api, cnn, image.tolist())
    upload(page, "two.npy", npy(np.zeros((2, 8, 8))), "application/octet-stream")
    message = "the .npy holds a 2×8×8 array; the model takes 1×8×8"
    expect(page.locator("#image-error")).to_have_text(message)


def test_the_filter_view_draws_the_first_conv_layers_weights(page, server, api, cnn, healthy):
    assert finished(api, cnn)["status"] == "succeeded"
    filters = api.get(f"/jobs/{cnn}/filters").json()
    open_job(page, server, cnn)
    canvases = page.locator("#filters-grid canvas")
    expect(canvases).to_have_count(4)  # 4 filters of 1 input channel
    caption = page.locator("#filters-caption")
    expect(caption).to_contain_text("layer 0 (0.weight, 4×1×3×3); blue positive, red negative")
    assert canvases.first.evaluate("c => [c.width, c.height]") == [3, 3]
    # The largest weight in absolute value is drawn in full colour: blue, or red if negative.
    w = np.array(filters["weights"])
    o, c, y, x = (int(k) for k in np.unravel_index(np.abs(w).argmax(), w.shape))
    pixel = page.locator(f'#filters-grid canvas[data-filter="{o}"][data-channel="{c}"]').evaluate(
        f"c => Array.from(c.getContext('2d').getImageData({x}, {y}, 1, 1).data.slice(0, 3))"
    )
    assert pixel == ([0, 0, 255] if w[o, c, y, x] > 0 else [255, 0, 0])
    assert float(caption.get_attribute("data-max")) == pytest.approx(np.abs(w).max())

    finished(api, healthy)  # an MLP: no filters, the predict box takes typed rows
    open_job(page, server, healthy)
    expect(page.locator("#predict-input")).to_be_visible()
    expect(page.locator("#filters")).to_be_hidden()
