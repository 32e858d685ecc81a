"""Set-based writes of parsed records. Never commits: the caller owns the transaction.

Orders go through ``COPY`` into a session-local staging table, then one guarded
``INSERT … SELECT … ON CONFLICT (order_id) DO UPDATE … WHERE``: a stored order is replaced only
by a newer ``last_update_time``, or an equal one with different content, so a replay writes
nothing (no dead tuples). Rejected payloads are inserted into ``rejected_records``.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from etl.db.models import rejected_records
from etl.kalshi.parse import Order, QueuePosition, Rejected

ORDER_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Order))
_STAGE = "kalshi_etl_orders_stage"
_UPDATABLE = [c for c in ORDER_COLUMNS if c != "order_id"]
_EPOCH = datetime.min.replace(tzinfo=UTC)

_MERGE_SQL = f"""
WITH merged AS (
    INSERT INTO orders AS o ({", ".join(ORDER_COLUMNS)}, first_synced_at, synced_at)
    SELECT {", ".join(ORDER_COLUMNS)}, %(at)s, %(at)s FROM {_STAGE}
    ON CONFLICT (order_id) DO UPDATE SET
        {", ".join(f"{c} = EXCLUDED.{c}" for c in _UPDATABLE)},
        synced_at = EXCLUDED.synced_at
    WHERE EXCLUDED.last_update_time > o.last_update_time
       OR (o.last_update_time IS NULL AND EXCLUDED.last_update_time IS NOT NULL)
       OR (EXCLUDED.last_update_time IS NOT DISTINCT FROM o.last_update_time
           AND EXCLUDED.raw IS DISTINCT FROM o.raw)
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM merged
"""


@dataclass(frozen=True)
class Counts:
    """What a write did: rows fetched, inserted, updated, left unchanged, rejected."""

    fetched: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Counts)))


def newest_per_order(records: Iterable[Order]) -> list[Order]:
    """One record per ``order_id``: the newest ``last_update_time`` (the later one on a tie).

    PostgreSQL refuses an ``ON CONFLICT`` statement that touches the same key twice.
    """
    newest: dict[str, Order] = {}
    for order in records:
        held = newest.get(order.order_id)
        if held is None or (order.last_update_time or _EPOCH) >= (held.last_update_time or _EPOCH):
            newest[order.order_id] = order
    return list(newest.values())


_COLUMNS_BUT_RAW = operator.attrgetter(*ORDER_COLUMNS[:-1])
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _row(order: Order) -> tuple[Any, ...]:
    """The COPY row of an order: its columns in ORDER_COLUMNS order, ``raw`` as JSON text."""
    return (*_COLUMNS_BUT_RAW(order), _JSON.encode(order.raw))


def upsert_orders(conn: Connection, records: Sequence[Order], *, synced_at: datetime) -> Counts:
    """Write ``records`` into ``orders``, newest version wins; return what happened.

    ``fetched`` counts every record given (duplicates included); ``unchanged`` is what the
    guard left alone, duplicates within the batch included.
    """
    if not records:
        return Counts()
    batch = newest_per_order(records)
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    with driver.cursor() as cur:
        cur.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} "
            f"(LIKE orders INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        cur.execute(f"TRUNCATE {_STAGE}")
        with cur.copy(f"COPY {_STAGE} ({', '.join(ORDER_COLUMNS)}) FROM STDIN") as copy:
            for order in batch:
                copy.write_row(_row(order))
        cur.execute(_MERGE_SQL, {"at": synced_at})
        row = cur.fetchone()
    assert row is not None
    inserted, updated = int(row[0]), int(row[1])
    return Counts(
        fetched=len(records),
        inserted=inserted,
        updated=updated,
        unchanged=len(records) - inserted - updated,
    )


def insert_rejected(
    conn: Connection,
    rejected: Sequence[Rejected],
    *,
    stream: str,
    account: str | None,
    received_at: datetime,
) -> int:
    """Keep rejected payloads with their reasons; return how many."""
    if not rejected:
        return 0
    conn.execute(
        sa.insert(rejected_records),
        [
            {
                "account": account,
                "stream": stream,
                "received_at": received_at,
                "error": item.reason,
                "payload": item.raw if not isinstance(item.raw, str) else None,
                "payload_text": item.raw if isinstance(item.raw, str) else None,
            }
            for item in rejected
        ],
    )
    return len(rejected)


_SNAPSHOT_SQL = sa.text(
    """
    INSERT INTO queue_position_snapshots (order_id, market_ticker, queue_position, captured_at)
    SELECT n.order_id, n.market_ticker, n.queue_position, :captured_at
    FROM unnest(CAST(:order_ids AS text[]), CAST(:tickers AS text[]),
                CAST(:positions AS numeric[])) AS n(order_id, market_ticker, queue_position)
    LEFT JOIN LATERAL (
        SELECT s.queue_position FROM queue_position_snapshots s
        WHERE s.order_id = n.order_id ORDER BY s.captured_at DESC LIMIT 1
    ) AS latest ON true
    WHERE latest.queue_position IS DISTINCT FROM n.queue_position
    ON CONFLICT DO NOTHING
    """
)


def insert_snapshots(
    conn: Connection, positions: Sequence[QueuePosition], *, captured_at: datetime
) -> Counts:
    """Write a snapshot for each position first seen or different from its latest row."""
    if not positions:
        return Counts()
    latest = {p.order_id: p for p in positions}
    result = conn.execute(
        _SNAPSHOT_SQL,
        {
            "captured_at": captured_at,
            "order_ids": list(latest),
            "tickers": [p.market_ticker for p in latest.values()],
            "positions": [p.queue_position for p in latest.values()],
        },
    )
    inserted = result.rowcount
    return Counts(fetched=len(positions), inserted=inserted, unchanged=len(positions) - inserted)
