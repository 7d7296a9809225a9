"""What the sweeps API takes and returns (POST /sweeps, GET /sweeps[/{id}], their events)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    model_validator,
)

from service.schemas import _keys_by_pattern
from service.tables import Status
from workers.spec import DEFAULT_MODE, Metric, TrainingSpec

MAX_PARAMETERS, MAX_VALUES = 16, 64  # searched spec fields; values of one categorical
MAX_TRIALS = 10_000  # the schema's bound; SHARDGRAD_MAX_SWEEP_TRIALS may be lower
# A spec field: names joined by dots (`optimizer.lr`, `model.sizes`), no list indices.
PARAM_PATH = r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,7}$"
ParamPath = Annotated[str, Field(pattern=PARAM_PATH, max_length=200)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Range(_Strict):
    @model_validator(mode="after")
    def _ordered(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


class LogUniform(_Range):
    """A float drawn uniformly on a log scale between low and high (both > 0)."""

    type: Literal["log_uniform"]
    low: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    high: Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Uniform(_Range):
    type: Literal["uniform"]
    low: Finite
    high: Finite


class IntRange(_Range):
    """A whole number from low to high, inclusive; `log` draws on a log scale (low >= 1)."""

    type: Literal["int"]
    low: Annotated[int, Field(ge=-(2**53), le=2**53)]
    high: Annotated[int, Field(ge=-(2**53), le=2**53)]
    log: bool = False

    @model_validator(mode="after")
    def _log_positive(self):
        if self.log and self.low < 1:
            raise ValueError(f"a log int range needs low >= 1, not {self.low}")
        return self


class Choice(_Strict):
    """One of `values`: any JSON values, lists too (`model.sizes`)."""

    values: list[JsonValue] = Field(min_length=1, max_length=MAX_VALUES)


def _kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):  # serializing
        return getattr(value, "type", "values")
    if isinstance(value, dict):
        return "values" if "values" in value and "type" not in value else value.get("type")
    return None


Distribution = Annotated[
    Annotated[LogUniform, Tag("log_uniform")]
    | Annotated[Uniform, Tag("uniform")]
    | Annotated[IntRange, Tag("int")]
    | Annotated[Choice, Tag("values")],
    Discriminator(
        _kind,
        custom_error_type="distribution",
        custom_error_message='a distribution: {"type": "log_uniform" | "uniform" | "int", '
        '"low", "high"} or {"values": [...]}',
    ),
]


class Sampler(_Strict):
    """Optuna's TPESampler, RandomSampler or GridSampler. `grid` needs `values` or an int
    range for every parameter, and runs each point of the grid at most once."""

    type: Literal["tpe", "random", "grid"] = "tpe"
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = Field(
        None, description="the same seed draws the same trials"
    )


class AshaPruner(_Strict):
    """Optuna's SuccessiveHalvingPruner (asynchronous successive halving): at rungs
    min_resource x reduction_factor^k (training steps), a trial outside the top
    1/reduction_factor of the trials that reached the rung is pruned."""

    type: Literal["asha"]
    min_resource: int = Field(1, ge=1, le=2**31 - 1, description="training steps")
    reduction_factor: int = Field(3, ge=2, le=100)


class MedianPruner(_Strict):
    """Optuna's MedianPruner: a trial whose best value so far is worse than the median of
    the other trials' values at the same step is pruned."""

    type: Literal["median"]
    n_startup_trials: int = Field(
        2, ge=0, le=MAX_TRIALS, description="trials that finish before any is pruned"
    )
    n_warmup_steps: int = Field(
        0, ge=0, le=2**31 - 1, description="training steps of a trial before it may be pruned"
    )


class NoPruner(_Strict):
    type: Literal["none"]


Pruner = Annotated[AshaPruner | MedianPruner | NoPruner, Field(discriminator="type")]


class SweepCreate(_Strict):
    """POST /sweeps: a base TrainingSpec, the spec fields to search and how."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")
    base: TrainingSpec = Field(
        description="every trial's spec, with the searched fields set to the trial's values; "
        "its priority is the trials'"
    )
    parameters: dict[ParamPath, Distribution] = Field(
        min_length=1,
        max_length=MAX_PARAMETERS,
        json_schema_extra=_keys_by_pattern,
        description="dotted spec field -> distribution, e.g. optimizer.lr, model.sizes",
    )
    trials: int = Field(ge=1, le=MAX_TRIALS, description="how many trials to run in all")
    parallel: int = Field(1, ge=1, le=1024, description="most trials queued or running at once")
    metric: Metric = "val_loss"
    mode: Literal["min", "max"] | None = Field(
        None, description="default: min for val_loss, max for val_accuracy and val_exact_match"
    )
    sampler: Sampler = Field(default_factory=Sampler)
    pruner: Pruner = Field(
        default_factory=lambda: MedianPruner(type="median"),
        description="default: median",
    )

    @model_validator(mode="after")
    def _default_mode(self):
        if self.mode is None:
            self.mode = DEFAULT_MODE[self.metric]
        return self


SweepStatus = Literal["running", "cancelling", "finished", "cancelled"]
TrialState = Status | Literal["pending"]


class SweepTrial(BaseModel):
    number: int = Field(description="the Optuna trial number: 0, 1, ... (the job's `trial` tag)")
    job_id: str | None = Field(description="null if the trial never became a job")
    state: TrialState = Field(
        description="the job's status; `pending` while asked but not yet queued; a trial "
        "whose spec was invalid is `failed` with no job"
    )
    params: dict[str, JsonValue] = Field(description="dotted spec field -> the trial's value")
    pruned: bool = Field(description="stopped by the pruner (its job ended cancelled)")
    value: float | None = Field(
        description="the trial's result told to Optuna: its best metric value "
        "(null while running, and for failed trials)"
    )
    best_value: float | None = Field(description="the best metric value reported so far")
    best_step: int | None = Field(description="the training step of best_value")
    step: int | None = Field(description="the last step the metric was reported at")
    error: str | None = None


class SweepSummary(BaseModel):
    id: str
    name: str
    status: SweepStatus
    priority: int
    metric: Metric
    mode: Literal["min", "max"]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    error: str | None = None
    counts: dict[str, int] = Field(description="trials by state (pruned ones as `pruned`)")
    best: SweepTrial | None = Field(description="the best finished trial by metric and mode")


class Sweep(SweepSummary):
    spec: SweepCreate = Field(description="the sweep as submitted, defaults filled in")
    trials: list[SweepTrial] = Field(description="every trial asked so far, by number")


class SweepPage(BaseModel):
    items: list[SweepSummary]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page")
