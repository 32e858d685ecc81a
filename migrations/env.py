"""Alembic environment: metadata from :mod:`etl.db.models`, URL from :mod:`etl.config`.

``kalshi-etl migrate`` and the tests hand over a live connection in
``config.attributes["connection"]``; under the plain ``alembic`` command the URL comes from
``DATABASE_URL`` (or the embedded PostgreSQL), never from ``alembic.ini``. ``fileConfig`` runs
only under the alembic command line, because it disables the loggers kalshi-etl set up.
Migrations take an advisory lock so that two processes migrating at once do not collide.
"""

from __future__ import annotations

from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from etl.config import environment, from_env
from etl.db.engine import embedded_url
from etl.db.models import metadata

config = context.config
MIGRATION_LOCK = 0x4B45544D  # "KETM"


def _url() -> str:
    settings = from_env(environment())
    return settings.database_url or embedded_url(settings.home)


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, compare_type=True)
    with context.begin_transaction():
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    engine = sa.create_engine(_url(), poolclass=NullPool)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
