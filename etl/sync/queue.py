"""Queue-position poll: fetch → parse → write changed snapshots → record the run.

The positions polled are those of the orders the table holds as open, asked per subaccount
(the API answers for subaccount 0 only unless told otherwise, so the subaccount is always
named when known), by market ticker in chunks. A snapshot row is written only when an order's
position is first seen or has changed, in the same transaction as the run's counts and the
stream's watermark (the poll time). Entries PostgreSQL would refuse are rejected, never allowed
to fail the poll forever.

Each poll also closes the series of every order that stopped being open: one row with a NULL
position, so that "where was I in the queue at time t" is right after fills and cancels. It
looks only at orders written since its previous run (with five minutes of margin for clocks
and slow commits), or at all of them the first time.

The poll time (``captured_at``) is the server's clock where it sends one (its ``Date`` header;
the local clock's finer reading when the two agree) and always later than the previous poll's,
so a local clock that steps back can neither re-insert rows nor reorder the series.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy.engine import Connection, Engine

from etl import metrics
from etl.db.engine import connection
from etl.db.state import add_to_run, open_orders, read_state, write_state
from etl.db.upsert import (
    Counts,
    close_snapshots,
    insert_rejected,
    insert_snapshots,
    refusal_safe,
    write_records,
)
from etl.kalshi.client import KalshiClient
from etl.kalshi.parse import QueuePosition, Rejected, parse_queue_position
from etl.sync.orders import SyncResult
from etl.sync.run import Clock, Run, recorded_run, utcnow

log = logging.getLogger(__name__)

STREAM = "queue_positions"
# How far before its previous run a poll looks for orders that closed: covers the clock
# difference between the process that synced the order and the one polling, and a page
# transaction that took its time stamp before the poll started but committed after it.
CLOSE_MARGIN = timedelta(minutes=5)
# Two clocks "agree" when the local one reads within this of the server's (whole-second) Date.
AGREE = timedelta(seconds=2)
TICK = timedelta(milliseconds=1)


def snapshot_time(server: datetime | None, local: datetime, previous: datetime | None) -> datetime:
    """When a poll's positions held: the server's clock (``Date``, whole seconds) or the
    local one's finer reading when it agrees with the server's; always after ``previous``."""
    at = local if server is None or server <= local < server + AGREE else server
    if previous is not None and at <= previous:
        at = previous + TICK
    return at.astimezone(UTC)


def poll_queue_positions(
    engine: Engine,
    client: KalshiClient,
    *,
    account: str,
    lock_wait: float = 30.0,
    clock: Clock = utcnow,
    stop: threading.Event | None = None,
) -> SyncResult:
    """One poll of the queue positions of every open order.

    Raises:
        LockBusyError: another poll of this account holds the lock.
        ApiError: the API failed after retries; the run is recorded as failed.
    """
    with recorded_run(
        engine, account, STREAM, "incremental", lock_wait=lock_wait, clock=clock, stop=stop
    ) as run:
        with connection(engine) as conn:
            held = open_orders(conn, account)
            previous = read_state(conn, account, STREAM)
        metrics.open_orders(account, len(held))
        by_subaccount: dict[int | None, set[str]] = defaultdict(set)
        for order in held:
            by_subaccount[order.subaccount_number].add(order.ticker)
        raw: list[object] = []
        server: datetime | None = None
        for subaccount, tickers in sorted(by_subaccount.items(), key=lambda kv: kv[0] or 0):
            answer = client.queue_positions(market_tickers=tickers, subaccount=subaccount)
            raw.extend(answer.items)
            server = server or answer.server_time
        parsed = [parse_queue_position(item) for item in raw]
        good = [p for p in parsed if isinstance(p, QueuePosition)]
        bad = [p for p in parsed if isinstance(p, Rejected)]
        captured_at = snapshot_time(
            server, run.clock().astimezone(UTC), previous.watermark if previous else None
        )
        closed_since = _closed_since(previous.state if previous else {})
        started = utcnow()
        counts = refusal_safe(
            lambda one_by_one: _write(
                run,
                good,
                bad,
                captured_at=captured_at,
                closed_since=closed_since,
                started=started,
                one_by_one=one_by_one,
            ),
            what="the poll",
        )
        log.debug("queue positions: %d polled for %d open orders", counts.fetched, len(held))
    metrics.watermark_moved(account, STREAM, captured_at)
    return SyncResult(run_id=run.run_id, counts=counts, watermark=captured_at)


def _closed_since(state: dict[str, object]) -> datetime | None:
    """Where to look for orders that closed: the previous run's start, less the margin."""
    raw = state.get("closed_through")
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw) - CLOSE_MARGIN
    except ValueError:
        return None


def _write(
    run: Run,
    good: Sequence[QueuePosition],
    bad: Sequence[Rejected],
    *,
    captured_at: datetime,
    closed_since: datetime | None,
    started: datetime,
    one_by_one: bool,
) -> Counts:
    with run.transaction() as conn:

        def write(c: Connection, batch: Sequence[QueuePosition]) -> Counts:
            return insert_snapshots(c, batch, account=run.account, captured_at=captured_at)

        written, refused = write_records(conn, good, write, one_by_one=one_by_one)
        insert_rejected(  # kept once; counted as met, on every run that meets it
            conn,
            [*bad, *refused],
            stream=STREAM,
            account=run.account,
            received_at=captured_at,
        )
        rejected = len(bad) + len(refused)
        closed = close_snapshots(
            conn, account=run.account, captured_at=captured_at, changed_since=closed_since
        )
        counts = Counts(
            fetched=len(good) + len(bad),
            inserted=written.inserted + closed,
            unchanged=written.unchanged,
            rejected=rejected,
        )
        add_to_run(conn, run.run_id, counts)
        write_state(
            conn,
            run.account,
            STREAM,
            watermark=captured_at,
            state={"closed_through": started.isoformat()},
        )
    return counts
