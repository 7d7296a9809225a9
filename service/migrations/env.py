"""Alembic's entry point. The store runs it on its own connection (`upgrade` in
__init__.py); the `alembic` command runs it on the store that SHARDGRAD_DATABASE_URL (or
`-x url=...`) names."""

from __future__ import annotations

from alembic import context

from service.tables import Base


def run(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata)
    with context.begin_transaction():
        context.run_migrations()


def store_url() -> str:
    from service.config import Settings

    return context.get_x_argument(as_dictionary=True).get("url") or Settings().store_url


if (connection := context.config.attributes.get("connection")) is not None:
    run(connection)
elif context.is_offline_mode():
    context.configure(url=store_url(), target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    from service.store import make_engine

    with make_engine(store_url()).begin() as conn:
        run(conn)
