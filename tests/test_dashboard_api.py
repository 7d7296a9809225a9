"""The dashboard's server side under TestClient: what is served without a token, plotly.js
from the installed package, the example templates, and a front end that never leaves the
origin (no CDN, no network)."""

from __future__ import annotations

import gzip
import re

import pytest

from service.api.routes import dashboard
from tests.fakes import make_client

TOKEN = "t0ken"
JS = sorted((dashboard.STATIC / "js").glob("*.js"))


@pytest.fixture
def client(tmp_path):
    client, _, _ = make_client(tmp_path, api_token=TOKEN)
    return client


def test_the_page_and_its_files_need_no_token(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="/static/js/app.js"' in page.text
    csp = page.headers["content-security-policy"]  # the browser itself refuses other origins
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    for path in ("/static/app.css", "/static/js/app.js", "/static/favicon.svg"):
        assert client.get(path).status_code == 200, path
    assert client.get("/api/v1/jobs").status_code == 401
    assert client.get("/api/v1/examples").status_code == 401


def test_plotly_comes_from_the_installed_package(client):
    raw = dashboard.PLOTLY_JS.read_bytes()
    r = client.get("/static/vendor/plotly.min.js", headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200 and r.content == raw
    assert r.headers["content-type"].startswith("text/javascript")
    r = client.get("/static/vendor/plotly.min.js", headers={"Accept-Encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip" and r.content == raw  # httpx inflates it
    assert len(dashboard._plotly_gzip()) < len(raw) / 2
    assert gzip.decompress(dashboard._plotly_gzip()) == raw


def test_examples_are_the_repos_spec_files(client):
    r = client.get("/api/v1/examples", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    examples = {e["name"]: e for e in r.json()}
    on_disk = {p.stem for p in dashboard.EXAMPLES.glob("*.json")} - {"moons-sweep"}
    assert set(examples) == on_disk and "moons" in examples
    moons = examples["moons"]
    assert moons["spec"]["model"]["type"] == "mlp"
    assert moons["text"] == (dashboard.EXAMPLES / "moons.json").read_text()


def test_examples_fall_back_to_none_when_not_shipped(client, tmp_path, monkeypatch):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    monkeypatch.setattr(dashboard, "EXAMPLES", tmp_path / "absent")
    assert client.get("/api/v1/examples", headers=auth).json() == []
    (tmp_path / "ok.json").write_text('{"name": "ok"}')
    (tmp_path / "broken.json").write_text("{not json")
    monkeypatch.setattr(dashboard, "EXAMPLES", tmp_path)
    assert [e["name"] for e in client.get("/api/v1/examples", headers=auth).json()] == ["ok"]


def test_the_front_end_loads_nothing_from_elsewhere():
    files = [dashboard.STATIC / "index.html", dashboard.STATIC / "app.css", *JS]
    for path in files:
        text = path.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), path
        assert not re.search(r"""(import|from)\s*\(?\s*["'](https?:)?//""", text), path
        assert "@import" not in text, path


def test_every_module_import_resolves():
    for path in JS:
        for name in re.findall(r"""from\s+["']\./([\w.-]+)["']""", path.read_text()):
            assert (path.parent / name).is_file(), f"{path.name} imports a missing {name}"
    index = (dashboard.STATIC / "index.html").read_text()
    for ref in re.findall(r"""(?:src|href)="/static/([^"]+)\"""", index):
        assert (dashboard.STATIC / ref).is_file(), ref
