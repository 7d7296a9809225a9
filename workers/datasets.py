"""Datasets: builtin generators, files and uploads, all as NumPy arrays.

Every dataset is `X` (float64, C-contiguous, samples x features) and `y`: int64 class
indices `(n,)` for classification, float64 `(n, n_targets)` for regression. Sequence data
(workers/sequences.py) is the exception: X holds int64 token ids, y nothing. Images are
flat rows too (C*H*W values each); `info.shape` records (C, H, W), and a model whose
`input_shape` says so reshapes them (so workers gather rows as for any other data).

Randomness comes from `np.random.default_rng([seed, TAG])`, never from global state, so a
dataset and its train/validation split are functions of the spec's seed alone.

Uploads live under a root directory that callers pass (`WorkerSettings.datasets_dir`);
None means `WorkerSettings()`'s, from $SHARDGRAD_DATASETS_DIR.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import hashlib
import importlib.util
import io
import itertools
import math
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from workers.catalogue import DATASET_ID, MAX_CLASSES, TASKS, DatasetInfo, TooManyValues
from workers.config import WorkerSettings
from workers.sequences import read_text, stream_info, task_samples, windows, windows_info
from workers.spec import MAX_DATASET_VALUES, DataSpec

_DATA_TAG = 0xDA7A  # the generator stream of builtin datasets
_SPLIT_TAG = 0x5B17  # the train/validation permutation


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
    # Consecutive windows of one text: validation is the last of them, not a random draw.
    ordered: bool = field(default=False, kw_only=True)

    def __len__(self) -> int:
        return len(self.X)


def _rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([seed, tag])


# ---------------------------------------------------------------- builtin generators
# Each generator takes the resolved info, the noise level and a Generator and returns (X, y).
# The registry's facts (task, shapes, options) are in workers/catalogue.py.

Generator = Callable[[DatasetInfo, float, np.random.Generator], tuple[np.ndarray, np.ndarray]]
GENERATORS: dict[str, Generator] = {}


def _builtin(name: str):
    def register(make: Generator) -> Generator:
        GENERATORS[name] = make
        return make

    return register


def _balanced_labels(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def _on_circle(angle: np.ndarray) -> np.ndarray:
    return np.column_stack([np.cos(angle), np.sin(angle)])


@_builtin("moons")
def make_moons(info, noise, rng):
    y = _balanced_labels(info.n_samples, 2, rng)
    t = rng.uniform(0.0, np.pi, info.n_samples)
    upper = _on_circle(t)
    lower = np.array([1.0, 0.5]) - upper  # the same arc, flipped and shifted into the gap
    X = np.where(y[:, None] == 0, upper, lower)
    return X + noise * rng.standard_normal(X.shape), y


@_builtin("circles")
def make_circles(info, noise, rng):
    y = _balanced_labels(info.n_samples, 2, rng)
    radius = np.where(y == 0, 1.0, 0.5)
    X = radius[:, None] * _on_circle(rng.uniform(0.0, 2 * np.pi, info.n_samples))
    return X + noise * rng.standard_normal(X.shape), y


@_builtin("spirals")
def make_spirals(info, noise, rng):
    y = _balanced_labels(info.n_samples, info.n_classes, rng)
    r = rng.uniform(0.0, 1.0, info.n_samples)
    # Arms start evenly spaced and each turns 4 radians from the centre to the rim.
    angle = 2 * np.pi * y / info.n_classes + 4.0 * r
    X = r[:, None] * _on_circle(angle)
    return X + noise * rng.standard_normal(X.shape), y


@_builtin("xor")
def make_xor(info, noise, rng):
    X = rng.uniform(-1.0, 1.0, (info.n_samples, 2))
    y = ((X[:, 0] > 0) != (X[:, 1] > 0)).astype(np.int64)
    return X + noise * rng.standard_normal(X.shape), y


@_builtin("blobs")
def make_blobs(info, noise, rng):
    centres = rng.uniform(-1.0, 1.0, (info.n_classes, info.n_features))
    y = _balanced_labels(info.n_samples, info.n_classes, rng)
    return centres[y] + noise * rng.standard_normal((info.n_samples, info.n_features)), y


@_builtin("sine")
def make_sine(info, noise, rng):
    X = rng.uniform(-np.pi, np.pi, (info.n_samples, 1))
    return X, np.sin(X) + noise * rng.standard_normal(X.shape)


@_builtin("shapes")
def make_shapes(info, noise, rng):
    """Outlines of a circle (0), square (1) or triangle (2), or a filled cross (3), each at
    a random position, size and stroke, anti-aliased, plus Gaussian noise; flat rows."""
    n, (_, h, w) = info.n_samples, info.shape
    y = _balanced_labels(n, 4, rng)
    r = rng.uniform(5.0, 10.0, n)  # size: radius, half-side, inradius or arm length
    stroke = rng.uniform(1.5, 3.0, n)
    cy, cx = (rng.uniform(r + 2, side - r - 2) for side in (h, w))
    dy = np.arange(h)[None, :, None] - cy[:, None, None]
    dx = np.arange(w)[None, None, :] - cx[:, None, None]
    r, half = r[:, None, None], stroke[:, None, None] / 2
    ax, ay = np.abs(dx), np.abs(dy)
    # Each shape as a distance to its stroke (<= 0 inside); a pixel's value is its coverage.
    angles = np.deg2rad([90.0, 210.0, 330.0])  # the triangle's outward edge normals
    edge = np.max([np.cos(a) * dx - np.sin(a) * dy for a in angles], axis=0)
    distance = np.select(
        [y[:, None, None] == k for k in range(3)],
        [
            np.abs(np.hypot(dx, dy) - r) - half,
            np.abs(np.maximum(ax, ay) - r) - half,
            np.abs(edge - r / 2) - half,
        ],
        np.minimum(np.maximum(ax - half, ay - r), np.maximum(ay - half, ax - r)),
    )
    X = np.clip(0.5 - distance, 0.0, 1.0).reshape(n, h * w)
    return X + noise * rng.standard_normal(X.shape), y


# scikit-learn's bundled copies: no download. n_samples and noise do not apply.
@_builtin("digits")
def make_digits(info, noise, rng):
    X, y = load_digits()
    return X / 16.0, y  # pixel intensities 0..16 -> [0, 1]


@_builtin("iris")
def make_iris(info, noise, rng):
    X, y = load_iris()
    return (X - X.mean(axis=0)) / X.std(axis=0), y


def _sklearn_data(filename: str) -> Path:
    """A data file that scikit-learn ships, found without importing scikit-learn, which
    would take seconds of a run's start-up."""
    found = importlib.util.find_spec("sklearn")
    for root in (found.submodule_search_locations or []) if found else []:
        path = Path(root) / "datasets" / "data" / filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"scikit-learn's bundled {filename} is not installed")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn.datasets.load_digits(return_X_y=True), read from the file it reads."""
    with gzip.open(_sklearn_data("digits.csv.gz"), "rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


def load_iris() -> tuple[np.ndarray, np.ndarray]:
    """sklearn.datasets.load_iris(return_X_y=True), read from the file it reads."""
    data = np.loadtxt(_sklearn_data("iris.csv"), delimiter=",", skiprows=1)
    return data[:, :-1], data[:, -1].astype(int)


# ---------------------------------------------------------------- files and uploads


def _read_npz(raw: bytes, max_values: int) -> tuple[np.ndarray, np.ndarray]:
    """X and y of an np.savez archive, reading each member's .npy header first: a member
    that claims more than `max_values` values (with the other), or is not of real numbers,
    is refused before anything is allocated, and no member is decompressed past the bytes
    its header claims (a deflate bomb or a lying header costs nothing)."""
    if not raw.startswith(b"PK\x03\x04"):  # np.load would try to unpickle anything else
        raise ValueError("not a .npz file (expected a zip archive of .npy arrays, np.savez)")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            members = {name.removesuffix(".npy"): name for name in archive.namelist()}
            if "X" not in members or "y" not in members:
                found = ", ".join(members) or "nothing"
                raise ValueError(f"a .npz dataset needs arrays 'X' and 'y'; found {found}")
            X = _read_member(archive, members["X"], "X", max_values)
            y = _read_member(archive, members["y"], "y", max_values - X.size)
            return X, y
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
        raise ValueError(f"not a readable .npz file ({e})") from None


def _read_member(archive: zipfile.ZipFile, member: str, name: str, budget: int) -> np.ndarray:
    with archive.open(member) as f:
        try:
            shape, fortran, dtype = _npy_header(f)
        except ValueError as e:
            raise ValueError(f"{name} is not a readable .npy array ({e})") from None
        if dtype.hasobject or dtype.kind not in "biuf":
            raise ValueError(f"{name} must hold real numbers; got dtype {dtype}")
        count = math.prod(shape)
        if count > budget:
            raise TooManyValues(
                f"{name} has shape {shape}: {count:,} values, more than the "
                f"{max(budget, 0):,} left of the limit of a dataset"
            )
        data = f.read(count * dtype.itemsize)  # never more than the header claims
        more = f.read(1)
    if len(data) != count * dtype.itemsize or more:
        held = f"{len(data):,}" if not more else "more"
        raise ValueError(
            f"{name} does not match its header, which claims shape {shape} "
            f"({count * dtype.itemsize:,} bytes); the archive holds {held}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The shape, order and dtype an .npy header claims; nothing else is read."""
    header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    read_header = header.get(npy.read_magic(f))
    if read_header is None:
        raise ValueError("unsupported .npy format version")
    return read_header(f)


CSV_CHUNK_ROWS = 10_000  # rows parsed as text before they become an array


def _read_csv(raw: bytes, max_values: int) -> tuple[np.ndarray, np.ndarray]:
    """A header row, then numbers. NumPy's C parser reads them when it can (six times
    faster); anything it refuses is read again with the csv module, CSV_CHUNK_ROWS rows
    at a time, which says which row and column is wrong. Neither holds the text of more
    than a chunk of cells at once, nor more than `max_values` values."""
    header, rest = _csv_header(raw)
    values = _numbers(rest, len(header), max_values)
    if values is None:
        values = _csv_values(raw, header, max_values)
    target = header.index("y") if "y" in header else len(header) - 1
    return np.delete(values, target, axis=1), values[:, target]


def _csv_text(raw: bytes) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8-sig", newline="")  # no copy


def _csv_rows(text: io.TextIOWrapper):
    reader = csv.reader(text)
    return reader, (row for row in reader if any(cell.strip() for cell in row))


def _csv_header(raw: bytes) -> tuple[list[str], io.TextIOWrapper]:
    """The header's names, and the text after the header."""
    text = _csv_text(raw)
    with _csv_errors(csv.reader(text)) as reader:
        header = [h.strip() for h in next(r for r in reader if any(c.strip() for c in r))]
    if not header:
        raise ValueError("the .csv file is empty; expected a header row and data rows")
    if len(header) < 2:
        raise ValueError("a .csv dataset needs at least 2 columns (features and a target)")
    return header, text


def _numbers(text: io.TextIOWrapper, columns: int, max_values: int) -> np.ndarray | None:
    """The rows after the header by np.loadtxt, or None where it fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": told below
            values = np.loadtxt(
                text,
                delimiter=",",
                quotechar='"',
                comments=None,
                ndmin=2,
                max_rows=max_values // columns + 1,
            )
    except (ValueError, UnicodeDecodeError):
        return None
    if values.shape[1] != columns or len(values) == 0:
        return None
    if values.size > max_values:
        raise TooManyValues(_too_many_cells(max_values))
    return values


def _csv_values(raw: bytes, header: list[str], max_values: int) -> np.ndarray:
    reader, rows = _csv_rows(_csv_text(raw))
    with _csv_errors(reader):
        next(rows)  # the header
        chunks = list(_csv_chunks(rows, header, max_values))
    if not chunks:
        raise ValueError("the .csv file has a header but no data rows")
    return np.concatenate(chunks)


@contextlib.contextmanager
def _csv_errors(reader):
    """The csv module's and the decoder's errors as ValueErrors that say where."""
    try:
        yield reader
    except StopIteration:
        raise ValueError("the .csv file is empty; expected a header row and data rows") from None
    except UnicodeDecodeError:
        raise ValueError("a .csv dataset must be UTF-8 text") from None
    except csv.Error as e:
        raise ValueError(f"line {reader.line_num} of the .csv file: {e}") from None


def _too_many_cells(max_values: int) -> str:
    return f"the .csv file holds more than {max_values:,} values (rows x columns), the limit"


def _csv_chunks(rows, header: list[str], max_values: int):
    done = 0
    for chunk in iter(lambda: list(itertools.islice(rows, CSV_CHUNK_ROWS)), []):
        for i, row in enumerate(chunk, start=done + 1):
            if len(row) != len(header):
                raise ValueError(
                    f"data row {i} has {len(row)} columns; the header has {len(header)}"
                )
        done += len(chunk)
        if done * len(header) > max_values:
            raise TooManyValues(_too_many_cells(max_values))
        try:
            yield np.array(chunk, dtype=np.float64)
        except ValueError:
            raise ValueError(_first_non_number(header, chunk, done - len(chunk))) from None


def _first_non_number(header: list[str], rows: list[list[str]], before: int = 0) -> str:
    for i, row in enumerate(rows, start=before + 1):
        for name, cell in zip(header, row, strict=True):
            try:
                float(cell)
            except ValueError:
                return f"data row {i}, column {name!r}: {cell.strip()!r} is not a number"
    return "the .csv file holds values that are not numbers"


def read_arrays(
    raw: bytes, filename: str, max_values: int = MAX_DATASET_VALUES
) -> tuple[np.ndarray, np.ndarray]:
    """Parse `.npz` (arrays X, y) or `.csv` (header; target column `y`, else the last),
    refusing (ValueError) more than `max_values` values in all, before allocating them."""
    suffix = Path(filename).suffix.lower()
    if suffix == ".npz":
        return _read_npz(raw, max_values)
    if suffix == ".csv":
        return _read_csv(raw, max_values)
    raise ValueError(
        f"{filename!r}: unsupported file type; use .npz (arrays X, y) or .csv (or upload "
        ".txt text for a character-level language model)"
    )


def _check_arrays(X: np.ndarray, y: np.ndarray) -> None:
    if X.ndim not in (2, 4) or X.size == 0:
        raise ValueError(
            "X must be 2-D (samples x features) or 4-D images (samples x channels x height x "
            f"width) and non-empty; got shape {X.shape}"
        )
    if y.ndim not in (1, 2) or y.shape[-1:] == (0,):
        raise ValueError(f"y must be 1-D or 2-D and non-empty; got shape {y.shape}")
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    for name, a in (("X", X), ("y", y)):
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{name} must hold real numbers; got dtype {a.dtype}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values")


def _text(name: str, ids: np.ndarray, vocab: tuple[str, ...]) -> Dataset:
    """A text as a stream of character ids, one sample each (a model's context cuts it)."""
    ids = ids.astype(np.int64).reshape(-1, 1)
    info = stream_info(name, len(ids), vocab)
    return Dataset(ids, np.zeros((len(ids), 0), np.int64), info, ordered=True)


def _from_file(raw: bytes, path: str) -> Dataset:
    """A local file's dataset: a `.txt` as a text stream (as its upload is), else arrays."""
    if Path(path).suffix.lower() == ".txt":
        return _text(path, *read_text(raw, MAX_DATASET_VALUES))
    return from_arrays(path, *read_arrays(raw, path))


def from_arrays(name: str, X: np.ndarray, y: np.ndarray) -> Dataset:
    """Build a dataset from checked arrays, inferring the task from y.

    Integer-valued y (one column) with 2..MAX_CLASSES distinct values is classification;
    its labels are mapped to 0..k-1 in sorted order. Anything else is regression.
    """
    _check_arrays(X, y)
    shape = tuple(X.shape[1:]) if X.ndim == 4 else None  # images are kept as flat rows
    X = np.ascontiguousarray(X, dtype=np.float64).reshape(len(X), -1)
    column = y.reshape(-1).astype(np.float64) if y.ndim == 1 or y.shape[1] == 1 else None
    if column is not None and np.array_equal(column, np.round(column)):
        labels = np.unique(column)
        if 2 <= len(labels) <= MAX_CLASSES:
            info = DatasetInfo(
                name, X.shape[1], "classification", len(labels), 1, len(X), shape=shape
            )
            classes = np.searchsorted(labels, column).astype(np.int64)
            return Dataset(X, classes, info, tuple(labels.astype(np.float64).tolist()))
    targets = np.ascontiguousarray(y.reshape(len(y), -1), dtype=np.float64)
    info = DatasetInfo(name, X.shape[1], "regression", None, targets.shape[1], len(X), shape=shape)
    return Dataset(X, targets, info)


def dataset_root(root: Path | None = None) -> Path:
    """Where uploads live: `root`, else WorkerSettings' datasets_dir ($SHARDGRAD_DATASETS_DIR,
    else ./var/datasets)."""
    return Path(root) if root is not None else WorkerSettings().datasets_dir


def _uploaded_path(dataset_id: str, root: Path) -> Path:
    if not DATASET_ID.match(dataset_id):
        raise ValueError(f"{dataset_id!r} is not a dataset id (16 lowercase hex characters)")
    return root / f"{dataset_id}.npz"


def _no_upload(dataset_id: str, root: Path) -> FileNotFoundError:
    return FileNotFoundError(f"no uploaded dataset {dataset_id!r} in {root}")


def _content_id(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def save_uploaded(
    raw: bytes, filename: str, root: Path | None = None, max_values: int = MAX_DATASET_VALUES
) -> UploadedDataset:
    """Validate an uploaded .csv/.npz/.txt and store it as <root>/<id>.npz (id = content
    hash): arrays X and y, or a text's character ids X and its vocabulary.

    Raises ValueError with a readable message when the file is not a usable dataset or
    holds more than `max_values` values (a text: characters). Uploading the same arrays
    twice returns the same id.
    """
    filename = Path(filename).name
    if Path(filename).suffix.lower() == ".txt":
        ids, vocab = read_text(raw, max_values)
        arrays = {"X": ids, "vocab": np.array(vocab)}
    else:
        X, y = read_arrays(raw, filename, max_values)
        from_arrays(filename, X, y)  # validates: raises ValueError on unusable arrays
        arrays = {"X": np.ascontiguousarray(X, dtype=np.float64), "y": y}
    dataset_id, root = _content_id(*arrays.values()), dataset_root(root)
    path = _uploaded_path(dataset_id, root)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays, filename=np.array(filename))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # readers never see a half-written upload
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return get_uploaded(dataset_id, root)


def delete_uploaded(dataset_id: str, root: Path | None = None) -> bool:
    """Remove an upload; False if there was none with this id."""
    path = _uploaded_path(dataset_id, dataset_root(root))
    existed = path.is_file()
    path.unlink(missing_ok=True)
    return existed


def save_uploaded_file(
    path: str, filename: str, root: Path | None = None, max_values: int = MAX_DATASET_VALUES
) -> UploadedDataset:
    """save_uploaded of the bytes of the file at `path` (a copy of the upload)."""
    return save_uploaded(Path(path).read_bytes(), filename, root, max_values)


def _load_uploaded(dataset_id: str, root: Path) -> tuple[Dataset, str]:
    path = _uploaded_path(dataset_id, root)
    if not path.is_file():
        raise _no_upload(dataset_id, root)
    with np.load(path, allow_pickle=False) as npz:
        filename = str(npz["filename"]) if "filename" in npz.files else path.name
        if "vocab" in npz.files:  # a text, as a stream of character ids
            return _text(dataset_id, npz["X"], tuple(npz["vocab"].tolist())), filename
        X, y = npz["X"], npz["y"]
    return from_arrays(dataset_id, X, y), filename


def get_uploaded(dataset_id: str, root: Path | None = None) -> UploadedDataset:
    """Describe one upload; FileNotFoundError if there is none with this id.

    An upload never changes (its id is its content's hash), so its description is read
    once per file: submissions that name it, and the dataset list, don't reload it.
    """
    root = dataset_root(root)
    path = _uploaded_path(dataset_id, root)
    if not path.is_file():
        raise _no_upload(dataset_id, root)
    return _describe_uploaded(dataset_id, path.resolve().parent)


@functools.lru_cache(maxsize=1024)
def _describe_uploaded(dataset_id: str, root: Path) -> UploadedDataset:
    dataset, filename = _load_uploaded(dataset_id, root)
    return UploadedDataset(**vars(dataset.info), id=dataset_id, filename=filename)


def list_uploaded(root: Path | None = None) -> list[UploadedDataset]:
    """Every stored upload, oldest first."""
    root = dataset_root(root)
    paths = [p for p in root.glob("*.npz") if DATASET_ID.match(p.stem)] if root.is_dir() else []
    paths.sort(key=lambda p: (p.stat().st_mtime, p.name))
    return [get_uploaded(p.stem, root) for p in paths]


# ---------------------------------------------------------------- files, described once

_DIGESTS: dict[tuple, tuple[str, str]] = {}  # (path, inode, mtime, size) -> content key
_DESCRIBED: dict[tuple[str, str], DatasetInfo] = {}  # (sha256 of the bytes, suffix) -> info
_CACHED = 1024


def _remember(cache: dict, key, value) -> None:
    cache[key] = value
    while len(cache) > _CACHED:
        del cache[next(iter(cache))]  # the oldest entry


def _describe_file(path: str) -> DatasetInfo:
    """A file's description, parsed once per content: cached by the sha256 of its bytes,
    which are read again only when the file's (path, inode, mtime, size) changes."""
    p = Path(path)
    st = p.stat()
    stamp = (str(p.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)
    key = _DIGESTS.get(stamp)
    if key not in _DESCRIBED:
        raw = p.read_bytes()
        key = (hashlib.sha256(raw).hexdigest(), p.suffix.lower())
        if key not in _DESCRIBED:
            _remember(_DESCRIBED, key, _from_file(raw, path).info)
        _remember(_DIGESTS, stamp, key)
    return replace(_DESCRIBED[key], name=path)


# ---------------------------------------------------------------- the public entry points


def describe(data: DataSpec, root: Path | None = None, context: int | None = None) -> DatasetInfo:
    """Shape and task of a dataset. Builtins answer from the registry without generating;
    a file or an upload is parsed once per content. `context`: the model's (see
    `workers.spec.model_context`), which cuts an uploaded text into windows; without it a
    text is described as a stream of characters."""
    if data.type == "builtin":
        return data.describe()
    info = get_uploaded(data.id, root) if data.type == "dataset" else _describe_file(data.path)
    if info.task == "sequence" and info.context is None and context is not None:
        return windows_info(info, context)  # raises if the text is too short
    return info


def load_dataset(
    data: DataSpec, seed: int, root: Path | None = None, context: int | None = None
) -> Dataset:
    """The dataset a spec names; `context` as for `describe`."""
    if data.type == "builtin" and data.name in TASKS:
        info = data.describe()
        X = task_samples(data.name, data.n_digits, info.n_samples, _rng(seed, _DATA_TAG))
        return Dataset(X, np.zeros((len(X), 0), np.int64), info)
    if data.type == "builtin":
        info = data.describe()
        X, y = GENERATORS[data.name](info, data.noise, _rng(seed, _DATA_TAG))
        X = np.ascontiguousarray(X, dtype=np.float64)
        if info.task == "classification":
            return Dataset(X, np.asarray(y, dtype=np.int64), info)
        return Dataset(X, np.ascontiguousarray(y, dtype=np.float64).reshape(len(X), -1), info)
    if data.type == "file":
        dataset = _from_file(Path(data.path).read_bytes(), data.path)
    elif data.type == "dataset":
        dataset = _load_uploaded(data.id, dataset_root(root))[0]
    else:
        raise ValueError(f"unknown data type {data.type!r}")
    if dataset.info.task != "sequence" or context is None:
        return dataset
    info = windows_info(dataset.info, context)  # raises if the text is too short
    X = windows(dataset.X[:, 0], context)
    return Dataset(X, np.zeros((len(X), 0), np.int64), info, ordered=True)


def subset(dataset: Dataset, index: np.ndarray) -> Dataset:
    info = replace(dataset.info, n_samples=len(index))
    return Dataset(
        dataset.X[index], dataset.y[index], info, dataset.labels, ordered=dataset.ordered
    )


def train_val_split(
    dataset: Dataset, validation_fraction: float, seed: int
) -> tuple[Dataset, Dataset]:
    """Hold out floor(n * fraction) samples, chosen by a permutation drawn from the seed;
    of an ordered dataset (a text's windows), the last ones: the end of the text."""
    n_val = int(len(dataset) * validation_fraction)
    if dataset.ordered:
        order = np.roll(np.arange(len(dataset)), n_val)  # the last n_val first
    else:
        order = _rng(seed, _SPLIT_TAG).permutation(len(dataset))
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
