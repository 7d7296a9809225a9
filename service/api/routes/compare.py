"""/compare: a few jobs side by side."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service import compare
from service.api.deps import NOT_FOUND, StoreDep
from service.api.errors import field_error
from service.schemas import MAX_COMPARE, MAX_SERIES_POINTS, PRINTABLE, Comparison

router = APIRouter(tags=["jobs"])
ID = r"[^,\x00-\x1f\x7f]+"
IDS_PATTERN = rf"^{ID}(,{ID}){{1,{MAX_COMPARE - 1}}}$"


def parse_ids(text: str) -> list[str]:
    """`a,b,c`: 2 to MAX_COMPARE job ids, each once; else a 422 at `ids`."""
    ids = [i.strip() for i in text.split(",")]
    if "" in ids:
        raise field_error(("query", "ids"), "an empty job id: give ids=a,b,c", text)
    if not 2 <= len(ids) <= MAX_COMPARE:
        msg = f"compare 2 to {MAX_COMPARE} jobs, not {len(ids)}"
        raise field_error(("query", "ids"), msg, text)
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise field_error(("query", "ids"), f"named more than once: {', '.join(twice)}", text)
    return ids


@router.get("/compare", responses=NOT_FOUND)
def compare_jobs(
    store: StoreDep,
    ids: Annotated[
        str,
        Query(
            max_length=MAX_COMPARE * 80,
            pattern=PRINTABLE,
            # what the checks below require, for clients; they answer in words
            json_schema_extra={"pattern": IDS_PATTERN},
            description=f"2 to {MAX_COMPARE} job ids, comma-separated, each once",
        ),
    ],
    points: Annotated[
        int, Query(ge=2, le=MAX_SERIES_POINTS, description="the most points of each series")
    ] = 500,
) -> Comparison:
    """The jobs' specs with the fields that differ (`differs`, dotted paths, and each job's
    `values` there), their final metrics, and their loss and accuracy curves, in the order
    of `ids`. A curve longer than `points` keeps the last point of each of `points` equal
    step ranges. 404 names the first unknown id."""
    return compare.compare(store, parse_ids(ids), points)
