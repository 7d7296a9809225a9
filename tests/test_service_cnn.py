"""A CNN job through the service (TestClient, no Ray): admission, predict and explain on
images of its input_shape or on flat rows, 422s that name the shape, the first conv layer's
filters, the validation samples, and conv nodes in the loss graph."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import cli
from service.client import Client
from tests.fakes import locs, make_client, spec
from tests.helpers import digits_cnn, write_trained_checkpoint
from workers.datasets import load_dataset, train_val_split
from workers.spec import TrainingSpec


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A client, the CNN job's URL, its model (trained a few steps), its validation split."""
    tmp = tmp_path_factory.mktemp("cnn")
    client, _, _ = make_client(tmp)
    r = client.post("/api/v1/jobs", json=digits_cnn())
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    s = TrainingSpec.model_validate(digits_cnn())
    model = write_trained_checkpoint(s, tmp / "jobs" / job_id, steps=15)
    _, val = train_val_split(load_dataset(s.data, s.seed), s.validation_fraction, s.seed)
    return client, f"/api/v1/jobs/{job_id}", model, val


def images(val, n: int = 5) -> np.ndarray:
    return val.X[:n].reshape(n, 1, 8, 8)


def post(client, url: str, body: dict) -> dict:
    r = client.post(url, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_cnns_size_limit_names_its_layers(tmp_path):
    client, _, _ = make_client(tmp_path, max_model_params=100)
    r = client.post("/api/v1/jobs", json=digits_cnn())
    assert locs(r) == [("body", "model", "sequential", "layers")]
    assert "SHARDGRAD_MAX_MODEL_PARAMS" in r.json()["detail"][0]["msg"]


def test_predict_takes_images_or_flat_rows(cnn):
    client, url, model, val = cnn
    X = images(val)
    from_images = post(client, f"{url}/predict", {"inputs": X.tolist()})
    from_rows = post(client, f"{url}/predict", {"inputs": val.X[:5].tolist()})
    assert from_images == from_rows
    np.testing.assert_allclose(from_images["outputs"], model(X).data, rtol=1e-12)
    small = post(client, f"{url}/predict", {"inputs": X[:2].tolist()})
    assert small["outputs"] == from_images["outputs"][:2]


@pytest.mark.parametrize("route", ["predict", "explain"])
def test_a_wrong_shape_is_422_naming_the_place_and_the_shape_the_model_takes(cnn, route):
    client, url, _, val = cnn
    X = images(val, 2).tolist()
    cases = [  # inputs, loc, message
        (
            np.zeros((2, 1, 8, 7)).tolist(),
            (),
            "has images of shape 1x8x7 but the model takes 1x8x8",
        ),
        (X[:1] + [[X[1][0][:7]]], (1, 0), "has 7 rows but the model takes 8"),
        (
            [[[row[:-1] if i == 3 else row for i, row in enumerate(X[0][0])]]],
            (0, 0, 3),
            "has 7 val",
        ),
        (np.zeros((1, 3, 8, 8)).tolist(), (), "has images of shape 3x8x8"),
    ]
    for inputs, loc, message in cases:
        r = client.post(f"{url}/{route}", json={"inputs": inputs})
        assert locs(r)[0] == ("body", "inputs", *loc), (route, loc)
        assert message in r.json()["detail"][0]["msg"]
    r = client.post(f"{url}/{route}", json={"inputs": val.X[:1, :63].tolist()})
    assert locs(r)[0][:2] == ("body", "inputs")  # flat rows take prod(input_shape) values
    assert "63" in r.json()["detail"][0]["msg"] and "64" in r.json()["detail"][0]["msg"]


def test_an_mlp_job_refuses_images(tmp_path):
    client, _, _ = make_client(tmp_path)
    job_id = client.post("/api/v1/jobs", json=spec()).json()["id"]
    r = client.post(f"/api/v1/jobs/{job_id}/predict", json={"inputs": [[[[0.1, 0.2]]]]})
    assert locs(r) == [("body", "inputs")]
    assert "must be rows of 2 numbers; the model takes no images" in r.text


def test_explain_on_images_gives_attributions_of_their_shape(cnn):
    client, url, _, val = cnn
    X = images(val, 3)
    for method in ("gradient", "gradient_x_input"):
        result = post(client, f"{url}/explain", {"inputs": X.tolist(), "method": method})
        flat = post(client, f"{url}/explain", {"inputs": val.X[:3].tolist(), "method": method})
        assert np.shape(result["attributions"]) == (3, 1, 8, 8)
        assert np.shape(flat["attributions"]) == (3, 64)
        np.testing.assert_array_equal(
            np.reshape(result["attributions"], (3, 64)), flat["attributions"]
        )

    # Integrated gradients from a baseline image: complete within 1% of f(x) - f(baseline).
    baseline = np.full((1, 8, 8), 0.25)
    body = {"inputs": X.tolist(), "method": "integrated_gradients", "target": 3}
    result = post(client, f"{url}/explain", body | {"baseline": baseline.tolist()})
    outputs = np.array(result["outputs"])[:, 3]
    at_baseline = post(client, f"{url}/predict", {"inputs": [baseline.tolist()]})["outputs"][0][3]
    change = outputs - at_baseline
    assert np.all(np.abs(result["completeness_gap"]) <= 0.01 * np.abs(change))
    sums = np.sum(result["attributions"], axis=(1, 2, 3))
    np.testing.assert_allclose(sums - change, result["completeness_gap"], atol=1e-12)
    flat_baseline = body | {"inputs": val.X[:3].tolist(), "baseline": [0.25] * 64}
    flat = post(client, f"{url}/explain", flat_baseline)
    np.testing.assert_array_equal(np.reshape(result["attributions"], (3, 64)), flat["attributions"])


def test_non_finite_image_values_are_422_at_their_place(cnn):
    client, url, _, val = cnn
    X = images(val, 2).tolist()
    X[1][0][2][5] = 1e400  # JSON's Infinity
    body = '{"inputs": ' + str(X).replace("inf", "Infinity") + "}"
    for route in ("predict", "explain"):
        r = client.post(
            f"{url}/{route}", content=body, headers={"content-type": "application/json"}
        )
        assert locs(r) == [("body", "inputs", 1, 0, 2, 5)], route


def test_filters_are_the_first_conv_layers_weights(cnn, tmp_path):
    client, url, model, _ = cnn
    r = client.get(f"{url}/filters")
    assert r.status_code == 200, r.text
    filters = r.json()
    assert (filters["layer"], filters["name"], filters["shape"]) == (0, "0.weight", [4, 1, 3, 3])
    assert filters["shown"] == 4 and filters["checkpoint"] == "step-15"
    np.testing.assert_array_equal(filters["weights"], model[0].weight.data)

    mlp_client, _, _ = make_client(tmp_path)
    mlp = mlp_client.post("/api/v1/jobs", json=spec()).json()["id"]
    r = mlp_client.get(f"/api/v1/jobs/{mlp}/filters")
    assert r.status_code == 404 and "no conv2d layer" in r.json()["detail"]


def test_samples_are_the_validation_split_in_the_models_shape(cnn):
    client, url, _, val = cnn
    r = client.get(f"{url}/samples", params={"offset": 3, "limit": 4})
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["total"] == len(val.X)
    assert [s["index"] for s in page["samples"]] == [3, 4, 5, 6]
    np.testing.assert_array_equal(
        [s["input"] for s in page["samples"]], val.X[3:7].reshape(4, 1, 8, 8)
    )
    assert [s["label"] for s in page["samples"]] == val.y[3:7].tolist()
    past = client.get(f"{url}/samples", params={"offset": 10_000}).json()
    assert past == {"total": len(val.X), "samples": []}
    assert locs(client.get(f"{url}/samples", params={"limit": 65})) == [("query", "limit")]


def test_the_graph_has_conv_and_pool_nodes_with_their_shapes(cnn):
    client, url, _, _ = cnn
    graph = client.get(f"{url}/graph").json()
    shapes = {n["operation"]: n["shape"] for n in graph["nodes"]}
    assert shapes["conv2d+relu"] == [1, 4, 8, 8]
    assert shapes["max_pool2d"] == [1, 4, 4, 4]
    assert shapes["flatten"] == [1, 64]
    assert shapes["linear"] == [1, 10]
    params = {n["name"]: n["shape"] for n in graph["nodes"] if n["operation"] == "parameter"}
    assert params == {"0.weight": [4, 1, 3, 3], "0.bias": [4], "4.weight": [10, 64], "4.bias": [10]}


def test_the_cli_predicts_and_explains_images_from_a_npy(cnn, tmp_path, monkeypatch, capsys):
    client, url, model, val = cnn
    http = TestClient(client.app, base_url="http://testserver/api/v1")

    def app_client(url=None) -> Client:
        c = Client("http://testserver")
        c.http = http
        return c

    monkeypatch.setattr(cli, "Client", app_client)
    job_id = url.rsplit("/", 1)[1]
    path = tmp_path / "images.npy"
    np.save(path, images(val, 2))
    assert cli.main(["predict", job_id, "--images", str(path)]) == 0
    out = capsys.readouterr().out
    rows = [[float(v) for v in line.split(",")] for line in out.splitlines()]
    np.testing.assert_allclose(rows, model(images(val, 2)).data, rtol=1e-5)  # 6 digits

    np.save(path, images(val, 1)[0])  # one image, C x H x W
    argv = ["explain", job_id, "--images", str(path), "--method", "gradient_x_input"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    grid = [line for line in out.splitlines() if line.startswith("  |")]
    assert "channel 0" in out and len(grid) == 8  # a row of cells per image row
    assert all(len(line) == 2 + 1 + 2 * 8 + 1 for line in grid)
    assert "██" in out or "##" in out  # the largest attribution fills its cell

    np.save(path, np.zeros((2, 3)))
    assert cli.main(["predict", job_id, "--images", str(path)]) == 1
    assert "--images: " in capsys.readouterr().err
