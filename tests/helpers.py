"""What the test modules share: optional dependencies, and the specs of examples/*.json.

Test modules import from here (or use conftest's fixtures), never from each other."""

from __future__ import annotations

import copy
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


# -- specs -----------------------------------------------------------------------------------


def example_spec(example: str, /, **overrides) -> dict:
    """examples/<example>.json as a dict, with top-level fields replaced by `overrides`."""
    spec = json.loads((EXAMPLES / f"{example}.json").read_text())
    spec.update(copy.deepcopy(overrides))
    return spec


def small_moons(**overrides) -> dict:
    """examples/moons.json made small for tests: 200 samples (160 for training), a
    [2, 8, 2] tanh MLP, 3 epochs, 2 workers of half a CPU, a checkpoint every 5 steps."""
    small = {
        "model": {"type": "mlp", "sizes": [2, 8, 2], "activation": "tanh"},
        "data": {"type": "builtin", "name": "moons", "n_samples": 200, "noise": 0.1},
        "epochs": 3,
        "workers": 2,
        "cpus_per_worker": 0.5,
        "checkpoint_every": 5,
    }
    return example_spec("moons", **{**small, **overrides})


# A small CNN over every layer type: 1x28x28 -> conv s2 -> 4x13x13 -> max pool -> 4x6x6 ->
# conv pad 1 -> 6x6x6 -> avg pool -> 6x3x3 -> flatten 54 -> dropout -> linear 4.
SMALL_CNN = {
    "type": "sequential",
    "input_shape": [1, 28, 28],
    "layers": [
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "stride": 2},
        {"type": "relu"},
        {"type": "max_pool2d", "kernel_size": 2},
        {"type": "conv2d", "out_channels": 6, "kernel_size": [3, 3], "padding": 1},
        {"type": "tanh"},
        {"type": "avg_pool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.3},
        {"type": "linear", "out_features": 4},
    ],
}


def small_cnn(**overrides) -> dict:
    """examples/shapes-cnn.json made small for tests: SMALL_CNN (dropout on) in float64 on
    160 shapes (128 for training), batch 30, 2 epochs, a checkpoint every 5 steps."""
    small = {
        "model": copy.deepcopy(SMALL_CNN),
        "data": {"type": "builtin", "name": "shapes", "n_samples": 160, "noise": 0.1},
        "dtype": "float64",
        "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9},
        "epochs": 2,
        "batch_size": 30,
        "cpus_per_worker": 0.5,
        "checkpoint_every": 5,
        "health_every": 3,
    }
    return example_spec("shapes-cnn", **{**small, **overrides})


# Fails at step 1 (Diverged): its loss and gradient are finite, but lr * gradient overflows
# float32. Spec fields to override a small spec with.
OVERFLOWING = {
    "model": {"type": "mlp", "sizes": [2, 8, 1], "activation": "tanh", "bias_init": 10.0},
    "loss": "mse",
    "dtype": "float32",
    "optimizer": {"type": "sgd", "lr": 1e38},
    "checkpoint_every": 1,
}


# digits as 1x8x8 images: conv 1->4 (pad 1) + relu, max pool 2 (4x4x4), flatten, linear 10.
DIGITS_CNN = {
    "type": "sequential",
    "input_shape": [1, 8, 8],
    "layers": [
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "max_pool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 10},
    ],
}


def digits_cnn(**overrides) -> dict:
    """A tiny CNN on digits as images, in-process (workers 0): the service's CNN job."""
    data = {"type": "builtin", "name": "digits"}
    small = {"name": "digits-cnn", "model": copy.deepcopy(DIGITS_CNN), "data": data}
    return small_cnn(**{**small, "workers": 0, **overrides})


def make_spec(**overrides):
    """The distributed tests' TrainingSpec: the small moons run named "t", global batch 30
    (160 training rows: 6 steps per epoch, the last one 10 rows)."""
    from workers.spec import TrainingSpec

    return TrainingSpec.model_validate(small_moons(**{"name": "t", "batch_size": 30, **overrides}))


def write_trained_checkpoint(spec, out, steps: int):
    """Train `spec` (a TrainingSpec) in-process for `steps` full-batch steps with the engine,
    write the model as the checkpoint of step `steps` in `out`, and return the model."""
    from core import Tensor
    from workers.checkpoint import save_checkpoint
    from workers.data import PreparedData
    from workers.model import LOSSES, build_model, build_optimizer

    model, data = build_model(spec), PreparedData(spec)
    optimizer = build_optimizer(spec, model.parameters())
    for _ in range(steps):
        optimizer.zero_grad()
        LOSSES[spec.loss](model(Tensor(data.X)), data.y).backward()
        optimizer.step()
    save_checkpoint(out, steps, model.state_dict(), {"state": {}}, {"step": steps})
    return model


# AdamW, a cosine schedule with warmup and clipping: for make_spec's 18 steps.
RECIPE = {
    "optimizer": {
        "type": "adamw",
        "lr": 0.05,
        "schedule": {"type": "cosine", "warmup_steps": 8, "min_lr": 0.001},
    },
    "grad_clip": {"max_norm": 0.3},
}


def reference_loop(spec) -> dict:
    """Plain single-process training of `spec` (a TrainingSpec) on its global batches,
    written with core alone: the loss's mean over the batch (a language model's: each
    sample's mean over its tokens, averaged), dropout masks keyed by the rows' dataset
    indices and epoch, as the contract says. Returns the final state dict."""
    from core import Tensor, nn
    from core.lm import TransformerLM
    from workers.data import PreparedData
    from workers.model import LOSSES, build_model, build_optimizer, next_token_losses
    from workers.sampler import Schedule

    data = PreparedData(spec)
    schedule = Schedule(len(data.X), spec.batch_size, spec.epochs, spec.seed)
    model = build_model(spec).train()
    opt = build_optimizer(spec, model.parameters())
    for step in range(schedule.total_steps):
        idx = schedule.batch(step)
        opt.zero_grad()
        with nn.sample_context(schedule.epoch_of(step), idx):
            if isinstance(model, TransformerLM):
                loss = next_token_losses(model, data.X[idx]).mean()
            else:
                loss = LOSSES[spec.loss](model(Tensor(data.X[idx])), data.y[idx])
        loss.backward()
        opt.step()
    return model.state_dict()


def assert_close(got: dict, expected: dict, atol: float = 1e-9) -> None:
    """Two state dicts with the same keys, equal within `atol`."""
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=atol)


def assert_identical(got: dict, expected: dict) -> None:
    """Two state dicts with the same keys, bit-identical."""
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def final_params(out) -> dict:
    """The model parameters of a run's newest checkpoint."""
    from workers import checkpoint

    return checkpoint.load_latest(out).model_state


def kill_9_after_a_checkpoint(proc, out, timeout: float = 120) -> int:
    """Wait until the run `proc` writing into `out` has a checkpoint, kill -9 it, and
    return the newest checkpoint's step."""
    from workers import checkpoint

    deadline = time.time() + timeout
    while not checkpoint.list_checkpoints(out) and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.list_checkpoints(out), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return checkpoint.load_latest(out).step


_KILL_AT = """
import os, signal, sys
from workers.spec import TrainingSpec
from workers.trainer import Trainer

def kill(event):
    if event["type"] == "checkpoint" and event["step"] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)

Trainer(TrainingSpec.model_validate_json(sys.argv[1]), sys.argv[2], callback=kill).run()
"""


def kill_9_at_checkpoint(spec, out, step: int) -> None:
    """Run `spec` (a TrainingSpec) into `out` in another process that kill -9s itself
    right after writing its checkpoint of `step`: a crash at a step the test chooses."""
    args = [sys.executable, "-c", _KILL_AT, spec.model_dump_json(), str(out), str(step)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


# -- optional dependencies ---------------------------------------------------------------------


def under_ci() -> bool:
    return os.environ.get("CI") == "true"


def require(module: str):
    """importorskip, except under CI=true, where a missing dependency is a failure."""
    if under_ci():
        return importlib.import_module(module)  # the submodule itself, as importorskip gives
    return pytest.importorskip(module)


def unavailable(reason: str):
    """Skip, except under CI=true, where a missing dependency is a failure (as `require`)."""
    if under_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


# -- time ----------------------------------------------------------------------------------


def wait_for(predicate, timeout: float = 60.0) -> None:
    """Poll until `predicate()` holds. `timeout` bounds a stuck test; it is not a deadline
    that the behaviour under test must meet (a loaded machine may be slow)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


class FakeClock:
    """A stand-in for a module's `time`: monotonic() reads a clock the test moves by hand
    (`clock.now += s`); everything else (sleep) is the real one. Patch it in with
    monkeypatch.setattr("service.dispatcher.time", FakeClock())."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


# -- `shardgrad serve` processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, port: int | None = None, **env):
        self.data_dir, self.port = data_dir, port or free_port()
        self.env = {**os.environ, "SHARDGRAD_RAY_NUM_CPUS": "2", **env}
        self.env.pop("RAY_ADDRESS", None)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        log = open(self.data_dir.parent / f"server-{self.port}.log", "ab")  # noqa: SIM115
        cmd = [sys.executable, "-m", "service", "serve", "--port", str(self.port)]
        cmd += ["--data-dir", str(self.data_dir)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=log)
        return self

    def wait_ready(self, timeout=90.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}"
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not become healthy")

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=30)

    def stop(self, sig=signal.SIGTERM, timeout=60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def wait_job(client, job_id, until, timeout=120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there: {job['status']} {job['progress']}")


# -- torch twins -----------------------------------------------------------------------------


def torch_lm(torch, vocab_size, context, d_model, heads, layers, ff):
    """The torch module a `transformer` model spec's state dict loads into (the README's
    recipe): nn.Embedding, nn.TransformerEncoderLayer, nn.LayerNorm and nn.Linear, float64."""
    T = torch.nn

    class LM(T.Module):
        def __init__(self):
            super().__init__()
            kw = {"dtype": torch.float64}
            self.tok_emb = T.Embedding(vocab_size, d_model, **kw)
            self.pos_emb = T.Embedding(context, d_model, **kw)
            self.blocks = T.ModuleList(
                T.TransformerEncoderLayer(
                    d_model, heads, ff, 0.0, "gelu", batch_first=True, norm_first=True, **kw
                )
                for _ in range(layers)
            )
            self.norm = T.LayerNorm(d_model, **kw)
            self.head = T.Linear(d_model, vocab_size, **kw)

        def forward(self, tokens):
            t = tokens.shape[1]
            x = self.tok_emb(tokens) + self.pos_emb(torch.arange(t))
            mask = T.Transformer.generate_square_subsequent_mask(t, dtype=x.dtype)
            for block in self.blocks:
                x = block(x, src_mask=mask, is_causal=True)
            return self.head(self.norm(x))

    return LM()


def assert_matches_torch(torch, ours_fn, torch_fn, arrays, seed=0, atol=1e-9):
    """ours_fn(*Tensors) against torch_fn(*torch tensors) made from the same float64
    `arrays`: the values, then every input's gradient for one random output gradient."""
    from core import Tensor

    ours = [Tensor(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    y, ty = ours_fn(*ours), torch_fn(*theirs)
    g = np.random.default_rng(seed).standard_normal(y.shape)
    y.backward(g)
    ty.backward(torch.tensor(g))
    pairs = [(y.data, ty), *((a.grad, b.grad) for a, b in zip(ours, theirs, strict=True))]
    for a, b in pairs:
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=0, atol=atol)
