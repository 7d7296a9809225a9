"""Tags, filters, sorts and cursor paging of GET /jobs (service/listing.py), on SQLite and
on PostgreSQL: every sort pages through ties and jobs without the key, each job once."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from service.listing import SORTS, Cursor, filtered, scans
from service.tables import SORT_COLUMNS
from tests.fakes import locs, make_client, spec, submit

JOBS = "/api/v1/jobs"
# (name, val_loss, val_accuracy, finished): ties on every metric, and jobs lacking each.
TABLE = [
    ("alpha", 0.5, 0.9, True),
    ("Beta", 0.5, 0.9, True),
    ("gamma", None, None, False),
    ("delta", 0.2, 0.7, True),
    ("alpha", 0.5, None, False),
    ("epsilon", None, 0.9, True),
    ("50%_off", 0.2, 0.7, False),
]


@pytest.fixture(params=["sqlite", "postgresql"], scope="module")
def db(request, tmp_path_factory):
    return request.param


@pytest.fixture
def env(db, tmp_path, request):
    url = "sqlite://" if db == "sqlite" else request.getfixturevalue("pg_url")
    return make_client(tmp_path, store_url=url)


def finished_jobs(client, store) -> list[str]:
    """TABLE's jobs, each with its metrics, the finished ones with a duration."""
    ids = []
    for i, (name, val_loss, val_accuracy, finished) in enumerate(TABLE):
        job = submit(client, name=name, priority=i % 3)
        owner = "t"
        store.claim(owner, lambda q, job_id=job["id"]: q.id == job_id or False)
        metrics = {"train_loss": 1.0}
        metrics |= {"val_loss": val_loss} if val_loss is not None else {}
        metrics |= {"val_accuracy": val_accuracy} if val_accuracy is not None else {}
        store.progress(job["id"], owner, {"step": 1, "metrics": metrics})
        if finished:
            store.finish(job["id"], owner, "succeeded")
        ids.append(job["id"])
    return ids


def expected(store, ids: list[str], sort: str) -> list[str]:
    """The order the listing promises: by (key, seq), rows without the key last."""
    rows = [store.get(i) for i in ids]
    column = SORT_COLUMNS[sort.lstrip("-")].key
    desc = sort.startswith("-")
    have = sorted(
        (r for r in rows if getattr(r, column) is not None),
        key=lambda r: (getattr(r, column), r.seq),
        reverse=desc,
    )
    lack = sorted((r for r in rows if getattr(r, column) is None), key=lambda r: r.seq)
    return [r.id for r in have + (lack[::-1] if desc else lack)]


def pages(client, limit=2, **params) -> list[str]:
    seen, cursor = [], None
    while True:
        query = params | {"limit": limit} | ({"cursor": cursor} if cursor else {})
        r = client.get(JOBS, params=query)
        assert r.status_code == 200, r.text
        seen += [j["id"] for j in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return seen


def test_every_sort_pages_through_ties_and_missing_keys_once(env):
    client, store, _ = env
    ids = finished_jobs(client, store)
    for sort in SORTS:
        assert pages(client, sort=sort) == expected(store, ids, sort), sort
    assert pages(client, limit=3) == ids[::-1]  # the default: newest first
    # A filter with a sort pages too.
    top = pages(client, limit=1, sort="-val_accuracy", name="ALPHA")
    assert top == [ids[0], ids[4]]


def test_filters_by_tags_name_and_sweep(env):
    client, store, _ = env
    a = submit(client, name="lr-0.1", tags={"sweep": "s1", "team": "x"} | {"note": "a:b"})
    b = submit(client, name="LR-1", tags={"sweep": "s1"})
    c = submit(client, name="100%_done", tags={"sweep": "s2", "team": "x"})

    def listed(**params):
        return {j["id"] for j in client.get(JOBS, params=params).json()["items"]}

    assert listed(sweep="s1") == listed(tag="sweep:s1") == {a["id"], b["id"]}
    assert listed(tag=["team:x", "sweep:s1"]) == {a["id"]}  # AND
    assert listed(tag=["team:x"], sweep="s2") == {c["id"]}
    assert listed(tag="note:a:b") == {a["id"]}  # the value holds colons
    assert listed(tag=["sweep:s1", "sweep:s2"]) == set()
    assert listed(name="lr-") == {a["id"], b["id"]}  # any case
    assert listed(name="%_") == {c["id"]}  # LIKE's wildcards are literal
    assert listed(name="r_") == set()  # not "r-": _ is no wildcard


def test_bad_queries_are_422_naming_the_parameter(env):
    client, store, _ = env
    submit(client), submit(client)
    cursor = client.get(JOBS, params={"limit": 1, "sort": "val_loss"}).json()["next_cursor"]
    assert cursor is not None
    assert locs(client.get(JOBS, params={"sort": "loss"})) == [("query", "sort")]
    assert locs(client.get(JOBS, params={"tag": "nocolon"})) == [("query", "tag", 0)]
    assert locs(client.get(JOBS, params={"tag": ["a:1", "bad key:v"]})) == [("query", "tag", 1)]
    assert locs(client.get(JOBS, params={"name": "nul\x00"})) == [("query", "name")]
    r = client.get(JOBS, params={"cursor": cursor, "sort": "-val_loss"})
    assert locs(r) == [("query", "cursor")] and "keep the sort" in r.text
    assert locs(client.get(JOBS, params={"cursor": cursor})) == [("query", "cursor")]


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_tags_are_kept_outside_the_spec_and_patched_as_a_merge(env):
    client, store, _ = env
    plain = submit(client)
    job = submit(client, tags={"a": "1", "b": "2"})
    assert job["tags"] == {"a": "1", "b": "2"}
    assert job["spec"] == plain["spec"] and "tags" not in job["spec"]  # same spec, same hash

    url = f"{JOBS}/{job['id']}"
    r = client.patch(url, json={"tags": {"b": None, "c": "3", "zz": None}})
    assert r.status_code == 200 and r.json()["tags"] == {"a": "1", "c": "3"}
    assert client.get(url).json()["tags"] == {"a": "1", "c": "3"}
    assert client.patch(f"{JOBS}/nosuchjob", json={"tags": {}}).status_code == 404
    many = {f"k{i}": "v" for i in range(31)}  # and a, c: 33
    r = client.patch(url, json={"tags": many})  # 32 at most: a conflict with the job's tags
    assert r.status_code == 409 and "33 tags" in r.text
    assert locs(client.patch(url, json={"tags": {"a": "1"}, "x": 1})) == [("body", "x")]


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    "tags, loc",
    [
        ({"has space": "v"}, ("body", "tags", "has space", "[key]")),
        ({"k:v": "v"}, ("body", "tags", "k:v", "[key]")),
        ({"": "v"}, ("body", "tags", "", "[key]")),
        ({"k": "x" * 257}, ("body", "tags", "k")),
        ({"k": "line\nbreak"}, ("body", "tags", "k")),
        ({"k": 1}, ("body", "tags", "k")),
        ({f"k{i}": "v" for i in range(33)}, ("body", "tags")),
    ],
)
def test_bad_tags_are_422_at_the_tag(env, tags, loc):
    client, _, _ = env
    r = client.post(JOBS, json=spec() | {"tags": tags})
    assert locs(r) == [loc]


def test_an_index_serves_every_sort_without_a_sort_step(env, db):
    """Each page's scans read an index in order: no sort of the table on either database
    (PostgreSQL told to avoid the scans it prefers on a table this small)."""
    _, store, _ = env
    keys = {"name": "m", "priority": 1}
    with store.engine.connect() as conn:
        if db == "postgresql":
            conn.execute(text("SET enable_seqscan = off; SET enable_bitmapscan = off"))
        for sort in SORTS:
            cursor = Cursor(sort, keys.get(sort.lstrip("-"), 0.5), 3)
            for stmt in scans(filtered(), sort, cursor) + scans(filtered(), sort, None):
                plan = explain(conn, stmt.limit(10), db)
                # created: SQLite's table is in seq order (its rowid), PostgreSQL's pkey
                assert any(
                    i in plan for i in ("ix_jobs_sort_", "PRIMARY KEY", "SCAN jobs", "jobs_pkey")
                ), plan
                assert "TEMP B-TREE" not in plan and "Sort " not in plan, (sort, plan)


# The sorts' indexes; for created the table itself: SQLite's is in seq order (its rowid).
INDEXES = ("ix_jobs_sort_", "PRIMARY KEY", "SCAN jobs", "jobs_pkey")


def explain(conn, stmt, db: str) -> str:
    sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
    prefix = "EXPLAIN QUERY PLAN " if db == "sqlite" else "EXPLAIN "
    return "\n".join(" ".join(map(str, row)) for row in conn.execute(text(prefix + sql)))
