"""A run: the lifecycle of one ``sync_runs`` row, shared by every stream.

:func:`recorded_run` takes the stream's lock, opens the run, hands the body a :class:`Run`
(engine, account, run id, lock, clock, stop) and closes the run as ``succeeded`` or
``failed`` with the error's message. Every transaction a run writes in goes through
:meth:`Run.transaction`, which checks the lock is still held before it commits.

Closing a run also counts it in :mod:`etl.metrics` and logs one summary line whose fields
(``stream``, ``account``, ``run_id``, the counts, ``duration_ms``, ``error``) the JSON log
format carries as keys.

A run that fails because the database went away cannot record that: its outcome is kept in
:data:`UNRECORDED` and written by the next run of the process once the database answers. A
process that dies meanwhile leaves the run ``running``; the next run of the stream (any
process) closes it as interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.engine import Connection, Engine

from etl import metrics
from etl.db.engine import StreamLock, connection, lock_held, stream_lock, transaction
from etl.db.state import Mode, RunStatus, finish_run, last_start, start_run
from etl.db.upsert import Counts
from etl.errors import DatabaseError, StopRequested

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Run:
    """What each step of one run needs to write: where, for whom, under which lock."""

    engine: Engine
    account: str
    stream: str
    run_id: int
    lock: StreamLock
    clock: Clock = utcnow
    stop: threading.Event | None = None
    mode: Mode = "incremental"
    started: float = 0.0  # time.monotonic() when the run opened

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A transaction that commits only while this run still holds its lock."""
        with transaction(self.engine) as conn:
            yield conn
            self.lock.check(conn)

    def check_stop(self, what: str) -> None:
        """Raise :class:`StopRequested` when a stop was asked for."""
        if self.stop is not None and self.stop.is_set():
            raise StopRequested(what)


class Unrecorded:
    """Run outcomes that could not be written (the database was away), written later."""

    def __init__(self) -> None:
        self._pending: dict[int, tuple[RunStatus, str | None, datetime]] = {}
        self._lock = threading.Lock()

    def add(self, run_id: int, status: RunStatus, error: str | None) -> None:
        with self._lock:
            self._pending[run_id] = (status, error, utcnow())

    def __len__(self) -> int:
        return len(self._pending)

    def flush(self, engine: Engine) -> None:
        """Write the pending outcomes; keep them when the database is still away."""
        with self._lock:
            pending = dict(self._pending)
        if not pending:
            return
        try:
            with transaction(engine) as conn:
                for run_id, (status, error, at) in pending.items():
                    finish_run(conn, run_id, status, error=error, finished_at=at)
        except DatabaseError:
            return
        with self._lock:
            for run_id in pending:
                self._pending.pop(run_id, None)
        log.info("recorded the outcome of %d run(s) the database missed", len(pending))


UNRECORDED = Unrecorded()


RETRY_FAILED = timedelta(seconds=30)  # a failed run is tried again this soon (or its interval)


def is_due(
    engine: Engine, account: str, stream: str, every: timedelta, *, slack: timedelta
) -> bool:
    """Whether a scheduled run of (account, ``stream``) is due: no run of it started within
    ``every`` (less ``slack``) in any process sharing the database; after a failed run, within
    :data:`RETRY_FAILED` (an API or database not up yet at start must not leave a stream of a
    10-minute interval unready for 10 minutes); and at once after a run that died (still
    ``running``, its lock free), while one that is alive is left to finish. Replicas check
    this shared record before they run a job, so N daemons make about the API calls of one;
    a replica that died stops starting runs, and another finds the job due at once.

    A database that does not answer makes the job due: the run then fails and says so once.
    """
    try:
        with connection(engine) as conn:
            last = last_start(conn, account, stream)
            # A run still marked running whose lock no one holds died with its process (a
            # kill -9): due at once, so that the next run closes it and takes over.
            if last is not None and last.status == "running":
                return not lock_held(conn, account, stream)
    except DatabaseError:
        return True
    if last is None:
        return True
    wait = min(every, RETRY_FAILED) if last.status == "failed" else every
    return last.ago >= wait - slack


def describe(exc: BaseException) -> str:
    """The error text a failed run records."""
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return "interrupted"
    if isinstance(exc, StopRequested):
        return f"stopped on request: {exc}"
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def recorded_run(
    engine: Engine,
    account: str,
    stream: str,
    mode: Mode,
    *,
    lock_wait: float = 30.0,
    clock: Clock = utcnow,
    stop: threading.Event | None = None,
) -> Iterator[Run]:
    """Hold the lock of (account, ``stream``) and record one run of ``mode`` around the block.

    Raises:
        LockBusyError: another process holds the lock after ``lock_wait`` seconds.
        DatabaseError: the database cannot be reached.
    """
    with stream_lock(engine, account, stream, wait=lock_wait) as lock:
        UNRECORDED.flush(engine)
        with transaction(engine) as conn:
            run_id = start_run(conn, account, stream, mode)
        run = Run(
            engine,
            account,
            stream,
            run_id,
            lock,
            clock=clock,
            stop=stop,
            mode=mode,
            started=time.monotonic(),
        )
        metrics.run_started(account, stream)
        try:
            yield run
        except BaseException as exc:
            _close(run, "failed", describe(exc))
            raise
        _close(run, "succeeded", None)


def _close(run: Run, status: RunStatus, error: str | None) -> None:
    counts: Counts | None = None
    try:
        with transaction(run.engine) as conn:
            counts = finish_run(conn, run.run_id, status, error=error)
    except DatabaseError:
        log.warning(
            "run %d %s, but the database is away: recorded when it is back", run.run_id, status
        )
        UNRECORDED.add(run.run_id, status, error)
    duration = time.monotonic() - run.started
    rows = None if counts is None else asdict(counts)
    metrics.run_finished(
        run.account, run.stream, status=status, duration=duration, rows=rows, error=error
    )
    shown = (
        ""
        if counts is None
        else f": fetched {counts.fetched}, inserted {counts.inserted}, updated "
        f"{counts.updated}, unchanged {counts.unchanged}, rejected {counts.rejected}"
    )
    log.info(
        "%s %s run %d %s in %.0f ms%s",
        run.stream,
        run.mode,
        run.run_id,
        status,
        duration * 1000,
        shown,
        extra={
            "stream": run.stream,
            "account": run.account,
            "run_id": run.run_id,
            "mode": run.mode,
            "status": status,
            **(rows or {}),
            "duration_ms": round(duration * 1000),
            "error": error,
        },
    )
