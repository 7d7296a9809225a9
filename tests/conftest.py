import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import require, unavailable

# Keep Ray's own chatter and memory use small in tests.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The suite's distributed tests (worker kills, stuck steps, exchanges) need the workers from
# the first step; tests/test_headstart.py covers the head start, on by default for users.
os.environ.setdefault("SHARDGRAD_HEAD_START", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One in-process Ray for the whole test session (2 real cores, fractional workers)."""
    import ray

    from workers.cluster import ensure_ray

    if not ray.is_initialized():
        ensure_ray(num_cpus=2)  # as the service does: workers' output in their jobs' logs
    yield ray
    ray.shutdown()


def _postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL (/usr/lib/postgresql/<major>/bin), else initdb on PATH."""
    debian = [p for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parts[-3].isdigit()]
    if debian:
        return max(debian, key=lambda p: int(p.parts[-3])).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="session")
def pg_server():
    """The admin URL of a PostgreSQL server for this session (see `pg_url`).

    $SHARDGRAD_TEST_DATABASE_URL names a server you run (its role must create databases);
    .ci/run installs Debian's `postgresql`, starts one and sets it. Otherwise the session
    starts a throwaway server of the same kind from the local binaries: initdb into a temp
    dir, listening on a Unix socket in that dir only, so it needs no init system, no pg_hba
    edits and no free port, and leaves nothing behind. PostgreSQL refuses to run as root,
    so as root it runs as the `postgres` user the package creates.
    """
    require("psycopg")
    if url := os.environ.get("SHARDGRAD_TEST_DATABASE_URL"):
        yield url
        return
    bindir = _postgres_bindir()
    if bindir is None:
        unavailable(
            "PostgreSQL not found (no initdb): apt-get install postgresql, "
            "or set SHARDGRAD_TEST_DATABASE_URL"
        )
    with _throwaway_postgres(bindir) as url:
        yield url


@contextmanager
def _throwaway_postgres(bindir: Path) -> Iterator[str]:
    root = Path(tempfile.mkdtemp(prefix="sgpg-"))  # short: a socket path has ~100 bytes
    as_postgres = {}
    if os.geteuid() == 0:
        as_postgres = {"user": "postgres", "group": "postgres", "extra_groups": []}
        shutil.chown(root, "postgres", "postgres")
    data, log = root / "data", root / "server.log"
    # UTF8 whatever the locale (under SQL_ASCII psycopg returns bytes, not str).
    initdb = [bindir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync"]
    initdb += ["-E", "UTF8", "--locale=C"]
    # Throwaway data: no fsync. Two services, their Trainers and the tests' stores all connect.
    settings = ["listen_addresses=", "fsync=off", "full_page_writes=off", "max_connections=200"]
    cmd = [bindir / "postgres", "-D", data, "-k", root]
    cmd += [arg for setting in settings for arg in ("-c", setting)]
    try:
        made = subprocess.run(initdb, cwd=root, capture_output=True, text=True, **as_postgres)
        if made.returncode:
            raise RuntimeError(f"initdb failed:\n{made.stdout}{made.stderr}")
        with open(log, "ab") as out:
            server = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=out, **as_postgres)
        try:
            url = f"postgresql+psycopg://postgres@/postgres?host={root}"
            _wait_for_postgres(server, url, log)
            yield url
        finally:
            server.send_signal(signal.SIGINT)  # "fast" shutdown: it disconnects clients
            server.wait(30)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_postgres(server: subprocess.Popen, url: str, log: Path, timeout: float = 60.0):
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"postgres exited with {server.returncode}:\n{log.read_text()}")
        try:
            engine.connect().close()
            return
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty PostgreSQL database for one test (cheap: a copy of template1)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(pg_server).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:  # FORCE: the test's stores may still hold connections
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()
