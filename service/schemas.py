"""What the HTTP API returns and accepts (besides the TrainingSpec itself)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    Strict,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
)

from service.tables import EventRow, JobRow, Status
from workers.checkpoint import CHOICE_HELP, CHOICE_PATTERN, DEFAULT_HELP
from workers.explain import Method, nesting
from workers.health import WarningKind
from workers.spec import TrainingSpec

# Tags: a few short labels per job. Keys are identifiers (no colon: `tag=key:value` splits
# at the first one); values are any printable text up to MAX_TAG_VALUE characters.
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 32, 64, 256
TAG_KEY_PATTERN = r"^[A-Za-z0-9_.\-/]+$"
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # no control characters (PostgreSQL refuses NUL)
# A tag=key:value filter; the value is what follows the first colon.
TAG_FILTER = rf"^[A-Za-z0-9_.\-/]{{1,{MAX_TAG_KEY}}}:[^\x00-\x1f\x7f]{{0,{MAX_TAG_VALUE}}}$"
TagFilter = Annotated[str, StringConstraints(pattern=TAG_FILTER)]
TagKey = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_TAG_KEY, pattern=TAG_KEY_PATTERN)
]
TagValue = Annotated[str, StringConstraints(max_length=MAX_TAG_VALUE, pattern=PRINTABLE)]


def _keys_by_pattern(schema: dict) -> None:
    """Pydantic writes a dict with patterned keys as patternProperties, which leaves other
    keys unchecked; JSON Schema's own way is propertyNames and additionalProperties."""
    [(pattern, value)] = schema.pop("patternProperties").items()
    schema["propertyNames"] = schema.get("propertyNames", {}) | {"pattern": pattern}
    schema["additionalProperties"] = value


Tags = Annotated[
    dict[TagKey, TagValue],
    Field(
        json_schema_extra=_keys_by_pattern,
        max_length=MAX_TAGS,
        description=f"at most {MAX_TAGS}; keys: 1-{MAX_TAG_KEY} of A-Z a-z 0-9 _ . - /; "
        f"values: up to {MAX_TAG_VALUE} printable characters. `sweep: <id>` marks a "
        "sweep's trials",
    ),
]


class JobSubmission(TrainingSpec):
    """What POST /jobs takes: a TrainingSpec, and the job's tags (not part of the spec:
    they change nothing of the run, and stay out of its hash and of the stored spec)."""

    tags: Tags = Field(default_factory=dict)


class JobPatch(BaseModel):
    """PATCH /jobs/{id}: a JSON merge patch of the job's tags."""

    model_config = ConfigDict(extra="forbid")
    tags: Annotated[
        dict[TagKey, TagValue | None],
        Field(max_length=MAX_TAGS, json_schema_extra=_keys_by_pattern),
    ] = Field(description="keys to set; a null value removes its key; keys not named stay")


def utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None else None


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


Measure = Annotated[float | None, AfterValidator(finite)]  # inf and nan become null


class LayerStats(BaseModel):
    """One Linear layer at a health check (see workers/health.py)."""

    layer: str = Field(description="layers.<i>, as in the checkpoint")
    grad_norm: Measure = Field(description="of the step's averaged gradient; null if not finite")
    weight_norm: Measure
    update_ratio: Measure = Field(description="norm of the step's update / weight norm")
    dead_fraction: Measure = Field(
        description="relu units zero on the step's whole batch; null for other activations"
    )


class Advice(BaseModel):
    field: str = Field(description="the spec field that addresses the warning")
    change: dict[str, Any] | None = Field(
        description="a JSON merge patch (RFC 7396) on the job's spec that sets the field; "
        "null where no single edit does"
    )


class HealthWarning(BaseModel):
    kind: WarningKind
    layer: str
    message: str = Field(description="the latest occurrence, starting with the layer")
    first_step: int
    last_step: int = Field(description="the latest check that raised it")
    advice: Advice | None = Field(None, description="what in the spec addresses it")


class JobHealth(BaseModel):
    step: int = Field(description="the latest health check")
    layers: list[LayerStats]
    warnings: list[HealthWarning] = Field(description="each (kind, layer) once, oldest first")


class Progress(BaseModel):
    step: int
    total_steps: int | None
    epoch: int
    fraction: float | None = Field(description="step / total_steps, once the run has started")
    eta_s: float | None = Field(description="seconds left at the recent step rate")


class JobEvent(BaseModel):
    at: datetime
    status: Status
    attempt: int
    message: str | None

    @classmethod
    def of(cls, row: EventRow) -> JobEvent:
        return cls(at=utc(row.at), status=row.status, attempt=row.attempt, message=row.message)


class Job(BaseModel):
    id: str
    name: str
    status: Status
    priority: int
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    progress: Progress
    metrics: dict[str, float | int | None] = Field(description="the latest value of each metric")
    attempts: int = Field(description="how many times the job was started or resumed")
    error: str | None
    queue_position: int | None = Field(description="1 = next to run; only while queued")
    pending_reason: str | None = Field(description="why a queued job is not running yet")
    worker_nodes: list[str]
    workers: int | None = Field(
        description="the worker count (0: in-process): the spec's, or the one auto chose "
        "once the run started; null until then"
    )
    workers_reason: str | None = Field(
        description="why that count: what auto measured and predicted; null until started"
    )
    health: JobHealth | None = Field(None, description="the latest training-health check")
    stopped_early: bool | None = Field(
        None, description="whether early_stopping ended the run; null until it finished"
    )
    best_step: int | None = Field(
        None, description="the step of the best evaluation by keep_best, once finished"
    )
    tags: dict[str, str] = Field(default_factory=dict)
    pruned: bool = Field(
        False, description="a sweep's trial that its pruner stopped (the job ended cancelled)"
    )
    duration_s: float | None = Field(
        None, description="seconds from its first start to its finish; null until finished"
    )
    events: list[JobEvent] | None = Field(
        None, description="status timeline, oldest first; only in GET /jobs/{id}"
    )

    @classmethod
    def of(cls, row: JobRow, *, position=None, reason=None, events=None) -> Job:
        total = row.total_steps
        progress = Progress(
            step=row.step,
            total_steps=total,
            epoch=row.epoch,
            fraction=min(1.0, row.step / total) if total else None,
            eta_s=row.eta_s,
        )
        return cls(
            id=row.id,
            name=row.name,
            status=row.status,
            priority=row.priority,
            spec=row.spec,
            created_at=utc(row.created_at),
            started_at=utc(row.started_at),
            finished_at=utc(row.finished_at),
            updated_at=utc(row.updated_at),
            progress=progress,
            metrics=row.metrics or {},
            attempts=row.attempts,
            error=row.error,
            queue_position=position,
            pending_reason=reason,
            worker_nodes=row.worker_nodes or [],
            workers=row.workers if row.workers is not None else _count(row.spec.get("workers")),
            workers_reason=row.workers_reason,
            health=row.health,
            stopped_early=(row.summary or {}).get("stopped_early"),
            best_step=(row.summary or {}).get("best_step"),
            tags=row.tags,
            pruned=bool((row.summary or {}).get("pruned")),
            duration_s=row.duration_s,
            events=None if events is None else [JobEvent.of(e) for e in events],
        )


def _count(workers) -> int | None:
    """The spec's worker count, if it states one ("auto" chooses when the run starts)."""
    return workers if isinstance(workers, int) else None


class JobPage(BaseModel):
    items: list[Job]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page")


class GcRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    older_than_s: Annotated[float, Field(ge=0, le=100 * 365 * 86400, allow_inf_nan=False)] = Field(
        description="delete jobs that finished at least this many seconds ago"
    )
    status: list[Literal["succeeded", "failed", "cancelled"]] = Field(
        ["succeeded", "failed", "cancelled"], min_length=1, description="only jobs in these"
    )
    dry_run: bool = Field(False, description="list what would be deleted; delete nothing")


class GcResult(BaseModel):
    deleted: list[str] = Field(description="job ids, oldest first (would be, on a dry run)")
    dry_run: bool
    more: bool = Field(description="more jobs match: ask again (a request deletes a batch)")


class MetricPoint(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    epoch: int | None
    train_loss: float | None
    val_loss: float | None
    val_accuracy: float | None
    val_exact_match: float | None = Field(
        None,
        description="builtin sequence tasks: the share of validation questions whose greedy "
        "answer is exactly right",
    )
    grad_norm: float | None = Field(description="of the averaged gradient, before grad_clip")
    lr: float | None = Field(None, description="the learning rate the step used")
    samples_per_s: float | None
    layers: list[LayerStats] | None = Field(None, description="at health checks")
    warnings: list[HealthWarning] | None = Field(
        None, description="at health checks: the warnings this check raised"
    )


class Metrics(BaseModel):
    job_id: str
    points: list[MetricPoint]
    next_cursor: int | None = Field(
        None, description="pass as ?cursor= for the next page; null on the last page"
    )


# GET /compare: a few jobs side by side, each curve at most MAX_SERIES_POINTS points.
MAX_COMPARE, MAX_SERIES_POINTS = 10, 2000
SeriesName = Literal["train_loss", "val_loss", "val_accuracy", "val_exact_match"]


class Series(BaseModel):
    steps: list[int]
    values: list[float]
    total: int = Field(description="points measured; over `points`, `steps` holds fewer")


class ComparedJob(BaseModel):
    id: str
    name: str
    status: Status
    spec: dict[str, Any]
    values: dict[str, Any] = Field(
        description="the spec's value at each path of `differs` (null: the spec has no such field)"
    )
    metrics: dict[str, float | int | None] = Field(description="the latest value of each metric")
    best_step: int | None = Field(description="the step of its best evaluation, once finished")
    duration_s: float | None
    tags: dict[str, str]
    series: dict[SeriesName, Series] = Field(
        description="each metric the job has measured, by step (downsampled past `points`)"
    )


class Comparison(BaseModel):
    differs: list[str] = Field(
        description="dotted paths of the spec fields whose values differ between the jobs, "
        "e.g. optimizer.lr, model.layers[0].out_channels (lists of numbers are one value)"
    )
    jobs: list[ComparedJob] = Field(description="in the order of `ids`")
    points: int = Field(description="the most points of each series")


class CheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    step: int
    created_at: str
    size_bytes: int
    sha256: str


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Row = list[FiniteFloat]
Image = list[list[Row]]  # channels x height x width, as the model's input_shape


def _shapes(**variants: tuple) -> Any:
    """A union of list shapes, each given as name=(type, *constraints), told apart by their
    depth alone: a value is validated as the shallowest shape at least as deep as it is (or
    the deepest), so a bad value gets the errors of the one shape it tries to be."""
    depths = {name: nesting(_example(kind)) for name, (kind, *_) in variants.items()}

    def choose(value: Any) -> str:
        deep_enough = [name for name, d in depths.items() if d >= nesting(value)]
        return min(deep_enough, key=depths.get) if deep_enough else max(depths, key=depths.get)

    tagged = tuple(Annotated[kind, *extra, Tag(name)] for name, (kind, *extra) in variants.items())
    return Annotated[Union[tagged], Discriminator(choose)]  # noqa: UP007 (a tuple of types)


def _example(kind: Any) -> Any:
    """A value of a nested list type, one element per level: list[list[float]] -> [[0.0]]."""
    return [_example(kind.__args__[0])] if getattr(kind, "__origin__", None) is list else 0.0


def _inputs(most: int) -> Any:
    """1 to `most` rows, or images."""
    n = Field(min_length=1, max_length=most)
    return _shapes(rows=(list[Row], n), images=(list[Image], n))


Baseline = _shapes(row=(Row,), rows=(list[Row],), image=(Image,), images=(list[Image],))


def _untagged(value: Any, handler):
    """Pydantic's errors of a shape-chosen union without the shape's name in their loc:
    ("inputs", 0, 1), not ("inputs", "rows", 0, 1)."""
    try:
        return handler(value)
    except ValidationError as err:
        errors = [e | {"loc": e["loc"][1:]} if e["loc"] else e for e in err.errors()]
        raise ValidationError.from_exception_data(err.title, errors) from None


# Which checkpoint answers: a body field of predict and explain, a query parameter of graph.
CHECKPOINT = {"pattern": CHOICE_PATTERN, "description": f"{CHOICE_HELP}; default: {DEFAULT_HELP}"}


class PredictRequest(BaseModel):
    """Rows of features, or images of the model's input_shape (N x C x H x W)."""

    model_config = ConfigDict(extra="forbid")
    inputs: _inputs(10_000) = Field(
        description="rows of the model's input width, or images of its input_shape"
    )
    checkpoint: str | None = Field(None, **CHECKPOINT)
    _shape_errors = field_validator("inputs", mode="wrap")(_untagged)


class PredictResponse(BaseModel):
    outputs: list[list[float | None]]
    checkpoint: str = Field(description="the checkpoint that answered")


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON Schema has it: 3 or 3.0, never true or "3" (strict refuses those). Its
# bounds go before it (Annotated[int, Field(ge=0), *INTEGER]), so the schema shows them.
INTEGER = (Strict(), BeforeValidator(_integral))


MAX_GENERATE_TOKENS = 256  # of one generate request: one forward pass each
MAX_PROMPT_CHARS = 10_000  # the model reads only its last `context` tokens


class GenerateRequest(BaseModel):
    """A prompt to continue, one character a token, in the job's vocabulary."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_tokens: Annotated[int, Field(ge=1, le=MAX_GENERATE_TOKENS), *INTEGER] = 8
    temperature: float = Field(
        0.0, ge=0, le=100, description="0: greedy (argmax); above 0: sample softmax(logits / T)"
    )
    top_k: Annotated[int, Field(ge=1), *INTEGER] | None = Field(
        None, description="sample from the k most likely tokens only; null: from all"
    )
    seed: Annotated[int, Field(ge=0, le=2**63 - 1), *INTEGER] = Field(
        0, description="the same seed samples the same tokens"
    )
    checkpoint: str | None = Field(None, **CHECKPOINT)


class GenerateResponse(BaseModel):
    text: str = Field(description="the completion, without the prompt")
    tokens: list[int] = Field(description="the completion's token ids")
    logprobs: list[float] = Field(
        description="the model's log-probability of each token (softmax at temperature 1)"
    )
    checkpoint: str = Field(description="the checkpoint that answered")


class ExplainRequest(BaseModel):
    """Rows and steps are capped so that one request cannot hold the server for long."""

    model_config = ConfigDict(extra="forbid")
    inputs: _inputs(1000) = Field(
        description="rows of the model's input width, or images of its input_shape"
    )
    target: Annotated[int, Field(ge=0), *INTEGER] | None = Field(
        None,
        description="the output to explain, for every row; default: each row's predicted "
        "class, or 0 for a single output",
    )
    method: Method = "gradient"
    baseline: Baseline | None = Field(
        None,
        description="one row (or image) for every input, or one per input; default zeros",
    )
    steps: Annotated[int, Field(ge=1, le=1024), *INTEGER] = Field(
        64, description="integrated gradients"
    )
    checkpoint: str | None = Field(None, **CHECKPOINT)
    _shape_errors = field_validator("inputs", "baseline", mode="wrap")(_untagged)


Attributions = list[list[float | None]] | list[list[list[list[float | None]]]]


class ExplainResponse(BaseModel):
    outputs: list[list[float | None]] = Field(description="every output, as predict gives")
    attributions: Attributions = Field(
        description="one per input feature, in the inputs' shape (rows, or images)"
    )
    method: Method
    targets: list[int] = Field(description="the output explained, per row")
    completeness_gap: list[float | None] | None = Field(
        description="integrated gradients: sum(attributions) - (f(x) - f(baseline)) per row"
    )
    checkpoint: str = Field(description="the checkpoint that answered")


class TokenExplainRequest(BaseModel):
    """A transformer job's explain: integrated gradients of one next-token logit over the
    prompt's embeddings (token plus position), baseline all zeros."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="at most context")
    target: str | None = Field(
        None,
        min_length=1,
        max_length=1,
        description="the next token to explain, a character of the vocabulary; default: the "
        "greedy next token",
    )
    steps: Annotated[int, Field(ge=1, le=1024), *INTEGER] = Field(
        64, description="intervals of the path (refined where the logit bends)"
    )
    checkpoint: str | None = Field(None, **CHECKPOINT)


class TokenExplainResponse(BaseModel):
    tokens: list[str] = Field(description="the prompt, one character a token")
    attributions: list[float | None] = Field(
        description="per prompt token: its integrated gradient summed over the embedding"
    )
    target: str = Field(description="the next token explained")
    target_id: int
    logit: float | None = Field(description="the target's logit after the prompt")
    baseline_logit: float | None = Field(description="the target's logit from zero embeddings")
    completeness_gap: float | None = Field(
        description="sum(attributions) - (logit - baseline_logit); null where not finite"
    )
    method: Literal["integrated_gradients"] = "integrated_gradients"
    checkpoint: str = Field(description="the checkpoint that answered")


class AttentionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="at most context")
    checkpoint: str | None = Field(None, **CHECKPOINT)


class AttentionResponse(BaseModel):
    tokens: list[str] = Field(description="the prompt, one character a token")
    weights: list[list[list[list[float | None]]]] = Field(
        description="[layer][head][query][key]: the softmax attention weights, T x T per "
        "head; causal, so row i weighs tokens 0..i and each row sums to 1"
    )
    checkpoint: str = Field(description="the checkpoint that answered")


def _explain_kind(value: Any) -> str:
    has_prompt = isinstance(value, TokenExplainRequest) or (
        isinstance(value, dict) and "prompt" in value
    )
    return "prompt" if has_prompt else "rows"


class ExplainBody(
    RootModel[
        Annotated[
            Annotated[ExplainRequest, Tag("rows")] | Annotated[TokenExplainRequest, Tag("prompt")],
            Discriminator(_explain_kind),
        ]
    ]
):
    """POST /jobs/{id}/explain's body: rows (an MLP's or a CNN's job) or a prompt (a
    transformer's). The route validates it again as its job's model type takes it."""


class FiltersResponse(BaseModel):
    layer: int = Field(description="the first conv2d layer's index in model.layers")
    name: str = Field(description="its weight's parameter name, e.g. 0.weight")
    shape: list[int] = Field(description="the weight's shape: out, in, kernel h, kernel w")
    shown: int = Field(description="the filters given: the first `shown` of `shape[0]`")
    weights: list[list[list[list[float]]]]
    checkpoint: str = Field(description="the checkpoint that answered")


class Sample(BaseModel):
    index: int = Field(description="its position in the validation split")
    input: list[float] | list[list[list[float]]] = Field(
        description="a row of features, or an image of the model's input_shape"
    )
    label: int | list[float] = Field(description="a class index, or regression targets")


class SamplesResponse(BaseModel):
    total: int = Field(description="samples in the job's validation split")
    samples: list[Sample]


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    n_samples: int
    n_features: int
    n_classes: int | None
    task: str = Field(description="classification, regression, or sequence (a text)")
    filename: str
    vocab: list[str] | None = Field(
        None, description="a text's symbols, by token id (the sorted set of its characters)"
    )
    vocab_size: int | None = None


class Node(BaseModel):
    id: str
    alive: bool
    address: str | None
    cpus: float


class RunningJob(BaseModel):
    job_id: str
    name: str
    workers: int | None = Field(description="null while an auto run is still choosing")
    cpus: float
    worker_nodes: list[str]


class Cluster(BaseModel):
    nodes: list[Node]
    cpus_total: float
    cpus_free: float
    running_jobs: list[RunningJob]
    max_concurrent_jobs: int
    paused: bool
    autoscaling: bool
    dashboard_url: str | None
