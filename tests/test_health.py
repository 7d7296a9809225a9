"""Training health: the statistics and warnings (pure functions), the trainer's checks on
Ray, the CLI's warning lines, and a job's health through the dispatcher, store and API."""

import collections
import hashlib
import json
import math
import re
import time

import numpy as np
import pytest
from sklearn.datasets import make_moons

import core.functional as F
from core import Tensor, nn, optim
from service.api.deps import get_dispatcher
from service.client import sse_events
from service.config import Settings
from service.dispatcher import Dispatcher
from tests.fakes import FakeCluster, make_client, spec
from tests.helpers import make_spec
from workers import checkpoint as ckpt
from workers.cli import main as cli_main
from workers.health import HealthMonitor, active_units, health_warnings, layer_stats, new_warnings
from workers.model import build_model
from workers.spec import MATH_FIELDS, TrainingSpec
from workers.trainer import Trainer

on_ray = pytest.mark.usefixtures("ray_session")


def sgd_step(model, X, y, lr=0.1):
    """One SGD step; returns what the trainer would hand to layer_stats (p.grad stays set)."""
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(Tensor(X)), y).backward()
    grads = [p.grad.copy() for p in model.parameters()]
    prev = [p.data.copy() for p in model.parameters()]
    optim.SGD(model.parameters(), lr=lr).step()
    return grads, prev


def kinds(warnings):
    return {(w["kind"], w["layer"]) for w in warnings}


# --- statistics and warnings -------------------------------------------------------------------


def test_deep_sigmoid_net_has_vanishing_gradients():
    model = nn.MLP([2] + [32] * 10 + [2], activation="sigmoid", seed=0)  # Glorot init
    X, y = make_moons(128, noise=0.1, random_state=0)
    stats = layer_stats(model, *sgd_step(model, X, y), active_units(model, X))
    assert [s["layer"] for s in stats] == [f"layers.{i}" for i in range(11)]
    assert all(s["dead_fraction"] is None for s in stats)  # dead units are a relu notion
    warnings = health_warnings(stats, [s["grad_norm"] for s in stats])
    assert kinds(warnings) == {("vanishing", "layers.0")}
    assert "times the last layer's" in warnings[0]["message"]


def test_relu_net_with_negative_bias_has_dead_units():
    model = nn.MLP([2, 32, 32, 2], activation="relu", seed=0, bias_init=-10.0)
    X, y = make_moons(128, noise=0.1, random_state=0)
    masks = active_units(model, X)
    stats = layer_stats(model, *sgd_step(model, X, y), masks)
    assert [s["dead_fraction"] for s in stats] == [1.0, 1.0, None]
    assert {("dead", "layers.0"), ("dead", "layers.1")} <= kinds(health_warnings(stats))


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_healthy_moons_training_has_no_warnings(activation):
    model = nn.MLP([2, 16, 16, 2], activation=activation, seed=0)
    X, y = make_moons(200, noise=0.1, random_state=0)
    initial = None
    for _ in range(100):
        masks = active_units(model, X)
        grads, prev = sgd_step(model, X, y, lr=0.2)
        stats = layer_stats(model, grads, prev, masks)
        initial = initial or [s["grad_norm"] for s in stats]
        assert health_warnings(stats, initial) == []
        for s, g, w in zip(stats, grads[::2], prev[::2], strict=True):  # plain SGD: dw = -lr g
            assert s["update_ratio"] == pytest.approx(0.2 * s["grad_norm"] / s["weight_norm"])
            assert s["grad_norm"] >= np.linalg.norm(g) and s["weight_norm"] > 0
            assert w.shape == g.shape


def test_exploding_gradients_over_a_synthetic_series():
    def stats(first, last):
        return [
            {"layer": "layers.0", "grad_norm": first, "dead_fraction": None},
            {"layer": "layers.1", "grad_norm": last, "dead_fraction": None},
        ]

    initial = [2.0, 1.0]
    series = [2.0, 20.0, 200.0, 1999.0, 2001.0, float("inf"), float("nan")]
    flagged = [
        kinds(health_warnings(stats(g, 1.0), initial)) == {("exploding", "layers.0")}
        for g in series
    ]
    assert flagged == [False, False, False, False, True, True, True]
    # without initial norms only non-finite gradients count
    assert health_warnings(stats(1e9, 1.0)) == []
    (warning,) = health_warnings(stats(1.0, float("nan")))
    assert warning["kind"] == "exploding" and warning["layer"] == "layers.1"
    assert warning["message"].startswith("layers.1: gradient norm is nan")


@pytest.mark.parametrize("chunk_rows", [4096, 7])  # one forward pass, and 8 chunks
def test_active_units_are_the_relu_outputs_above_zero_on_some_row(chunk_rows, monkeypatch):
    monkeypatch.setattr("workers.model.EVAL_CHUNK_ROWS", chunk_rows)
    model = nn.MLP([2, 16, 16, 2], activation="relu", seed=0, bias_init=-0.5)
    X = np.random.default_rng(0).normal(size=(50, 2))
    masks = active_units(model, X)
    h = X
    for layer, mask in zip(model.layers[:-1], masks, strict=True):
        h = np.maximum(h @ layer.weight.data.T + layer.bias.data, 0)
        np.testing.assert_array_equal(mask, (h > 0).any(axis=0))
    assert [m.shape for m in masks] == [(16,), (16,)] and not all(m.all() for m in masks)


def test_layer_stats_checks_its_inputs():
    model = nn.MLP([2, 4, 2], seed=0)
    params = [p.data.copy() for p in model.parameters()]
    with pytest.raises(ValueError, match="model has 4 parameters; got 3 gradients"):
        layer_stats(model, params[:3], params)


# --- the record of a run -----------------------------------------------------------------------


def monitored_steps(monitor, steps, X, y):
    """SGD steps with `monitor`'s checks where due, as the trainer runs them."""
    events = []
    for step in steps:
        before = monitor.before_step(X) if monitor.due(step) else None
        sgd_step(monitor.model, X, y)
        if before is not None:
            events.append(monitor.check(step, before))
    return events


def dead_net():
    return nn.MLP([2, 8, 8, 2], activation="relu", seed=0, bias_init=-10.0)


def test_checks_follow_the_first_step_and_every_nth():
    X, y = make_moons(64, noise=0.1, random_state=0)
    monitor = HealthMonitor(nn.MLP([2, 8, 2], seed=0), every=4)
    events = monitored_steps(monitor, range(1, 13), X, y)
    assert [e["step"] for e in events] == [1, 4, 8, 12]
    assert monitor.summary() == {"checked_steps": 4, "last_step": 12, "warnings": []}
    assert monitor.initial == [s["grad_norm"] for s in events[0]["layers"]]


def test_each_warning_is_reported_once_with_its_first_and_last_step():
    X, y = make_moons(64, noise=0.1, random_state=0)
    monitor = HealthMonitor(dead_net(), every=1)
    events = monitored_steps(monitor, range(1, 4), X, y)
    expected = {("dead", "layers.0"), ("dead", "layers.1")}
    assert all(kinds(e["warnings"]) == expected for e in events)
    assert kinds(new_warnings(events[0])) == expected
    assert new_warnings(events[1]) == new_warnings(events[2]) == []
    for w in monitor.summary()["warnings"]:
        assert (w["first_step"], w["last_step"]) == (1, 3)
    assert [w["last_step"] for w in events[1]["warnings"]] == [2, 2]  # events keep theirs


def test_the_record_resumes_from_a_checkpoint_state():
    X, y = make_moons(64, noise=0.1, random_state=0)
    whole = HealthMonitor(dead_net(), every=3)
    monitored_steps(whole, range(1, 10), X, y)
    first = HealthMonitor(dead_net(), every=3)
    monitored_steps(first, range(1, 5), X, y)
    state = json.loads(json.dumps(first.state()))  # as state.json holds it
    second = HealthMonitor(first.model, every=3, state=state)
    events = monitored_steps(second, range(5, 10), X, y)
    assert [e["step"] for e in events] == [6, 9]  # no extra check where it resumed
    assert second.state() == whole.state()


# --- the trainer -------------------------------------------------------------------------------


def train_spec(**overrides) -> TrainingSpec:
    """The distributed tests' small moons spec (18 steps of 2 workers), with a relu net."""
    relu = {"type": "mlp", "sizes": [2, 16, 16, 2], "activation": "relu"}
    return make_spec(**{"model": relu, **overrides})


def checked(steps: int, every: int) -> list[int]:
    """The steps a run of `steps` steps checks: the first, and every `every`-th."""
    return [s for s in range(1, steps + 1) if s == 1 or s % every == 0]


def train(spec: TrainingSpec, out, stop_at: int | None = None) -> tuple[dict, list[dict]]:
    """Run to the end (or stop after step `stop_at`): the summary and the health events."""
    events = []

    def callback(event):
        if event["type"] == "health":
            events.append(event)
        if event["type"] == "step" and event["step"] == stop_at:
            trainer.stop_event.set()

    trainer = Trainer(spec, out, callback=callback)
    return trainer.run(), events


def test_bias_init_starts_every_bias_and_hashes_only_when_set():
    relu = {"type": "mlp", "sizes": [2, 8, 2], "activation": "relu"}
    plain, zero = train_spec(model=relu), train_spec(model=relu | {"bias_init": 0.0})
    dead = train_spec(model=relu | {"bias_init": -10.0})
    assert all((layer.bias.data == -10.0).all() for layer in build_model(dead).layers)
    assert plain.spec_hash() == zero.spec_hash() != dead.spec_hash()
    # a zero bias_init hashes as specs did before the field existed
    fields = plain.model_dump(mode="json", include=MATH_FIELDS)
    del fields["model"]["bias_init"]
    assert fields.pop("init_from") is None  # came later too: absent when not set
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    assert plain.spec_hash() == hashlib.sha256(canonical.encode()).hexdigest()


@on_ray
def test_a_relu_net_at_lr_50_warns_of_exploding_gradients_then_fails(tmp_path):
    # mse, whose gradients grow with the error: under cross entropy's bounded gradients a
    # relu net at this rate loses its units instead of diverging.
    spec = train_spec(
        model={"type": "mlp", "sizes": [2, 16, 1], "activation": "relu"},
        loss="mse",
        optimizer={"type": "sgd", "lr": 50},
    )
    summary, events = train(spec, tmp_path)
    assert summary["status"] == "failed"
    step = int(re.fullmatch(r"diverged at step (\d+) \(loss=.+\)", summary["error"])[1])
    assert step < spec.health_every
    assert [e["step"] for e in events] == [1, step]  # checked at the failing step all the same
    exploding = [w for w in events[-1]["warnings"] if w["kind"] == "exploding"]
    assert exploding and all(w["last_step"] == step for w in exploding)
    assert any(re.search(r"gradient norm is (nan|inf)", w["message"]) for w in exploding)
    assert ("exploding", exploding[0]["layer"]) in kinds(summary["health"]["warnings"])
    assert summary["health"]["checked_steps"] == 2


@on_ray
def test_a_deep_sigmoid_net_warns_of_vanishing_gradients_on_the_cli(tmp_path, capsys):
    spec = train_spec(
        model={"type": "mlp", "sizes": [2] + [32] * 12 + [2], "activation": "sigmoid"},
        optimizer={"type": "sgd", "lr": 0.5},
        epochs=1,
        health_every=1,
    )
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json())
    code = cli_main(["train", str(path), "--out", str(tmp_path / "run"), "--json"])
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and summary["status"] == "succeeded"
    (warning,) = summary["health"]["warnings"]
    assert (warning["kind"], warning["layer"]) == ("vanishing", "layers.0")
    assert (warning["first_step"], warning["last_step"]) == (1, summary["steps"])
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1  # once, though every check raised it
    assert lines[0].startswith("warning: vanishing at step 1: layers.0: gradient norm ")


@pytest.fixture(scope="module")
def dead_run(ray_session, tmp_path_factory):
    """An uninterrupted run of a relu net whose biases start at -10: every unit is dead."""
    spec = train_spec(model={"type": "mlp", "sizes": [2, 16, 16, 2], "bias_init": -10.0})
    out = tmp_path_factory.mktemp("dead")
    return spec, out, *train(spec, out)


def test_a_relu_net_with_negative_biases_reports_dead_units(dead_run):
    spec, _, summary, events = dead_run
    assert summary["status"] == "succeeded"
    checks = checked(summary["steps"], spec.health_every)
    assert [e["step"] for e in events] == checks
    assert [s["dead_fraction"] for s in events[0]["layers"]] == [1.0, 1.0, None]
    dead = [w for w in summary["health"]["warnings"] if w["kind"] == "dead"]
    assert [(w["layer"], w["first_step"], w["last_step"]) for w in dead] == [
        ("layers.0", 1, checks[-1]),
        ("layers.1", 1, checks[-1]),
    ]
    assert "ReLU units are zero on the whole batch" in dead[0]["message"]


def test_a_resumed_run_keeps_the_health_record(tmp_path, dead_run):
    spec, out, whole, _ = dead_run
    first, _ = train(spec, tmp_path, stop_at=3)
    landed = first["steps"]  # after the steps in flight: 3, or the end of its block
    assert first["status"] == "cancelled" and 3 <= landed < spec.health_every
    assert first["health"]["last_step"] == max(checked(landed, spec.health_every))
    second, events = train(spec, tmp_path)
    assert second["resumed_from_step"] == landed
    later = [s for s in checked(whole["steps"], spec.health_every) if s > landed]
    assert later and [e["step"] for e in events] == later  # no "first" check at the resume
    assert second["health"] == whole["health"]

    def initial(run):
        return ckpt.load_latest(run).state["health"]["initial_grad_norms"]

    assert initial(tmp_path) == initial(out)


@on_ray
def test_a_healthy_run_has_no_warnings_and_checks_never_change_the_result(tmp_path):
    every_step, events = train(train_spec(health_every=1), tmp_path / "every")
    default, _ = train(train_spec(), tmp_path / "default")
    assert every_step["status"] == default["status"] == "succeeded"
    steps = every_step["steps"]
    assert every_step["health"] == {"checked_steps": steps, "last_step": steps, "warnings": []}
    default_checks = checked(steps, train_spec().health_every)
    assert len(default_checks) > 1
    assert default["health"] == {
        "checked_steps": len(default_checks),
        "last_step": default_checks[-1],
        "warnings": [],
    }
    for event in events:
        layers = event["layers"]
        assert [s["layer"] for s in layers] == ["layers.0", "layers.1", "layers.2"]
        assert all(s["grad_norm"] > 0 and s["update_ratio"] > 0 for s in layers)
        assert all(0 <= s["dead_fraction"] <= 0.5 for s in layers[:2])
        assert layers[2]["dead_fraction"] is None
    a, b = (ckpt.load_latest(tmp_path / run).model_state for run in ("every", "default"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --- the service -------------------------------------------------------------------------------


def train_with_checks(checks: list[dict]):
    """A stand-in for workers.trainer.train that sends `checks` with its steps, the first
    after its step's metrics, the others before theirs."""

    def train(spec, out_dir, *, callback, stop_event, settings, abandon_event):
        total = len(checks)
        callback({"type": "started", "total_steps": total, "step": 0, "resumed_from_step": None})
        for i, check in enumerate(checks):
            point = {"type": "step", "step": check["step"], "total_steps": total, "epoch": 0}
            point |= {"train_loss": 0.5, "grad_norm": 1.0}
            for event in (point, check) if i == 0 else (check, point):
                callback(event)
        return {"status": "succeeded", "steps": total}

    return train


def test_a_jobs_health_through_the_dispatcher_store_and_api(tmp_path):
    client, store, _ = make_client(tmp_path, store_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    X, y = make_moons(64, noise=0.1, random_state=0)
    checks = monitored_steps(HealthMonitor(dead_net(), every=1), [1, 2], X, y)
    checks[1]["layers"][0]["grad_norm"] = math.inf  # JSON has no inf: the API says null
    settings = Settings(data_dir=tmp_path, instance_id="d1", poll_interval_s=0.05)
    dispatcher = Dispatcher(store, settings, FakeCluster(), train=train_with_checks(checks))
    job_id = client.post("/api/v1/jobs", json=spec(workers=1)).json()["id"]
    dispatcher.start()
    try:
        deadline = time.monotonic() + 20
        while store.get(job_id).status != "succeeded" and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        dispatcher.shutdown()

    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    health = job["health"]
    assert health["step"] == 2 and health["layers"][0]["grad_norm"] is None
    assert health["layers"][1] == checks[1]["layers"][1]
    assert health["warnings"] == checks[1]["warnings"]
    assert {(w["first_step"], w["last_step"]) for w in health["warnings"]} == {(1, 2)}

    points = client.get(f"/api/v1/jobs/{job_id}/metrics").json()["points"]
    assert [p["step"] for p in points] == [1, 2]
    for p, check in zip(points, checks, strict=True):  # neither write erased the other
        assert p["train_loss"] == 0.5 and len(p["layers"]) == len(check["layers"])
    assert points[0]["layers"] == checks[0]["layers"]
    for p, check in zip(points, checks, strict=True):  # the warnings each check raised
        raised = [w for w in check["warnings"] if w["last_step"] == check["step"]]
        assert raised and p["warnings"] == raised

    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as r:
        streamed = dict(sse_events(r.iter_lines()))
    assert streamed["status"]["health"] == health
    assert [p["layers"] for p in streamed["metrics"]["points"]] == [p["layers"] for p in points]

    client.app.dependency_overrides[get_dispatcher] = lambda: dispatcher
    text = client.get("/metrics").text
    raised = collections.Counter(w["kind"] for w in checks[1]["warnings"])  # once each
    for kind in ("exploding", "vanishing", "dead"):
        assert f'shardgrad_health_warnings_total{{kind="{kind}"}} {raised[kind]:.1f}' in text
