"""Datasets: builtin generators, files and uploads, all as NumPy arrays.

Every dataset is `X` (float64, C-contiguous, samples x features) and `y`: int64 class
indices `(n,)` for classification, float64 `(n, n_targets)` for regression.

Randomness comes from `np.random.default_rng([seed, TAG])`, never from global state, so a
dataset and its train/validation split are functions of the spec's seed alone.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from workers.spec import BuiltinData, DataSpec

Task = Literal["classification", "regression"]

_DATA_TAG = 0xDA7A  # the generator stream of builtin datasets
_SPLIT_TAG = 0x5B17  # the train/validation permutation
MAX_CLASSES = 100  # integer targets with more distinct values than this are regression
DATASET_ID = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    n_features: int
    task: Task
    n_classes: int | None  # None for regression
    n_targets: int  # 1 for classification (one label per sample)
    n_samples: int


@dataclass(frozen=True)
class UploadedDataset(DatasetInfo):
    id: str
    filename: str


@dataclass(frozen=True, eq=False)
class Dataset:
    X: np.ndarray
    y: np.ndarray
    info: DatasetInfo
    # Original label of each class index, when a file's labels were remapped to 0..k-1.
    labels: tuple[float, ...] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.X)


def _rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([seed, tag])


# ---------------------------------------------------------------- builtin generators
# Each generator takes the resolved info, the noise level and a Generator and returns (X, y).


@dataclass(frozen=True)
class Builtin:
    make: Callable[[DatasetInfo, float, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    task: Task
    n_features: int
    n_classes: int | None = None
    n_samples: int | None = None  # fixed size of a bundled dataset; None: from the spec
    options: tuple[str, ...] = ()  # which of n_classes / n_features the spec may set


BUILTINS: dict[str, Builtin] = {}


def _builtin(name: str, task: Task, n_features: int, n_classes: int | None = None, **kw):
    def register(make):
        BUILTINS[name] = Builtin(make, task, n_features, n_classes, **kw)
        return make

    return register


def _balanced_labels(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def _on_circle(angle: np.ndarray) -> np.ndarray:
    return np.column_stack([np.cos(angle), np.sin(angle)])


@_builtin("moons", "classification", n_features=2, n_classes=2)
def make_moons(info, noise, rng):
    y = _balanced_labels(info.n_samples, 2, rng)
    t = rng.uniform(0.0, np.pi, info.n_samples)
    upper = _on_circle(t)
    lower = np.array([1.0, 0.5]) - upper  # the same arc, flipped and shifted into the gap
    X = np.where(y[:, None] == 0, upper, lower)
    return X + noise * rng.standard_normal(X.shape), y


@_builtin("circles", "classification", n_features=2, n_classes=2)
def make_circles(info, noise, rng):
    y = _balanced_labels(info.n_samples, 2, rng)
    radius = np.where(y == 0, 1.0, 0.5)
    X = radius[:, None] * _on_circle(rng.uniform(0.0, 2 * np.pi, info.n_samples))
    return X + noise * rng.standard_normal(X.shape), y


@_builtin("spirals", "classification", n_features=2, n_classes=3, options=("n_classes",))
def make_spirals(info, noise, rng):
    y = _balanced_labels(info.n_samples, info.n_classes, rng)
    r = rng.uniform(0.0, 1.0, info.n_samples)
    # Arms start evenly spaced and each turns 4 radians from the centre to the rim.
    angle = 2 * np.pi * y / info.n_classes + 4.0 * r
    X = r[:, None] * _on_circle(angle)
    return X + noise * rng.standard_normal(X.shape), y


@_builtin("xor", "classification", n_features=2, n_classes=2)
def make_xor(info, noise, rng):
    X = rng.uniform(-1.0, 1.0, (info.n_samples, 2))
    y = ((X[:, 0] > 0) != (X[:, 1] > 0)).astype(np.int64)
    return X + noise * rng.standard_normal(X.shape), y


@_builtin("blobs", "classification", n_features=2, n_classes=3, options=("n_classes", "n_features"))
def make_blobs(info, noise, rng):
    centres = rng.uniform(-1.0, 1.0, (info.n_classes, info.n_features))
    y = _balanced_labels(info.n_samples, info.n_classes, rng)
    return centres[y] + noise * rng.standard_normal((info.n_samples, info.n_features)), y


@_builtin("sine", "regression", n_features=1)
def make_sine(info, noise, rng):
    X = rng.uniform(-np.pi, np.pi, (info.n_samples, 1))
    return X, np.sin(X) + noise * rng.standard_normal(X.shape)


# scikit-learn's bundled copies: no download. n_samples and noise do not apply.
@_builtin("digits", "classification", n_features=64, n_classes=10, n_samples=1797)
def make_digits(info, noise, rng):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X / 16.0, y  # pixel intensities 0..16 -> [0, 1]


@_builtin("iris", "classification", n_features=4, n_classes=3, n_samples=150)
def make_iris(info, noise, rng):
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    return (X - X.mean(axis=0)) / X.std(axis=0), y


def _describe_builtin(data: BuiltinData) -> DatasetInfo:
    b = BUILTINS[data.name]
    n_classes, n_features = b.n_classes, b.n_features
    if "n_classes" in b.options and data.n_classes is not None:
        n_classes = data.n_classes
    if "n_features" in b.options and data.n_features is not None:
        n_features = data.n_features
    return DatasetInfo(
        name=data.name,
        n_features=n_features,
        task=b.task,
        n_classes=n_classes,
        n_targets=1,
        n_samples=b.n_samples or data.n_samples,
    )


# ---------------------------------------------------------------- files and uploads


def _read_npz(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    if not raw.startswith(b"PK\x03\x04"):  # np.load would try to unpickle anything else
        raise ValueError("not a .npz file (expected a zip archive of .npy arrays, np.savez)")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            if "X" not in npz.files or "y" not in npz.files:
                found = ", ".join(npz.files) or "nothing"
                raise ValueError(f"a .npz dataset needs arrays 'X' and 'y'; found {found}")
            return npz["X"], npz["y"]
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"not a readable .npz file ({e})") from None


def _read_csv(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("a .csv dataset must be UTF-8 text") from None
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError("the .csv file is empty; expected a header row and data rows")
    header, rows = [h.strip() for h in rows[0]], rows[1:]
    if len(header) < 2:
        raise ValueError("a .csv dataset needs at least 2 columns (features and a target)")
    if not rows:
        raise ValueError("the .csv file has a header but no data rows")
    for i, row in enumerate(rows, start=1):
        if len(row) != len(header):
            raise ValueError(f"data row {i} has {len(row)} columns; the header has {len(header)}")
    try:
        values = np.array(rows, dtype=np.float64)
    except ValueError:
        raise ValueError(_first_non_number(header, rows)) from None
    target = header.index("y") if "y" in header else len(header) - 1
    return np.delete(values, target, axis=1), values[:, target]


def _first_non_number(header: list[str], rows: list[list[str]]) -> str:
    for i, row in enumerate(rows, start=1):
        for name, cell in zip(header, row, strict=True):
            try:
                float(cell)
            except ValueError:
                return f"data row {i}, column {name!r}: {cell.strip()!r} is not a number"
    return "the .csv file holds values that are not numbers"


def read_arrays(raw: bytes, filename: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse `.npz` (arrays X, y) or `.csv` (header; target column `y`, else the last)."""
    suffix = Path(filename).suffix.lower()
    if suffix == ".npz":
        return _read_npz(raw)
    if suffix == ".csv":
        return _read_csv(raw)
    raise ValueError(f"{filename!r}: unsupported file type; use .npz (arrays X, y) or .csv")


def _check_arrays(X: np.ndarray, y: np.ndarray) -> None:
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be 2-D (samples x features) and non-empty; got shape {X.shape}")
    if y.ndim not in (1, 2) or y.shape[-1:] == (0,):
        raise ValueError(f"y must be 1-D or 2-D and non-empty; got shape {y.shape}")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    for name, a in (("X", X), ("y", y)):
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{name} must hold real numbers; got dtype {a.dtype}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values")


def from_arrays(name: str, X: np.ndarray, y: np.ndarray) -> Dataset:
    """Build a dataset from checked arrays, inferring the task from y.

    Integer-valued y (one column) with 2..MAX_CLASSES distinct values is classification;
    its labels are mapped to 0..k-1 in sorted order. Anything else is regression.
    """
    _check_arrays(X, y)
    X = np.ascontiguousarray(X, dtype=np.float64)
    column = y.reshape(-1).astype(np.float64) if y.ndim == 1 or y.shape[1] == 1 else None
    if column is not None and np.array_equal(column, np.round(column)):
        labels = np.unique(column)
        if 2 <= len(labels) <= MAX_CLASSES:
            info = DatasetInfo(name, X.shape[1], "classification", len(labels), 1, len(X))
            classes = np.searchsorted(labels, column).astype(np.int64)
            return Dataset(X, classes, info, tuple(labels.astype(np.float64).tolist()))
    targets = np.ascontiguousarray(y.reshape(len(y), -1), dtype=np.float64)
    info = DatasetInfo(name, X.shape[1], "regression", None, targets.shape[1], len(X))
    return Dataset(X, targets, info)


def dataset_root() -> Path:
    """Where uploads live: $SHARDGRAD_DATASETS_DIR, else ./var/datasets."""
    return Path(os.environ.get("SHARDGRAD_DATASETS_DIR", "var/datasets"))


def _uploaded_path(dataset_id: str) -> Path:
    if not DATASET_ID.match(dataset_id):
        raise ValueError(f"{dataset_id!r} is not a dataset id (16 lowercase hex characters)")
    return dataset_root() / f"{dataset_id}.npz"


def _content_id(X: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (X, y):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def save_uploaded(raw: bytes, filename: str) -> UploadedDataset:
    """Validate an uploaded .csv/.npz and store it as <root>/<id>.npz (id = content hash).

    Raises ValueError with a readable message when the file is not a usable dataset.
    Uploading the same arrays twice returns the same id.
    """
    filename = Path(filename).name
    X, y = read_arrays(raw, filename)
    from_arrays(filename, X, y)  # validates: raises ValueError on unusable arrays
    X = np.ascontiguousarray(X, dtype=np.float64)
    dataset_id = _content_id(X, y)
    path = _uploaded_path(dataset_id)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, X=X, y=y, filename=np.array(filename))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # readers never see a half-written upload
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return get_uploaded(dataset_id)


def _load_uploaded(dataset_id: str) -> tuple[Dataset, str]:
    path = _uploaded_path(dataset_id)
    if not path.is_file():
        raise FileNotFoundError(f"no uploaded dataset {dataset_id!r} in {dataset_root()}")
    with np.load(path, allow_pickle=False) as npz:
        X, y = npz["X"], npz["y"]
        filename = str(npz["filename"]) if "filename" in npz.files else path.name
    return from_arrays(dataset_id, X, y), filename


def get_uploaded(dataset_id: str) -> UploadedDataset:
    """Describe one upload; FileNotFoundError if there is none with this id.

    An upload never changes (its id is its content's hash), so its description is read
    once per file: submissions that name it, and the dataset list, don't reload it.
    """
    path = _uploaded_path(dataset_id)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"no uploaded dataset {dataset_id!r} in {dataset_root()}") from None
    return _describe_uploaded(dataset_id, (str(path.resolve()), st.st_ino, st.st_mtime_ns))


@functools.lru_cache(maxsize=1024)
def _describe_uploaded(dataset_id: str, file_stamp: tuple) -> UploadedDataset:
    dataset, filename = _load_uploaded(dataset_id)
    return UploadedDataset(**vars(dataset.info), id=dataset_id, filename=filename)


def list_uploaded() -> list[UploadedDataset]:
    """Every stored upload, oldest first."""
    root = dataset_root()
    paths = [p for p in root.glob("*.npz") if DATASET_ID.match(p.stem)] if root.is_dir() else []
    return [get_uploaded(p.stem) for p in sorted(paths, key=lambda p: (p.stat().st_mtime, p.name))]


# ---------------------------------------------------------------- the public entry points


def describe(data: DataSpec, seed: int = 0) -> DatasetInfo:
    """Shape and task of a dataset. Builtins answer from the registry without generating."""
    if data.type == "builtin":
        return _describe_builtin(data)
    if data.type == "dataset":
        return get_uploaded(data.id)
    return load_dataset(data, seed).info


def load_dataset(data: DataSpec, seed: int) -> Dataset:
    if data.type == "builtin":
        info = _describe_builtin(data)
        X, y = BUILTINS[data.name].make(info, data.noise, _rng(seed, _DATA_TAG))
        X = np.ascontiguousarray(X, dtype=np.float64)
        if info.task == "classification":
            return Dataset(X, np.asarray(y, dtype=np.int64), info)
        return Dataset(X, np.ascontiguousarray(y, dtype=np.float64).reshape(len(X), -1), info)
    if data.type == "file":
        X, y = read_arrays(Path(data.path).read_bytes(), data.path)
        return from_arrays(data.path, X, y)
    if data.type == "dataset":
        return _load_uploaded(data.id)[0]
    raise ValueError(f"unknown data type {data.type!r}")


def subset(dataset: Dataset, index: np.ndarray) -> Dataset:
    info = replace(dataset.info, n_samples=len(index))
    return Dataset(dataset.X[index], dataset.y[index], info, dataset.labels)


def train_val_split(
    dataset: Dataset, validation_fraction: float, seed: int
) -> tuple[Dataset, Dataset]:
    """Hold out floor(n * fraction) samples, chosen by a permutation drawn from the seed."""
    order = _rng(seed, _SPLIT_TAG).permutation(len(dataset))
    n_val = int(len(dataset) * validation_fraction)
    return subset(dataset, order[n_val:]), subset(dataset, order[:n_val])


def targets_for(y: np.ndarray, loss: str, dtype: str | np.dtype = "float64") -> np.ndarray:
    """The targets a loss expects, from a dataset's y.

    cross_entropy: int64 class indices (n,). bce, and mse on binary classes: (n, 1) floats
    0/1. mse on regression: (n, n_targets) floats.
    """
    dtype = np.dtype(dtype)
    if y.dtype.kind in "iu":  # class indices
        if loss == "cross_entropy":
            return y.astype(np.int64)
        if y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError(f"{loss} on class labels needs binary classes 0/1")
        return y.astype(dtype).reshape(-1, 1)
    if loss != "mse":
        raise ValueError(f"{loss} needs class labels; regression targets need mse")
    return y.astype(dtype).reshape(len(y), -1)
