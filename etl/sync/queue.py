"""Queue-position poll: fetch → parse → write changed snapshots → record the run.

The positions polled are those of the orders the table holds as open, asked per subaccount
(the API answers for subaccount 0 only unless told otherwise, so the subaccount is always
named when known), by market ticker in chunks. A snapshot row is written only when an order's
position is first seen or has changed, in the same transaction as the run's counts and the
stream's watermark (the poll time). Entries PostgreSQL would refuse are rejected, never allowed
to fail the poll forever.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy.engine import Connection, Engine

from etl.db.engine import connection
from etl.db.state import add_to_run, open_orders, write_state
from etl.db.upsert import (
    Counts,
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
            held = open_orders(conn)
        by_subaccount: dict[int | None, set[str]] = defaultdict(set)
        for order in held:
            by_subaccount[order.subaccount_number].add(order.ticker)
        raw: list[object] = []
        for subaccount, tickers in sorted(by_subaccount.items(), key=lambda kv: kv[0] or 0):
            raw.extend(client.queue_positions(market_tickers=tickers, subaccount=subaccount))
        parsed = [parse_queue_position(item) for item in raw]
        good = [p for p in parsed if isinstance(p, QueuePosition)]
        bad = [p for p in parsed if isinstance(p, Rejected)]
        captured_at = run.clock().astimezone(UTC)
        counts = refusal_safe(
            lambda one_by_one: _write(
                run, good, bad, captured_at=captured_at, one_by_one=one_by_one
            ),
            what="the poll",
        )
    log.info(
        "queue positions run %d: %d polled for %d open orders, %d changed, %d rejected",
        run.run_id,
        counts.fetched,
        len(held),
        counts.inserted,
        counts.rejected,
    )
    return SyncResult(run_id=run.run_id, counts=counts, watermark=captured_at)


def _write(
    run: Run,
    good: Sequence[QueuePosition],
    bad: Sequence[Rejected],
    *,
    captured_at: datetime,
    one_by_one: bool,
) -> Counts:
    with run.transaction() as conn:

        def write(c: Connection, batch: Sequence[QueuePosition]) -> Counts:
            return insert_snapshots(c, batch, captured_at=captured_at)

        written, refused = write_records(conn, good, write, one_by_one=one_by_one)
        rejected = insert_rejected(
            conn,
            [*bad, *refused],
            stream=STREAM,
            account=run.account,
            received_at=captured_at,
        )
        counts = Counts(
            fetched=len(good) + len(bad),
            inserted=written.inserted,
            unchanged=written.unchanged,
            rejected=rejected,
        )
        add_to_run(conn, run.run_id, counts)
        write_state(conn, run.account, STREAM, watermark=captured_at)
    return counts
