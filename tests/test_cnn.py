"""The sequential (CNN) model spec, image data, and models built from the spec: shape
inference and its errors, the model against its data, torch-compatible checkpoints."""

import io
import json

import numpy as np
import pytest
from pydantic import ValidationError

from core import Tensor
from tests.helpers import EXAMPLES, SMALL_CNN, final_params, require, small_cnn
from workers.data import check_data
from workers.datasets import describe, load_dataset, save_uploaded
from workers.explain import explain, predict
from workers.model import build_model, param_bytes
from workers.spec import BuiltinData, TrainingSpec, load_spec
from workers.trainer import Trainer

ISSUE_MODEL = {  # the issue's example, verbatim
    "type": "sequential",
    "input_shape": [1, 28, 28],
    "layers": [
        {"type": "conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "max_pool2d", "kernel_size": 2},
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "max_pool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.1},
        {"type": "linear", "out_features": 10},
    ],
}


def spec(model=None, **fields) -> dict:
    return small_cnn(name="cnn", **({"model": model} if model else {}), **fields)


def errors(obj: dict) -> list[dict]:
    with pytest.raises(ValidationError) as e:
        TrainingSpec.model_validate(obj)
    return e.value.errors(include_url=False)


def data_errors(obj: dict) -> list[dict]:
    with pytest.raises(ValidationError) as e:
        check_data(TrainingSpec.model_validate(obj))
    return e.value.errors(include_url=False)


def layers(*changes, base=ISSUE_MODEL, input_shape=None) -> dict:
    model = json.loads(json.dumps(base))
    for i, layer in changes:
        if layer is None:
            del model["layers"][i]
        else:
            model["layers"][i] = layer
    return model | ({"input_shape": input_shape} if input_shape else {})


# ---------------------------------------------------------------- the spec


def test_the_issues_model_parses_with_shapes_widths_and_parameters():
    m = TrainingSpec.model_validate(spec(ISSUE_MODEL)).model
    assert m.shapes() == [
        (1, 28, 28),
        (8, 28, 28),
        (8, 28, 28),
        (8, 14, 14),
        (16, 14, 14),
        (16, 14, 14),
        (16, 7, 7),
        (784,),
        (784,),
        (10,),
    ]
    assert (m.in_width, m.out_width) == (784, 10)
    assert m.n_params == (9 + 1) * 8 + (8 * 9 + 1) * 16 + (784 + 1) * 10
    assert param_bytes(m, "float32") == 4 * m.n_params


@pytest.mark.parametrize(
    "model, loc, msg",
    [
        (
            layers((6, None), (6, None)),  # no flatten, no dropout: linear is layers[6]
            ("model", "sequential", "layers", 6),
            "model.layers[6]: linear after a 16x7x7 output needs flatten first",
        ),
        (
            layers(
                (3, {"type": "conv2d", "out_channels": 16, "kernel_size": 5}),
                input_shape=[1, 8, 8],
            ),
            ("model", "sequential", "layers", 3),
            "model.layers[3]: kernel 5 is larger than the 4x4 input",
        ),
        (
            layers((0, {"type": "max_pool2d", "kernel_size": [2, 40]})),
            ("model", "sequential", "layers", 0),
            "model.layers[0]: kernel 2x40 is larger than the 28x28 input",
        ),
        (
            layers((0, {"type": "linear", "out_features": 3})),
            ("model", "sequential", "layers", 0),
            "model.layers[0]: linear on a 1x28x28 input needs flatten first",
        ),
        (
            layers(input_shape=[784]),
            ("model", "sequential", "layers", 0),
            "model.layers[0]: conv2d needs a CxHxW input but gets 784 features as input",
        ),
        (
            layers((6, None), (6, None), (6, None)),
            ("model", "sequential", "layers", 5),
            "model.layers[5]: the model's output is 16x7x7; "
            "end with flatten and linear to give one value per output",
        ),
        (
            layers(input_shape=[28, 28]),
            ("model", "sequential", "input_shape"),
            "model.input_shape must be [features] or [channels, height, width]",
        ),
    ],
)
def test_shape_errors_name_the_layer(model, loc, msg):
    (err,) = errors(spec(model))
    assert (err["loc"], err["msg"]) == (loc, msg)


def test_layer_field_errors_carry_the_layer_and_its_type():
    (err,) = errors(spec(layers((7, {"type": "dropout", "p": 1.0}))))
    assert err["loc"] == ("model", "sequential", "layers", 7, "dropout", "p")
    (err,) = errors(spec(layers((0, {"type": "conv2d", "out_channels": 8}))))
    assert err["loc"] == ("model", "sequential", "layers", 0, "conv2d", "kernel_size")
    (err,) = errors(spec(layers((1, {"type": "softmax"}))))
    assert err["loc"][:4] == ("model", "sequential", "layers", 1)


def test_the_spec_hash_covers_the_layers():
    a = TrainingSpec.model_validate(spec())
    b = TrainingSpec.model_validate(
        spec(layers((7, {"type": "dropout", "p": 0.2}), base=SMALL_CNN))
    )
    assert a.spec_hash() == TrainingSpec.model_validate(spec()).spec_hash() != b.spec_hash()


# ---------------------------------------------------------------- against the data


def test_input_shape_must_match_the_data():
    err, _ = data_errors(spec(data={"type": "builtin", "name": "digits"}))  # and 10 classes
    assert err["loc"] == ("model", "sequential", "input_shape")
    assert err["msg"] == (
        "model.input_shape is [1, 28, 28] (784 values) but dataset 'digits' has 64 features "
        "(1x8x8 images)"
    )
    wrong = layers(input_shape=[4, 14, 14], base=SMALL_CNN)
    (err,) = data_errors(spec(wrong))
    assert (
        err["msg"] == "model.input_shape is [4, 14, 14] but dataset 'shapes' holds 1x28x28 images"
    )


def test_the_output_width_must_fit_the_loss():
    (err,) = data_errors(spec(ISSUE_MODEL))  # 10 outputs, 4 classes
    assert err["loc"] == ("model", "sequential", "layers", 8)
    assert err["msg"] == (
        "model.layers[8] gives 10 outputs but cross_entropy on 'shapes' needs 4 outputs "
        "(one per class)"
    )


def test_digits_as_images_or_as_features():
    digits = {"type": "builtin", "name": "digits"}
    as_images = layers((8, {"type": "linear", "out_features": 10}), input_shape=[1, 8, 8])
    as_images["layers"][2:] = [{"type": "flatten"}, {"type": "linear", "out_features": 10}]
    flat = {"type": "sequential", "input_shape": [64], "layers": [as_images["layers"][-1]]}
    mlp = {"type": "mlp", "sizes": [64, 10]}
    for model in (as_images, flat, mlp):
        check_data(TrainingSpec.model_validate(spec(model, data=digits)))
    images = TrainingSpec.model_validate(spec(as_images, data=digits))
    X = load_dataset(images.data, 0).X[:5]
    assert X.shape == (5, 64)  # the data stays flat; the model reshapes it
    model = build_model(images)
    np.testing.assert_array_equal(model(X).data, model(X.reshape(5, 1, 8, 8)).data)


# ---------------------------------------------------------------- the shapes dataset


def test_shapes_is_a_deterministic_image_dataset():
    data = BuiltinData(type="builtin", name="shapes")
    info = describe(data)
    assert (info.n_samples, info.n_features, info.n_classes, info.shape) == (
        5000,
        784,
        4,
        (1, 28, 28),
    )
    small = BuiltinData(type="builtin", name="shapes", n_samples=200)
    a, b, c = (load_dataset(small, seed) for seed in (3, 3, 4))
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.X, c.X)
    assert np.bincount(a.y).tolist() == [50] * 4
    clean = load_dataset(BuiltinData(type="builtin", name="shapes", n_samples=200, noise=0), 3)
    assert clean.X.min() == 0 and clean.X.max() == 1  # strokes of full intensity on black
    assert 0.02 < (clean.X > 0.5).mean() < 0.3  # a stroke, not a filled image


# ---------------------------------------------------------------- uploads


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def upload_spec(dataset_id: str, input_shape) -> dict:
    model = {
        "type": "sequential",
        "input_shape": input_shape,
        "layers": [
            {"type": "conv2d", "out_channels": 2, "kernel_size": 2},
            {"type": "flatten"},
            {"type": "linear", "out_features": 2},
        ],
    }
    return spec(model, data={"type": "dataset", "id": dataset_id})


def test_an_upload_of_nchw_images_or_flat_rows_trains_a_cnn(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_DATASETS_DIR", str(tmp_path / "uploads"))
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 3, 4, 5)), np.arange(40) % 2
    images = save_uploaded(npz(X=X, y=y), "images.npz")
    assert (images.n_features, images.shape) == (60, (3, 4, 5))
    flat = save_uploaded(npz(X=X.reshape(40, -1), y=y), "flat.npz")
    assert (flat.n_features, flat.shape) == (60, None)
    for dataset_id in (images.id, flat.id):
        check_data(TrainingSpec.model_validate(upload_spec(dataset_id, [3, 4, 5])))
        np.testing.assert_array_equal(
            load_dataset(TrainingSpec.model_validate(upload_spec(dataset_id, [3, 4, 5])).data, 0).X,
            X.reshape(40, -1),
        )
    (err,) = data_errors(upload_spec(images.id, [3, 5, 4]))
    assert (
        err["msg"] == f"model.input_shape is [3, 5, 4] but dataset {images.id!r} holds 3x4x5 images"
    )
    (err,) = data_errors(upload_spec(flat.id, [3, 4, 4]))
    assert err["msg"].startswith(
        f"model.input_shape is [3, 4, 4] (48 values) but dataset {flat.id!r} has 60"
    )
    check_data(TrainingSpec.model_validate(upload_spec(flat.id, [3, 5, 4])))  # sizes agree


# ---------------------------------------------------------------- models and checkpoints


def test_examples_parse():
    for name in ("shapes-cnn", "digits-cnn"):
        s = load_spec(EXAMPLES / f"{name}.json")
        check_data(s)
        assert s.name == name and s.model.type == "sequential"


def test_the_model_has_torch_names_and_starts_in_eval_mode():
    s = TrainingSpec.model_validate(spec())
    model = build_model(s)
    names = [name for name, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "3.weight", "3.bias", "8.weight", "8.bias"]
    assert sum(p.data.size for p in model.parameters()) == s.model.n_params
    assert not model.training  # predictions never see dropout
    x = Tensor(np.ones((2, 784)))
    np.testing.assert_array_equal(model(x).data, model(x).data)


def torch_sequential(torch, model_spec):
    """torch.nn.Sequential from a spec's layer list, the same modules at the same indices."""
    T, made = torch.nn, []
    shapes = model_spec.shapes()
    for layer, shape in zip(model_spec.layers, shapes, strict=False):
        kw = layer.model_dump(exclude={"type"})
        if layer.type == "linear":
            made.append(T.Linear(shape[0], kw.pop("out_features"), **kw))
        elif layer.type == "conv2d":
            made.append(T.Conv2d(shape[0], kw.pop("out_channels"), **kw))
        else:
            cls = {"max_pool2d": T.MaxPool2d, "avg_pool2d": T.AvgPool2d, "flatten": T.Flatten}
            cls |= {"relu": T.ReLU, "tanh": T.Tanh, "sigmoid": T.Sigmoid, "dropout": T.Dropout}
            made.append(cls[layer.type](**kw))
    return T.Sequential(*made).double()


def test_the_checkpoint_loads_into_torch_sequential(tmp_path):
    torch = require("torch")
    safetensors_numpy = require("safetensors.numpy")
    s = TrainingSpec.model_validate(spec(workers=0, epochs=1))
    assert Trainer(s, tmp_path).run()["status"] == "succeeded"
    (weights,) = tmp_path.glob("checkpoints/step-*/model.safetensors")
    state = safetensors_numpy.load_file(weights)
    net = torch_sequential(torch, s.model)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    net.eval()
    X = load_dataset(s.data, s.seed).X[:7]
    ours = build_model(s)
    ours.load_state_dict(final_params(tmp_path))
    theirs = net(torch.from_numpy(X).reshape(7, 1, 28, 28)).detach().numpy()
    np.testing.assert_allclose(ours(X).data, theirs, rtol=0, atol=1e-9)


def test_predict_and_explain_take_flat_rows_of_a_cnn():
    s = TrainingSpec.model_validate(spec())
    model = build_model(s)
    X = load_dataset(s.data, s.seed).X[:3]
    np.testing.assert_array_equal(predict(model, X), model(X).data)
    result = explain(model, X, method="integrated_gradients", target=1)
    change = predict(model, X)[:, 1] - predict(model, np.zeros_like(X))[:, 1]
    assert np.array(result["attributions"]).shape == (3, 784)
    assert np.all(np.abs(result["completeness_gap"]) <= 0.01 * np.abs(change))
    with pytest.raises(ValueError, match="has width 64 but the model takes 784"):
        explain(model, np.ones((1, 64)))
