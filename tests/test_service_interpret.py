"""The interpretability routes under TestClient: the loss graph of the newest checkpoint and
input attributions, checked against the predict route and the engine (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.api.routes.interpret import MAX_PATH_VALUES
from tests.fakes import locs, make_client, spec, submit
from tests.helpers import write_trained_checkpoint
from workers.data import PreparedData
from workers.model import grad_sum
from workers.spec import TrainingSpec

SINE = {
    "name": "sine",
    "model": {"type": "mlp", "sizes": [1, 8, 1], "activation": "tanh"},
    "data": {"type": "builtin", "name": "sine", "n_samples": 100, "noise": 0.1},
    "loss": "mse",
    "optimizer": {"type": "adam", "lr": 0.05},
}
# Rows around both moons, so the model predicts both classes.
ROWS = [[-1.0, 0.5], [0.0, 1.0], [1.0, 0.0], [2.0, 0.5], [0.5, -0.4], [1.5, -0.3]]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_DATASETS_DIR", str(tmp_path / "datasets"))
    client, _, _ = make_client(tmp_path)
    return client, tmp_path


def trained(env, steps=40, **overrides):
    """Submit a job, then write a checkpoint of its model after `steps` full-batch steps,
    trained in-process with the engine. Returns the job's URL and the model."""
    client, tmp_path = env
    job_id = submit(client, **overrides)["id"]
    s = TrainingSpec.model_validate(spec(**overrides))
    model = write_trained_checkpoint(s, tmp_path / "jobs" / job_id, steps)
    return f"/api/v1/jobs/{job_id}", model


@pytest.fixture
def moons(env):
    return (env[0], *trained(env))


def predict(client, url, rows) -> np.ndarray:
    r = client.post(f"{url}/predict", json={"inputs": np.asarray(rows).tolist()})
    assert r.status_code == 200, r.text
    return np.array(r.json()["outputs"])


def explain(client, url, **body) -> dict:
    r = client.post(f"{url}/explain", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def raw_post(client, path, text):
    return client.post(path, content=text, headers={"content-type": "application/json"})


# -- the graph ------------------------------------------------------------------------------


def test_graph_of_the_loss_on_the_first_training_example(moons):
    client, url, model = moons
    r = client.get(f"{url}/graph")
    assert r.status_code == 200 and r.headers["x-checkpoint"] == "step-40"
    graph = r.json()
    nodes = {n["id"]: n for n in graph["nodes"]}
    root = nodes[graph["root"]]

    data = PreparedData(TrainingSpec.model_validate(spec()))
    X, y = data.X[:1], data.y[:1]
    grads, loss = grad_sum(model, "cross_entropy", X, y)  # one row: the sum is the mean
    assert (root["operation"], root["shape"], root["gradient"]) == ("cross_entropy", [], 1.0)
    assert root["output"] == pytest.approx(loss, rel=1e-12)

    ops = sorted(n["operation"] for n in graph["nodes"])
    assert ops == ["cross_entropy", "linear", "linear+tanh"] + ["parameter"] * 4 + ["source"]
    (source,) = [n for n in graph["nodes"] if n["operation"] == "source"]
    assert source["output"] == X.tolist() and source["gradient"] is None
    params = [n for n in graph["nodes"] if n["operation"] == "parameter"]
    named = dict(model.named_parameters())
    for (name, p), grad in zip(named.items(), grads, strict=True):
        (node,) = [n for n in params if n["name"] == name]
        assert node["output"] == p.data.tolist()
        np.testing.assert_allclose(node["gradient"], grad, rtol=1e-12)
    for n in graph["nodes"]:
        if n["inputs"]:
            assert n["gradient"] is not None, n
            assert np.shape(n["gradient"]) == tuple(n["shape"])
    hidden = next(n for n in graph["nodes"] if n["operation"] == "linear+tanh")
    assert nodes[hidden["inputs"][0]] == source

    # Backward ran on a copy: the cached model's gradients did not pile up.
    assert client.get(f"{url}/graph").json() == graph


def test_graph_as_graphviz(moons):
    client, url, _ = moons
    r = client.get(f"{url}/graph", params={"format": "dot"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/vnd.graphviz")
    assert r.text.startswith("digraph") and "linear+tanh" in r.text
    nodes = client.get(f"{url}/graph").json()["nodes"]
    assert r.text.count("[label=") == len(nodes)
    assert r.text.count(" -> ") == sum(len(n["inputs"]) for n in nodes)


def test_graph_errors(env):
    client, _ = env
    url = f"/api/v1/jobs/{submit(client)['id']}"
    r = client.get(f"{url}/graph")
    assert r.status_code == 409 and "no checkpoint yet" in r.json()["detail"]
    assert client.get("/api/v1/jobs/nope/graph").status_code == 404
    assert locs(client.get(f"{url}/graph", params={"format": "svg"})) == [("query", "format")]


# -- explain --------------------------------------------------------------------------------


def test_gradient_matches_finite_differences_of_predict(moons):
    client, url, _ = moons
    X = np.array(ROWS)
    result = explain(client, url, inputs=ROWS)
    outputs = predict(client, url, X)
    assert result["outputs"] == outputs.tolist() and result["method"] == "gradient"
    assert result["completeness_gap"] is None and result["checkpoint"] == "step-40"

    targets = outputs.argmax(axis=1)
    assert result["targets"] == targets.tolist()
    rows = np.arange(len(X))
    h = 1e-6
    numeric = np.zeros_like(X)
    for i in range(X.shape[1]):
        step = np.zeros_like(X)
        step[:, i] = h
        up, down = predict(client, url, X + step), predict(client, url, X - step)
        numeric[:, i] = (up[rows, targets] - down[rows, targets]) / (2 * h)
    np.testing.assert_allclose(result["attributions"], numeric, rtol=1e-6, atol=1e-9)


def test_default_target_is_each_rows_predicted_class(moons):
    client, url, _ = moons
    classes = predict(client, url, ROWS).argmax(axis=1)
    assert set(classes) == {0, 1}
    default = np.array(explain(client, url, inputs=ROWS)["attributions"])
    for k in (0, 1):
        result = explain(client, url, inputs=ROWS, target=k)
        assert result["targets"] == [k] * len(ROWS)
        chosen = np.array(result["attributions"])
        np.testing.assert_array_equal(default[classes == k], chosen[classes == k])
        assert not np.allclose(default[classes != k], chosen[classes != k])


def test_gradient_x_input(moons):
    client, url, _ = moons
    b = [0.25, -0.5]
    grad = np.array(explain(client, url, inputs=ROWS, target=1)["attributions"])
    result = explain(client, url, inputs=ROWS, target=1, method="gradient_x_input", baseline=b)
    np.testing.assert_allclose(result["attributions"], (np.array(ROWS) - b) * grad, rtol=1e-12)
    assert result["completeness_gap"] is None
    plain = explain(client, url, inputs=ROWS, target=1, method="gradient_x_input")
    np.testing.assert_allclose(plain["attributions"], np.array(ROWS) * grad, rtol=1e-12)


def test_integrated_gradients_are_complete(moons):
    client, url, _ = moons
    b = [0.5, 0.25]
    result = explain(client, url, inputs=ROWS, target=0, method="integrated_gradients", baseline=b)
    change = predict(client, url, ROWS)[:, 0] - predict(client, url, [b])[0, 0]
    attributions = np.array(result["attributions"])
    gap = np.array(result["completeness_gap"])
    np.testing.assert_allclose(gap, attributions.sum(axis=1) - change, rtol=1e-9, atol=1e-12)
    assert np.all(np.abs(gap) <= 0.01 * np.abs(change) + 1e-4)
    assert np.all(np.abs(change) > 1e-3)  # the check above is not vacuous


def test_baseline_is_one_row_for_all_or_one_row_per_input(moons):
    client, url, _ = moons
    ig = {"method": "integrated_gradients", "target": 1}
    b = [0.5, 0.25]
    one = explain(client, url, inputs=ROWS, baseline=b, **ig)
    assert explain(client, url, inputs=ROWS, baseline=[b] * len(ROWS), **ig) == one
    assert explain(client, url, inputs=ROWS, baseline=[b], **ig) == one

    baselines = [[0.1 * i, -0.1 * i] for i in range(len(ROWS))]
    per_row = explain(client, url, inputs=ROWS, baseline=baselines, **ig)
    for i, (x, row_b) in enumerate(zip(ROWS, baselines, strict=True)):
        alone = explain(client, url, inputs=[x], baseline=row_b, **ig)
        np.testing.assert_allclose(per_row["attributions"][i], alone["attributions"][0], rtol=1e-9)
        assert per_row["completeness_gap"][i] == pytest.approx(
            alone["completeness_gap"][0], abs=1e-9
        )
    assert per_row["attributions"] != one["attributions"]


def test_a_single_output_model_explains_output_zero(env):
    client, _ = env
    url, _ = trained(env, **SINE)
    X = [[-2.0], [0.5], [1.5]]
    default = explain(client, url, inputs=X, method="gradient_x_input")
    assert default == explain(client, url, inputs=X, method="gradient_x_input", target=0)
    assert default["outputs"] == predict(client, url, X).tolist()
    assert np.shape(default["outputs"]) == (3, 1)
    r = client.post(f"{url}/explain", json={"inputs": X, "target": 1})
    assert locs(r) == [("body", "target")]
    assert "the model has 1 output(s)" in r.json()["detail"][0]["msg"]


def test_explain_before_any_checkpoint_is_409(env):
    client, _ = env
    url = f"/api/v1/jobs/{submit(client)['id']}"
    r = client.post(f"{url}/explain", json={"inputs": [[0.1, 0.2]]})
    assert r.status_code == 409 and "no checkpoint yet" in r.json()["detail"]
    assert (
        client.post("/api/v1/jobs/nope/explain", json={"inputs": [[0.1, 0.2]]}).status_code == 404
    )


@pytest.mark.parametrize(
    "body, loc",
    [
        ({"inputs": [[0.1, 0.2], [0.3, 0.4], [1.0]]}, ("body", "inputs", 2)),
        ({"inputs": [[0.1, 0.2, 0.3]]}, ("body", "inputs")),
        ({"inputs": []}, ("body", "inputs")),
        ({"inputs": [[0.1, 0.2]] * 1001}, ("body", "inputs")),
        ({"inputs": [[0.1, 0.2]], "baseline": [0.1, 0.2, 0.3]}, ("body", "baseline")),
        ({"inputs": [[0.1, 0.2]], "baseline": [[0.1, 0.2]] * 2}, ("body", "baseline")),
        ({"inputs": [[0.1, 0.2]], "baseline": [[0.1, 0.2], [1.0]]}, ("body", "baseline")),
        ({"inputs": [[0.1, 0.2]], "baseline": "zeros"}, ("body", "baseline")),
        ({"inputs": [[0.1, 0.2]], "method": "saliency"}, ("body", "method")),
        ({"inputs": [[0.1, 0.2]], "target": 2}, ("body", "target")),
        ({"inputs": [[0.1, 0.2]], "target": -1}, ("body", "target")),
        ({"inputs": [[0.1, 0.2]], "target": True}, ("body", "target")),
        ({"inputs": [[0.1, 0.2]], "steps": 0}, ("body", "steps")),
        ({"inputs": [[0.1, 0.2]], "steps": 1025}, ("body", "steps")),
        ({"inputs": [[0.1, 0.2]], "bogus": 1}, ("body", "bogus")),
    ],
)
def test_bad_requests_are_422_at_the_field(moons, body, loc):
    client, url, _ = moons
    assert locs(client.post(f"{url}/explain", json=body))[0][: len(loc)] == loc


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_the_raw_body_are_422(moons, literal):
    client, url, _ = moons
    cases = [
        ('{"inputs": [[0.1, @]]}', ("body", "inputs", 0, 1)),
        ('{"inputs": [[0.1, 0.2]], "baseline": [@, 0]}', ("body", "baseline", 0)),
        ('{"inputs": [[0.1, 0.2]], "baseline": [[0, 1], [0, @]]}', ("body", "baseline", 1, 1)),
    ]
    for template, loc in cases:
        r = raw_post(client, f"{url}/explain", template.replace("@", literal))
        assert locs(r) == [loc], template
        assert json.loads(r.text)["detail"][0]["type"] == "finite_number"
    predict_body = '{"inputs": [[@, 0.2]]}'.replace("@", literal)
    assert locs(raw_post(client, f"{url}/predict", predict_body)) == [("body", "inputs", 0, 0)]


def test_values_beyond_a_float32_models_range_are_422_for_predict_and_explain(env):
    client, _ = env
    url, _ = trained(env, steps=1, dtype="float32")
    body = {"inputs": [[0.1, 0.2], [0.1, 1e39]]}  # finite in JSON, inf in float32
    for route in ("predict", "explain"):
        assert locs(client.post(f"{url}/{route}", json=body)) == [("body", "inputs", 1, 1)], route
    assert client.post(f"{url}/predict", json={"inputs": [[0.1, 3e38]]}).status_code == 200
    assert locs(client.post(f"{url}/predict", json=body | {"method": "gradient"})) == [
        ("body", "method")
    ]


def test_integrated_gradients_work_is_capped(moons):
    client, url, _ = moons
    rows = MAX_PATH_VALUES // (2 * 1024) + 1  # just over the limit for width 2 at 1024 steps
    body = {"inputs": [[0.1, 0.2]] * rows, "method": "integrated_gradients", "steps": 1024}
    r = client.post(f"{url}/explain", json=body)
    assert locs(r) == [("body", "steps")] and "fewer rows or steps" in r.text
    # The cap is on the path's points, not on plain gradients.
    assert client.post(f"{url}/explain", json=body | {"method": "gradient"}).status_code == 200
