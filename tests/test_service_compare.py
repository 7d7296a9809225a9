"""GET /compare and Client.compare: the spec fields that differ, final metrics, and curves
bounded in points, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.compare import differing, flatten
from service.schemas import Comparison
from shardgrad import Client, ClientError
from tests.fakes import curve, finished_job, locs, make_client, submit

COMPARE = "/api/v1/compare"


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request, tmp_path):
    url = "sqlite://" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    return make_client(tmp_path, store_url=url)


def test_differing_fields_values_metrics_and_curves():
    client, store, _ = make_client("unused")
    a = finished_job(
        client, store, curve(6, 3, 1.0), name="a", optimizer={"type": "sgd", "lr": 0.1}
    )
    b = finished_job(
        client,
        store,
        curve(4, 2, 2.0),
        finish="cancelled",
        name="b",
        optimizer={"type": "sgd", "lr": 0.5},
        model={"type": "mlp", "sizes": [2, 16, 2], "activation": "tanh"},
    )
    r = client.get(COMPARE, params={"ids": f"{b}, {a}"})
    assert r.status_code == 200, r.text
    body = Comparison.model_validate(r.json())
    assert body.differs == ["name", "model.sizes", "optimizer.lr"]
    assert [j.id for j in body.jobs] == [b, a]  # the order asked
    jb, ja = body.jobs
    assert ja.values == {"name": "a", "model.sizes": [2, 8, 2], "optimizer.lr": 0.1}
    assert jb.values == {"name": "b", "model.sizes": [2, 16, 2], "optimizer.lr": 0.5}
    assert (ja.status, jb.status) == ("succeeded", "cancelled")
    assert ja.metrics["val_loss"] == pytest.approx(2 / 6) and jb.metrics["train_loss"] == 0.5
    assert ja.spec["optimizer"]["lr"] == 0.1
    assert ja.series["train_loss"].steps == [1, 2, 3, 4, 5, 6]
    assert ja.series["val_loss"].steps == [3, 6] and ja.series["val_accuracy"].values == [0.5, 1]
    assert jb.series["val_loss"].values == [2.0, 1.0] and jb.series["val_loss"].total == 2
    assert "val_exact_match" not in ja.series  # never measured


def test_long_curves_are_downsampled_in_the_database(env):
    client, store, _ = env
    long = finished_job(client, store, curve(1000, 10, 1.0), name="long")
    short = finished_job(client, store, curve(30, 10, 1.0), name="short")
    body = client.get(COMPARE, params={"ids": f"{long},{short}", "points": 50}).json()
    assert body["points"] == 50
    train = body["jobs"][0]["series"]["train_loss"]
    assert train["total"] == 1000 and len(train["steps"]) == 50
    # the last step of each 20-step range: the curve's shape and its final point are kept
    assert train["steps"] == list(range(20, 1001, 20))
    assert train["values"] == [pytest.approx(1 / s) for s in train["steps"]]
    val = body["jobs"][0]["series"]["val_loss"]
    assert val["total"] == 100 and len(val["steps"]) == 50 and val["steps"][-1] == 1000
    assert val["values"][-1] == pytest.approx(2 / 1000)
    assert body["jobs"][1]["series"]["train_loss"]["steps"] == list(range(1, 31))  # all


def test_bad_ids_are_refused_naming_the_field():
    client, store, _ = make_client("unused")
    a, b = (submit(client, name=n)["id"] for n in "ab")
    for ids in (a, f"{a},{a}", f"{a},,{b}", ",".join([a] * 11), "x" * 801):
        assert locs(client.get(COMPARE, params={"ids": ids})) == [("query", "ids")], ids
    assert locs(client.get(COMPARE)) == [("query", "ids")]
    assert locs(client.get(COMPARE, params={"ids": f"{a},{b}", "points": 1})) == [
        ("query", "points")
    ]
    r = client.get(COMPARE, params={"ids": f"{a},nope"})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    assert client.get(COMPARE, params={"ids": f"{a},{b}"}).json()["differs"] == ["name"]


def test_the_client_compares_jobs_and_carries_the_422():
    test_client, store, _ = make_client("unused")
    a, b = (submit(test_client, name=n, epochs=e)["id"] for n, e in (("a", 1), ("b", 2)))
    with Client("http://testserver") as c:
        c.http = TestClient(test_client.app, base_url="http://testserver/api/v1")
        got = c.compare([a, c.job(b)], points=10)
        assert isinstance(got, Comparison) and got.differs == ["name", "epochs"]
        assert got.points == 10 and [j.id for j in got.jobs] == [a, b]
        with pytest.raises(ClientError) as err:
            c.compare([a])
    assert err.value.status_code == 422 and err.value.errors[0]["loc"] == ("ids",)


def test_flatten_follows_objects_and_lists_of_objects():
    spec = {"model": {"layers": [{"type": "linear", "out": 4}], "sizes": [2, 2]}, "seed": 0}
    assert flatten(spec) == {
        "model.layers[0].type": "linear",
        "model.layers[0].out": 4,
        "model.sizes": [2, 2],
        "seed": 0,
    }
    assert differing([{"a": 1, "b": True}, {"a": 1.0, "b": 1}]) == ["b"]  # 1 == 1.0, not True
    assert differing([{"l": [{"t": 1}]}, {"l": [{"t": 1}, {"t": 2}]}]) == ["l[1].t"]
