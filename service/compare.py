"""Jobs side by side (GET /compare): which spec fields differ, each job's values there, its
final metrics, and its curves, bounded."""

from __future__ import annotations

from typing import Any, get_args

from service.schemas import ComparedJob, Comparison, Series, SeriesName
from service.store import JobStore
from service.tables import JobRow

SERIES = get_args(SeriesName)
MISSING = object()


def flatten(value: Any, path: str = "") -> dict[str, Any]:
    """A spec's leaves by dotted path: {"optimizer.lr": 0.1, "model.layers[0].type": ...}.
    An object's fields and a list of objects' items are followed; any other list (sizes,
    shapes) is one value, as a sweep's parameter names it."""
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out |= flatten(item, f"{path}.{key}" if path else key)
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for i, item in enumerate(value):
            out |= flatten(item, f"{path}[{i}]")
        return out
    return {path: value}


def differing(specs: list[dict]) -> list[str]:
    """The paths whose values are not the same in every spec (absent counts as a value), in
    the order the specs first name them."""
    leaves = [flatten(s) for s in specs]
    paths = dict.fromkeys(p for flat in leaves for p in flat)
    return [p for p in paths if len({_key(flat.get(p, MISSING)) for flat in leaves}) > 1]


def _key(value: Any) -> Any:
    """A hashable stand-in for a JSON value; 1 and 1.0 are the same value, True is not 1."""
    if value is MISSING:
        return MISSING
    if isinstance(value, list):
        return ("list", tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    return (type(value) is bool, value)


def compare(store: JobStore, ids: list[str], points: int) -> Comparison:
    rows = [store.get(i) for i in ids]  # JobNotFound: 404 naming the id
    differs = differing([r.spec for r in rows])
    return Comparison(
        differs=differs, jobs=[_job(store, r, differs, points) for r in rows], points=points
    )


def _job(store: JobStore, row: JobRow, differs: list[str], points: int) -> ComparedJob:
    flat = flatten(row.spec)
    series = {
        name: Series(steps=[s for s, _ in pts], values=[v for _, v in pts], total=total)
        for name, (pts, total) in store.series(row.id, SERIES, points).items()
        if total
    }
    return ComparedJob(
        id=row.id,
        name=row.name,
        status=row.status,
        spec=row.spec,
        values={p: flat.get(p) for p in differs},
        metrics=row.metrics or {},
        best_step=(row.summary or {}).get("best_step"),
        duration_s=row.duration_s,
        tags=row.tags,
        series=series,
    )
