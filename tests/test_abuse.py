"""Hostile and careless input (issue 16): every request bounded, never a 500.

Sections: admission limits and error echoes; dataset uploads (bombs, lying headers);
predict and explain costs; the event loop under the worst body."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.offload import OFFLOAD_BYTES, BodyValidator
from service.predict import Predictor
from tests.fakes import locs, make_client, spec
from workers.checkpoint import save_checkpoint
from workers.model import build_model
from workers.spec import TrainingSpec

JOBS = "/api/v1/jobs"


@pytest.fixture
def client(tmp_path, monkeypatch):
    """The app with a fake dispatcher; a server error is answered (500), not raised."""
    monkeypatch.setenv("SHARDGRAD_DATASETS_DIR", str(tmp_path / "datasets"))
    app = make_client(tmp_path)[0].app
    return TestClient(app, raise_server_exceptions=False)


def post_raw(client, url: str, body: str | bytes):
    """`body` exactly as given (json= would refuse a lone surrogate or re-encode numbers)."""
    return client.post(url, content=body, headers={"content-type": "application/json"})


def errors_of(r) -> list[dict]:
    assert r.status_code == 422, r.text
    return r.json()["detail"]


def message(r, loc: tuple) -> str:
    return next(e["msg"] for e in errors_of(r) if tuple(e["loc"]) == loc)


# -- abuse-input: the table, admission limits and error echoes --------------------


def test_a_lone_surrogate_is_422_and_escaped_in_the_echo(client):
    body = json.dumps(spec(name="\ud800"))  # json.dumps writes it as the escape \\ud800
    r = post_raw(client, JOBS, body)
    (error,) = errors_of(r)
    assert tuple(error["loc"]) == ("body", "name") and error["input"] == "\\ud800"


def test_integers_beyond_64_bits_are_422(client):
    body = json.dumps(spec(workers=10**309, batch_size=10**309))
    r = post_raw(client, JOBS, body)
    assert {("body", "workers"), ("body", "batch_size")} <= set(map(tuple, locs(r)))
    assert len(r.content) < 4000  # the 310-digit inputs are echoed cut short


def test_floats_beyond_float64_are_422(client):
    body = json.dumps(spec()).replace('"lr": 0.1', '"lr": 1e400')
    assert '"lr": 1e400' in body
    assert ("body", "optimizer", "sgd", "lr") in locs(post_raw(client, JOBS, body))
    body = json.dumps(spec()).replace('"lr": 0.1', f'"lr": {10**400}')
    assert ("body", "optimizer", "sgd", "lr") in locs(post_raw(client, JOBS, body))


def test_a_cursor_beyond_64_bits_is_422(client):
    r = client.get(JOBS, params={"cursor": "OTk5OTk5OTk5OTk5OTk5OTk5OTk"})
    assert locs(r) == [("query", "cursor")]
    assert client.get(JOBS, params={"cursor": "LTE"}).status_code == 422  # "-1"


def test_a_megabyte_of_layer_widths_is_refused_briefly(client):
    body = spec(model={"type": "mlp", "sizes": [0] * 400_000})
    r = client.post(JOBS, json=body)
    assert locs(r) == [("body", "model", "mlp", "sizes")]
    assert "at most 1000" in r.text and len(r.content) < 2000


def test_the_error_list_is_capped_with_a_count_of_the_rest(client):
    body = spec() | {f"extra_{i}": i for i in range(100)}
    detail = errors_of(client.post(JOBS, json=body))
    assert len(detail) == 21
    assert detail[-1]["type"] == "too_many_errors" and "80 more errors" in detail[-1]["msg"]


def test_echoed_inputs_are_cut_short(client):
    r = client.post(JOBS, json=spec(name="x" * 100_000))
    (error,) = errors_of(r)
    assert error["input"].startswith("xxx") and "99920 more characters" in error["input"]
    r = post_raw(client, JOBS, json.dumps([list(range(1000))] * 100))
    assert len(r.content) < 2000


def test_a_process_bomb_of_workers_is_refused_by_the_workers_limit(client):
    r = client.post(JOBS, json=spec(workers=5000, cpus_per_worker=0.0002, batch_size=5000))
    assert "SHARDGRAD_MAX_WORKERS" in message(r, ("body", "workers"))
    assert "5,000, over the limit of 64" in message(r, ("body", "workers"))


def test_cpus_per_worker_is_in_rays_steps_of_a_ten_thousandth(client):
    r = client.post(JOBS, json=spec(cpus_per_worker=0.00015))
    assert "multiple of 0.0001" in message(r, ("body", "cpus_per_worker"))
    assert locs(client.post(JOBS, json=spec(cpus_per_worker=0.00001))) == [
        ("body", "cpus_per_worker")
    ]
    assert client.post(JOBS, json=spec(cpus_per_worker=0.0003)).status_code == 201


def test_a_7_gb_model_is_refused_by_the_parameter_and_memory_limits(client):
    r = client.post(JOBS, json=spec(model={"type": "mlp", "sizes": [2, 30000, 30000, 2]}))
    msgs = [e["msg"] for e in errors_of(r)]
    assert any("900,180,002" in m and "SHARDGRAD_MAX_MODEL_PARAMS" in m for m in msgs)
    assert any("SHARDGRAD_MAX_JOB_MEMORY_BYTES" in m for m in msgs)


def test_the_memory_limit_counts_parameters_optimizer_state_and_data(tmp_path):
    client = make_client(tmp_path, max_job_memory_bytes=100_000)[0]
    sgd = spec(model={"type": "mlp", "sizes": [2, 8, 2]})
    assert client.post(JOBS, json=sgd).status_code == 201
    big = spec(model={"type": "mlp", "sizes": [2, 512, 2]})  # 2,562 parameters
    r = client.post(JOBS, json=big)
    assert "SHARDGRAD_MAX_JOB_MEMORY_BYTES" in message(r, ("body", "model", "mlp", "sizes"))


def test_a_job_that_needs_more_memory_than_the_node_has_is_refused(client, monkeypatch):
    monkeypatch.setattr("service.limits.psutil.virtual_memory", lambda: SimpleNamespace(total=1000))
    r = client.post(JOBS, json=spec())
    assert "more than this node's 1,000" in message(r, ("body", "model", "mlp", "sizes"))


@pytest.mark.parametrize("priority", [2**63 - 1, 1001, -1001])
def test_priority_is_in_minus_1000_to_1000(client, priority):
    assert locs(client.post(JOBS, json=spec(priority=priority))) == [("body", "priority")]


def test_total_steps_and_kept_checkpoints_are_limited(tmp_path):
    client = make_client(tmp_path, max_total_steps=100, max_keep_checkpoints=5)[0]
    r = client.post(JOBS, json=spec(epochs=10**18, keep_checkpoints=6))
    assert "SHARDGRAD_MAX_TOTAL_STEPS" in message(r, ("body", "epochs"))
    assert "SHARDGRAD_MAX_KEEP_CHECKPOINTS" in message(r, ("body", "keep_checkpoints"))
    assert client.post(JOBS, json=spec(epochs=12, keep_checkpoints=5)).status_code == 201


def test_a_builtin_dataset_is_held_to_the_values_limit(tmp_path):
    client = make_client(tmp_path, max_dataset_values=1000)[0]
    r = client.post(JOBS, json=spec(data={"type": "builtin", "name": "moons", "n_samples": 400}))
    assert "SHARDGRAD_MAX_DATASET_VALUES" in message(r, ("body", "data", "builtin", "n_samples"))


# -- abuse-input: dataset uploads ---------------------------------------------------------

DATASETS = "/api/v1/datasets"


def upload(client, name: str, raw: bytes):
    return client.post(DATASETS, files={"file": (name, raw, "application/octet-stream")})


def npz(**members: bytes) -> bytes:
    """A zip archive of raw .npy members, deflated, as np.savez_compressed writes them."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(f"{name}.npy", data)
    return out.getvalue()


def npy(shape: tuple, data: bytes = b"", dtype: str = "<f8") -> bytes:
    """A .npy member whose header claims `shape`, followed by `data` (true or not)."""
    out = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue() + data


def real_npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def test_a_csv_with_a_lone_carriage_return_is_422(client):
    r = upload(client, "d.csv", b"a,b,y\n1,2\r3,0\n4,5,1\n")  # \r ends a row, as in Excel
    assert "data row 1 has 2 columns" in message(r, ("body", "file"))
    r = upload(client, "d.csv", b'a,b,y\n1,"2\r3",0\n4,5,1\n')
    assert "column 'b'" in message(r, ("body", "file"))


def test_a_csv_the_csv_module_cannot_read_is_422(client):
    r = upload(client, "d.csv", b"a,b,y\n1,2,0\n1," + b"x" * 200_000 + b",0\n")
    assert "line 3 of the .csv file: field larger than" in message(r, ("body", "file"))


def test_a_csv_that_is_not_utf8_is_422(client):
    assert "UTF-8" in message(upload(client, "d.csv", b"a,b,y\n1,\xff,0\n"), ("body", "file"))


def test_an_npz_whose_header_claims_14_tib_is_422_before_allocating(client):
    raw = npz(X=npy((10**12, 2)), y=npy((10**12,)))
    assert len(raw) < 600
    msg = message(upload(client, "bomb.npz", raw), ("body", "file"))
    assert "2,000,000,000,000 values" in msg and "SHARDGRAD_MAX_DATASET_VALUES" in msg


def test_an_npz_that_deflates_1000_to_1_is_refused_by_its_header(tmp_path):
    client = make_client(tmp_path, max_dataset_values=100_000)[0]
    X = real_npy(np.zeros((1_000_000, 2)))  # 16 MB of zeros, deflated to ~16 kB
    raw = npz(X=X, y=real_npy(np.zeros(1_000_000)))
    assert len(raw) * 500 < len(X)
    msg = message(upload(client, "bomb.npz", raw), ("body", "file"))
    assert "2,000,000 values" in msg and "SHARDGRAD_MAX_DATASET_VALUES" in msg


@pytest.mark.parametrize(
    "member, words",
    [
        (npy((1000, 2), b"\0" * 160), "does not match its header"),  # claims more than it holds
        (npy((2, 2), b"\0" * 4000), "does not match its header"),  # holds more than it claims
        (npy((4, 2), b"\0" * 64, dtype="|O"), "real numbers"),
        (npy((4, 2), b"\0" * 64, dtype="<U2"), "real numbers"),
        (b"\x93NUMPY\x09\x00" + b"\0" * 64, "X is not a readable .npy array"),
        (npy((2, 2), b"\0" * 32).replace(b"'shape'", b"'shapf'"), "X is not a readable .npy"),
    ],
)
def test_an_npz_with_a_lying_or_bad_header_is_422(client, member, words):
    raw = npz(X=member, y=real_npy(np.arange(4) % 2))
    assert words in message(upload(client, "lies.npz", raw), ("body", "file"))


def test_a_csv_over_the_values_limit_is_422(tmp_path):
    client = make_client(tmp_path, max_dataset_values=1000)[0]
    raw = b"a,b,y\n" + b"0.5,0.25,1\n" * 400
    msg = message(upload(client, "big.csv", raw), ("body", "file"))
    assert "more than 1,000 values" in msg and "SHARDGRAD_MAX_DATASET_VALUES" in msg


# -- abuse-input: predict and explain cost, the predict cache ------------------------------


def with_checkpoint(client, tmp_path, **overrides) -> str:
    """A submitted job with one checkpoint of its initial model; its URL."""
    r = client.post(JOBS, json=spec(**overrides))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    model = build_model(TrainingSpec.model_validate(spec(**overrides)))
    save_checkpoint(tmp_path / "jobs" / job_id, 1, model.state_dict(), {"state": {}}, {"step": 1})
    return f"{JOBS}/{job_id}"


WIDE = {"type": "mlp", "sizes": [2, 512, 512, 2]}  # 264,192 multiply-adds a row


def test_predict_cost_is_counted_in_model_flops(tmp_path):
    client = make_client(tmp_path, max_predict_flops=10**6)[0]
    url = with_checkpoint(client, tmp_path, model=WIDE)
    assert client.post(f"{url}/predict", json={"inputs": [[0.1, 0.2]] * 3}).status_code == 200
    r = client.post(f"{url}/predict", json={"inputs": [[0.1, 0.2]] * 4})
    msg = message(r, ("body", "inputs"))
    assert "1,056,768" in msg and "SHARDGRAD_MAX_PREDICT_FLOPS" in msg


def test_explain_cost_is_counted_in_model_flops(tmp_path):
    client = make_client(tmp_path, max_explain_flops=10**7)[0]
    url = with_checkpoint(client, tmp_path, model=WIDE)
    row = {"inputs": [[0.1, 0.2]]}
    assert client.post(f"{url}/explain", json=row).status_code == 200
    r = client.post(f"{url}/explain", json=row | {"method": "integrated_gradients", "steps": 8})
    assert "SHARDGRAD_MAX_EXPLAIN_FLOPS" in message(r, ("body", "steps"))
    r = client.post(f"{url}/explain", json={"inputs": [[0.1, 0.2]] * 20})
    assert "SHARDGRAD_MAX_EXPLAIN_FLOPS" in message(r, ("body", "inputs"))


def test_hours_of_integrated_gradients_on_a_wide_model_are_refused(client):
    """The review's case: the old cap counted input width only, and 1000 rows x 1024 steps
    of a [1, 4096, 4096, 1] model passed it. Refused before any model is loaded."""
    model = {"type": "mlp", "sizes": [1, 4096, 4096, 1]}
    data = {"type": "builtin", "name": "sine", "n_samples": 200}
    r = client.post(JOBS, json=spec(model=model, data=data, loss="mse"))
    assert r.status_code == 201, r.text
    body = {"inputs": [[0.5]] * 1000, "method": "integrated_gradients", "steps": 1024}
    r = client.post(f"{JOBS}/{r.json()['id']}/explain", json=body)
    assert "SHARDGRAD_MAX_EXPLAIN_FLOPS" in message(r, ("body", "steps"))


def test_the_predict_cache_is_bounded_in_bytes(tmp_path):
    s = TrainingSpec.model_validate(spec(model=WIDE))
    model = build_model(s)
    one = sum(p.data.nbytes for p in model.parameters())
    predictor = Predictor(cache_bytes=one + one // 2)
    for job in ("a", "b", "c"):
        save_checkpoint(tmp_path / job, 1, model.state_dict(), {"state": {}}, {"step": 1})
        predictor.predict(s, tmp_path / job, [[0.1, 0.2]])
        assert predictor.cached_bytes() == one  # the newest only: two would not fit
    predictor.cache_bytes = one // 2
    save_checkpoint(tmp_path / "d", 1, model.state_dict(), {"state": {}}, {"step": 1})
    predictor.predict(s, tmp_path / "d", [[0.1, 0.2]])
    assert predictor.cached_bytes() == 0  # larger than the whole cache: not kept


# -- abuse-input: large bodies are validated off the event loop ----------------------------


def test_a_large_body_is_validated_elsewhere_and_answers_as_a_small_one(tmp_path):
    client = make_client(tmp_path)[0]
    url = with_checkpoint(client, tmp_path)
    rows = np.random.default_rng(0).uniform(-1, 1, (4000, 2)).tolist()
    assert len(json.dumps({"inputs": rows})) > OFFLOAD_BYTES
    large = client.post(f"{url}/predict", json={"inputs": rows})
    small = client.post(f"{url}/predict", json={"inputs": rows[:10]})
    assert large.status_code == small.status_code == 200
    assert large.json()["outputs"][:10] == small.json()["outputs"]


def test_a_large_body_with_every_value_wrong_answers_20_errors_and_the_count(tmp_path):
    client = make_client(tmp_path)[0]
    url = with_checkpoint(client, tmp_path)
    r = client.post(f"{url}/predict", json={"inputs": [["x", "y"]] * 10_000})
    detail = errors_of(r)
    assert [tuple(e["loc"]) for e in detail[:2]] == [
        ("body", "inputs", 0, 0),
        ("body", "inputs", 0, 1),
    ]
    assert detail[-1]["type"] == "too_many_errors" and "19980 more errors" in detail[-1]["msg"]
    assert len(r.content) < 5000


class HeldExecutor(ThreadPoolExecutor):
    """Runs each job only once the test releases it, and says when one has arrived."""

    def __init__(self):
        super().__init__(1)
        self.arrived, self.release = threading.Event(), threading.Event()

    def submit(self, fn, *args):
        self.arrived.set()
        return super().submit(lambda: self.release.wait(10) and fn(*args))


def test_healthz_answers_while_a_large_body_is_validated(tmp_path):
    """Ordering, not timing: while the worst body waits for its validator, the event loop
    still answers /healthz; the body's 422 comes after. (benchmarks/hostile.py times it.)"""
    app = make_client(tmp_path)[0].app
    held = HeldExecutor()
    app.state.body_validator = BodyValidator(held)
    worst = b"[" + b"{}," * 349_000 + b"{}]"

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            headers = {"content-type": "application/json"}
            big = asyncio.create_task(c.post(JOBS, content=worst, headers=headers))
            while not (held.arrived.is_set() or big.done()):
                await asyncio.sleep(0.01)
            health = await c.get("/healthz")
            pending = not big.done()
            held.release.set()
            return health, pending, await big

    try:
        health, pending, big = asyncio.run(main())
    finally:
        held.release.set()
        held.shutdown()
    assert health.status_code == 200 and pending
    assert locs(big) == [("body",)]
