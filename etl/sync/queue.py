"""Queue-position poll: fetch → parse → write changed snapshots → record the run.

The positions polled are those of the orders the table holds as open, asked per subaccount
(the API answers for subaccount 0 only unless told otherwise), by market ticker in chunks.
A snapshot row is written only when an order's position is first seen or has changed, in the
same transaction as the run's counts and the stream's watermark (the poll time).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import UTC

from sqlalchemy.engine import Engine

from etl.db.engine import stream_lock
from etl.db.state import add_to_run, finish_run, open_orders, start_run, write_state
from etl.db.upsert import Counts, insert_rejected, insert_snapshots
from etl.kalshi.client import KalshiClient
from etl.kalshi.parse import QueuePosition, Rejected, parse_queue_position
from etl.sync.orders import Clock, SyncResult, utcnow

log = logging.getLogger(__name__)

STREAM = "queue_positions"


def poll_queue_positions(
    engine: Engine,
    client: KalshiClient,
    *,
    account: str,
    lock_wait: float = 30.0,
    clock: Clock = utcnow,
) -> SyncResult:
    """One poll of the queue positions of every open order.

    Raises:
        LockBusyError: another poll of this account holds the lock.
        ApiError: the API failed after retries; the run is recorded as failed.
    """
    with stream_lock(engine, account, STREAM, wait=lock_wait):
        with engine.begin() as conn:
            run_id = start_run(conn, account, STREAM, "incremental")
            held = open_orders(conn)
        try:
            by_subaccount: dict[int, set[str]] = defaultdict(set)
            for order in held:
                by_subaccount[order.subaccount_number or 0].add(order.ticker)
            raw: list[object] = []
            for subaccount, tickers in sorted(by_subaccount.items()):
                raw.extend(
                    client.queue_positions(
                        market_tickers=tickers, subaccount=subaccount if subaccount else None
                    )
                )
            parsed = [parse_queue_position(item) for item in raw]
            good = [p for p in parsed if isinstance(p, QueuePosition)]
            bad = [p for p in parsed if isinstance(p, Rejected)]
            captured_at = clock().astimezone(UTC)
            with engine.begin() as conn:
                counts = insert_snapshots(conn, good, captured_at=captured_at)
                rejected = insert_rejected(
                    conn, bad, stream=STREAM, account=account, received_at=captured_at
                )
                counts = counts + Counts(fetched=rejected, rejected=rejected)
                add_to_run(conn, run_id, counts)
                write_state(conn, account, STREAM, watermark=captured_at)
                finish_run(conn, run_id, "succeeded")
        except BaseException as exc:
            with engine.begin() as conn:
                message = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
                finish_run(conn, run_id, "failed", error=message or type(exc).__name__)
            raise
    log.info(
        "queue positions run %d: %d polled for %d open orders, %d changed, %d rejected",
        run_id,
        counts.fetched,
        len(held),
        counts.inserted,
        counts.rejected,
    )
    return SyncResult(run_id=run_id, counts=counts, watermark=captured_at)
