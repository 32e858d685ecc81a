"""A real PostgreSQL for the tests.

``--database-url`` (default ``TEST_DATABASE_URL``) names a server where the suite may create
databases; without one a throwaway embedded server (pgserver) is started. Each session gets a
fresh database, migrated with alembic over a shared connection, dropped at the end; each test
starts from empty tables (``db`` fixture).
"""

from __future__ import annotations

import os
import secrets
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from etl.db import migrations
from etl.db.models import metadata


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--database-url",
        default=os.environ.get("TEST_DATABASE_URL"),
        help="PostgreSQL server URL where tests may create databases (default TEST_DATABASE_URL;"
        " without it an embedded server is started)",
    )


def start_embedded(root: Path) -> tuple[str, object]:
    """A throwaway embedded PostgreSQL in ``root``; returns its URL and handle."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(root / "pgdata", cleanup_mode="delete")  # type: ignore[attr-defined]
    uri: str = server.get_uri()
    return "postgresql+psycopg://" + uri.split("://", 1)[1], server


def _normalise(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class DatabaseFactory:
    """Creates and drops databases on one server."""

    def __init__(self, server_url: str) -> None:
        self.server_url = make_url(_normalise(server_url))
        self._admin = sa.create_engine(self.server_url, isolation_level="AUTOCOMMIT")
        self.created: list[str] = []

    def create(self) -> str:
        name = f"ketl_test_{os.getpid()}_{secrets.token_hex(3)}"
        with self._admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return self.server_url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self._admin.connect() as conn:
            for name in self.created:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._admin.dispose()


@pytest.fixture(scope="session")
def database_server(request: pytest.FixtureRequest) -> Iterator[DatabaseFactory]:
    url = request.config.getoption("--database-url")
    handle = None
    if not url:
        tmp = Path(tempfile.mkdtemp(prefix="ketl-pg-"))
        url, handle = start_embedded(tmp)
    factory = DatabaseFactory(url)
    yield factory
    factory.drop_all()
    if handle is not None:
        handle.cleanup()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def database_url(database_server: DatabaseFactory) -> str:
    """A fresh, migrated database for this session."""
    url = database_server.create()
    engine = sa.create_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = sa.create_engine(database_url, pool_size=8)
    yield engine
    engine.dispose()


def empty_tables(engine: Engine) -> None:
    """Empty every table of the schema."""
    names = ", ".join(t.name for t in metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY"))


@pytest.fixture
def db(engine: Engine) -> Engine:
    """The session's engine, with every table emptied before the test."""
    empty_tables(engine)
    return engine
