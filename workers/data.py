"""A spec's data: checked against the spec where a job is submitted, and prepared as arrays
for the trainer, the workers and the service's views."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from workers.catalogue import DatasetInfo
from workers.config import WorkerSettings
from workers.datasets import describe, load_dataset, targets_for, train_val_split
from workers.spec import (
    ALLOW_FILES,
    DESCRIBE_DATA,
    TrainingSpec,
    data_errors,
    model_context,
    raise_errors,
)


def check_data(spec: TrainingSpec, datasets_dir: Path | None = None) -> DatasetInfo:
    """Check the spec against its data: the model's widths, the loss, whether the file or the
    upload can be read. Raises a ValidationError whose errors blame the spec's fields (as
    TrainingSpec's own do). A file or an upload is parsed once per content (see
    `workers.datasets.describe`); `datasets_dir` holds the uploads (None: WorkerSettings')."""
    info, errors = data_errors(spec, functools.partial(describe, root=datasets_dir))
    raise_errors(TrainingSpec.__name__, errors)
    return info


def describe_data(spec: TrainingSpec, datasets_dir: Path | None = None) -> DatasetInfo:
    """The description of the spec's data as its model sees it (an uploaded text cut into
    windows of the model's context)."""
    return describe(spec.data, datasets_dir, model_context(spec.model))


def with_data(datasets_dir: Path | None = None, *, allow_files: bool = True) -> dict:
    """The validation context of a submission: `TrainingSpec.model_validate(obj,
    context=with_data(...))` validates the spec and checks it against its data as
    `check_data` does, and one ValidationError lists every problem of both kinds."""
    return {ALLOW_FILES: allow_files, DESCRIBE_DATA: functools.partial(describe, root=datasets_dir)}


class PreparedData:
    """Training and validation arrays in the spec's dtype and the loss's target form.
    Sequence data keeps its int64 token ids (and its empty y)."""

    def __init__(self, spec: TrainingSpec, settings: WorkerSettings | None = None):
        settings = settings or WorkerSettings()
        context = model_context(spec.model)
        dataset = load_dataset(spec.data, spec.seed, settings.datasets_dir, context)
        train, val = train_val_split(dataset, spec.validation_fraction, spec.seed)
        dtype = np.dtype(spec.dtype)
        self.info = dataset.info
        self.classify = dataset.info.task == "classification"
        x_dtype = np.int64 if dataset.info.task == "sequence" else dtype
        self.X = np.ascontiguousarray(train.X, dtype=x_dtype)
        self.y = targets_for(train.y, spec.loss, dtype)
        self.X_val = np.ascontiguousarray(val.X, dtype=x_dtype)
        self.y_val = targets_for(val.y, spec.loss, dtype)
