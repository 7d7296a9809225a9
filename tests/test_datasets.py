import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from workers import datasets
from workers.catalogue import BUILTINS
from workers.config import WorkerSettings
from workers.data import PreparedData
from workers.datasets import (
    describe,
    get_uploaded,
    list_uploaded,
    load_dataset,
    save_uploaded,
    targets_for,
    train_val_split,
)
from workers.spec import BuiltinData, FileData, TrainingSpec, UploadedData


def builtin(name, **kw):
    return BuiltinData(type="builtin", name=name, **kw)


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture
def upload_dir(tmp_path, monkeypatch):
    root = tmp_path / "uploads"
    monkeypatch.setenv("SHARDGRAD_DATASETS_DIR", str(root))
    return root


# ---------------------------------------------------------------- builtins


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_shapes_match_describe(name):
    data = builtin(name, n_samples=300)
    ds = load_dataset(data, seed=0)
    info = describe(data)
    assert ds.info == info
    assert ds.X.dtype == np.float64 and ds.X.flags.c_contiguous
    assert ds.X.shape == (info.n_samples, info.n_features)
    if info.task == "classification":
        assert ds.y.dtype == np.int64 and ds.y.shape == (info.n_samples,)
        assert set(np.unique(ds.y)) == set(range(info.n_classes))
    else:
        assert ds.y.dtype == np.float64 and ds.y.shape == (info.n_samples, info.n_targets)
    assert np.isfinite(ds.X).all()


@pytest.mark.parametrize(
    "name, n_features, task, n_classes",
    [
        ("moons", 2, "classification", 2),
        ("circles", 2, "classification", 2),
        ("spirals", 2, "classification", 3),
        ("xor", 2, "classification", 2),
        ("blobs", 2, "classification", 3),
        ("sine", 1, "regression", None),
        ("digits", 64, "classification", 10),
        ("iris", 4, "classification", 3),
    ],
)
def test_builtin_descriptions(name, n_features, task, n_classes):
    info = describe(builtin(name))
    assert (info.name, info.n_features, info.task, info.n_classes, info.n_targets) == (
        name,
        n_features,
        task,
        n_classes,
        1,
    )


@pytest.mark.parametrize("name", ["moons", "circles", "spirals", "xor", "blobs", "sine"])
def test_generators_are_deterministic_in_the_seed(name):
    data = builtin(name, n_samples=200)
    a, b, c = load_dataset(data, 7), load_dataset(data, 7), load_dataset(data, 8)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.X, c.X)


def test_generators_ignore_global_random_state():
    np.random.seed(1)
    a = load_dataset(builtin("moons"), 0)
    np.random.seed(2)
    b = load_dataset(builtin("moons"), 0)
    np.testing.assert_array_equal(a.X, b.X)


def test_options_of_spirals_and_blobs():
    spirals = load_dataset(builtin("spirals", n_classes=5, n_samples=500), 0)
    assert spirals.info.n_classes == 5 and set(spirals.y) == set(range(5))
    assert np.bincount(spirals.y).tolist() == [100] * 5  # balanced
    blobs = load_dataset(builtin("blobs", n_classes=4, n_features=6, n_samples=100), 0)
    assert blobs.X.shape == (100, 6) and blobs.info.n_classes == 4


def test_noise_parameter():
    clean = load_dataset(builtin("sine", noise=0.0), 0)
    np.testing.assert_allclose(clean.y[:, 0], np.sin(clean.X[:, 0]))
    circles = load_dataset(builtin("circles", noise=0.0), 0)
    radius = np.linalg.norm(circles.X, axis=1)
    np.testing.assert_allclose(radius, np.where(circles.y == 0, 1.0, 0.5))


def test_digits_and_iris_are_bundled_and_scaled():
    digits = load_dataset(builtin("digits", n_samples=5), 0)
    assert digits.X.shape == (1797, 64)
    assert digits.X.min() == 0.0 and digits.X.max() == 1.0
    iris = load_dataset(builtin("iris"), 3)
    assert iris.X.shape == (150, 4)
    np.testing.assert_allclose(iris.X.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(iris.X.std(axis=0), 1)


def test_every_builtin_has_a_generator():
    assert set(datasets.GENERATORS) == set(BUILTINS)


def test_digits_and_iris_are_read_as_scikit_learn_reads_them():
    from sklearn.datasets import load_digits, load_iris

    for ours, theirs in ((datasets.load_digits, load_digits), (datasets.load_iris, load_iris)):
        (X, y), (X_ref, y_ref) = ours(), theirs(return_X_y=True)
        assert X.dtype == X_ref.dtype and y.dtype == y_ref.dtype
        np.testing.assert_array_equal(X, X_ref)
        np.testing.assert_array_equal(y, y_ref)


def test_loading_digits_does_not_import_scikit_learn():
    code = (
        "import sys; from workers.datasets import load_dataset;"
        "from workers.spec import BuiltinData;"
        "ds = load_dataset(BuiltinData(type='builtin', name='digits'), 0);"
        "print(ds.X.shape, 'sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(1797, 64) False"


# ---------------------------------------------------------------- files


def test_csv_with_y_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,y,b\n1,0,2\n3,1,4\n5,1,6\n")
    ds = load_dataset(FileData(type="file", path=str(path)), 0)
    np.testing.assert_array_equal(ds.X, [[1, 2], [3, 4], [5, 6]])
    np.testing.assert_array_equal(ds.y, [0, 1, 1])
    assert ds.info.task == "classification" and ds.info.n_classes == 2
    assert ds.info.name == str(path)


def test_csv_without_y_uses_last_column_and_remaps_labels(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n1,2,5\n3,4,-1\n\n5,6,5\n")  # blank lines are skipped
    ds = load_dataset(FileData(type="file", path=str(path)), 0)
    np.testing.assert_array_equal(ds.X, [[1, 2], [3, 4], [5, 6]])
    np.testing.assert_array_equal(ds.y, [1, 0, 1])
    assert ds.labels == (-1.0, 5.0)


def test_csv_regression(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("x,y\n0.5,1.25\n1.5,2.5\n2.5,0.1\n")
    ds = load_dataset(FileData(type="file", path=str(path)), 0)
    assert ds.info.task == "regression" and ds.info.n_targets == 1 and ds.info.n_classes is None
    assert ds.y.shape == (3, 1) and ds.y.dtype == np.float64


def test_npz_round_trip_with_2d_targets(tmp_path):
    X = np.arange(12.0).reshape(6, 2)
    y = np.linspace(0, 1, 12).reshape(6, 2)
    path = tmp_path / "d.npz"
    np.savez(path, X=X, y=y)
    ds = load_dataset(FileData(type="file", path=str(path)), 0)
    np.testing.assert_array_equal(ds.X, X)
    np.testing.assert_array_equal(ds.y, y)
    assert ds.info.task == "regression" and ds.info.n_targets == 2


@pytest.mark.parametrize(
    "filename, raw, message",
    [
        ("d.csv", b"a,y\n1,2\n3,oops\n", "data row 2, column 'y': 'oops' is not a number"),
        ("d.csv", b"a,b,y\n1,2,3\n1,2\n", "data row 2 has 2 columns; the header has 3"),
        ("d.csv", b"a,y\n", "header but no data rows"),
        ("d.csv", b"", "empty"),
        ("d.csv", b"y\n1\n", "at least 2 columns"),
        ("d.csv", b"a,y\nnan,1\n", "X contains NaN or infinite values"),
        ("d.csv", b"\xff\xfe", "UTF-8"),
        ("d.npz", b"not a zip", "not a .npz file"),
        ("d.npz", npz_bytes(features=np.ones((2, 2))), "needs arrays 'X' and 'y'; found features"),
        ("d.npz", npz_bytes(X=np.ones(3), y=np.ones(3)), "X must be 2-D"),
        ("d.npz", npz_bytes(X=np.ones((3, 2)), y=np.ones(2)), "X has 3 rows but y has 2"),
        ("d.npz", npz_bytes(X=np.array([["a"]]), y=np.ones(1)), "X must hold real numbers"),
        ("d.npz", npz_bytes(X=np.ones((1, 1)), y=np.array([np.inf])), "y contains NaN"),
        ("d.json", b"a,y\n1,2\n", "unsupported file type"),
    ],
)
def test_bad_files_give_clear_errors(upload_dir, filename, raw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        save_uploaded(raw, filename)
    assert not list_uploaded()


def test_a_file_is_parsed_once_per_content(tmp_path, monkeypatch):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("a,b,y\n1,2,0\n3,4,1\n")
    second.write_bytes(first.read_bytes())
    parsed = []
    read = datasets.read_arrays
    monkeypatch.setattr(datasets, "read_arrays", lambda *a: parsed.append(a[1]) or read(*a))
    a, b = FileData(type="file", path=str(first)), FileData(type="file", path=str(second))
    assert describe(a) == describe(a) and describe(a).name == str(first)
    assert describe(b).name == str(second)  # the same bytes elsewhere: not parsed again
    assert (describe(b).n_features, describe(b).n_samples) == (2, 2)
    assert parsed == [str(first)]
    first.write_text("a,y\n1,0\n2,1\n3,1\n")  # changed: read, hashed and parsed again
    os.utime(first, ns=(1, 1))
    assert (describe(a).n_features, describe(a).n_samples) == (1, 3)
    assert parsed == [str(first), str(first)]


# ---------------------------------------------------------------- uploads


def test_dataset_root(monkeypatch, tmp_path):
    monkeypatch.delenv("SHARDGRAD_DATASETS_DIR", raising=False)
    assert str(datasets.dataset_root()) == "var/datasets"
    monkeypatch.setenv("SHARDGRAD_DATASETS_DIR", str(tmp_path))
    assert datasets.dataset_root() == tmp_path


def test_uploads_live_where_the_caller_says(upload_dir, tmp_path):
    """An explicit root (a service's uploads_dir) wins over the environment's."""
    root = tmp_path / "elsewhere"
    saved = save_uploaded(b"a,b,y\n1,2,0\n3,4,1\n2,2,0\n", "d.csv", root)
    assert (root / f"{saved.id}.npz").is_file() and not upload_dir.exists()
    assert list_uploaded(root) == [saved] and list_uploaded() == []
    assert get_uploaded(saved.id, root) == saved
    with pytest.raises(FileNotFoundError, match="no uploaded dataset"):
        get_uploaded(saved.id)
    spec = TrainingSpec.model_validate(
        {
            "name": "u",
            "model": {"type": "mlp", "sizes": [2, 2]},
            "data": {"type": "dataset", "id": saved.id},
            "loss": "cross_entropy",
            "optimizer": {"type": "sgd", "lr": 0.1},
            "epochs": 1,
            "batch_size": 2,
            "validation_fraction": 0,
        }
    )
    data = PreparedData(spec, WorkerSettings(datasets_dir=root))
    assert sorted(data.X.tolist()) == [[1, 2], [2, 2], [3, 4]]  # in the split's order


def test_upload_save_list_load(upload_dir):
    X = np.random.default_rng(0).normal(size=(20, 3))
    y = np.arange(20) % 2
    saved = save_uploaded(npz_bytes(X=X, y=y), "some/dir/train.npz")
    assert re.fullmatch(r"[0-9a-f]{16}", saved.id)
    assert saved.filename == "train.npz"
    assert (saved.n_features, saved.task, saved.n_classes, saved.n_samples) == (
        3,
        "classification",
        2,
        20,
    )
    assert (upload_dir / f"{saved.id}.npz").is_file()
    assert not list(upload_dir.glob("*.tmp"))

    again = save_uploaded(npz_bytes(X=X, y=y), "copy.npz")
    assert again.id == saved.id and again.filename == "train.npz"  # content-addressed
    csv = save_uploaded(b"a,y\n1,0.5\n2,1.5\n", "r.csv")
    assert csv.id != saved.id and csv.task == "regression"
    assert {d.id for d in list_uploaded()} == {saved.id, csv.id}
    assert get_uploaded(csv.id) == csv

    ds = load_dataset(UploadedData(type="dataset", id=saved.id), 0)
    np.testing.assert_array_equal(ds.X, X)
    np.testing.assert_array_equal(ds.y, y)
    assert ds.info.name == saved.id


def test_an_upload_is_read_once_to_describe_it(upload_dir, monkeypatch):
    saved = save_uploaded(npz_bytes(X=np.eye(4), y=np.arange(4) % 2), "eye.npz")
    reads = []
    load = datasets._load_uploaded
    monkeypatch.setattr(datasets, "_load_uploaded", lambda *a: reads.append(a) or load(*a))
    spec = UploadedData(type="dataset", id=saved.id)
    assert describe(spec) == describe(spec) == get_uploaded(saved.id) == saved
    assert len(reads) <= 1  # none, if saving already described it
    (upload_dir / f"{saved.id}.npz").unlink()  # a deleted upload is noticed
    with pytest.raises(FileNotFoundError, match="no uploaded dataset"):
        describe(spec)


def test_unknown_or_malformed_upload_ids(upload_dir):
    with pytest.raises(FileNotFoundError, match="no uploaded dataset"):
        get_uploaded("0123456789abcdef")
    with pytest.raises(ValueError, match="not a dataset id"):
        get_uploaded("../../etc/passwd")
    assert list_uploaded() == []


# ---------------------------------------------------------------- split and targets


def test_train_val_split_is_deterministic_and_disjoint():
    ds = load_dataset(builtin("moons", n_samples=101), 0)
    ds.X[:, 0] = np.arange(101)  # tag each row with its index
    train, val = train_val_split(ds, 0.2, seed=3)
    again, _ = train_val_split(ds, 0.2, seed=3)
    other, _ = train_val_split(ds, 0.2, seed=4)
    assert (len(train), len(val)) == (81, 20)
    assert (train.info.n_samples, val.info.n_samples) == (81, 20)
    train_rows, val_rows = set(train.X[:, 0]), set(val.X[:, 0])
    assert not train_rows & val_rows and len(train_rows | val_rows) == 101
    np.testing.assert_array_equal(train.X, again.X)
    assert not np.array_equal(train.X, other.X)
    np.testing.assert_array_equal(ds.y[train.X[:, 0].astype(int)], train.y)


def test_train_val_split_without_validation():
    ds = load_dataset(builtin("sine", n_samples=10), 0)
    train, val = train_val_split(ds, 0.0, seed=0)
    assert len(train) == 10 and len(val) == 0 and val.X.shape == (0, 1)


def test_targets_for():
    classes = np.array([0, 1, 1], dtype=np.int64)
    ce = targets_for(classes, "cross_entropy", "float32")
    assert ce.dtype == np.int64 and ce.shape == (3,)
    for loss in ("bce", "mse"):
        t = targets_for(classes, loss, "float32")
        assert t.dtype == np.float32 and t.shape == (3, 1)
        np.testing.assert_array_equal(t[:, 0], [0, 1, 1])
    reg = targets_for(np.ones((3, 2)), "mse", np.float64)
    assert reg.dtype == np.float64 and reg.shape == (3, 2)
    with pytest.raises(ValueError, match="binary"):
        targets_for(np.array([0, 1, 2]), "bce", "float64")
    with pytest.raises(ValueError, match="regression targets need mse"):
        targets_for(np.ones((3, 1)), "cross_entropy", "float64")
