import json
import subprocess
import sys
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from pydantic import ValidationError

from workers.data import check_data, with_data
from workers.datasets import save_uploaded
from workers.model import LOSSES, build_model
from workers.spec import (
    SPEC_ERROR,
    Loss,
    SpecError,
    TrainingSpec,
    format_validation_error,
    load_spec,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MOONS = {
    "name": "moons",
    "model": {"type": "mlp", "sizes": [2, 16, 16, 2], "activation": "tanh"},
    "data": {"type": "builtin", "name": "moons", "n_samples": 1000, "noise": 0.1},
    "loss": "cross_entropy",
    "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
    "epochs": 50,
    "batch_size": 64,
    "workers": 2,
    "cpus_per_worker": 1,
    "seed": 0,
    "dtype": "float64",
    "checkpoint_every": 100,
}
SINE = {
    **MOONS,
    "model": {"type": "mlp", "sizes": [1, 8, 1]},
    "data": {"type": "builtin", "name": "sine"},
    "loss": "mse",
}


def spec(base=MOONS, **changes) -> TrainingSpec:
    """Validated as a submission is: the spec and its data."""
    return TrainingSpec.model_validate({**base, **changes}, context=with_data())


def errors(base=MOONS, **changes) -> list[dict]:
    with pytest.raises(ValidationError) as info:
        spec(base, **changes)
    return info.value.errors()


def only_error(base=MOONS, **changes) -> dict:
    (err,) = errors(base, **changes)
    return err


@pytest.mark.parametrize("name", ["moons", "spirals", "digits", "sine", "circles", "xor", "iris"])
def test_examples_parse(name):
    s = load_spec(EXAMPLES / f"{name}.json")
    assert s.name == name and s.workers == "auto"  # each example runs as fast as it can


def test_moons_example_is_the_contract():
    example = json.loads((EXAMPLES / "moons.json").read_text())
    assert example | {"epochs": 50} == MOONS | {"workers": "auto"}


def test_defaults():
    s = TrainingSpec.model_validate(
        {k: v for k, v in MOONS.items() if k not in ("workers", "cpus_per_worker", "seed")}
        | {"model": {"type": "mlp", "sizes": [2, 2]}}
    )
    assert s.model.activation == "relu"
    assert (s.workers, s.cpus_per_worker, s.seed, s.dtype) == ("auto", 1.0, 0, "float64")
    assert (s.validation_fraction, s.keep_checkpoints, s.max_failures, s.priority) == (
        0.2,
        3,
        3,
        0,
    )
    assert (s.checkpoint_every, s.health_every) == (100, 10)
    sgd = spec(optimizer={"type": "sgd", "lr": 0.1}).optimizer
    assert (sgd.momentum, sgd.nesterov, sgd.weight_decay) == (0, False, 0)
    adam = spec(optimizer={"type": "adam", "lr": 1e-3}).optimizer
    assert (adam.betas, adam.eps, adam.weight_decay) == ((0.9, 0.999), 1e-8, 0)
    data = spec().data
    assert (data.n_samples, data.noise) == (1000, 0.1)


def test_dump_validates_again():
    for s in (spec(), load_spec(EXAMPLES / "spirals.json")):
        assert TrainingSpec.model_validate(s.model_dump()) == s
        assert TrainingSpec.model_validate_json(s.model_dump_json()) == s


# ---------------------------------------------------------------- cross-field messages


def test_input_width_names_the_field():
    err = only_error(model={"type": "mlp", "sizes": [3, 16, 2]})
    assert err["msg"] == "model.sizes[0] is 3 but dataset 'moons' has 2 features"
    assert err["loc"] == ("model", "mlp", "sizes", 0)
    assert err["type"] == SPEC_ERROR


def test_cross_entropy_output_width():
    err = only_error(model={"type": "mlp", "sizes": [2, 16, 3]})
    assert err["msg"] == (
        "model.sizes[-1] is 3 but cross_entropy on 'moons' needs 2 outputs (one per class)"
    )
    assert err["loc"] == ("model", "mlp", "sizes", 2)


def test_several_problems_are_reported_together():
    errs = errors(model={"type": "mlp", "sizes": [3, 3]}, batch_size=1)
    assert {e["loc"] for e in errs} == {
        ("batch_size",),
        ("model", "mlp", "sizes", 0),
        ("model", "mlp", "sizes", 1),
    }


@pytest.mark.parametrize(
    "changes, loc, message",
    [
        (
            {"loss": "bce"},
            ("model", "mlp", "sizes", 3),
            "model.sizes[-1] is 2 but bce on 'moons' needs 1 output (the logit of class 1)",
        ),
        (
            {"loss": "mse"},
            ("model", "mlp", "sizes", 3),
            "model.sizes[-1] is 2 but mse on 'moons' needs 1 output (targets 0/1)",
        ),
        (
            {"data": {"type": "builtin", "name": "spirals"}, "loss": "bce"},
            ("loss",),
            "loss: bce needs binary classification data but dataset 'spirals' has 3 classes",
        ),
        (
            {"data": {"type": "builtin", "name": "spirals"}, "loss": "mse"},
            ("loss",),
            "loss: mse needs regression data or 2 classes but dataset 'spirals' has 3 classes",
        ),
        (
            {"batch_size": 1},
            ("batch_size",),
            "batch_size (1) must be >= workers (2)",
        ),
    ],
)
def test_loss_and_batch_messages(changes, loc, message):
    err = only_error(**changes)
    assert err["loc"] == loc
    assert err["msg"].startswith(message)


def test_regression_losses():
    assert spec(SINE).loss == "mse"
    err = only_error(SINE, model={"type": "mlp", "sizes": [1, 8, 2]})
    assert err["msg"] == "model.sizes[-1] is 2 but mse on 'sine' needs 1 output (one per target)"
    for loss in ("cross_entropy", "bce"):
        err = only_error(SINE, loss=loss)
        assert err["loc"] == ("loss",) and "is regression (use mse)" in err["msg"]


def test_losses_that_fit():
    one = {"type": "mlp", "sizes": [2, 8, 1]}
    assert spec(loss="bce", model=one).loss == "bce"
    assert spec(loss="mse", model=one).loss == "mse"
    digits = {"type": "builtin", "name": "digits"}
    assert spec(data=digits, model={"type": "mlp", "sizes": [64, 10]}).data.name == "digits"


# ---------------------------------------------------------------- field errors


def test_unknown_builtin_lists_the_valid_ones():
    err = only_error(data={"type": "builtin", "name": "foo"})
    assert err["msg"] == (
        "data.name: unknown dataset 'foo'; "
        "valid: addition, blobs, circles, digits, iris, moons, reverse, shapes, sine, spirals, xor"
    )
    assert err["loc"] == ("data", "builtin", "name")


def test_builtin_options():
    err = only_error(data={"type": "builtin", "name": "moons", "n_classes": 3})
    assert err["loc"] == ("data", "builtin", "n_classes")
    assert err["msg"] == "data.n_classes does not apply to 'moons'"
    err = only_error(data={"type": "builtin", "name": "spirals", "n_features": 3})
    assert err["loc"] == ("data", "builtin", "n_features")
    five = {"type": "builtin", "name": "spirals", "n_classes": 5}
    assert spec(data=five, model={"type": "mlp", "sizes": [2, 5]}).data.n_classes == 5
    blobs = {"type": "builtin", "name": "blobs", "n_features": 4}
    assert spec(data=blobs, model={"type": "mlp", "sizes": [4, 3]}).data.n_features == 4


@pytest.mark.parametrize(
    "changes, loc",
    [
        ({"extra": 1}, ("extra",)),
        ({"model": {"type": "mlp", "sizes": [2, 2], "dropout": 0.1}}, ("model", "mlp", "dropout")),
        ({"data": {"type": "builtin", "name": "moons", "x": 1}}, ("data", "builtin", "x")),
        ({"optimizer": {"type": "sgd", "lr": 0.1, "beta": 1}}, ("optimizer", "sgd", "beta")),
    ],
)
def test_unknown_fields_are_rejected(changes, loc):
    err = only_error(**changes)
    assert err["type"] == "extra_forbidden" and err["loc"] == loc


@pytest.mark.parametrize("field", ["model", "data", "optimizer"])
def test_bad_discriminator(field):
    err = only_error(**{field: {**MOONS[field], "type": "nope"}})
    assert err["loc"] == (field,) and err["type"] == "union_tag_invalid"


@pytest.mark.parametrize(
    "changes, loc_part",
    [
        ({"optimizer": {"type": "sgd", "lr": -0.1}}, "lr"),
        ({"optimizer": {"type": "adam", "lr": 0}}, "lr"),
        ({"optimizer": {"type": "sgd", "lr": 0.1, "momentum": 1.0}}, "momentum"),
        ({"optimizer": {"type": "sgd", "lr": 0.1, "nesterov": True}}, "nesterov"),
        ({"optimizer": {"type": "adam", "lr": 0.1, "betas": [0.9, 1.0]}}, 1),
        ({"optimizer": {"type": "adam", "lr": 0.1, "eps": 0}}, "eps"),
        ({"optimizer": {"type": "sgd", "lr": float("inf")}}, "lr"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"workers": -1}, "workers"),
        ({"workers": "many"}, "workers"),
        ({"workers": 1.5}, "workers"),
        ({"cpus_per_worker": 0}, "cpus_per_worker"),
        ({"seed": -1}, "seed"),
        ({"dtype": "float16"}, "dtype"),
        ({"loss": "hinge"}, "loss"),
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"validation_fraction": 0.95}, "validation_fraction"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"keep_checkpoints": 0}, "keep_checkpoints"),
        ({"max_failures": -1}, "max_failures"),
        ({"health_every": 0}, "health_every"),
        ({"model": {"type": "mlp", "sizes": [2]}}, "sizes"),
        ({"model": {"type": "mlp", "sizes": [2, 0, 2]}}, "sizes"),
        ({"model": {"type": "mlp", "sizes": [2, 2], "activation": "gelu"}}, "activation"),
        ({"data": {"type": "builtin", "name": "moons", "n_samples": 0}}, "n_samples"),
        ({"data": {"type": "builtin", "name": "moons", "noise": -1}}, "noise"),
    ],
)
def test_field_constraints_point_at_the_field(changes, loc_part):
    err = only_error(**changes)
    assert loc_part in err["loc"]


def test_nesterov_with_momentum_is_fine():
    opt = spec(optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}).optimizer
    assert opt.nesterov


def test_fractional_cpus_and_execution_fields():
    s = spec(cpus_per_worker=0.5, priority=-5, max_failures=0, validation_fraction=0)
    assert (s.cpus_per_worker, s.priority, s.max_failures) == (0.5, -5, 0)


# ---------------------------------------------------------------- file and uploaded data


def test_file_data(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,c,y\n" + "".join(f"{i},{i},{i},{i % 2}\n" for i in range(10)))
    s = spec(data={"type": "file", "path": str(path)}, model={"type": "mlp", "sizes": [3, 2]})
    assert s.data.path == str(path)
    err = only_error(data={"type": "file", "path": str(path)})
    assert err["msg"] == f"model.sizes[0] is 2 but dataset '{path}' has 3 features"


def test_file_data_errors_name_the_path(tmp_path):
    missing = only_error(data={"type": "file", "path": str(tmp_path / "no.csv")})
    assert missing["loc"] == ("data", "file", "path")
    assert missing["msg"].startswith("data.path:") and "does not exist" in missing["msg"]

    wrong = only_error(data={"type": "file", "path": "data.json"})
    assert wrong["loc"] == ("data", "file", "path")
    assert wrong["msg"] == "data.path: 'data.json' must end in .npz, .csv or .txt"

    (tmp_path / "dir.csv").mkdir()
    unreadable = only_error(data={"type": "file", "path": str(tmp_path / "dir.csv")})
    assert unreadable["msg"].startswith("data.path: cannot read")

    bad = tmp_path / "bad.csv"
    bad.write_text("a,y\n1,x\n")
    broken = only_error(data={"type": "file", "path": str(bad)})
    assert broken["loc"] == ("data", "file", "path")
    assert "is not a usable dataset" in broken["msg"] and "'x' is not a number" in broken["msg"]


def test_uploaded_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDGRAD_DATASETS_DIR", str(tmp_path))
    raw = b"a,b,y\n" + b"".join(b"%d,%d,%d\n" % (i, -i, i % 2) for i in range(10))
    uploaded = save_uploaded(raw, "train.csv")
    assert spec(data={"type": "dataset", "id": uploaded.id}).data.id == uploaded.id

    missing = only_error(data={"type": "dataset", "id": "0123456789abcdef"})
    assert missing["loc"] == ("data", "dataset", "id")
    assert missing["msg"].startswith("data.id: no uploaded dataset '0123456789abcdef'")
    malformed = only_error(data={"type": "dataset", "id": "../secrets"})
    assert malformed["loc"] == ("data", "dataset", "id")


# ---------------------------------------------------------------- hash, schema, loading


def test_spec_hash_ignores_execution_fields():
    base = spec()
    execution = {
        "name": "other",
        "workers": 4,
        "cpus_per_worker": 0.5,
        "priority": 9,
        "checkpoint_every": 7,
        "keep_checkpoints": 1,
        "max_failures": 0,
        "health_every": 1,
    }
    assert spec(**execution).spec_hash() == base.spec_hash()
    assert len(base.spec_hash()) == 64


def test_spec_hash_includes_defaults():
    explicit = {"type": "sgd", "lr": 0.1, "momentum": 0, "nesterov": False, "weight_decay": 0}
    assert spec(optimizer={"type": "sgd", "lr": 0.1}).spec_hash() == (
        spec(optimizer=explicit).spec_hash()
    )
    spirals = {"type": "builtin", "name": "spirals"}
    three = {"model": {"type": "mlp", "sizes": [2, 3]}}
    assert spec(data=spirals, **three).spec_hash() == (
        spec(data={**spirals, "n_classes": 3}, **three).spec_hash()
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"model": {"type": "mlp", "sizes": [2, 16, 16, 2], "activation": "relu"}},
        {"data": {"type": "builtin", "name": "moons", "noise": 0.2}},
        {"loss": "mse", "model": {"type": "mlp", "sizes": [2, 16, 16, 1], "activation": "tanh"}},
        {"optimizer": {"type": "sgd", "lr": 0.2, "momentum": 0.9}},
        {"epochs": 51},
        {"batch_size": 32},
        {"seed": 1},
        {"dtype": "float32"},
        {"validation_fraction": 0.1},
    ],
)
def test_spec_hash_changes_with_math_fields(changes):
    assert spec(**changes).spec_hash() != spec().spec_hash()


def test_json_schema():
    schema = TrainingSpec.model_json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) >= {"name", "model", "data", "loss", "optimizer"}
    mapping = schema["properties"]["data"]["discriminator"]["mapping"]
    assert set(mapping) == {"builtin", "file", "dataset"}
    builtin = schema["$defs"]["BuiltinData"]["properties"]["name"]
    assert "moons" in builtin["enum"]
    json.dumps(schema)


def test_load_spec_reports_every_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                **MOONS,
                "optimizer": {"type": "sgd", "lr": -1},
                "model": {"type": "mlp", "sizes": [3, 2]},
            }
        )
    )
    with pytest.raises(SpecError) as info:
        load_spec(path, context=with_data())
    assert str(info.value) == (
        f"invalid spec {path}:\n  optimizer.sgd.lr: Input should be greater than 0"
    )
    path.write_text(json.dumps({**MOONS, "model": {"type": "mlp", "sizes": [3, 2]}, "x": 1}))
    with pytest.raises(SpecError) as info:
        load_spec(path, context=with_data())
    assert "  x: Extra inputs are not permitted" in str(info.value)
    path.write_text(json.dumps({**MOONS, "model": {"type": "mlp", "sizes": [3, 2]}}))
    with pytest.raises(SpecError, match=r"model\.sizes\[0\] is 3 but dataset 'moons'"):
        load_spec(path, context=with_data())
    path.write_text("{not json")
    with pytest.raises(SpecError, match="Invalid JSON"):
        load_spec(path)
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "missing.json")


def test_format_validation_error():
    with pytest.raises(ValidationError) as info:
        spec(batch_size=1, epochs=0)
    assert format_validation_error(info.value).splitlines() == [
        "epochs: Input should be greater than or equal to 1"
    ]
    with pytest.raises(ValidationError) as info:
        spec(batch_size=1)
    assert format_validation_error(info.value) == "batch_size (1) must be >= workers (2)"


def test_float32_spec_and_numpy_free_json():
    s = spec(dtype="float32")
    assert json.loads(s.model_dump_json())["dtype"] == "float32"
    assert np.dtype(s.dtype) == np.float32


# ---------------------------------------------------------------- a pure spec, one data check


def test_validation_reads_no_data(tmp_path):
    """The JSON alone: a missing file or upload passes; check_data is what reads them."""
    for data in (
        {"type": "file", "path": str(tmp_path / "missing.csv")},
        {"type": "dataset", "id": "0123456789abcdef"},
    ):
        s = TrainingSpec.model_validate({**MOONS, "data": data})
        with pytest.raises(ValidationError) as checked:
            check_data(s, tmp_path)
        with pytest.raises(ValidationError) as together:
            TrainingSpec.model_validate({**MOONS, "data": data}, context=with_data(tmp_path))
        assert checked.value.errors() == together.value.errors()
        (err,) = checked.value.errors()
        assert err["loc"] == ("data", data["type"], "path" if "path" in data else "id")


def test_check_data_reports_the_same_errors_and_returns_the_description():
    bad = TrainingSpec.model_validate({**MOONS, "model": {"type": "mlp", "sizes": [3, 3]}})
    with pytest.raises(ValidationError) as info:
        check_data(bad)
    assert info.value.errors() == errors(model={"type": "mlp", "sizes": [3, 3]})
    assert info.value.title == "TrainingSpec"
    good = check_data(spec())
    assert (good.name, good.n_features, good.n_classes) == ("moons", 2, 2)


def test_spec_does_not_import_the_datasets():
    code = "import sys, workers.spec; print('workers.datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "name, digest",
    [
        ("moons", "fdd6c7d2783050076018dd0394e2b9dac20c236720a50f12b1121ccb69b9a2a8"),
        ("digits", "52f54bfbaf9afce6cccbbe6ed0ec84a703966e1cef65a10c840e2a779c13434e"),
        ("spirals", "219018ee350b28d8f7445794879d586b3e63b0e49f4aa7185424771e799d3f54"),
    ],
)
def test_spec_hash_is_stable(name, digest):
    """Checkpoints record it: a spec's hash never changes between versions."""
    assert load_spec(EXAMPLES / f"{name}.json").spec_hash() == digest


def test_a_spec_stored_before_bias_init_builds_its_model():
    stored = spec().model_dump(mode="json")
    del stored["model"]["bias_init"]
    old = TrainingSpec.model_validate(stored)
    assert old.model.bias_init == 0.0 and old.spec_hash() == spec().spec_hash()
    biases = [p.data for n, p in build_model(old).named_parameters() if n.endswith("bias")]
    assert biases and all((b == 0).all() for b in biases)


def test_every_loss_has_its_function():
    assert set(get_args(Loss)) == set(LOSSES)


@pytest.mark.parametrize("workers", [0, 1, 3, "auto"])
def test_workers_is_a_count_from_0_or_auto(workers):
    assert spec(workers=workers).workers == workers
    assert spec(workers=str(workers)).workers == workers  # as `--workers` passes it


def test_batch_size_against_workers_is_checked_for_counts_only():
    assert spec(workers="auto", batch_size=1).batch_size == 1
    assert spec(workers=0, batch_size=1).workers == 0
    assert only_error(workers=3, batch_size=2)["msg"] == "batch_size (2) must be >= workers (3)"
    assert only_error(workers=-1)["msg"] == 'workers must be a whole number >= 0 or "auto", not -1'


def test_workers_stays_out_of_the_spec_hash():
    hashes = {spec(workers=w).spec_hash() for w in (0, 1, 2, "auto")}
    assert len(hashes) == 1


def test_reserved_cpus_are_one_workers_share_for_in_process_and_auto():
    assert spec(workers=3, cpus_per_worker=0.5).reserved_cpus() == 1.5
    assert spec(workers=0, cpus_per_worker=0.5).reserved_cpus() == 0.5
    assert spec(workers="auto", cpus_per_worker=2).reserved_cpus() == 2
    assert spec(workers="auto", cpus_per_worker=2).reserved_cpus(3) == 6
