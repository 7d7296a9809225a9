"""Export (issue 17, section 4): ONNX graphs that onnxruntime runs to predict's outputs, and
safetensors that load with load_state_dict(strict=True) into the torch module their
metadata describes; for an MLP, a small CNN and a tiny transformer. Then the HTTP route
and `shardgrad export`, for a job and for a run directory."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core import Tensor
from service import cli
from service.client import Client
from tests.fakes import make_client, submit
from tests.fakes import spec as service_spec
from tests.helpers import require, small_cnn, small_moons, torch_lm, write_trained_checkpoint
from workers.checkpoint import save_checkpoint
from workers.explain import predict
from workers.export import DESCRIPTION_KEY, export_run
from workers.model import build_model, build_optimizer, next_token_losses
from workers.spec import TrainingSpec

TINY_LM = {
    "type": "transformer",
    "vocab_size": 11,
    "context": 6,
    "d_model": 8,
    "heads": 2,
    "layers": 2,
    "dim_feedforward": 12,
    "dropout": 0.1,
}
# Its data is not read: the test gives the tokens.
LM_SPEC = {**small_moons(), "name": "lm", "model": TINY_LM, "loss": "cross_entropy", "workers": 0}
SPECS = {"mlp": small_moons(), "cnn": small_cnn(), "transformer": LM_SPEC}


def tokens(n: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY_LM["vocab_size"], (n, t))


def train_lm(spec: TrainingSpec, out, steps: int):
    """The tiny transformer after `steps` Adam steps on random tokens, as a checkpoint."""
    model = build_model(spec)
    opt = build_optimizer(spec, model.parameters())
    X = tokens(8, TINY_LM["context"] + 1)
    for _ in range(steps):
        opt.zero_grad()
        next_token_losses(model, X).mean().backward()
        opt.step()
    save_checkpoint(out, steps, model.state_dict(), {"state": {}}, {"step": steps})
    return model


@pytest.fixture(scope="module", params=list(SPECS))
def trained(request, tmp_path_factory):
    """(spec, run dir, model): a model trained 3 steps, its checkpoint step-3 in run dir."""
    spec = TrainingSpec.model_validate(SPECS[request.param])
    out = tmp_path_factory.mktemp(request.param)
    train = train_lm if spec.model.type == "transformer" else write_trained_checkpoint
    return spec, out, train(spec, out, 3)


def sample_inputs(spec: TrainingSpec) -> np.ndarray:
    """Inputs of the model: 4 rows of features or images, or 3 rows of 5 tokens."""
    if spec.model.type == "transformer":
        return tokens(3, 5, seed=1)
    shape = getattr(spec.model, "input_shape", None) or [spec.model.in_width]
    return np.random.default_rng(1).standard_normal((4, *shape))


def ours(spec: TrainingSpec, model, X: np.ndarray) -> np.ndarray:
    if spec.model.type == "transformer":
        return model(X).data
    return predict(model, X.reshape(len(X), -1))  # /predict's outputs for these rows


def onnx_outputs(data: bytes, X: np.ndarray) -> np.ndarray:
    ort = require("onnxruntime")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "output")
    assert inp.shape[0] == "batch"  # a dynamic batch dimension
    x = X.astype(np.int64 if X.dtype.kind == "i" else np.float32)
    return session.run(None, {"input": x})[0]


def test_onnx_outputs_equal_predict(trained):
    spec, out, model = trained
    exported = export_run(spec, out, "onnx")
    assert exported.checkpoint == "step-3"
    X = sample_inputs(spec)
    got = onnx_outputs(exported.data, X)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ours(spec, model, X), rtol=1e-5, atol=1e-5)
    if spec.model.type == "transformer":  # any token count up to the context
        full = tokens(2, TINY_LM["context"], seed=2)
        np.testing.assert_allclose(
            onnx_outputs(exported.data, full), ours(spec, model, full), rtol=1e-5, atol=1e-5
        )


def torch_module(torch, description: dict):
    """The torch module a `torch` export describes (the README's recipe)."""
    T = torch.nn
    if description["type"] == "TransformerLM":
        return torch_lm(torch, *description["args"])
    layers = [
        getattr(T, d["type"])(*d["args"], **d.get("kwargs", {})) for d in description["layers"]
    ]
    return T.Sequential(*layers)


def test_torch_export_loads_strictly_and_gives_the_same_outputs(trained):
    torch = require("torch")
    from safetensors import safe_open
    from safetensors.torch import load

    spec, out, model = trained
    exported = export_run(spec, out, "torch", "step-3")
    path = out / "model.safetensors"
    path.write_bytes(exported.data)
    with safe_open(path, "pt") as f:
        description = json.loads(f.metadata()[DESCRIPTION_KEY])
    assert description["dtype"] == spec.dtype
    net = torch_module(torch, description).to(getattr(torch, description["dtype"])).eval()
    net.load_state_dict(load(exported.data), strict=True)
    X = sample_inputs(spec)
    with torch.no_grad():
        theirs = net(torch.from_numpy(X if X.dtype.kind == "i" else X.astype(spec.dtype)))
    tol = 1e-9 if spec.dtype == "float64" else 1e-5
    np.testing.assert_allclose(theirs.numpy(), ours(spec, model, X), rtol=tol, atol=tol)


def test_an_mlps_keys_are_those_of_its_torch_sequential(tmp_path):
    from safetensors.numpy import load

    spec = TrainingSpec.model_validate(small_moons(model={"type": "mlp", "sizes": [2, 5, 4, 3]}))
    write_trained_checkpoint(spec, tmp_path, 1)
    state = load(export_run(spec, tmp_path, "torch").data)
    assert sorted(state) == [f"{i}.{n}" for i in (0, 2, 4) for n in ("bias", "weight")]


def test_a_spec_of_another_model_names_the_mismatch(tmp_path):
    spec = TrainingSpec.model_validate(small_moons())
    write_trained_checkpoint(spec, tmp_path, 1)
    other = TrainingSpec.model_validate(small_moons(model={"type": "mlp", "sizes": [2, 9, 2]}))
    with pytest.raises(ValueError, match=r"shape mismatch for layers\.0\.weight"):
        export_run(other, tmp_path, "onnx")


# -- the HTTP route and the CLI ------------------------------------------------------------


@pytest.fixture
def job(tmp_path, monkeypatch):
    """(TestClient, job id, model): a submitted moons job with a checkpoint step-4."""
    monkeypatch.setenv("SHARDGRAD_DATASETS_DIR", str(tmp_path / "datasets"))
    client, _, _ = make_client(tmp_path)
    job_id = submit(client)["id"]
    spec = TrainingSpec.model_validate(service_spec())
    model = write_trained_checkpoint(spec, tmp_path / "jobs" / job_id, 4)
    return client, job_id, model


def test_the_export_route(job):
    client, job_id, model = job
    url = f"/api/v1/jobs/{job_id}/export"
    r = client.get(url, params={"format": "onnx", "checkpoint": "latest"})
    assert r.status_code == 200, r.text
    assert r.headers["x-checkpoint"] == "step-4"
    assert f'filename="{job_id}-step-4.onnx"' in r.headers["content-disposition"]
    X = np.array([[0.5, -0.3], [1.0, 0.2]])
    np.testing.assert_allclose(onnx_outputs(r.content, X), predict(model, X), atol=1e-5)
    r = client.get(url, params={"format": "torch"})
    assert r.status_code == 200 and r.headers["x-checkpoint"] == "step-4"
    assert r.content[8:].startswith(b"{")  # safetensors: a length, then the JSON header
    wrong = client.get(url, params={"format": "keras"})
    assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"] == ["query", "format"]
    missing = client.get(url, params={"format": "onnx", "checkpoint": "step-99"})
    assert missing.status_code == 404 and "step-99" in missing.json()["detail"]


def test_without_the_onnx_package_the_route_says_what_to_install(job, monkeypatch):
    client, job_id, _ = job
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    r = client.get(f"/api/v1/jobs/{job_id}/export", params={"format": "onnx"})
    assert r.status_code == 501 and "shardgrad[export]" in r.json()["detail"]
    assert client.get(f"/api/v1/jobs/{job_id}/export?format=torch").status_code == 200


def test_cli_exports_a_job_through_the_service(job, tmp_path, monkeypatch, capsys):
    client, job_id, model = job

    def via_test_client(url=None) -> Client:
        c = Client("http://testserver")
        c.http = TestClient(client.app, base_url="http://testserver/api/v1")
        return c

    monkeypatch.setattr(cli, "Client", via_test_client)
    out = tmp_path / "m.onnx"
    code = cli.main(["export", job_id, "--format", "onnx", "--out", str(out), "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == "step-4"
    X = np.array([[0.5, -0.3]])
    np.testing.assert_allclose(onnx_outputs(out.read_bytes(), X), predict(model, X), atol=1e-5)
    code = cli.main(["export", "nope", "--format", "onnx", "--out", str(out)])
    assert code == 1 and "404" in capsys.readouterr().err


def test_cli_exports_a_run_directory_offline(tmp_path, capsys):
    spec = small_cnn()
    run = tmp_path / "run"
    model = write_trained_checkpoint(TrainingSpec.model_validate(spec), run, 2)
    spec_file, out = tmp_path / "cnn.json", tmp_path / "cnn.onnx"
    spec_file.write_text(json.dumps(spec))
    argv = ["export", str(run), "--format", "onnx", "--out", str(out)]
    assert cli.main(argv) == 2 and "--spec" in capsys.readouterr().err
    assert cli.main([*argv, "--spec", str(spec_file), "--checkpoint", "step-2"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: onnx export of step-2")
    X = sample_inputs(TrainingSpec.model_validate(spec))
    expected = model(Tensor(X)).data
    np.testing.assert_allclose(onnx_outputs(out.read_bytes(), X), expected, atol=1e-5)
