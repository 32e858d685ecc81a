"""The engine of every listing stream: pages → parse → write → state, one transaction a page.

A stream hands the engine a :class:`Sink`: how one record parses (pure), how a batch of parsed
records is written (its write rule, inside the engine's transaction), and how a completed
listing's :class:`Checkpoint` is recorded. The engine does the rest, the same for every
stream:

- :func:`prefetched` reads pages ahead on a thread, so the API's latency overlaps the write of
  the page before;
- :class:`PageWriter` writes pages on threads of their own, each in its own transaction on its
  own connection (pages may commit out of order: each is whole by itself);
- each page's transaction holds its records, its rejected records (kept once per stream,
  counted as met) and the run's counts; a page PostgreSQL refuses on its data is written
  again record by record (:func:`~etl.db.upsert.refusal_safe`), so only the refused records
  are set aside;
- the checkpoint (a watermark, or a backfill window done) is written in one more transaction
  once the listing has been read to its end: the API's sort order is unknown, so a half-read
  listing justifies nothing. A kill at any instant loses nothing, and a rerun converges;
- a body that is not JSON is kept in ``rejected_records`` before the run fails with the API's
  error (:func:`keep_unparseable_body`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy.engine import Connection

from etl.db.state import Scope, add_to_run
from etl.db.upsert import Counts, insert_rejected, refusal_safe
from etl.errors import ApiProtocolError
from etl.kalshi.client import Page
from etl.kalshi.parse import Rejected
from etl.sync.run import Run

log = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True)
class Checkpoint:
    """What a completed pull writes to ``sync_state``: the incremental watermark, or a
    backfill window ``[start, end)`` in Unix seconds."""

    watermark: datetime | None = None
    window: tuple[int, int] | None = None
    scope: Scope = "backfill"  # whose window: a backfill's, or a first load's


# (connection, run, records, one_by_one) → (what the write did, records PostgreSQL refused)
Write = Callable[[Connection, Run, Sequence[R], bool], tuple[Counts, list[Rejected]]]


@dataclass(frozen=True)
class Sink(Generic[R]):
    """How one stream's pages are parsed and written.

    Attributes:
        stream: the stream's name (``rejected_records.stream``, logs).
        noun: what its records are called in logs ("orders", "fills").
        parse: one item of a page → a record or a :class:`Rejected` (pure), called as
            ``parse(item, screened=...)``: ``screened`` says the page's body was cleared of
            anything ``jsonb`` cannot hold.
        write: writes a batch of parsed records in the caller's transaction (the stream's
            write rule); ``one_by_one`` asks for each record in a savepoint of its own, the
            refused ones returned.
        checkpoint: records a completed listing's checkpoint in the caller's transaction.
    """

    stream: str
    noun: str
    parse: Callable[..., R | Rejected]
    write: Write[R]
    checkpoint: Callable[[Connection, Run, Checkpoint], None]


class Progress:
    """Logs a pull's progress at most every ``every`` seconds: counts and rate."""

    def __init__(self, label: str, *, noun: str = "records", every: float = 5.0) -> None:
        self.label = label
        self.noun = noun
        self.every = every
        self.started = time.monotonic()
        self._last = self.started
        self.fetched = 0

    def add(self, fetched: int) -> None:
        self.fetched += fetched
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            rate = self.fetched / max(now - self.started, 1e-9)
            log.info("%s: %d %s so far (%.0f/s)", self.label, self.fetched, self.noun, rate)


_END = object()


def prefetched(pages: Iterable[Page], *, depth: int = 1) -> Generator[Page, None, None]:
    """Fetch up to ``depth`` pages ahead on a thread, so the API's latency overlaps the
    database write of the page before. Errors surface at the page where they happened; a
    page fetched but not yet written is simply fetched again by the next run."""
    handoff: queue.Queue[object] = queue.Queue(maxsize=depth)
    closed = threading.Event()

    def put(item: object) -> bool:
        while not closed.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for page in pages:
                if not put(page):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    threading.Thread(target=produce, name="page-prefetch", daemon=True).start()
    try:
        while True:
            item = handoff.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Page)
            yield item
    finally:
        closed.set()


def parse_page(
    sink: Sink[R], items: Sequence[Any], *, screened: bool = False
) -> tuple[list[R], list[Rejected]]:
    """The records of a page that parse, and the ones that do not (logged)."""
    parse = sink.parse
    parsed = [parse(item, screened=screened) for item in items]
    good: list[R] = [p for p in parsed if not isinstance(p, Rejected)]
    bad = [p for p in parsed if isinstance(p, Rejected)]
    for rejected in bad:
        log.warning("rejected %s record: %s", _article(sink.noun), rejected.reason)
    return good, bad


def _article(noun: str) -> str:
    """ "orders" → "an order" (the log line of a rejected record)."""
    single = noun.removesuffix("s")
    return ("an " if single[:1] in "aeiou" else "a ") + single


def write_parsed(
    run: Run,
    sink: Sink[R],
    good: Sequence[R],
    bad: Sequence[Rejected],
    *,
    checkpoint: Checkpoint | None = None,
) -> Counts:
    """Write a parsed page in one transaction: its records by the sink's rule, its rejected
    records, the run's counts and, when given, the checkpoint. A page PostgreSQL refuses on
    its data is written again record by record."""
    return refusal_safe(
        lambda one_by_one: _write(run, sink, good, bad, checkpoint, one_by_one=one_by_one),
        what="a page",
    )


def _write(
    run: Run,
    sink: Sink[R],
    good: Sequence[R],
    bad: Sequence[Rejected],
    checkpoint: Checkpoint | None,
    *,
    one_by_one: bool,
) -> Counts:
    now = run.clock()
    with run.transaction() as conn:
        if checkpoint is None:
            # A page alone need not wait for its WAL to reach the disk. WAL is replayed as a
            # prefix, so a page lost to a PostgreSQL crash takes every later commit with it,
            # the checkpoint that would have covered it included; and the run's own end (and
            # a checkpoint's) commits synchronously, which flushes every page before it.
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        written, refused = sink.write(conn, run, good, one_by_one)
        # Counted as met (a record the API keeps serving is rejected on every run), kept once.
        insert_rejected(
            conn, [*bad, *refused], stream=sink.stream, account=run.account, received_at=now
        )
        counts = Counts(
            fetched=len(good) + len(bad),
            inserted=written.inserted,
            updated=written.updated,
            unchanged=written.unchanged,
            rejected=len(bad) + len(refused),
        )
        add_to_run(conn, run.run_id, counts)
        if checkpoint is not None:
            sink.checkpoint(conn, run, checkpoint)
    return counts


class PageWriter:
    """Writes parsed pages on threads of their own, each page in its own transaction on its
    own connection, so that a page's database work overlaps the parsing (and fetching) of the
    next and PostgreSQL writes ``depth`` pages at once. One writer may serve several listings
    read at once (a partitioned read): :meth:`submit` is thread-safe and waits while ``depth``
    writes are in flight, which bounds the pages held in memory whatever the number of
    listings. Pages may commit out of order: each is whole by itself and the stream's write
    rule holds whatever the order; a listing's checkpoint is written only once its own
    pages are committed (:meth:`Pages.wait`).
    """

    def __init__(self, run: Run, *, depth: int = 2) -> None:
        self.run = run
        self._slots = threading.BoundedSemaphore(depth)
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="page-writer")

    def submit(self, sink: Sink[R], good: list[R], bad: list[Rejected]) -> Future[Counts]:
        self._slots.acquire()
        try:
            future = self._pool.submit(write_parsed, self.run, sink, good, bad)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> PageWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Pages:
    """The writes of one listing's pages on a (maybe shared) :class:`PageWriter`: their
    counts, and the first error, raised at the next submit or at :meth:`wait`."""

    def __init__(self, writer: PageWriter, sink: Sink[R]) -> None:
        self.writer = writer
        self.sink = sink
        self.counts = Counts()
        self._pending: deque[Future[Counts]] = deque()

    def submit(self, good: list[Any], bad: list[Rejected]) -> None:
        while self._pending and self._pending[0].done():
            self.counts += self._pending.popleft().result()
        self._pending.append(self.writer.submit(self.sink, good, bad))

    def wait(self) -> None:
        """Wait for every write in flight (committed, or the first error raised here; the
        others still end before this returns)."""
        try:
            while self._pending:
                self.counts += self._pending.popleft().result()
        finally:
            for other in self._pending:
                with contextlib.suppress(Exception):
                    other.result()
            self._pending.clear()


def keep_unparseable_body(run: Run, stream: str, exc: ApiProtocolError) -> None:
    """A page whose body was not JSON: keep the body (escaped) in ``rejected_records`` before
    the run fails with the API error; failing to keep it never hides that error."""
    if exc.body is None:
        return
    try:
        with run.transaction() as conn:
            insert_rejected(
                conn,
                [Rejected(str(exc), exc.body)],
                stream=stream,
                account=run.account,
                received_at=run.clock(),
            )
    except Exception as keep_error:  # the API error is what the run reports
        log.warning("could not keep the unparseable body: %s", keep_error)


PageCallback = Callable[[int], None]


def pull(
    run: Run,
    sink: Sink[R],
    pages: Iterable[Page],
    *,
    checkpoint: Checkpoint | None,
    label: str,
    on_page: PageCallback | None = None,
    on_records: Callable[[list[R]], None] | None = None,
    writer: PageWriter | None = None,
    progress: bool = True,
) -> Counts:
    """Write every page of one listing, each in its own transaction; once the listing has
    been read to its end, write ``checkpoint``. ``on_records`` sees each page's parsed
    records (what a stream collects on the way, e.g. the open orders listed). ``writer``:
    the run's shared page writer (a partitioned read), else one of the pull's own;
    ``progress``: log this listing's progress (a partitioned read logs its own).

    Raises:
        StopRequested: a stop was asked for; the pages in flight were committed first.
    """
    shown = Progress(label, noun=sink.noun, every=5.0 if progress else float("inf"))
    iterator = prefetched(pages)
    own = writer is None
    written = Pages(writer or PageWriter(run), sink)
    try:
        try:
            for page in iterator:
                good, bad = parse_page(sink, page.items, screened=page.screened)
                written.submit(good, bad)
                if on_records is not None:
                    on_records(good)
                shown.add(len(page.items))
                if on_page is not None:
                    on_page(len(page.items))
                run.check_stop(f"stopped during {label}; the pages read so far are committed")
        finally:
            try:
                written.wait()  # the pages in flight are committed (or an error raised) first
            finally:
                if own:
                    written.writer.close()
    except ApiProtocolError as exc:
        keep_unparseable_body(run, sink.stream, exc)
        raise
    finally:
        iterator.close()  # stops the prefetch thread at once, whatever ended the pull
    counts = written.counts
    if checkpoint is not None:
        write_parsed(run, sink, [], [], checkpoint=checkpoint)
    return counts
