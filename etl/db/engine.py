"""Which database, and how to talk to it: URL resolution, the Engine, the per-stream lock.

``DATABASE_URL`` wins; without it an embedded PostgreSQL (package ``pgserver``) is started
under ``KALSHI_ETL_HOME/pgdata`` and reused by later commands. Connection failures become a
one-line :class:`~etl.errors.DatabaseError` with the password masked, at connect time and
later (:func:`transaction`, :func:`connection`: an outage mid-run is one line, not a traceback).
:func:`stream_lock` serialises runs per (account, stream) with a PostgreSQL advisory lock held on
its own connection, so a killed process releases it with its connection; its lease is checked
inside every transaction that writes (:meth:`StreamLock.check`), so a lock lost with its
connection stops the holder before its next commit instead of letting two writers overlap.
Every connection has a connect timeout and TCP keepalives, so a dead peer is noticed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

from etl.errors import ConfigError, DatabaseError, DatabaseUnavailable, LockBusyError, LockLostError

log = logging.getLogger(__name__)

_LOCK_NAMESPACE = 0x4B455431  # "KET1": keeps our advisory locks apart from other apps'

_embedded: dict[Path, Any] = {}

# libpq options for every connection: give up connecting after 10 s, notice a dead peer within
# about a minute (keepalives), and never let one statement run for more than 10 minutes.
CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 10,
    "application_name": "kalshi-etl",
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "options": "-c statement_timeout=600000",
}


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
            connect_args=CONNECT_ARGS,
        )
    except (sa.exc.ArgumentError, ImportError, ValueError) as exc:
        raise DatabaseError(f"DATABASE_URL {mask(url)} is not usable: {exc}") from None
    check(engine)
    return engine


def check(engine: Engine) -> None:
    """Open and close one connection; a failure is a one-line :class:`DatabaseError`."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database at {mask(engine.url)}: {_first_line(exc)} "
            "(check DATABASE_URL and that the server is running)"
        ) from None
    except sa.exc.DBAPIError as exc:
        raise DatabaseError(f"database at {mask(engine.url)} refused: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


# Failures of the connection or the server, as opposed to a statement the data made fail.
_OUTAGES = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)


def _lost(engine: Engine, exc: BaseException) -> DatabaseError:
    orig = getattr(exc, "orig", None) or exc
    state = getattr(orig, "sqlstate", None)
    # No SQLSTATE, class 08 (connection) or 57P (shutdown): the server or the link went away.
    gone = state is None or state.startswith(("08", "57P"))
    what = "lost the database" if gone else "the database failed"
    return DatabaseError(f"{what} at {mask(engine.url)}: {_first_line(exc)}")


@contextlib.contextmanager
def transaction(engine: Engine) -> Iterator[sa.Connection]:
    """``engine.begin()``, with a lost connection or a server gone away raised as a one-line
    :class:`DatabaseError` (data errors pass through: they are the caller's to handle)."""
    try:
        with engine.begin() as conn:
            yield conn
    except _OUTAGES as exc:
        raise _lost(engine, exc) from exc


@contextlib.contextmanager
def connection(engine: Engine) -> Iterator[sa.Connection]:
    """``engine.connect()`` for reads, with outages translated as :func:`transaction` does."""
    try:
        with engine.connect() as conn:
            yield conn
    except _OUTAGES as exc:
        raise _lost(engine, exc) from exc


def driver_cursor(conn: sa.Connection) -> psycopg.Cursor[Any]:
    """A psycopg cursor on ``conn``'s own driver connection, inside its transaction: for what
    SQLAlchemy does not offer, such as ``COPY``."""
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    return driver.cursor()


def lock_key(account: str, stream: str) -> int:
    """A stable 32-bit key for (account, stream)."""
    return zlib.crc32(f"{account}\x00{stream}".encode()) - 2**31


# Whether the advisory lock (ns, key) is granted: to session ``pid``, or to any (NULL).
_HELD = sa.text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
    "AND classid = CAST(:ns AS int4)::oid AND objid = CAST(:key AS int4)::oid "
    "AND objsubid = 2 AND granted AND (CAST(:pid AS int4) IS NULL OR pid = :pid))"
)


@dataclass(frozen=True)
class StreamLock:
    """The advisory lock of one (account, stream), held by the session ``pid``."""

    account: str
    stream: str
    key: int
    pid: int

    def check(self, conn: sa.Connection) -> None:
        """Raise :class:`LockLostError` unless the lock is still held by its session; call it
        in each transaction that writes, before its commit."""
        held = conn.execute(
            _HELD, {"ns": _LOCK_NAMESPACE, "key": self.key, "pid": self.pid}
        ).scalar_one()
        if not held:
            raise LockLostError(
                f"the {self.stream} lock of account {self.account} was lost (its database "
                "session ended); stopping before writing anything more"
            )


def lock_held(conn: sa.Connection, account: str, stream: str) -> bool:
    """Whether any session holds the lock of (account, stream) now: a run recorded as
    ``running`` whose lock no one holds died with its process."""
    held = conn.execute(
        _HELD, {"ns": _LOCK_NAMESPACE, "key": lock_key(account, stream), "pid": None}
    ).scalar_one()
    return bool(held)


@contextlib.contextmanager
def stream_lock(
    engine: Engine, account: str, stream: str, *, wait: float = 30.0, poll: float = 0.25
) -> Iterator[StreamLock]:
    """Hold the advisory lock of (account, stream) for the duration of the block.

    Waits up to ``wait`` seconds for another holder to finish.

    Raises:
        LockBusyError: when the lock is still held by another session after ``wait``.
        DatabaseError: when the database cannot be reached.
    """
    key = lock_key(account, stream)
    # A connection of its own outside the pool, so the lock lives exactly as long as the block.
    lock_engine = sa.create_engine(engine.url, poolclass=NullPool, connect_args=CONNECT_ARGS)
    try:
        with connection(lock_engine) as conn:
            _acquire(conn, key, account=account, stream=stream, wait=wait, poll=poll)
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            conn.commit()
            try:
                yield StreamLock(account=account, stream=stream, key=key, pid=int(pid))
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
            holder = _holder(conn, account, stream)
            raise LockBusyError(
                f"another kalshi-etl run{holder} holds the {stream} lock for account "
                f"{account} (waited {wait:.0f}s); let it finish or stop it"
            )
        if not announced:
            log.info("waiting for another run of %s/%s to finish", account, stream)
            announced = True
        time.sleep(poll)
    conn.commit()


def _holder(conn: sa.Connection, account: str, stream: str) -> str:
    """`` (backfill #12, started 10:00:00)``: the live run holding a lock, when recorded."""
    row = conn.execute(
        sa.text(
            "SELECT id, mode, started_at FROM sync_runs WHERE account = :account "
            "AND stream = :stream AND status = 'running' ORDER BY id DESC LIMIT 1"
        ),
        {"account": account, "stream": stream},
    ).first()
    conn.commit()
    if row is None:
        return ""
    return f" ({row.mode} #{row.id}, started {row.started_at:%Y-%m-%d %H:%M:%S %Z})"


def psql_executable() -> str:
    """The ``psql`` to open the database with: the embedded PostgreSQL's own, else the one on
    PATH.

    Raises:
        ConfigError: when there is none.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgserver._commands import POSTGRES_BIN_PATH
        bundled = Path(POSTGRES_BIN_PATH) / "psql"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("psql")
    if found is None:
        raise ConfigError(
            "no psql found: install the PostgreSQL client (e.g. apt install postgresql-client) "
            "or pip install 'kalshi-etl[embedded]', which bundles one"
        )
    return found


def libpq_url(url: str | URL) -> str:
    """The URL in the form psql and other libpq tools take (no ``+psycopg``)."""
    text = make_url(url).render_as_string(hide_password=False)
    return text.replace("postgresql+psycopg://", "postgresql://", 1)


def libpq_target(url: str | URL) -> tuple[str, dict[str, str]]:
    """The URL for a libpq tool's command line, without its password, and the environment
    that carries the password instead (``PGPASSWORD``): a process's arguments are readable by
    every user of the machine (``/proc/PID/cmdline``), its environment only by its owner."""
    parsed = make_url(url)
    password = parsed.password
    bare = libpq_url(parsed._replace(password=None))
    return bare, ({} if password is None else {"PGPASSWORD": str(password)})
