"""Warm start (`init_from`): a run that begins from another run's checkpoint.

Where a run is accepted (the service for job ids, `shardgrad train` for paths), `pin` checks
the source against the new model (every parameter's shape, and the optimizer's kind when its
state is loaded) and pins it: `checkpoint` becomes the step it resolved to and `sha256` the
hash of that step's weights. The spec hash includes that sha256, so a run resumes only with
the same starting weights. When the run starts with no checkpoint of its own, the Trainer
calls `warm_start`, which loads that checkpoint and checks it is still the one pinned. A
run that has checkpoints of its own resumes from them and never reads the source again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workers.checkpoint import (
    Checkpoint,
    CheckpointError,
    UnknownCheckpoint,
    checkpoint_info,
    load_checkpoint,
    resolve_checkpoint,
)
from workers.config import WorkerSettings
from workers.spec import InitFrom, TrainingSpec

__all__ = ["InitFromError", "pin", "source_dir", "warm_start"]


class InitFromError(ValueError):
    """`init_from` cannot be used; `loc` is the field it blames, under `init_from`."""

    def __init__(self, loc: tuple, message: str, value):
        super().__init__(message)
        self.loc, self.value = ("init_from", *loc), value


def source_dir(init: InitFrom, settings: WorkerSettings) -> Path:
    """The source's run directory: its path, or a job's under the settings' jobs_dir."""
    if init.path is not None:
        return Path(init.path)
    if settings.jobs_dir is None:
        msg = "init_from.job: job ids are known to the service only; give init_from.path"
        raise InitFromError(("job",), msg, init.job)
    return settings.jobs_dir / init.job


def pin(spec: TrainingSpec, settings: WorkerSettings) -> TrainingSpec:
    """The spec with its `init_from` checked against the model and pinned to one checkpoint
    and its weights' sha256; the spec itself without one. InitFromError otherwise."""
    init = spec.init_from
    if init is None:
        return spec
    source = _load(init, source_dir(init, settings))
    _check_fits(spec, source)
    info = checkpoint_info(source.path)
    _check_sha256(init, info.sha256, source.path)
    pinned = init.model_copy(update={"checkpoint": info.name, "sha256": info.sha256})
    return spec.model_copy(update={"init_from": pinned})


def warm_start(spec: TrainingSpec, settings: WorkerSettings, model, opt) -> None:
    """Load the pinned source checkpoint into `model` (and its state into `opt` when
    `load_optimizer`); InitFromError if it is gone or no longer the one pinned."""
    init = spec.init_from
    source = _load(init, source_dir(init, settings))
    _check_sha256(init, checkpoint_info(source.path).sha256, source.path)
    model.load_state_dict(source.model_state)
    if init.load_optimizer:
        opt.load_state_dict(_state_only(source.optimizer_state, opt))


def _check_sha256(init: InitFrom, sha256: str, path: Path) -> None:
    if init.sha256 is not None and sha256 != init.sha256:
        msg = f"init_from.sha256: the weights of {path} are not those pinned ({init.sha256})"
        raise InitFromError(("sha256",), msg, init.sha256)


def _load(init: InitFrom, run_dir: Path) -> Checkpoint:
    """The checkpoint `init.checkpoint` names in the source's `run_dir`, verified."""
    if not run_dir.is_dir():
        if init.job is not None:
            msg = f"init_from.job: no job {init.job!r} with checkpoints"
            raise InitFromError(("job",), msg, init.job)
        raise InitFromError(("path",), f"init_from.path: {init.path!r} is no directory", init.path)
    try:
        return load_checkpoint(resolve_checkpoint(run_dir, init.checkpoint))
    except (UnknownCheckpoint, CheckpointError) as e:
        which = init.checkpoint or "default"
        msg = f"init_from.checkpoint: {init.source()} has no usable {which} checkpoint: {e}"
        raise InitFromError(("checkpoint",), msg, init.checkpoint) from None


def _check_fits(spec: TrainingSpec, source: Checkpoint) -> None:
    """Every parameter of the new model has its shape in the source; with load_optimizer,
    the source's optimizer is of the same kind."""
    from workers.model import build_model, build_optimizer

    model, init = build_model(spec), spec.init_from
    source_name = f"the source checkpoint ({source.path.name} of {init.source()})"
    theirs = {k: np.shape(v) for k, v in source.model_state.items()}
    for name, param in model.named_parameters():
        if theirs.get(name) != param.shape:
            has = f"shape {list(theirs[name])}" if name in theirs else "no such parameter"
            msg = f"init_from: parameter {name} has shape {list(param.shape)} in this model "
            raise InitFromError((), f"{msg}but {has} in {source_name}", init.model_dump())
    extra = [k for k in theirs if k not in dict(model.named_parameters())]
    if extra:
        msg = f"init_from: {source_name} has parameter {extra[0]}, which this model lacks"
        raise InitFromError((), msg, init.model_dump())
    if init.load_optimizer:
        opt = build_optimizer(spec, model.parameters())
        try:
            opt.load_state_dict(_state_only(source.optimizer_state, opt))
        except (ValueError, KeyError, TypeError) as e:
            msg = f"init_from.load_optimizer: the source's optimizer state does not fit: {e}"
            raise InitFromError(("load_optimizer",), msg, True) from None


def _state_only(saved: dict, opt) -> dict:
    """The source's per-parameter state with `opt`'s own hyperparameters (this spec's lr,
    betas, ...). ValueError when the source's optimizer was of another kind."""
    mine = opt.state_dict()["param_groups"]
    for ours, theirs in zip(mine, saved["param_groups"], strict=False):
        if set(ours) != set(theirs):
            raise ValueError(
                f"it is of another kind (settings {sorted(set(theirs) - {'params'})}, "
                f"this optimizer's {sorted(set(ours) - {'params'})})"
            )
    return {"state": saved["state"], "param_groups": mine}
