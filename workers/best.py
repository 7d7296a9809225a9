"""Early stopping and the best evaluation, as pure functions of a run's evaluation history
(the trainer's `history`: one entry per evaluation, with its step and metrics). The history
is in every checkpoint, so a resumed run counts on from where it stopped and stops at the
same step as an uninterrupted one."""

from __future__ import annotations

import math

from workers.spec import EarlyStopping, KeepBest


def best_evaluation(history: list[dict], by: EarlyStopping | KeepBest) -> tuple[dict | None, int]:
    """The best entry by `by.metric` and `by.mode` (to replace the best so far, a value
    must beat it by more than `min_delta`, 0 for keep_best), and the evaluations since it."""
    min_delta = getattr(by, "min_delta", 0.0)
    best, since = None, 0
    for entry in history:
        value = entry.get(by.metric)
        if _improves(value, None if best is None else best[by.metric], by.mode, min_delta):
            best, since = entry, 0
        else:
            since += 1
    return best, since


def stops(history: list[dict], early_stopping: EarlyStopping) -> bool:
    """Whether `patience` evaluations in a row have not improved on the best."""
    return best_evaluation(history, early_stopping)[1] >= early_stopping.patience


def _improves(value, best, mode: str, min_delta: float) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta
