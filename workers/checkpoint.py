"""Atomic, verified checkpoints.

Layout, one directory per saved step (``N`` is a plain integer, ordered numerically)::

    <out>/checkpoints/step-<N>/
        model.safetensors      model state_dict, key order kept in the metadata
        optimizer.safetensors  arrays as ``state.<i>.<name>``; ints, floats and
                               param_groups as JSON in the safetensors metadata
        state.json             step, epoch, spec hash, metrics (whatever the caller passes)
        manifest.json          sha256 and size of every file, step, created_at, format

Commit protocol. A checkpoint is written into ``.tmp-…`` next to its final place.
Every file is fsynced, then ``manifest.json`` is written *last* and fsynced, then the
directory itself. Only then is it renamed to ``step-<N>`` and the parent fsynced.

* Why manifest last: it is the commit marker. A crash at any earlier point leaves a
  directory without a manifest, which loading treats as not a checkpoint. Its hashes
  also catch what a crash cannot explain: bit rot, truncation, a half-copied backup.
* Why fsync before rename: without it the kernel may persist the rename before the
  data, and after a power loss ``step-<N>`` could exist with empty files.
* Why rename: it is atomic, so readers see either no ``step-<N>`` or a complete one.
  A directory cannot be renamed over a non-empty one, so re-saving a step moves the
  old copy aside to ``.old-…`` first and deletes it after the new one is in place.

Loading ignores ``.tmp-*`` and ``.old-*``; the next save deletes them. ``load_latest``
walks from the newest step down and skips (with a warning) any checkpoint that fails
verification. "Newest" means the highest step. Pruning keeps the ``keep`` newest
*verified* checkpoints, and the one ``<out>/best.json`` names (`write_best`), and deletes
bad ones older than the newest good one; bad ones newer than it stay until that step is
saved again, so a corrupt newest directory never costs the last good one. If saving
raises, its ``.tmp-`` directory is removed at once.
One writer per output directory.

Verification is cached per process. A file whose hash matched its manifest is not hashed
again while its (path, size, mtime, inode) stay the same: listing, predicting and
downloading then cost a ``stat`` per file. Only files whose mtime was at least
``SETTLED_S`` old when they were hashed are remembered (as git does for racily clean
files): a file changed later gets a later mtime, even with a coarse filesystem clock.

Round-trip types: arrays come back bit-identical (dtype, shape, bytes) and writable;
numpy scalars come back as the equal Python ``int``/``float``/``bool``; tuples come
back as lists; optimizer state keys come back as ``int``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointWarning",
    "NoCheckpoint",
    "UnknownCheckpoint",
    "checkpoint_dir",
    "checkpoint_info",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "load_model_state",
    "prune_checkpoints",
    "read_best",
    "resolve_checkpoint",
    "save_checkpoint",
    "write_best",
    "verify_checkpoint",
]

FORMAT = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)
BEST_FILE = "best.json"  # <out>/best.json: {"step", "checkpoint", "metric", "mode", "value"}
# What a caller may ask for: the best checkpoint, the newest, or one step's.
CHOICE_PATTERN = r"^(best|latest|step-(0|[1-9][0-9]*))$"  # also the API's, as JSON Schema
CHOICE = re.compile(CHOICE_PATTERN)
CHOICE_HELP = '"best", "latest" or "step-<N>"'
DEFAULT_HELP = "best when the job keeps a best checkpoint (keep_best), else latest"

_NAME = re.compile(r"step-[0-9]+")  # what checkpoint_dir accepts
_CANONICAL = re.compile(r"step-(0|[1-9][0-9]*)")  # what save writes and scans find

log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint is missing, partial or corrupt."""


class UnknownCheckpoint(LookupError):
    """The checkpoint asked for does not exist: never written, pruned, failed verification,
    or "best" of a run that keeps none."""


class NoCheckpoint(UnknownCheckpoint):
    """The run has no verified checkpoint at all (yet)."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it failed verification."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_state: dict[str, np.ndarray]
    optimizer_state: dict
    state: dict


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    step: int
    path: Path
    created_at: str  # ISO 8601, UTC, when the manifest was written
    size_bytes: int  # sum of the files listed in the manifest
    sha256: str  # of model.safetensors


# --- saving ---------------------------------------------------------------------------


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model_state: Mapping[str, np.ndarray],
    optimizer_state: Mapping[str, Any],
    state: Mapping[str, Any],
    keep: int | None = 3,
) -> Path:
    """Write ``<out_dir>/checkpoints/step-<step>`` atomically; prune to ``keep`` good ones.

    ``keep=None`` keeps every checkpoint. Re-saving an existing step replaces it.
    """
    step = _as_step(step)
    if keep is not None:
        keep = _as_keep(keep)
    if "step" in state and state["step"] != step:
        raise ValueError(f"state['step'] is {state['step']!r} but saving step {step}")
    root = _root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)

    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=root))
    try:
        _write_files(tmp, step, model_state, optimizer_state, state)
        _fsync(tmp)
        if final.exists() or final.is_symlink():
            old = root / f".old-step-{step}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except OSError:
                os.rename(old, final)
                raise
            _fsync(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
            _fsync(root)
    except Exception:
        # An ordinary error (disk full, bad input) cleans up; a hard crash leaves the
        # .tmp- directory for the next save to delete.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune_checkpoints(out_dir, keep, known_good=final)
    return final


def _write_files(tmp: Path, step: int, model_state, optimizer_state, state) -> None:
    """The three data files, then the manifest that commits them; everything fsynced."""
    model_meta = {"format": str(FORMAT), "step": str(step), "keys": json.dumps(list(model_state))}
    _write_safetensors(tmp / MODEL_FILE, dict(model_state), model_meta)
    tensors, optimizer_meta = _flatten_optimizer(optimizer_state)
    _write_safetensors(tmp / OPTIMIZER_FILE, tensors, optimizer_meta)
    _write_json(tmp / STATE_FILE, _jsonable(dict(state)))
    files = {}
    for name in REQUIRED_FILES:
        data = (tmp / name).read_bytes()
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    created_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    manifest = {"format": FORMAT, "step": step, "created_at": created_at, "files": files}
    _write_json(tmp / MANIFEST_FILE, manifest)


def prune_checkpoints(
    out_dir: str | os.PathLike, keep: int, known_good: Path | None = None
) -> list[Path]:
    """Delete all but the ``keep`` newest verified checkpoints; return what was deleted.
    The checkpoint best.json names is never deleted.

    Unverifiable directories older than the newest good one are deleted too. Anything
    newer than the newest good one is left alone, so the newest good one always stays.
    Only the newest ones are hashed: past ``keep`` good ones, every older directory goes,
    good or not. ``known_good`` (the checkpoint just written) is not hashed again.
    """
    keep = _as_keep(keep)
    good: list[Path] = []
    doomed: list[Path] = []
    for _, path in reversed(_step_dirs(_root(out_dir))):
        if len(good) == keep:
            doomed.append(path)
            continue
        try:
            if path != known_good:
                verify_checkpoint(path)
        except CheckpointError:
            if good:  # bad and older than the newest good one
                doomed.append(path)
            continue
        good.append(path)
    best = read_best(out_dir)
    doomed = [path for path in doomed if best is None or path.name != best.get("checkpoint")]
    for path in doomed:
        try:
            _remove_dir(path)
        except OSError as e:  # the save already succeeded; pruning is best effort
            log.warning("could not prune checkpoint %s: %s", path, e)
    return doomed


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict) -> None:
    # safetensors copies raw memory, so views (transposes, slices) must be made contiguous
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata)
    _fsync(path)


def write_best(out_dir: str | os.PathLike, best: dict) -> Path:
    """Write ``<out_dir>/best.json`` atomically (a temporary file, fsynced, renamed):
    ``{"step": N, "checkpoint": "step-N", "metric": .., "mode": .., "value": ..}``, the
    best evaluation of a run that keeps its best checkpoint; pruning never deletes it."""
    out = Path(out_dir)
    tmp = out / f".{BEST_FILE}.{uuid.uuid4().hex[:8]}"
    _write_json(tmp, best)
    os.replace(tmp, out / BEST_FILE)
    _fsync(out)
    return out / BEST_FILE


def read_best(out_dir: str | os.PathLike) -> dict | None:
    """What ``<out_dir>/best.json`` says, or None without one (or an unreadable one)."""
    try:
        best = json.loads((Path(out_dir) / BEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return best if isinstance(best, dict) else None


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        f.write(json.dumps(obj, indent=2).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    if os.name == "nt" and path.is_dir():  # Windows cannot open a directory to fsync it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dir(path: Path) -> None:
    # Rename first: a crash mid-delete then leaves an ignored .old- dir, not a half step-N.
    old = path.with_name(f".old-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, old)
    shutil.rmtree(old)


def _remove_leftovers(root: Path) -> None:
    for path in root.iterdir():
        if path.name.startswith((".tmp-", ".old-")) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


# --- optimizer state <-> safetensors ----------------------------------------------------


def _flatten_optimizer(optimizer_state: Mapping[str, Any]) -> tuple[dict, dict[str, str]]:
    """Arrays become tensors ``state.<i>.<name>``; everything else becomes JSON metadata."""
    extra = set(optimizer_state) - {"state", "param_groups"}
    if extra:
        raise ValueError(f"unexpected optimizer state keys: {sorted(extra)}")
    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, list[str]] = {}  # per param: entry names in their original order
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in optimizer_state.get("state", {}).items():
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"optimizer state keys must be ints, got {index!r}")
        key = str(int(index))
        layout[key] = [str(name) for name in entries]
        for name, value in entries.items():
            if isinstance(value, np.ndarray):
                tensors[f"state.{key}.{name}"] = value
            else:
                scalars.setdefault(key, {})[str(name)] = _jsonable(value)
    metadata = {
        "format": str(FORMAT),
        "state": json.dumps(layout),
        "scalars": json.dumps(scalars),
        "param_groups": json.dumps(_jsonable(list(optimizer_state.get("param_groups", [])))),
    }
    return tensors, metadata


def _unflatten_optimizer(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> dict:
    layout = json.loads(metadata["state"])
    scalars = json.loads(metadata["scalars"])
    state = {}
    for key, names in layout.items():
        given = scalars.get(key, {})
        state[int(key)] = {
            name: given[name] if name in given else tensors.pop(f"state.{key}.{name}")
            for name in names
        }
    if tensors:
        raise CheckpointError(f"tensors not described by the metadata: {sorted(tensors)}")
    return {"state": state, "param_groups": json.loads(metadata["param_groups"])}


def _jsonable(value: Any) -> Any:
    """Plain JSON types; numpy scalars become the equal Python number (repr round-trips)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float):
        return value
    raise TypeError(f"cannot store {type(value).__name__} as JSON in a checkpoint: {value!r}")


# --- loading and verification -----------------------------------------------------------


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless the manifest and every file it lists check out."""
    _verified_manifest(Path(path))


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Verify and load one checkpoint directory; raise CheckpointError when it is bad."""
    path = Path(path)
    manifest = _verified_manifest(path)
    try:
        model_state = _load_model(path / MODEL_FILE)
        optimizer_state = _unflatten_optimizer(*_read_safetensors(path / OPTIMIZER_FILE))
        state = json.loads((path / STATE_FILE).read_bytes())
    except CheckpointError:
        raise
    except Exception as e:  # verified bytes that still do not parse: a format bug
        raise CheckpointError(f"{path}: cannot decode checkpoint: {e!r}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {STATE_FILE} is not a JSON object")
    return Checkpoint(path, manifest["step"], model_state, optimizer_state, state)


def load_model_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Only the model parameters of a checkpoint directory, checked against its manifest."""
    path = Path(path)
    manifest = _read_manifest(path)
    _check_listed(path, MODEL_FILE, manifest["files"][MODEL_FILE])
    try:
        return _load_model(path / MODEL_FILE)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot decode {MODEL_FILE}: {e!r}") from e


def load_latest(out_dir: str | os.PathLike) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None. Bad ones are skipped with a warning."""
    for _, path in reversed(_step_dirs(_root(out_dir))):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            _warn_skipped(e)
    return None


def list_checkpoints(out_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Verified checkpoints, oldest first. Bad ones are left out (logged at debug level)."""
    infos = []
    for _, path in _step_dirs(_root(out_dir)):
        try:
            manifest = _verified_manifest(path)
        except CheckpointError as e:
            log.debug("not listing %s: %s", path, e)
            continue
        infos.append(_info(path, manifest))
    return infos


def checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """One checkpoint directory's listing entry; CheckpointError unless it verifies."""
    path = Path(path)
    return _info(path, _verified_manifest(path))


def _info(path: Path, manifest: dict) -> CheckpointInfo:
    files = manifest["files"]
    return CheckpointInfo(
        name=path.name,
        step=manifest["step"],
        path=path,
        created_at=manifest["created_at"],
        size_bytes=sum(entry["size"] for entry in files.values()),
        sha256=files[MODEL_FILE]["sha256"],
    )


def resolve_checkpoint(out_dir: str | os.PathLike, which: str | None = None) -> Path:
    """The verified checkpoint directory that ``which`` names: ``"best"`` (the one
    ``best.json`` names), ``"latest"`` (the newest that verifies) or ``"step-<N>"``.
    None is "best" when the run keeps a best checkpoint that verifies, else "latest".

    ValueError for a name that is none of these; NoCheckpoint when the run has no
    checkpoint at all; UnknownCheckpoint when the one named does not exist or verify.
    """
    if which is not None and (not isinstance(which, str) or not CHOICE.fullmatch(which)):
        raise ValueError(f"invalid checkpoint {which!r}: expected {CHOICE_HELP}")
    if which in (None, "best"):
        try:
            return _best(out_dir)
        except UnknownCheckpoint:
            if which == "best":
                raise
    if which in (None, "latest"):
        for _, path in reversed(_step_dirs(_root(out_dir))):
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError as e:
                log.debug("not resolving to %s: %s", path, e)
        raise NoCheckpoint("no checkpoint yet")
    return _verified_dir(out_dir, which)


def _best(out_dir: str | os.PathLike) -> Path:
    best = read_best(out_dir)
    if best is None:
        raise UnknownCheckpoint("no best checkpoint: the run keeps none (see keep_best)")
    try:
        return _verified_dir(out_dir, best.get("checkpoint"))
    except (ValueError, UnknownCheckpoint) as e:
        raise UnknownCheckpoint(f"the best checkpoint is not usable: {e}") from None


def _verified_dir(out_dir: str | os.PathLike, name: str) -> Path:
    path = checkpoint_dir(out_dir, name)
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        if not _step_dirs(_root(out_dir)):
            raise NoCheckpoint("no checkpoint yet") from None
        log.debug("checkpoint %s: %s", name, e)
        raise UnknownCheckpoint(f"no checkpoint {name!r}") from None
    return path


def checkpoint_dir(out_dir: str | os.PathLike, name: str) -> Path:
    """``<out_dir>/checkpoints/<name>`` for a name like ``step-12``; ValueError otherwise.

    The path is not required to exist, but it can never point outside the checkpoints
    directory (also not through a symlink).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"invalid checkpoint name {name!r}: expected 'step-<N>'")
    root = _root(out_dir)
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"checkpoint {name!r} points outside {root}")
    return path


def _verified_manifest(path: Path) -> dict:
    manifest = _read_manifest(path)
    for name, entry in manifest["files"].items():
        _check_listed(path, name, entry)
    return manifest


def _read_manifest(path: Path) -> dict:
    file = f"{path}/{MANIFEST_FILE}"
    try:
        st = os.stat(file)
        key = (file, st.st_size, st.st_mtime_ns, st.st_ino)
        manifest = _SETTLED.get(key)  # parsed and checked before, unchanged since
        if manifest is None:
            read_at = time.time_ns()
            with open(file, "rb") as f:
                manifest = json.loads(f.read())
            problem = _manifest_problem(manifest)
            if problem:
                raise CheckpointError(f"{path}: invalid {MANIFEST_FILE}: {problem}")
            _remember_if_settled(key, manifest, read_at)
    except (FileNotFoundError, NotADirectoryError):
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a directory") from None
        raise CheckpointError(f"{path}: no {MANIFEST_FILE} (incomplete write?)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST_FILE}: {e}") from e
    match = _CANONICAL.fullmatch(path.name)
    if match and int(match[1]) != manifest["step"]:
        raise CheckpointError(f"{path}: manifest is for step {manifest['step']}")
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if manifest.get("format") != FORMAT:
        return f"unsupported format {manifest.get('format')!r}"
    if not isinstance(manifest.get("step"), int) or isinstance(manifest["step"], bool):
        return "step is not an integer"
    if not isinstance(manifest.get("created_at"), str):
        return "created_at is missing"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "files is not an object"
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        return f"does not list {', '.join(missing)}"
    for name, entry in files.items():
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            return f"bad file name {name!r}"
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("size"), int)
        ):
            return f"bad entry for {name}"
    return None


def _check_listed(path: Path, name: str, entry: dict) -> None:
    """The file has the manifest's size and sha256: hashed, or known from an earlier hash."""
    file = f"{path}/{name}"
    try:
        st = os.stat(file)
        if st.st_size != entry["size"]:
            raise CheckpointError(
                f"{path}: {name} has {st.st_size} bytes, expected {entry['size']}"
            )
        key = (file, st.st_size, st.st_mtime_ns, st.st_ino)
        if _SETTLED.get(key) == entry["sha256"]:
            return
        hashed_at = time.time_ns()
        digest = _hash_file(file)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {name}: {e.strerror or e}") from e
    if digest != entry["sha256"]:
        raise CheckpointError(f"{path}: {name} fails its sha256 check")
    _remember_if_settled(key, digest, hashed_at)


def _hash_file(file: str) -> str:
    with open(file, "rb") as f:  # in chunks: a large model is never whole in memory
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Settled:
    """What a settled file held when it was checked (a manifest, a hash), by its (path, size,
    mtime_ns, inode); the newest `size` entries are kept. Treat the values as read-only."""

    def __init__(self, size: int):
        self.size = size
        self._values: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()  # the service lists and loads from many threads

    def get(self, key: tuple) -> Any:
        with self._lock:
            return self._values.get(key)

    def remember(self, key: tuple, value: Any) -> None:
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.size:
                self._values.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


def _remember_if_settled(key: tuple, value: Any, read_at_ns: int) -> None:
    """A file changed within the same tick of the filesystem's clock as its last write keeps
    its mtime; one that was SETTLED_S old when read can only change with a new mtime."""
    if read_at_ns - key[2] >= SETTLED_S * 1e9:
        _SETTLED.remember(key, value)


SETTLED_S = 2.0
_SETTLED = _Settled(size=200_000)  # 4 files a checkpoint: 50,000 checkpoints, ~100 MB at most


def _load_model(file: Path) -> dict[str, np.ndarray]:
    tensors, metadata = _read_safetensors(file)
    keys = metadata.get("keys")
    if keys is None:  # written by another tool: keep the file's order
        return tensors
    return {k: tensors[k] for k in json.loads(keys)}


def _read_safetensors(file: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and the metadata of a file whose hash was just checked. A committed
    checkpoint is never written again (a new one is renamed into place), so the file read
    here is the one verified."""
    with safe_open(file, "np") as f:
        metadata = f.metadata() or {}
    return load_file(file), metadata


def _warn_skipped(error: CheckpointError) -> None:
    message = f"skipping bad checkpoint {error}"  # the error names the directory
    log.warning("%s", message)
    warnings.warn(message, CheckpointWarning, stacklevel=3)


# --- paths --------------------------------------------------------------------------------


def _root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-<N>`` directory, in numeric order."""
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        match = _CANONICAL.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match[1]), Path(entry.path)))
    return sorted(found)


def _as_keep(keep: Any) -> int:
    if isinstance(keep, bool) or not isinstance(keep, int | np.integer) or keep < 1:
        raise ValueError(f"keep must be a positive integer (or None to keep all), got {keep!r}")
    return int(keep)


def _as_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return int(step)
