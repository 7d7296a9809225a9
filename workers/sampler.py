"""Which samples each step sees, and which worker computes which of them.

Everything here is a pure function of ``(seed, epoch, step)``: no generator
state lives between steps, so a run resumed from a checkpoint at step N sees
exactly the batches an uninterrupted run would have seen from step N on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

_PERMUTATION_TAG = 0x5EED  # keeps these streams apart from the dataset generators'


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, _PERMUTATION_TAG]).permutation(n)


def split_batch(indices: np.ndarray, workers: int) -> list[np.ndarray]:
    """Cut a global batch into `workers` contiguous pieces whose sizes differ by at most 1."""
    return np.array_split(indices, workers)


@dataclass
class Schedule:
    """The step -> global batch map of one training run."""

    n_train: int
    batch_size: int
    epochs: int
    seed: int
    _cache: dict = field(default_factory=dict, repr=False)

    # Read several times a step: computed once (the fields never change).
    @cached_property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.batch_size)

    @cached_property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def batch(self, step: int) -> np.ndarray:
        """Indices of the global batch of `step` (0-based); the epoch's last batch may be short."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._cache.get("epoch") != epoch:
            self._cache = {
                "epoch": epoch,
                "perm": epoch_permutation(self.seed, epoch, self.n_train),
            }
        start = pos * self.batch_size
        return self._cache["perm"][start : start + self.batch_size]
