"""Sync any :class:`~etl.streams.Listing` (fills, settlements, positions, balance, cash): the
engine's pull for each partition, then the watermark, in one recorded run under the stream's
lock; and :func:`backfill_listing`, the same listings read in time windows.

One run:

1. the watermark to be is the server's ``user_data_timestamp`` taken *before* reading (the
   local clock where the server has none or is behind): never past what the server has seen;
2. the partitions: the whole listing, or (``per_subaccount``) one listing per subaccount,
   the subaccounts being {0} ∪ those ``/portfolio/subaccounts/balances`` lists ∪ those seen
   in the account's orders and fills;
3. each partition's live listing, with ``min_ts`` = watermark − lookback after the first run
   (``incremental`` streams); then, where the stream has a historical tier, that tier for the
   span the cutoff hides from the live one (all of it on the first run): read after the live
   pull, so that records moving between tiers meanwhile are found. The stream's companion
   listings (``also``) follow in the same partition. An endpoint of one object (balance) is a
   page of one record; snapshots are stamped with the run's start. A snapshot series that a
   complete listing (nothing rejected) no longer lists gets its closing row;
4. the watermark, once every listing has been read to its end.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection, Engine

from etl.db.engine import connection
from etl.db.state import (
    Scope,
    add_to_run,
    backfill_coverage,
    end_load,
    known_subaccounts,
    mark_window_done,
    read_state,
    start_load,
    write_state,
)
from etl.db.upsert import Counts, write_records
from etl.db.write import ChangeOnly, close_unlisted, write_rows
from etl.kalshi.client import KalshiClient, Page
from etl.kalshi.parse import Rejected
from etl.streams import Listing
from etl.sync import engine
from etl.sync.engine import Checkpoint, PageCallback, PageWriter, Sink
from etl.sync.orders import SyncResult
from etl.sync.partitions import (
    ProgressCallback,
    Tier,
    Window,
    first_load_plan,
    load_windows,
    logged_progress,
    plan_windows,
    width,
)
from etl.sync.run import Clock, Run, recorded_run, utcnow

log = logging.getLogger(__name__)


def parser(stream: Listing, *, subaccount: int | None = None) -> Callable[..., Any]:
    """``stream``'s parser, stamping ``subaccount`` where the stream is listed per
    subaccount (its records carry none)."""
    if stream.per_subaccount:
        return functools.partial(stream.parse, subaccount=subaccount)
    return stream.parse


def rows_of(stream: Listing, account: str, records: Sequence[Any]) -> list[dict[str, Any]]:
    """The table rows of parsed ``records`` of ``account``: their columns and the account."""
    return [{"account": account, **{c: getattr(r, c) for c in stream.columns}} for r in records]


def write_listed(
    conn: Connection,
    stream: Listing,
    account: str,
    records: Sequence[Any],
    *,
    synced_at: datetime,
    one_by_one: bool,
) -> tuple[Counts, list[Rejected]]:
    """Write parsed ``records`` of ``stream`` by its rule (REST pages and WebSocket messages
    alike), in the caller's transaction; returns the counts and what PostgreSQL refused."""
    return write_records(
        conn,
        records,
        lambda c, batch: write_rows(
            c, stream.rule, rows_of(stream, account, batch), synced_at=synced_at
        ),
        one_by_one=one_by_one,
    )


def listing_sink(
    stream: Listing, *, subaccount: int | None = None, captured_at: datetime | None = None
) -> Sink[Any]:
    """How the engine parses and writes ``stream``'s pages (of ``subaccount``, when the
    stream is listed per subaccount; snapshots stamped ``captured_at``, the poll's time)."""

    def write(
        conn: Connection, run: Run, good: Sequence[Any], one_by_one: bool
    ) -> tuple[Counts, list[Rejected]]:
        return write_listed(
            conn,
            stream,
            run.account,
            good,
            synced_at=captured_at or utcnow(),
            one_by_one=one_by_one,
        )

    def checkpoint(conn: Connection, run: Run, point: Checkpoint) -> None:
        if point.window is not None:
            mark_window_done(
                conn, run.account, *point.window, stream=stream.name, scope=point.scope
            )
        else:
            write_state(conn, run.account, stream.name, watermark=point.watermark)
            end_load(conn, run.account, stream.name)

    return Sink(
        stream=stream.name,
        noun=stream.noun,
        parse=parser(stream, subaccount=subaccount),
        write=write,
        checkpoint=checkpoint,
    )


def sync_listing(
    db: Engine,
    client: KalshiClient,
    stream: Listing,
    *,
    account: str,
    lookback: timedelta = timedelta(minutes=5),
    lock_wait: float = 30.0,
    clock: Clock = utcnow,
    stop: threading.Event | None = None,
) -> SyncResult:
    """One incremental run of ``stream`` for ``account`` (see the module docstring).

    Raises:
        LockBusyError: another process holds the stream's lock after ``lock_wait`` seconds.
        ApiError, DatabaseError: the run is recorded as failed first.
    """
    with recorded_run(
        db, account, stream.name, "incremental", lock_wait=lock_wait, clock=clock, stop=stop
    ) as run:
        with connection(db) as conn:
            state = read_state(conn, account, stream.name)
            subaccounts = known_subaccounts(conn, account) if stream.per_subaccount else set()
        now = clock()
        as_of = client.user_data_timestamp()
        watermark = now if as_of is None else min(as_of, now)
        since: datetime | None = None
        if stream.incremental and state is not None and state.watermark is not None:
            since = state.watermark - lookback
        min_ts = None if since is None else int(since.timestamp())
        if since is None and windowed(stream):
            with run.transaction() as tx:
                watermark, spans = start_load(tx, account, stream.name, watermark)
            log.info("first sync of %s of account %s: loading every record", stream.name, account)
            counts = _load(
                run,
                client,
                stream,
                first_load_plan(now),
                spans,
                scope="load",
                concurrency=lambda: width(client),
                on_progress=logged_progress(f"first load of {stream.name}", run),
            )
        else:
            partitions = _partitions(client, stream, subaccounts)
            counts = _read(
                run, client, stream, partitions, since=since, min_ts=min_ts, captured_at=now
            )
        engine.write_parsed(
            run, listing_sink(stream), [], [], checkpoint=Checkpoint(watermark=watermark)
        )
    return SyncResult(run_id=run.run_id, counts=counts, watermark=watermark)


def backfill_listing(
    db: Engine,
    client: KalshiClient,
    stream: Listing,
    *,
    account: str,
    since: datetime,
    until: datetime,
    window: timedelta = timedelta(days=1),
    concurrency: int | None = None,
    lock_wait: float = 30.0,
    on_progress: ProgressCallback | None = None,
    clock: Clock = utcnow,
    stop: threading.Event | None = None,
) -> SyncResult:
    """Load every record of ``stream`` with a time in [since, until), both tiers, in windows
    (:mod:`etl.sync.partitions`; ``concurrency`` at once, by default as many as keep the key's
    budget busy), under the stream's lock. The stream's watermark is left alone.

    Raises:
        LockBusyError: another run of this account's ``stream`` holds the lock.
        ApiError: a window failed after retries; completed windows stay done.
    """
    if not windowed(stream):
        raise ValueError(f"{stream.name} cannot be read in time windows")
    with recorded_run(
        db, account, stream.name, "backfill", lock_wait=lock_wait, clock=clock, stop=stop
    ) as run:
        with connection(db) as conn:
            spans = backfill_coverage(conn, account, stream.name)
        total = _load(
            run,
            client,
            stream,
            plan_windows(since, until, window),
            spans,
            scope="backfill",
            concurrency=concurrency or (lambda: width(client)),
            on_progress=on_progress,
        )
    return SyncResult(run_id=run.run_id, counts=total, watermark=None)


def windowed(stream: Listing) -> bool:
    """Whether ``stream`` can be read in time windows: a listing by time of the whole
    account (fills), not of one object or one subaccount at a time, nor of snapshots."""
    return (
        stream.incremental
        and stream.items_key is not None
        and not stream.per_subaccount
        and not stream.also
        and not isinstance(stream.rule, ChangeOnly)
    )


def _load(
    run: Run,
    client: KalshiClient,
    stream: Listing,
    plan: Sequence[Window],
    spans: Sequence[tuple[int, int]],
    *,
    scope: Scope,
    concurrency: int | Callable[[], int],
    on_progress: ProgressCallback | None,
) -> Counts:
    """Load ``plan``'s windows that ``spans`` leave, several at once
    (:func:`etl.sync.partitions.load_windows`), each window's live listing then its historical
    tier; each window recorded done in ``scope`` once read to its end."""
    sink = listing_sink(stream)
    listings = window_listings(client, stream)

    def tiers(win: Window, writer: PageWriter) -> list[Tier]:
        def tier(path: str, noun: str) -> Tier:
            def take(pages: Iterable[Page]) -> Counts:
                label = f"{noun} {win.label}"
                return engine.pull(
                    run, sink, pages, checkpoint=None, label=label, writer=writer, progress=False
                )

            return Tier(lambda: window_pages(client, stream, path, win), take)

        return [tier(path, noun) for path, noun in listings(win)]

    return load_windows(
        run,
        plan,
        spans,
        tiers,
        sink=sink,
        scope=scope,
        concurrency=concurrency,
        on_progress=on_progress,
    )


# How long before a cutoff a window must end for its live listing to be skipped: clocks
# differ, and a server's max_ts may include its second.
_CUTOFF_MARGIN = timedelta(minutes=1)


def window_listings(
    client: KalshiClient, stream: Listing
) -> Callable[[Window], list[tuple[str, str]]]:
    """Which of ``stream``'s listings a window is read from, live first, as (path, noun): the
    historical tier where the server has one; the live listing unless the window ends before
    the cutoff behind which records are served only by the historical tier (fills created
    before ``trades_created_ts``: a cutoff only moves forward, so they never come back). An
    old account's windows then cost one call less each."""
    cutoff = client.historical_cutoff() if stream.historical_path is not None else None
    hidden_before = None
    if cutoff is not None and stream.cutoff_field is not None:
        hidden_before = cutoff.of(stream.cutoff_field)

    def listings(win: Window) -> list[tuple[str, str]]:
        found = []
        if hidden_before is None or win.end is None or win.end > hidden_before - _CUTOFF_MARGIN:
            found.append((stream.path, stream.noun))
        if cutoff is not None and stream.historical_path is not None:
            found.append((stream.historical_path, f"historical {stream.noun}"))
        return found

    return listings


def window_pages(client: KalshiClient, stream: Listing, path: str, win: Window) -> Iterator[Page]:
    """The pages of ``stream``'s listing at ``path`` (a tier) within ``win``."""
    assert stream.items_key is not None
    return client.iter_pages(
        path, stream.items_key, min_ts=win.min_ts, max_ts=win.max_ts, **dict(stream.filters)
    )


def _partitions(client: KalshiClient, stream: Listing, subaccounts: set[int]) -> list[int | None]:
    """The listings a run of ``stream`` reads: the whole listing, or one per subaccount."""
    if stream.per_subaccount:
        return [*sorted(subaccounts | client.subaccount_numbers())]
    return [None]


def _read(
    run: Run,
    client: KalshiClient,
    stream: Listing,
    partitions: Sequence[int | None],
    *,
    since: datetime | None,
    min_ts: int | None,
    max_ts: int | None = None,
    label: str = "",
    on_page: PageCallback | None = None,
    captured_at: datetime | None = None,
) -> Counts:
    """For each partition, each of the stream's listings (its live listing, then its
    historical tier where the span reaches it); a snapshot series no longer listed in a
    complete listing is closed."""
    counts = Counts()
    for subaccount in partitions:
        for listing in stream.listings:
            counts += _read_listing(
                run,
                client,
                listing,
                subaccount,
                since=since,
                filters={"min_ts": min_ts, "max_ts": max_ts, "subaccount": subaccount},
                label=label,
                on_page=on_page,
                captured_at=captured_at,
            )
    return counts


def _read_listing(
    run: Run,
    client: KalshiClient,
    listing: Listing,
    subaccount: int | None,
    *,
    since: datetime | None,
    filters: dict[str, Any],
    label: str,
    on_page: PageCallback | None,
    captured_at: datetime | None,
) -> Counts:
    sink = listing_sink(listing, subaccount=subaccount, captured_at=captured_at)
    of = "" if subaccount is None else f" of subaccount {subaccount}"
    sent = {**filters, **dict(listing.filters)}
    rule = listing.rule
    listed: list[tuple[Any, ...]] = []
    closing = isinstance(rule, ChangeOnly) and rule.closed is not None
    free = [c for c in rule.key if c not in ("account", "subaccount_number", "captured_at")]

    def seen(records: list[Any]) -> None:
        listed.extend(tuple(getattr(r, c) for c in free) for r in records)

    if listing.items_key is None:
        pages = client.iter_object(listing.path, subaccount=subaccount)
    else:
        pages = client.iter_pages(listing.path, listing.items_key, **sent)
    counts = engine.pull(
        run,
        sink,
        pages,
        checkpoint=None,
        label=f"{listing.noun}{of}{label}",
        on_page=on_page,
        on_records=seen if closing else None,
    )
    if listing.items_key is not None and _reaches_history(client, listing, since=since):
        assert listing.historical_path is not None
        counts += engine.pull(
            run,
            sink,
            client.iter_pages(listing.historical_path, listing.items_key, **sent),
            checkpoint=None,
            label=f"historical {listing.noun}{of}{label}",
            on_page=on_page,
        )
    # The listing was read to its end (a stop or an error raised above): what it did not list
    # is closed, unless a record of it could not be parsed (its series is unknown).
    if closing and client.serves(listing.path) and counts.rejected == 0:
        assert isinstance(rule, ChangeOnly)
        where: dict[str, Any] = {"account": run.account}
        if subaccount is not None:
            where["subaccount_number"] = subaccount
        with run.transaction() as tx:
            closed = close_unlisted(tx, rule, where, listed, captured_at=captured_at or run.clock())
            add_to_run(tx, run.run_id, Counts(inserted=closed))
        counts += Counts(inserted=closed)
    return counts


def _reaches_history(client: KalshiClient, stream: Listing, *, since: datetime | None) -> bool:
    """Whether a read from ``since`` (the beginning, when ``None``) needs ``stream``'s
    historical tier: it has one, and the span reaches behind the cutoff."""
    if stream.historical_path is None:
        return False
    cutoff = client.historical_cutoff()
    if cutoff is None:
        return False
    hidden_before = cutoff.of(stream.cutoff_field) if stream.cutoff_field else None
    return since is None or hidden_before is None or since < hidden_before
