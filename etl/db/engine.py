"""Which database, and how to talk to it: URL resolution, the Engine, the per-stream lock.

``DATABASE_URL`` wins; without it an embedded PostgreSQL (package ``pgserver``) is started
under ``KALSHI_ETL_HOME/pgdata`` and reused by later commands. Connection failures become a
one-line :class:`~etl.errors.DatabaseError` with the password masked. :func:`stream_lock`
serialises runs per (account, stream) with a PostgreSQL advisory lock held on its own
connection, so a killed process releases it with its connection.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

from etl.errors import ConfigError, DatabaseError, LockBusyError

log = logging.getLogger(__name__)

_LOCK_NAMESPACE = 0x4B455431  # "KET1": keeps our advisory locks apart from other apps'

_embedded: dict[Path, Any] = {}


def mask(url: str | URL) -> str:
    """The URL with its password hidden, safe for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparseable URL: show only its scheme
        return str(url).split(":", 1)[0] + "://…"


def embedded_url(home: Path) -> str:
    """Start (or join) the embedded PostgreSQL under ``home/pgdata``; return its URL.

    Raises:
        ConfigError: when ``pgserver`` is not installed or the server cannot start.
    """
    pgdata = (home / "pgdata").expanduser().resolve()
    if pgdata not in _embedded:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pgserver

                pgdata.parent.mkdir(parents=True, exist_ok=True)
                log.info("starting the embedded PostgreSQL in %s", pgdata)
                _embedded[pgdata] = pgserver.get_server(  # type: ignore[attr-defined]
                    pgdata, cleanup_mode="stop"
                )
        except ImportError:
            raise ConfigError(
                "DATABASE_URL is not set and the embedded PostgreSQL is not installed: "
                "set DATABASE_URL=postgresql://user:pass@host/db or pip install "
                "'kalshi-etl[embedded]'"
            ) from None
        except Exception as exc:
            raise ConfigError(
                f"DATABASE_URL is not set and the embedded PostgreSQL in {pgdata} did not "
                f"start ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "set DATABASE_URL or KALSHI_ETL_HOME"
            ) from exc
    uri: str = _embedded[pgdata].get_uri()
    return "postgresql+psycopg://" + uri.split("://", 1)[1]


def create_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An Engine for ``url`` whose connectivity has been checked.

    Raises:
        DatabaseError: naming the masked URL and the reason when it cannot connect.
    """
    try:
        engine = sa.create_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            connect_args={"connect_timeout": 10, "application_name": "kalshi-etl"},
        )
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise DatabaseError(f"DATABASE_URL {mask(url)} is not usable: {exc}") from None
    check(engine)
    return engine


def check(engine: Engine) -> None:
    """Open and close one connection; a failure is a one-line :class:`DatabaseError`."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "connection failed"
        raise DatabaseError(
            f"cannot connect to the database at {mask(engine.url)}: {reason} "
            "(check DATABASE_URL and that the server is running)"
        ) from None
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise DatabaseError(f"database at {mask(engine.url)} refused: {reason}") from None


def lock_key(account: str, stream: str) -> int:
    """A stable 32-bit key for (account, stream)."""
    return zlib.crc32(f"{account}\x00{stream}".encode()) - 2**31


@contextlib.contextmanager
def stream_lock(
    engine: Engine, account: str, stream: str, *, wait: float = 30.0, poll: float = 0.25
) -> Iterator[None]:
    """Hold the advisory lock of (account, stream) for the duration of the block.

    Waits up to ``wait`` seconds for another holder to finish.

    Raises:
        LockBusyError: when the lock is still held by another session after ``wait``.
    """
    key = lock_key(account, stream)
    # A connection of its own outside the pool, so the lock lives exactly as long as the block.
    lock_engine = sa.create_engine(engine.url, poolclass=NullPool)
    try:
        with lock_engine.connect() as conn:
            _acquire(conn, key, account=account, stream=stream, wait=wait, poll=poll)
            try:
                yield
            finally:
                with contextlib.suppress(sa.exc.DBAPIError):
                    conn.execute(
                        sa.text("SELECT pg_advisory_unlock(:ns, :key)"),
                        {"ns": _LOCK_NAMESPACE, "key": key},
                    )
                    conn.commit()
    finally:
        lock_engine.dispose()


def _acquire(
    conn: sa.Connection, key: int, *, account: str, stream: str, wait: float, poll: float
) -> None:
    deadline = time.monotonic() + wait
    announced = False
    while not conn.execute(
        sa.text("SELECT pg_try_advisory_lock(:ns, :key)"), {"ns": _LOCK_NAMESPACE, "key": key}
    ).scalar_one():
        conn.commit()
        if time.monotonic() >= deadline:
            raise LockBusyError(
                f"another kalshi-etl run holds the {stream} lock for account {account} "
                f"(waited {wait:.0f}s); let it finish or stop it"
            )
        if not announced:
            log.info("waiting for another run of %s/%s to finish", account, stream)
            announced = True
        time.sleep(poll)
    conn.commit()
