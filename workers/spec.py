"""The training spec: the JSON contract shared by the CLI and the HTTP service.

Unknown fields are rejected at every level. `model`, `data` and `optimizer` are unions
discriminated on `type`, so an error's `loc` carries the variant, e.g.
`("optimizer", "sgd", "lr")`. Checks that span fields (the model against the dataset and
the loss, batch size against workers) report at the field they blame, with a message that
starts with that field's path: `model.sizes[0] is 3 but dataset 'moons' has 2 features`.

Validation reads the JSON alone: no file, no upload. Checking a spec against its data
(`workers.data.check_data`) is done once, where a job is submitted; it hands this module a
`describe` function through the validation context (DESCRIBE_DATA), so that one
ValidationError lists the spec's own problems and its data's together.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from workers.catalogue import (
    BUILTINS,
    DATASET_ID,
    MAX_CLASSES,
    MAX_DIGITS,
    TASKS,
    DatasetInfo,
    SequenceTask,
)
from workers.checkpoint import CHOICE_HELP, CHOICE_PATTERN, DEFAULT_HELP
from workers.config import ExchangeChoice
from workers.layers import SequentialSpec, layer_flops
from workers.sampler import Schedule
from workers.transformer import TransformerSpec
from workers.validation import SPEC_ERROR, raise_errors
from workers.validation import Strict as _Strict
from workers.validation import spec_error as _error

# Validation context: `TrainingSpec.model_validate(obj, context={ALLOW_FILES: False})` refuses
# `data.type: "file"` without touching the filesystem (a service that does not serve
# its own paths). Without a context, as on the command line, files are allowed.
ALLOW_FILES = "allow_files"
# Validation context: `{DESCRIBE_DATA: describe}`, with `describe(data_spec) -> DatasetInfo`
# (which reads the data), also checks the spec against its data. Without it, as when the
# dispatcher starts a job, validation touches no disk.
DESCRIBE_DATA = "describe_data"
FILES_DISABLED = (
    "data.path: file datasets are disabled on this server; "
    "upload the data with POST /api/v1/datasets"
)
INT64_MAX = 2**63 - 1  # every integer of a spec fits in 64 bits (the store, NumPy, Ray)
PRIORITY_RANGE = (-1000, 1000)
MAX_LAYERS = 1000  # model.sizes entries; admission limits bound the model's size further
MAX_WIDTH = 2**31 - 1  # of a layer; exact in JSON Schema, whose bounds are floats
CPU_STEP = 0.0001  # Ray's smallest resource share
MAX_DATASET_VALUES = 20_000_000  # the default limit; the service's is a setting

# The fields that change the mathematics of a run. Two specs that agree on these train
# the same parameters, however they are scheduled; checkpoints record their hash.
MATH_FIELDS = frozenset(
    {
        "model",
        "data",
        "loss",
        "optimizer",
        "epochs",
        "batch_size",
        "seed",
        "dtype",
        "validation_fraction",
        "init_from",  # only its weights' sha256 and load_optimizer (see spec_hash)
    }
)
# Fields that came later and change the mathematics too (issue 17). They enter the hash
# only when set, so that checkpoints written before they existed keep their hash.
RECIPE_FIELDS = ("grad_clip", "eval_every", "early_stopping")


Activation = Literal["relu", "tanh", "sigmoid"]
Loss = Literal["mse", "cross_entropy", "bce"]
Dtype = Literal["float32", "float64"]


# ---------------------------------------------------------------- model


class MLPSpec(_Strict):
    """A multilayer perceptron: Linear layers of `sizes`, `activation` between them."""

    type: Literal["mlp"]
    sizes: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = Field(
        min_length=2,
        max_length=MAX_LAYERS,
        description="Layer widths, input first and output last.",
    )
    activation: Activation = "relu"
    bias_init: float = Field(
        0.0,
        description="Every bias starts at this value; for experiments such as provoking "
        "dead ReLUs with a large negative value.",
    )

    # The widths and size every model spec gives (SequentialSpec has them too).
    in_width = property(lambda self: self.sizes[0])
    out_width = property(lambda self: self.sizes[-1])
    n_params = property(lambda self: sum((a + 1) * b for a, b in itertools.pairwise(self.sizes)))


ModelSpec = Annotated[MLPSpec | SequentialSpec | TransformerSpec, Field(discriminator="type")]


@dataclass(frozen=True)
class ModelSize:
    """What a model costs, from its spec alone (nothing is built)."""

    params: int  # weights and biases
    flops: int  # multiply-adds of one sample's forward pass
    activations: int  # values one sample's forward pass keeps for backward


def model_size(model: ModelSpec) -> ModelSize:
    """The size of the model a spec describes, for admission limits and cost caps. Every
    model type has its rule here (integers: no overflow whatever the widths)."""
    if model.type == "mlp":
        layers = list(zip(model.sizes, model.sizes[1:], strict=False))
        return ModelSize(
            params=sum((a + 1) * b for a, b in layers),
            flops=sum(a * b for a, b in layers),
            activations=sum(model.sizes),
        )
    if model.type == "sequential":
        shapes = model.shapes()
        return ModelSize(
            params=model.n_params,
            flops=sum(map(layer_flops, model.layers, shapes, shapes[1:])),
            activations=sum(math.prod(shape) for shape in shapes),
        )
    if model.type == "transformer":
        return ModelSize(params=model.n_params, flops=model.flops, activations=model.activations)
    raise ValueError(f"model_size: no rule for model type {model.type!r}")


# ---------------------------------------------------------------- data


class BuiltinData(_Strict):
    """A generated dataset, or scikit-learn's bundled digits / iris, or a sequence task.

    `n_samples` and `noise` do not apply to digits (1797 samples) and iris (150).
    `n_classes` applies to spirals and blobs, `n_features` to blobs. `n_samples` defaults
    to 1000, and to 5000 for the shapes images. The sequence tasks (addition, reverse) take
    `n_digits` (default 2 and 5) and `n_samples`, at most as many as there are distinct
    samples; `noise` does not apply to them.
    """

    type: Literal["builtin"]
    name: str = Field(json_schema_extra={"enum": sorted([*BUILTINS, *TASKS])})
    n_samples: int = Field(1000, ge=1, le=1_000_000)
    noise: float = Field(0.1, ge=0)
    n_classes: int | None = Field(None, ge=2, le=MAX_CLASSES)
    n_features: int | None = Field(None, ge=1, le=10_000)
    n_digits: int | None = Field(
        None, ge=1, le=MAX_DIGITS, description="addition: of each operand; reverse: at most"
    )

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in BUILTINS and name not in TASKS:
            valid = ", ".join(sorted([*BUILTINS, *TASKS]))
            raise PydanticCustomError(
                SPEC_ERROR, f"data.name: unknown dataset {name!r}; valid: {valid}"
            )
        return name

    @model_serializer(mode="wrap")
    def _no_unset_digits(self, handler):
        # n_digits came later: left out where it does not apply, so that specs (and the
        # hash their checkpoints hold) read as they did before it existed.
        dumped = handler(self)
        if isinstance(dumped, dict) and dumped.get("n_digits") is None:
            dumped.pop("n_digits", None)
        return dumped

    @model_validator(mode="after")
    def _options_apply(self) -> BuiltinData:
        task, builtin = TASKS.get(self.name), BUILTINS.get(self.name)
        options = ("n_digits",) if task else builtin.options
        errors = [
            _error((option,), f"data.{option} does not apply to {self.name!r}", value)
            for option in ("n_classes", "n_features", "n_digits")
            if (value := getattr(self, option)) is not None and option not in options
        ]
        raise_errors(type(self).__name__, errors)
        # Fill in the registry's defaults, so that omitting them hashes like stating them.
        if task:
            self._task_defaults(task)
        elif "n_samples" not in self.model_fields_set:
            self.n_samples = builtin.default_n_samples
        info = self.describe()
        for option in builtin.options if builtin else ():
            setattr(self, option, getattr(info, option))
        if self.n_samples * info.n_features > MAX_DATASET_VALUES:
            msg = f"data.n_samples x n_features must stay <= {MAX_DATASET_VALUES:,} values"
            raise_errors(type(self).__name__, [_error(("n_samples",), msg, self.n_samples)])
        return self

    def _task_defaults(self, task: SequenceTask) -> None:
        """n_digits, and n_samples: at most the task's distinct samples (by default, all
        of them when there are fewer than the default)."""
        self.n_digits = self.n_digits or task.default_n_digits
        distinct = task.capacity(self.n_digits)
        if "n_samples" not in self.model_fields_set:
            self.n_samples = min(self.n_samples, distinct)
        elif self.n_samples > distinct:
            msg = f"data.n_samples is {self.n_samples:,} but {self.name!r} with n_digits "
            msg += f"{self.n_digits} has only {distinct:,} distinct samples"
            raise_errors(type(self).__name__, [_error(("n_samples",), msg, self.n_samples)])

    def describe(self) -> DatasetInfo:
        """Shape and task, from the registry and this spec's options; nothing is generated."""
        if self.name in TASKS:
            return TASKS[self.name].describe(self.name, self.n_digits, self.n_samples)
        b = BUILTINS[self.name]
        n_classes, n_features = b.n_classes, b.n_features
        if "n_classes" in b.options and self.n_classes is not None:
            n_classes = self.n_classes
        if "n_features" in b.options and self.n_features is not None:
            n_features = self.n_features
        return DatasetInfo(
            name=self.name,
            n_features=n_features,
            task=b.task,
            n_classes=n_classes,
            n_targets=1,
            n_samples=b.n_samples or self.n_samples,
            shape=b.shape,
        )


class FileData(_Strict):
    """A `.npz` (arrays X, y), a `.csv` (header row; target column `y`, else the last) or a
    `.txt` (UTF-8 text for a character-level language model, as an uploaded one)."""

    type: Literal["file"]
    path: str = Field(min_length=1)

    @field_validator("path")
    @classmethod
    def _readable_kind(cls, path: str, info: ValidationInfo) -> str:
        # Refused here, before a data check (DESCRIBE_DATA) would read the file.
        if not (info.context or {}).get(ALLOW_FILES, True):
            raise PydanticCustomError(SPEC_ERROR, FILES_DISABLED)
        if Path(path).suffix.lower() not in (".npz", ".csv", ".txt"):
            msg = f"data.path: {path!r} must end in .npz, .csv or .txt"
            raise PydanticCustomError(SPEC_ERROR, msg)
        return path


class UploadedData(_Strict):
    """A dataset uploaded to the service, by the id the upload returned."""

    type: Literal["dataset"]
    id: str = Field(pattern=DATASET_ID.pattern)


DataSpec = Annotated[BuiltinData | FileData | UploadedData, Field(discriminator="type")]


# ---------------------------------------------------------------- optimizer


class ConstantSchedule(_Strict):
    type: Literal["constant"]


class StepSchedule(_Strict):
    """torch StepLR counted in steps: lr x gamma every `step_size` steps."""

    type: Literal["step"]
    step_size: int = Field(ge=1, le=INT64_MAX)
    gamma: float = Field(0.1, gt=0)


class CosineSchedule(_Strict):
    """Linear warmup from lr/W to lr over W steps (torch LinearLR(start_factor=1/W)), then
    CosineAnnealingLR(T_max = total steps - W, eta_min = min_lr), chained as SequentialLR."""

    type: Literal["cosine"]
    warmup_steps: int = Field(0, ge=0, le=INT64_MAX)
    min_lr: float = Field(0.0, ge=0)


class LinearSchedule(_Strict):
    """The warmup as cosine's, then LinearLR from lr to lr x end_factor at the last step."""

    type: Literal["linear"]
    warmup_steps: int = Field(0, ge=0, le=INT64_MAX)
    end_factor: float = Field(0.0, ge=0, le=1)


ScheduleSpec = Annotated[
    ConstantSchedule | StepSchedule | CosineSchedule | LinearSchedule,
    Field(discriminator="type"),
]


class _Optimizer(_Strict):
    schedule: ScheduleSpec = Field(
        default_factory=lambda: ConstantSchedule(type="constant"),
        description="The learning rate of each step, as torch's schedulers (default: constant).",
    )

    @model_serializer(mode="wrap")
    def _constant_schedule_unsaid(self, handler):
        """The default schedule is left out of dumps: a spec from before schedules existed
        dumps (and hashes) as it did."""
        data = handler(self)
        if data.get("schedule") == {"type": "constant"}:
            del data["schedule"]
        return data


class SGDSpec(_Optimizer):
    type: Literal["sgd"]
    lr: float = Field(gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGDSpec:
        if self.nesterov and self.momentum == 0:
            msg = "optimizer.nesterov requires optimizer.momentum > 0 (as torch.optim.SGD)"
            raise_errors(type(self).__name__, [_error(("nesterov",), msg, self.nesterov)])
        return self


_Beta = Annotated[float, Field(ge=0, lt=1)]


class AdamSpec(_Optimizer):
    type: Literal["adam"]
    lr: float = Field(gt=0)
    betas: tuple[_Beta, _Beta] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty, as torch.optim.Adam.")


class AdamWSpec(AdamSpec):
    type: Literal["adamw"]
    weight_decay: float = Field(0.01, ge=0, description="Decoupled, as torch.optim.AdamW.")


OptimizerSpec = Annotated[SGDSpec | AdamSpec | AdamWSpec, Field(discriminator="type")]


# ---------------------------------------------------------------- the recipe around the steps


class GradClip(_Strict):
    """torch's clip_grad_norm_ on the averaged gradient, before the optimizer."""

    max_norm: float = Field(gt=0)


Metric = Literal["val_loss", "val_accuracy", "val_exact_match"]
DEFAULT_MODE = {"val_loss": "min", "val_accuracy": "max", "val_exact_match": "max"}


class _BestBy(_Strict):
    metric: Metric = "val_loss"
    mode: Literal["min", "max"] | None = Field(
        None, description="Default: min for val_loss, max for val_accuracy and val_exact_match."
    )

    @model_validator(mode="after")
    def _default_mode(self):
        if self.mode is None:
            self.mode = DEFAULT_MODE[self.metric]
        return self


class EarlyStopping(_BestBy):
    """Stop when `patience` evaluations in a row did not improve the metric by more than
    `min_delta` on the best so far."""

    patience: int = Field(5, ge=1, le=INT64_MAX)
    min_delta: float = Field(0.0, ge=0)


class KeepBest(_BestBy):
    """Keep the checkpoint of the best evaluation by `metric` (best.json names it)."""


# ---------------------------------------------------------------- warm start (issue 17)

FILES_PATHS_DISABLED = "init_from.path: paths are disabled on this server; use init_from.job"
SHA256 = r"^[0-9a-f]{64}$"


class InitFrom(_Strict):
    """Start from another run's weights: a job of the service (`job`) or a run directory
    (`path`, as `shardgrad train --out` made it). Where the run is accepted, `checkpoint`
    is resolved to the step it names and `sha256` to its weights' hash, so that the spec
    (and its hash) say exactly where it started; a stated sha256 must match."""

    job: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$", description="a job id")
    path: str | None = Field(None, min_length=1, description="a run directory")
    checkpoint: str | None = Field(
        None, pattern=CHOICE_PATTERN, description=f"{CHOICE_HELP}; default: {DEFAULT_HELP}"
    )
    load_optimizer: bool = Field(
        False,
        description="also the optimizer's state (moments, step counts); its hyperparameters "
        "stay this spec's",
    )
    sha256: str | None = Field(None, pattern=SHA256, description="of the source's weights")

    @field_validator("path")
    @classmethod
    def _paths_allowed(cls, path: str, info: ValidationInfo) -> str:
        if not (info.context or {}).get(ALLOW_FILES, True):
            raise PydanticCustomError(SPEC_ERROR, FILES_PATHS_DISABLED)
        return path

    @model_validator(mode="after")
    def _one_source(self) -> InitFrom:
        if (self.job is None) == (self.path is None):
            msg = "init_from: give exactly one of job (a job id) and path (a run directory)"
            raise_errors(type(self).__name__, [_error((), msg, self.model_dump())])
        return self

    def source(self) -> str:
        """The source, as messages name it."""
        return f"job {self.job}" if self.job is not None else repr(self.path)


# ---------------------------------------------------------------- the spec


class TrainingSpec(_Strict):
    name: str = Field(min_length=1, max_length=200)
    model: ModelSpec
    data: DataSpec
    loss: Loss
    optimizer: OptimizerSpec
    epochs: int = Field(ge=1, le=INT64_MAX)
    batch_size: int = Field(
        ge=1, le=INT64_MAX, description="The global batch, split across workers."
    )
    workers: Annotated[int, Field(ge=0, le=INT64_MAX)] | Literal["auto"] = Field(
        "auto",
        description="Ray worker actors; 0 trains in the coordinator's own process; auto lets "
        "the job choose (0 included) whatever is fastest on the cluster it gets. Never "
        "changes the result beyond 1e-9.",
    )
    cpus_per_worker: float = Field(
        1.0, ge=CPU_STEP, le=1_000_000, description="A multiple of 0.0001, Ray's smallest share."
    )
    seed: int = Field(0, ge=0, le=INT64_MAX)
    dtype: Dtype = "float64"
    validation_fraction: float = Field(0.2, ge=0, le=0.9)
    checkpoint_every: int = Field(100, ge=1, le=INT64_MAX, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(3, ge=1, le=INT64_MAX)
    max_failures: int = Field(
        3, ge=0, le=INT64_MAX, description="Worker failures tolerated per job."
    )
    priority: int = Field(
        0, ge=PRIORITY_RANGE[0], le=PRIORITY_RANGE[1], description="Higher runs first."
    )
    health_every: int = Field(
        10, ge=1, le=INT64_MAX, description="Steps between training-health stats."
    )
    init_from: InitFrom | None = Field(
        None, description="start from another run's weights instead of random ones"
    )
    exchange: ExchangeChoice = Field(
        "auto",
        description="How parameters and gradients travel each step: a Ray Compiled Graph, "
        "plain Ray tasks, or auto (compiled, falling back to tasks; $SHARDGRAD_EXCHANGE "
        "may choose instead). Never changes the result.",
    )
    grad_clip: GradClip | None = None
    eval_every: int | None = Field(
        None, ge=1, le=INT64_MAX, description="Steps between evaluations (default: each epoch)."
    )
    early_stopping: EarlyStopping | None = None
    keep_best: KeepBest | None = Field(
        None, description="Default: early_stopping's metric and mode, when it is set."
    )

    @field_validator("workers", mode="wrap")
    @classmethod
    def _one_workers_error(cls, value, handler):
        """One error for a bad count, not one per member of the union."""
        try:
            return handler(value)
        except ValidationError:
            msg = f'workers must be a whole number >= 0 or "auto", not {json.dumps(value)}'
            raise PydanticCustomError(SPEC_ERROR, msg) from None

    @field_validator("cpus_per_worker")
    @classmethod
    def _whole_steps(cls, cpus: float) -> float:
        steps = cpus / CPU_STEP
        if abs(steps - round(steps)) > 1e-6 * max(1.0, steps):
            msg = f"cpus_per_worker must be a multiple of {CPU_STEP} (Ray's smallest share)"
            msg += f", not {cpus}"
            raise PydanticCustomError(SPEC_ERROR, msg)
        return cpus

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> TrainingSpec:
        errors = []
        if self.workers != "auto" and self.batch_size < self.workers:
            msg = f"batch_size ({self.batch_size}) must be >= workers ({self.workers})"
            errors.append(_error(("batch_size",), msg, self.batch_size))
        if self.model.type == "transformer" and self.loss != "cross_entropy":
            msg = f"loss: a transformer is trained by next-token cross_entropy, not {self.loss}"
            errors.append(_error(("loss",), msg, self.loss))
        for field in ("early_stopping", "keep_best"):
            if getattr(self, field) is not None and self.validation_fraction == 0:
                msg = f"{field} needs a validation set, but validation_fraction is 0"
                errors.append(_error((field,), msg, getattr(self, field).model_dump()))
        if self.keep_best is None and self.early_stopping is not None:
            es = self.early_stopping
            self.keep_best = KeepBest(metric=es.metric, mode=es.mode)
        describe = (info.context or {}).get(DESCRIBE_DATA)
        if describe is not None:
            errors += data_errors(self, describe)[1]
        raise_errors(type(self).__name__, errors)
        return self

    def reserved_cpus(self, workers: int | None = None) -> float:
        """The CPUs a run with `workers` workers (default: the spec's) holds: each worker's
        share, and one worker's for an in-process run (its coordinator computes) or for an
        auto run before it has chosen."""
        n = self.workers if workers is None else workers
        return max(1, n if n != "auto" else 1) * self.cpus_per_worker

    def schedule(self, n_samples: int) -> Schedule:
        """The steps of a run on a dataset of `n_samples` (training and validation rows)."""
        n_train = n_samples - int(n_samples * self.validation_fraction)
        return Schedule(max(n_train, 1), self.batch_size, self.epochs, self.seed)

    def spec_hash(self) -> str:
        """sha256 of the fields that change the mathematics (see MATH_FIELDS)."""
        math = self.model_dump(mode="json", include=MATH_FIELDS)
        # bias_init came later: at its default it is left out, so that checkpoints written
        # before it existed keep their hash and still resume.
        if math["model"].get("bias_init") == 0:
            del math["model"]["bias_init"]
        init = math.pop("init_from", None)  # absent, so older hashes stay as they were
        if init is not None:  # where the weights came from does not matter, only what they are
            math["init_from"] = {k: init[k] for k in ("sha256", "load_optimizer")}
        math |= self.model_dump(mode="json", include=set(RECIPE_FIELDS), exclude_none=True)
        canonical = json.dumps(math, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def data_errors(
    spec: TrainingSpec, describe: Callable[[BuiltinData | FileData | UploadedData], DatasetInfo]
) -> tuple[DatasetInfo | None, list[InitErrorDetails]]:
    """The spec against its data as `describe` finds it: the data's description (None if
    it cannot be read) and the errors, each at the field it blames."""
    try:
        info = describe(spec.data, context=model_context(spec.model))
    except (OSError, ValueError) as e:
        return None, [_data_error(spec.data, e)]
    return info, _model_errors(spec, info) + _recipe_errors(spec, info)


def _recipe_errors(spec: TrainingSpec, info: DatasetInfo) -> list[InitErrorDetails]:
    """The schedule against the run's total steps; an accuracy metric needs classes."""
    errors, sched = [], spec.optimizer.schedule
    total = spec.schedule(info.n_samples).total_steps
    if sched.type in ("cosine", "linear") and sched.warmup_steps >= total:
        loc = ("optimizer", spec.optimizer.type, "schedule", sched.type, "warmup_steps")
        msg = f"optimizer.schedule.warmup_steps ({sched.warmup_steps}) must be less than the "
        msg += f"total steps ({total}: epochs x steps per epoch)"
        errors.append(_error(loc, msg, sched.warmup_steps))
    for field in ("early_stopping", "keep_best"):
        chosen = getattr(spec, field)
        metric = None if chosen is None else chosen.metric
        if metric == "val_accuracy" and info.task != "classification":
            msg = f"{field}.metric: val_accuracy needs classification data, but {info.name!r} "
            msg += "is regression (use val_loss)"
            errors.append(_error((field, "metric"), msg, metric))
        if metric == "val_exact_match" and not scores_exact_match(spec):
            msg = f"{field}.metric: val_exact_match scores the builtin tasks {sorted(TASKS)}, "
            msg += f"not {info.name!r} (use val_loss)"
            errors.append(_error((field, "metric"), msg, metric))
    return errors


def scores_exact_match(spec: TrainingSpec) -> bool:
    """Whether the run's evaluations include val_exact_match: a builtin sequence task's."""
    return spec.data.type == "builtin" and spec.data.name in TASKS


def _data_error(data: FileData | UploadedData, e: Exception) -> InitErrorDetails:
    key, value = ("path", data.path) if data.type == "file" else ("id", data.id)
    if isinstance(e, FileNotFoundError) and data.type == "file":
        msg = f"data.path: {value!r} does not exist"
    elif isinstance(e, OSError) and data.type == "file":
        msg = f"data.path: cannot read {value!r}: {e.strerror or e}"
    elif isinstance(e, FileNotFoundError):
        msg = f"data.id: {e}"
    else:
        msg = f"data.{key}: {value!r} is not a usable dataset: {e}"
    return _error(("data", data.type, key), msg, value)


def model_context(model: ModelSpec) -> int | None:
    """The tokens a sequence model reads at once (a transformer's `context`), None for
    other models. It cuts an uploaded text into windows (see workers.sequences)."""
    return getattr(model, "context", None)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _model_errors(spec: TrainingSpec, info: DatasetInfo) -> list[InitErrorDetails]:
    """The model's input width must match the data, its output width the loss."""
    model, name, loss = spec.model, info.name, spec.loss
    if model.type == "transformer":
        return _sequence_errors(model, info)
    if info.task == "sequence":
        msg = f"model.type: {model.type!r} cannot read dataset {name!r} (token ids); use a "
        msg += "'transformer'"
        return [_error(("model", model.type, "type"), msg, model.type)]
    errors = _input_errors(model, info)
    width = model.out_width
    if model.type == "mlp":
        loc, gives = ("model", "mlp", "sizes", len(model.sizes) - 1), f"model.sizes[-1] is {width}"
    else:
        last = len(model.layers) - 1
        loc = ("model", "sequential", "layers", last)
        gives = f"model.layers[{last}] gives {_count(width, 'output')}"
    binary = info.task == "classification" and info.n_classes == 2
    fits = {
        "cross_entropy": ("classification data", info.task == "classification"),
        "bce": ("binary classification data", binary),
        "mse": ("regression data or 2 classes", binary or info.task == "regression"),
    }
    needs, ok = fits[loss]
    if not ok:
        if info.task == "regression":
            data_is, hint = "is regression", "mse"
        else:
            data_is, hint = f"has {info.n_classes} classes", "cross_entropy"
        msg = f"loss: {loss} needs {needs} but dataset {name!r} {data_is} (use {hint})"
        return [*errors, _error(("loss",), msg, loss)]

    if loss == "cross_entropy":
        outputs, why = info.n_classes, "one per class"
    elif info.task == "classification":
        outputs, why = 1, "the logit of class 1" if loss == "bce" else "targets 0/1"
    else:
        outputs, why = info.n_targets, "one per target"
    if width != outputs:
        wanted = _count(outputs, "output")
        msg = f"{gives} but {loss} on {name!r} needs {wanted} ({why})"
        errors.append(_error(loc, msg, width))
    return errors


def _sequence_errors(model: TransformerSpec, info: DatasetInfo) -> list[InitErrorDetails]:
    """A language model against token data: the vocabulary must be the data's, and the
    context long enough for its samples (`info.context`: the tokens a model reads of one)."""
    vocab, context = getattr(info, "vocab_size", None), getattr(info, "context", None)
    loc = ("model", "transformer")
    if vocab is None:
        msg = f"model: a transformer reads token sequences but dataset {info.name!r} is not one"
        return [_error((*loc, "type"), msg, model.type)]
    errors = []
    if model.vocab_size != vocab:
        msg = f"model.vocab_size is {model.vocab_size} but dataset {info.name!r} has {vocab} tokens"
        errors.append(_error((*loc, "vocab_size"), msg, model.vocab_size))
    if context is not None and model.context < context:
        msg = f"model.context is {model.context} but dataset {info.name!r} needs at least {context}"
        errors.append(_error((*loc, "context"), msg, model.context))
    return errors


def _input_errors(model: ModelSpec, info: DatasetInfo) -> list[InitErrorDetails]:
    """The model's input against the data: its width, and for images their shape."""
    features, name = _count(info.n_features, "feature"), info.name
    if model.type == "mlp":
        if model.sizes[0] == info.n_features:
            return []
        msg = f"model.sizes[0] is {model.sizes[0]} but dataset {name!r} has {features}"
        return [_error(("model", "mlp", "sizes", 0), msg, model.sizes[0])]
    shape, loc = list(model.input_shape), ("model", "sequential", "input_shape")
    if model.in_width != info.n_features:
        msg = f"model.input_shape is {shape} ({model.in_width} values) but dataset {name!r} has "
        msg += f"{features}" + (f" ({'x'.join(map(str, info.shape))} images)" if info.shape else "")
        return [_error(loc, msg, shape)]
    if info.shape is not None and len(shape) == 3 and tuple(shape) != tuple(info.shape):
        images = "x".join(map(str, info.shape))
        msg = f"model.input_shape is {shape} but dataset {name!r} holds {images} images"
        return [_error(loc, msg, shape)]
    return []


# ---------------------------------------------------------------- loading


class SpecError(ValueError):
    """A spec file that cannot be read or does not validate; the message lists why."""


def format_validation_error(exc: ValidationError) -> str:
    """One line per error: `<loc joined with .>: <msg>`.

    Our own checks (type `invalid_spec`) already start with the field path, so their
    message stands alone.
    """
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"])
        lines.append(err["msg"] if err["type"] == SPEC_ERROR or not loc else f"{loc}: {err['msg']}")
    return "\n".join(lines)


def load_spec(path: str | Path, context: dict | None = None) -> TrainingSpec:
    """Read and validate a spec file; SpecError with one line per problem otherwise.

    `context` is the validation context: `workers.data.with_data()` checks the data too."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read spec {path}: {e}") from None
    try:
        return TrainingSpec.model_validate_json(text, context=context)
    except ValidationError as e:
        errors = format_validation_error(e).replace("\n", "\n  ")
        raise SpecError(f"invalid spec {path}:\n  {errors}") from None
