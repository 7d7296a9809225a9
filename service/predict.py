"""Answer predictions from a job's newest checkpoint with the engine that trained it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from workers.checkpoint import CheckpointError, list_checkpoints, load_model_state


class NoCheckpoint(LookupError):
    pass


class Predictor:
    """Builds a job's model once per checkpoint and keeps the last few in memory."""

    def __init__(self, size: int = 8):
        self._models: OrderedDict[tuple, object] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def _model(self, spec, out_dir: Path):
        from workers.model import build_model

        for _ in range(3):  # the newest checkpoint may be pruned between listing and loading
            infos = list_checkpoints(out_dir)
            if not infos:
                raise NoCheckpoint("the job has no checkpoint yet")
            newest = infos[-1]
            key = (str(out_dir), newest.name, newest.sha256)
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key], newest.name
            try:
                state = load_model_state(newest.path)
            except (CheckpointError, OSError):
                continue
            model = build_model(spec)
            model.load_state_dict(state)
            with self._lock:
                self._models[key] = model
                while len(self._models) > self._size:
                    self._models.popitem(last=False)
            return model, newest.name
        raise NoCheckpoint("the checkpoints changed while loading; try again")

    def predict(self, spec, out_dir: Path, inputs: list[list[float]]) -> tuple[list, str]:
        from core import Tensor, no_grad

        model, name = self._model(spec, out_dir)
        X = np.asarray(inputs, dtype=np.dtype(spec.dtype))
        with no_grad():
            out = np.asarray(model(Tensor(X)).data, dtype=np.float64)
        rows = [[v if np.isfinite(v) else None for v in row] for row in out.tolist()]
        return rows, name
