"""Hostile and careless input and overload (issue 16): every request bounded, never a 500.

Sections: admission limits and error echoes; dataset uploads (bombs, lying headers);
predict and explain costs; the event loop under the worst body; the crash-loop breaker
(item 5); metric points by page; verified checkpoints cached and streamed (item 7); what
the OpenAPI document promises. The auth items are in tests/test_auth.py, the schemathesis
run in tests/test_schemathesis.py."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.offload import OFFLOAD_BYTES, BodyValidator
from service.predict import Predictor
from service.store import JobStore
from tests.fakes import locs, make_client, make_dispatcher, new_job, spec, submit
from workers import checkpoint as ckpt
from workers.checkpoint import list_checkpoints, load_latest, save_checkpoint
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
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
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


# == crash-loop breaker (item 5) ================================================================


def die(store: JobStore, job_id: str, owner: str = "svc", max_attempts: int = 5) -> str:
    """One attempt that ends with its service's death: claimed, then reclaimed at restart."""
    assert [j.id for j in store.claim(owner, lambda j: j.id == job_id or False)] == [job_id]
    store.reclaim_orphans(20.0, owner=owner, everyone=True, max_attempts=max_attempts)
    return store.get(job_id).status


def test_a_job_that_keeps_killing_its_service_fails_after_max_attempts():
    store = JobStore("sqlite://")
    job_id = new_job(store).id
    assert [die(store, job_id) for _ in range(4)] == ["queued"] * 4
    assert die(store, job_id) == "failed"
    job = store.get(job_id)
    assert job.attempts == 5 and job.finished_at is not None and job.owner is None
    assert job.error == (
        "svc stopped during each of the job's last 5 attempts (SHARDGRAD_MAX_ATTEMPTS=5): "
        "the job may be what kills the service; resume it to try again"
    )
    assert store.events(job_id)[-1].message == job.error
    assert store.counts() == {"failed": 1}  # nothing left to requeue it


def test_resume_lets_a_person_try_again_with_as_many_attempts():
    store = JobStore("sqlite://")
    job_id = new_job(store).id
    for _ in range(3):
        die(store, job_id, max_attempts=3)
    assert store.get(job_id).status == "failed"
    store.resume(job_id)
    assert [die(store, job_id, max_attempts=3) for _ in range(3)] == ["queued", "queued", "failed"]


def test_only_deaths_in_a_row_count():
    """An attempt that ended another way (a graceful stop's requeue) breaks the chain."""
    store = JobStore("sqlite://")
    job_id = new_job(store).id
    die(store, job_id, max_attempts=3)
    die(store, job_id, max_attempts=3)
    store.claim("svc", lambda j: True)
    store.note(job_id, "resumed from step 5")  # notes of a running attempt do not break it
    assert store.requeue(job_id, "svc", "service stopping: checkpointed at step 7; queued")
    assert [die(store, job_id, max_attempts=3) for _ in range(3)] == ["queued", "queued", "failed"]


def test_without_a_cap_reclaim_requeues_as_before():
    store = JobStore("sqlite://")
    job_id = new_job(store).id
    for _ in range(8):
        store.claim("svc", lambda j: True)
        store.reclaim_orphans(20.0, owner="svc", everyone=True)
    assert store.get(job_id).status == "queued" and store.get(job_id).attempts == 8


@pytest.mark.timeout(60)
def test_the_dispatcher_applies_shardgrad_max_attempts_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_MAX_ATTEMPTS", "2")
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    job_id = new_job(store).id
    die(store, job_id, owner="d1", max_attempts=2)
    store.claim("d1", lambda j: True)  # the second attempt; then the service dies again
    dispatcher = make_dispatcher(tmp_path, store, train=None, paused=True)
    assert dispatcher.settings.max_attempts == 2
    dispatcher.start()
    try:
        job = store.get(job_id)
        assert job.status == "failed" and "SHARDGRAD_MAX_ATTEMPTS=2" in job.error
    finally:
        dispatcher.shutdown(timeout=10)


# == metric points by page ======================================================================


def record_points(store: JobStore, job_id: str, steps: int) -> None:
    store.claim("fake", lambda j: j.id == job_id or False)
    for step in range(1, steps + 1):
        point = {"step": step, "epoch": 0, "train_loss": 1.0 / step}
        store.progress(job_id, "fake", {"step": step, "total_steps": steps}, point)


def test_metric_points_come_a_page_at_a_time(tmp_path):
    client, store, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    record_points(store, job_id, 12)
    url = f"/api/v1/jobs/{job_id}/metrics"
    whole = client.get(url).json()  # fewer points than a page: all of them, as before
    assert [p["step"] for p in whole["points"]] == list(range(1, 13))
    assert whole["job_id"] == job_id and whole["next_cursor"] is None
    steps, cursor, pages = [], None, 0
    while True:
        params = {"limit": 5} | ({} if cursor is None else {"cursor": cursor})
        page = client.get(url, params=params).json()
        steps += [p["step"] for p in page["points"]]
        pages, cursor = pages + 1, page["next_cursor"]
        if cursor is None:
            break
    assert steps == list(range(1, 13)) and pages == 3
    assert client.get(url, params={"cursor": 12}).json() == {
        "job_id": job_id,
        "points": [],
        "next_cursor": None,
    }


@pytest.mark.parametrize(
    "params, field",
    [({"limit": 0}, "limit"), ({"limit": 10**6}, "limit"), ({"cursor": "x"}, "cursor")]
    + [({"cursor": 2**63}, "cursor"), ({"cursor": -2}, "cursor")],
)
def test_bad_metric_page_parameters_are_422_naming_them(tmp_path, params, field):
    client, _, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    r = client.get(f"/api/v1/jobs/{job_id}/metrics", params=params)
    assert locs(r) == [("query", field)]


# == verified checkpoints, cached (item 7) ======================================================


@pytest.fixture
def hashes(monkeypatch):
    """The files hashed while a test runs, from a cold verification cache."""
    hashed: list[str] = []
    real = ckpt._hash_file
    monkeypatch.setattr(
        ckpt, "_hash_file", lambda file: hashed.append(os.path.basename(file)) or real(file)
    )
    ckpt._SETTLED.clear()
    yield hashed
    ckpt._SETTLED.clear()


def saved_checkpoints(out, steps, settled=True):
    """Small checkpoints at `steps`; settled ones look written a minute ago (their mtime)."""
    model = {"w": np.arange(6.0).reshape(2, 3), "b": np.zeros(3)}
    for step in steps:
        path = save_checkpoint(out, step, model, {"state": {}}, {"step": step}, keep=None)
        if settled:
            old = time.time_ns() - 60 * 10**9
            for file in path.iterdir():
                os.utime(file, ns=(old, old))
    return out


def test_a_settled_checkpoint_is_hashed_once_then_known_by_its_stat(tmp_path, hashes):
    out = saved_checkpoints(tmp_path, [1, 2, 3])
    first = list_checkpoints(out)
    assert len(hashes) == 9  # three files each (the manifest is read, not hashed)
    assert list_checkpoints(out) == first and load_latest(out).step == 3
    assert len(hashes) == 9  # listing and loading again: a stat per file


def test_a_checkpoint_written_moments_ago_is_hashed_at_every_read(tmp_path, hashes):
    """Its mtime may not move when it changes within the same tick of the filesystem's
    clock, so it is not remembered until it has settled."""
    out = saved_checkpoints(tmp_path, [1], settled=False)
    list_checkpoints(out)
    list_checkpoints(out)
    assert len(hashes) == 6


def test_a_changed_file_is_hashed_again_and_caught(tmp_path, hashes):
    out = saved_checkpoints(tmp_path, [1, 2])
    assert [c.step for c in list_checkpoints(out)] == [1, 2]
    model = out / "checkpoints" / "step-2" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0xFF
    model.write_bytes(bytes(data))  # same size, a new mtime
    assert [c.step for c in list_checkpoints(out)] == [1]
    model.write_bytes(bytes(data[:-1]))
    assert [c.step for c in list_checkpoints(out)] == [1]
    (out / "checkpoints" / "step-1" / "manifest.json").write_text('{"files": ')  # read again
    assert list_checkpoints(out) == []


def test_downloads_stream_from_the_file_and_do_not_hash_it_again(tmp_path, hashes):
    client, _, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    saved_checkpoints(tmp_path / "jobs" / job_id, [4, 8])
    url = f"/api/v1/jobs/{job_id}/checkpoints"
    listed = client.get(url).json()
    file = tmp_path / "jobs" / job_id / "checkpoints" / "step-8" / "model.safetensors"
    hashes.clear()
    r = client.get(f"{url}/step-8/model.safetensors")
    assert r.status_code == 200 and r.content == file.read_bytes() and hashes == []
    assert r.headers["content-length"] == str(file.stat().st_size) and r.headers["etag"]
    assert r.headers["content-disposition"] == (
        f'attachment; filename="{job_id}-step-8-model.safetensors"'
    )
    assert hashlib.sha256(r.content).hexdigest() == listed[1]["sha256"]
    file.write_bytes(file.read_bytes()[:-1])  # corrupt: no longer a verified checkpoint
    assert client.get(f"{url}/step-8/model.safetensors").status_code == 404
    assert client.get(f"{url}/step-9/model.safetensors").status_code == 404


# == what the OpenAPI document promises =========================================================


def test_an_unparseable_body_is_a_documented_400(tmp_path):
    client, _, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/jobs", "/api/v1/datasets", f"/api/v1/jobs/{job_id}/predict"):
        template = path.replace(job_id, "{job_id}")
        assert "400" in paths[template]["post"]["responses"], template
        r = client.post(path, content=b"\xff\xfe\xfd", headers={"content-type": "application/json"})
        assert r.status_code in (400, 422) and r.json()["detail"], path
    for template in ("/api/v1/jobs/{job_id}/explain",):
        assert "400" in paths[template]["post"]["responses"]


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("OPTIONS", "/api/v1/jobs", "GET, POST"),
        ("PUT", "/api/v1/jobs/abc", "DELETE, GET, PATCH"),  # DELETE and PATCH: issue 18
        ("PUT", "/api/v1/datasets", "GET, POST"),
        ("GET", "/api/v1/jobs/abc/cancel", "POST"),
    ],
)
def test_a_405_allows_every_method_of_the_path(tmp_path, method, path, allow):
    client, _, _ = make_client(tmp_path)
    r = client.request(method, path)
    assert r.status_code == 405 and r.headers["allow"] == allow


@pytest.mark.parametrize("steps, status", [(8.0, 409), (8, 409), (True, 422), ("8", 422)])
def test_an_integer_is_what_json_schema_calls_one(tmp_path, steps, status):
    """8.0 is an integer to JSON Schema (and so to generated clients); true and "8" are not.
    (409: the body passed, and the job has no checkpoint yet.)"""
    client, _, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    body = {"inputs": [[0.1, 0.2]], "method": "integrated_gradients", "steps": steps}
    assert client.post(f"/api/v1/jobs/{job_id}/explain", json=body).status_code == status
