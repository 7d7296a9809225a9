"""The job list's filters, sorts and cursors (GET /jobs): keyset pagination on (sort key,
seq) for every sort, with an index behind each (service/tables.py SORT_COLUMNS).

Jobs without the sort key (no val_loss yet, not finished) come last in either direction,
in the direction's seq order. Each page is read as up to two index range scans: the rows
that have the key, after the cursor's (key, seq), then the rows that lack it. A cursor
names its sort and the (key, seq) of the last row it returned (key null: that row lacked
it), so the next page starts right after that row however many rows tie on the key."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Select, select, tuple_

from service.tables import SORT_COLUMNS, JobRow, TagRow

DEFAULT_SORT = "-created"  # newest first
SORTS = tuple(f"{sign}{key}" for key in SORT_COLUMNS for sign in ("", "-"))
Sort = Literal[SORTS]  # type: ignore[valid-type]
INT64_MAX = 2**63 - 1


class BadQuery(ValueError):
    """A query parameter the list cannot use: its name, and why."""

    def __init__(self, param: str, message: str, value: Any):
        super().__init__(message)
        self.param, self.value = param, value


@dataclass(frozen=True)
class Cursor:
    sort: str
    key: Any  # the last row's sort key; None: it lacked the key
    seq: int


def parse_tag(text: str) -> tuple[str, str]:
    """`key:value` (schemas.TAG_FILTER): the value is what follows the first colon."""
    key, _, value = text.partition(":")
    return key, value


def encode_cursor(sort: str, row: JobRow) -> str:
    key = None if sort.lstrip("-") == "created" else getattr(row, _column(sort).key)
    raw = json.dumps([sort, key, row.seq], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(text: str, sort: str) -> Cursor:
    """The cursor GET /jobs handed out for this sort (422 for anything else). A bare seq
    is an older version's cursor of the default sort."""
    try:
        value = json.loads(base64.urlsafe_b64decode(text.encode() + b"==").decode())
    except (ValueError, binascii.Error, UnicodeError):
        value = None
    if _is_int(value) and sort == DEFAULT_SORT:
        value = [sort, None, value]
    if not (isinstance(value, list) and len(value) == 3 and _is_int(value[2])):
        raise BadQuery("cursor", "not a cursor returned by GET /jobs", text)
    if value[0] != sort:
        msg = f"a cursor of sort={value[0]}, not of sort={sort}: keep the sort while paging"
        raise BadQuery("cursor", msg, text)
    key, kind = value[1], _column(sort).type.python_type
    if key is not None and not (isinstance(key, kind) or kind is float and _is_int(key)):
        raise BadQuery("cursor", "not a cursor returned by GET /jobs", text)
    return Cursor(sort, key, value[2])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX


def _column(sort: str):
    return SORT_COLUMNS[sort.lstrip("-")]


def filtered(
    status: str | None = None,
    tags: Iterable[tuple[str, str]] = (),
    name: str | None = None,
) -> Select:
    """The jobs in `status`, carrying every tag of `tags`, whose name holds `name` (any case)."""
    stmt = select(JobRow)
    if status:
        stmt = stmt.where(JobRow.status == status)
    for key, value in tags:  # each tag through ix_job_tags_key_value
        tagged = select(TagRow.job_id).where(TagRow.key == key, TagRow.value == value)
        stmt = stmt.where(JobRow.id.in_(tagged))
    if name:
        stmt = stmt.where(JobRow.name.icontains(name, autoescape=True))
    return stmt


def scans(stmt: Select, sort: str, after: Cursor | None) -> list[Select]:
    """The statements that read a page in order: each continues where the previous ends.
    Both order by the index's (key, seq), also among the rows that lack the key: there that
    is seq order, and PostgreSQL only reads an index in order for an ORDER BY of its columns."""
    desc, column, seq = sort.startswith("-"), _column(sort), JobRow.seq
    order = (column.desc(), seq.desc()) if desc else (column.asc(), seq.asc())
    if column is seq:  # never null
        if after is not None:
            stmt = stmt.where(seq < after.seq if desc else seq > after.seq)
        return [stmt.order_by(order[0])]
    missing = stmt.where(column.is_(None)).order_by(*order)
    if after is not None and after.key is None:  # already among the rows that lack the key
        return [missing.where(seq < after.seq if desc else seq > after.seq)]
    present = stmt.where(column.is_not(None)).order_by(*order)
    if after is not None:
        last, key = tuple_(column, seq), (after.key, after.seq)
        present = present.where(last < key if desc else last > key)
    return [present, missing] if column.nullable else [present]
