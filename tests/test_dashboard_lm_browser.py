"""A transformer job's page in a real browser (Debian's Chromium, Playwright): the generate
box, the prompt's token attributions and the attention heatmap, each checked against what the
API answers, and the graph with one node per sub-layer. The app runs on a thread with a fake
dispatcher (no Ray); its one job was trained in-process (tests/test_generate.py's recipe).
The screenshot is docs/dashboard-lm.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import dashboard
from tests.dashboard import WIDE, badge, expect
from tests.fakes import make_client, submit
from tests.test_generate import lm_spec
from workers.spec import TrainingSpec
from workers.trainer import Trainer

pytestmark = pytest.mark.slow

browser = dashboard.browser
shots = dashboard.shots
allowed_statuses = dashboard.allowed_statuses


@pytest.fixture(scope="module")
def site(tmp_path_factory, browser):
    """The app on a thread (a fake dispatcher, no Ray) with one trained addition job marked
    succeeded: (url, api client, job id)."""
    tmp_path = tmp_path_factory.mktemp("lm-dashboard")
    client, store, _ = make_client(tmp_path, paused=True)
    job_id = submit(client, **lm_spec())["id"]
    summary = Trainer(TrainingSpec.model_validate(lm_spec()), tmp_path / "jobs" / job_id).run()
    assert summary["status"] == "succeeded", summary
    store.claim("fake", lambda job: job.id == job_id or False)
    assert store.finish(job_id, "fake", "succeeded", None, step=6)
    with dashboard.on_a_thread(client.app) as url:
        yield url, client, job_id


@pytest.fixture
def page(browser, allowed_statuses):
    page, errors = dashboard.open_page(browser, allowed_statuses)
    yield page
    page.close()
    assert not errors, errors


def test_generate_explain_and_attention_on_a_transformer_job(page, site, shots, allowed_statuses):
    allowed_statuses.add(422)  # the prompt with a character outside the vocabulary
    url, client, job_id = site
    api = f"/api/v1/jobs/{job_id}"
    page.goto(f"{url}/#/jobs/{job_id}")
    expect(badge(page)).to_have_text("succeeded")
    expect(page.locator("#predict h2")).to_have_text("Generate")

    # Generate: the completion and each token's log-probability, as the API gives them.
    body = {"prompt": "12+34=", "max_tokens": 5, "temperature": 0.5, "seed": 3}
    want = client.post(f"{api}/generate", json=body).json()
    page.fill("#generate-max_tokens", "5")
    page.fill("#generate-temperature", "0.5")
    page.fill("#generate-seed", "3")
    page.click("#generate-run")
    expect(page.locator("#generate-text")).to_have_text(want["text"])
    chips = page.locator("#generate-tokens .token")
    expect(chips).to_have_count(5)
    got = [float(v) for v in chips.evaluate_all("cs => cs.map(c => c.dataset.logprob)")]
    assert got == pytest.approx(want["logprobs"], abs=1e-12)

    # Token attributions: one coloured token per prompt character, the API's numbers.
    want = client.post(f"{api}/explain", json={"prompt": "12+34=", "steps": 32}).json()
    page.fill("#lm-explain-steps", "32")
    page.click("#lm-explain-run")
    tokens = page.locator("#lm-explain-tokens .token")
    expect(tokens).to_have_count(6)
    expect(tokens.locator(".mono")).to_have_text(list("12+34="))
    got = [float(v) for v in tokens.evaluate_all("ts => ts.map(t => t.dataset.attribution)")]
    assert got == pytest.approx(want["attributions"], abs=1e-12)
    colours = tokens.evaluate_all("ts => ts.map(t => getComputedStyle(t).backgroundColor)")
    strongest = max(range(6), key=lambda i: abs(got[i]))
    assert colours[strongest] != "rgba(0, 0, 0, 0)" and len(set(colours)) > 1
    expect(page.locator("#lm-explain-gap")).to_contain_text("completeness gap")

    # A character outside the vocabulary: the server's 422, under the prompt.
    page.fill("#lm-explain-prompt", "12x4=")
    page.click("#lm-explain-run")
    expect(page.locator("#lm-explain-prompt-error")).to_contain_text("'x' at position 2")

    # Attention: the heatmap of the picked layer and head is the API's matrix.
    want = client.post(f"{api}/attention", json={"prompt": "12+34="}).json()["weights"]
    page.click("#attention-run")
    expect(page.locator("#attention-chart .main-svg").first).to_be_visible()
    page.select_option("#attention-head", "1")
    expect(page.locator('#attention-chart[data-layer="0"][data-head="1"]')).to_have_count(1)
    z = page.evaluate('document.getElementById("attention-chart").data[0].z')
    np.testing.assert_allclose(z, want[0][1], atol=1e-12)
    assert not np.allclose(z, want[0][0], atol=1e-6)  # head 1's, not head 0's

    # The graph: one node per sub-layer, as the API gives it.
    graph = client.get(f"{api}/graph").json()
    expect(page.locator("#graph-svg .g-node")).to_have_count(len(graph["nodes"]))
    expect(page.locator("#graph-svg")).to_contain_text("blocks.0.self_attn")

    # docs/dashboard-lm.png: the three boxes, the explanation of a valid prompt again.
    page.fill("#lm-explain-prompt", "12+34=")
    page.click("#lm-explain-run")
    expect(page.locator("#lm-explain-prompt-error")).to_be_hidden()
    boxes_shot(page, shots, "dashboard-lm")


def boxes_shot(page, folder: Path, name: str) -> None:
    """The generate and explain boxes and the attention card, without the fixed header."""
    page.evaluate("document.querySelector('header.topbar')?.remove()")  # it is fixed
    top, bottom = page.evaluate(
        """() => [document.getElementById("predict"), document.getElementById("attention")]
          .map((el, i) => el.getBoundingClientRect()[i ? "bottom" : "top"] + scrollY)"""
    )
    path = folder / f"{name}.png"
    clip = {"x": 0, "y": top - 12, "width": WIDE["width"], "height": bottom - top + 24}
    page.screenshot(path=str(path), full_page=True, clip=clip)
    print(f"screenshot: {path}")
