"""A sweep's search space and its Optuna parts: how a trial's values are drawn and set in
its spec, the sampler and pruner a sweep asks for, and Optuna's storage on our database."""

from __future__ import annotations

import json
import math
from typing import Any

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from service.sweep_schemas import Choice, IntRange, LogUniform, SweepCreate, Uniform

GRID_MAX = 100_000  # points of a grid sampler's search space


# -- the search space -------------------------------------------------------------------------


def encode(value: Any) -> Any:
    """A categorical value as Optuna stores it: scalars as they are, lists and objects as
    JSON text (Optuna's categorical choices are None, bool, int, float or str)."""
    return json.dumps(value) if isinstance(value, list | dict) else value


def decode(value: Any, dist) -> Any:
    if isinstance(dist, Choice):
        return next((v for v in dist.values if encode(v) == value), value)
    return value


def suggest(trial: optuna.Trial, path: str, dist) -> Any:
    if isinstance(dist, LogUniform | Uniform):
        return trial.suggest_float(path, dist.low, dist.high, log=isinstance(dist, LogUniform))
    if isinstance(dist, IntRange):
        return trial.suggest_int(path, dist.low, dist.high, log=dist.log)
    return decode(trial.suggest_categorical(path, [encode(v) for v in dist.values]), dist)


def grid(sweep: SweepCreate) -> dict[str, list] | None:
    """The grid sampler's search space, or None when a parameter has no finite grid."""
    space = {}
    for path, dist in sweep.parameters.items():
        if isinstance(dist, Choice):
            space[path] = [encode(v) for v in dist.values]
        elif isinstance(dist, IntRange) and dist.high - dist.low < GRID_MAX:
            space[path] = list(range(dist.low, dist.high + 1))
        else:
            return None
    return space


def grid_size(sweep: SweepCreate) -> int:
    return math.prod(len(v) for v in (grid(sweep) or {}).values())


def set_path(spec: dict, path: str, value: Any) -> dict:
    """`spec` with the dotted field `path` set to `value` (a copy; the field must exist)."""
    spec = json.loads(json.dumps(spec))
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node[key]
    node[last] = value
    return spec


def has_path(spec: dict, path: str) -> bool:
    node: Any = spec
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def trial_spec(sweep: SweepCreate, base: dict, number: int, params: dict) -> dict:
    spec = base
    for path, value in params.items():
        spec = set_path(spec, path, value)
    spec["name"] = f"{sweep.name} #{number}"[:200]
    return spec


# -- Optuna -----------------------------------------------------------------------------------


def optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on the store's database. Optuna's tables sit beside ours; the
    `alembic_version` table is the store's (service/migrations), so Optuna's schema check
    is skipped: its schema is the one of the optuna version constraints.txt pins."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if parsed.database in (None, "", ":memory:"):
            kwargs["poolclass"] = StaticPool  # one in-memory database for every thread
    else:
        kwargs["pool_pre_ping"] = True
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_compatibility_check=True)


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its study.stop() once the grid is done (that is for
    study.optimize; the driver asks no more than the grid's size)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def sampler(sweep: SweepCreate, asked: int) -> optuna.samplers.BaseSampler:
    """A seeded sampler draws the same trials; one made after a restart is seeded past the
    trials already asked, so it does not draw the first ones again."""
    s = sweep.sampler
    if s.type == "grid":
        return GridSampler(grid(sweep), seed=s.seed)
    seed = None if s.seed is None else s.seed + asked
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def pruner(sweep: SweepCreate) -> optuna.pruners.BasePruner:
    p = sweep.pruner
    if p.type == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    if p.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps
        )
    return optuna.pruners.NopPruner()


def best_report(trial: optuna.trial.FrozenTrial, mode: str) -> tuple[float | None, int | None]:
    """The best reported value and its step (NaN reports never are)."""
    reports = [(v, s) for s, v in trial.intermediate_values.items() if not math.isnan(v)]
    if not reports:
        return None, None
    value, step = (min if mode == "min" else max)(reports, key=lambda r: (r[0], r[1]))
    return value, step
