"""A spec's data as the trainer, the workers and the service's views use it."""

from __future__ import annotations

import numpy as np

from workers.datasets import load_dataset, targets_for, train_val_split
from workers.spec import TrainingSpec


class PreparedData:
    """Training and validation arrays in the spec's dtype and the loss's target form."""

    def __init__(self, spec: TrainingSpec):
        dataset = load_dataset(spec.data, spec.seed)
        train, val = train_val_split(dataset, spec.validation_fraction, spec.seed)
        dtype = np.dtype(spec.dtype)
        self.info = dataset.info
        self.classify = dataset.info.task == "classification"
        self.X = np.ascontiguousarray(train.X, dtype=dtype)
        self.y = targets_for(train.y, spec.loss, dtype)
        self.X_val = np.ascontiguousarray(val.X, dtype=dtype)
        self.y_val = targets_for(val.y, spec.loss, dtype)
