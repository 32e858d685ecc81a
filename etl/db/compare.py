"""Compare a complete listing of the API with what ``orders`` holds: what ``verify`` reports.

The listing goes into two session-local tables as it is read (``COPY``, so memory stays flat
however large the account): the orders that parsed, and the records that did not. The
comparison is then a few set-based queries:

- **missing**: listed, not in ``orders``;
- **stale**: stored, but the listing's newest version would replace it by the merge's own
  rule (:func:`etl.db.upsert.replaces_sql`: later at the coarser precision, or as recent,
  different and not behind), or it is stored for another account name. A version the
  ``user_orders`` stream wrote (its payload is the message, not the REST record) is current
  when its time and every field the channel carries equal the listed version's. A repair
  writes exactly these versions, so it always converges;
- **extra**: stored for the account, not listed, and first written before the listing began
  (an order a running daemon wrote meanwhile is not counted);
- **unrecorded**: a listed record the parser rejects whose payload ``rejected_records`` lacks.

Everything here runs on the one connection the caller holds: the tables are temporary.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from etl.db.engine import driver_cursor
from etl.db.upsert import ORDER_COLUMNS, rejected_payload, replaces_sql, same_time_sql
from etl.kalshi.parse import STREAM_LACKS, Order, Rejected

_LISTED = "kalshi_etl_listed"
_LISTED_BAD = "kalshi_etl_listed_rejected"
_REPAIR = "kalshi_etl_listed_differing"
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)

# The fields a user_orders message carries, compared when the stored version came from it.
_CARRIED = [
    c for c in ORDER_COLUMNS if c not in (*STREAM_LACKS, "order_id", "last_update_time", "raw")
]
_LISTED_COLUMNS = ("order_id", "last_update_time", "raw", *_CARRIED)


@dataclass(frozen=True)
class Comparison:
    """What differs between the listing and the table, with a few order ids of each kind."""

    listed: int
    listed_rejected: int
    stored: int
    counts: dict[str, int]
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def equal(self) -> bool:
        return not any(self.counts.values())


def start_listing(conn: Connection) -> None:
    """Create (or empty) this session's listing tables."""
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE IF NOT EXISTS {_LISTED} AS "
        f"SELECT {', '.join(_LISTED_COLUMNS)} FROM orders WITH NO DATA"
    )
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE IF NOT EXISTS {_LISTED_BAD} "
        "(order_id text, error text NOT NULL, payload jsonb, payload_text text)"
    )
    conn.exec_driver_sql(f"TRUNCATE {_LISTED}, {_LISTED_BAD}")


def add_to_listing(
    conn: Connection, orders: Sequence[Order], rejected: Sequence[Rejected] = ()
) -> None:
    """Add one page of the listing: the orders that parsed and the records that did not."""
    if orders:
        with driver_cursor(conn) as cur:
            with cur.copy(f"COPY {_LISTED} ({', '.join(_LISTED_COLUMNS)}) FROM STDIN") as copy:
                for order in orders:
                    copy.write_row(
                        (
                            order.order_id,
                            order.last_update_time,
                            _JSON.encode(order.raw),
                            *(getattr(order, c) for c in _CARRIED),
                        )
                    )
    for item in rejected:
        order_id = item.raw.get("order_id") if isinstance(item.raw, dict) else None
        payload = rejected_payload(item.raw)
        conn.execute(
            sa.text(
                f"INSERT INTO {_LISTED_BAD} (order_id, error, payload, payload_text) "
                "VALUES (:order_id, :error, CAST(:payload AS jsonb), :payload_text)"
            ),
            {
                "order_id": order_id if isinstance(order_id, str) else None,
                "error": item.reason,
                "payload": None if payload["payload"] is None else _JSON.encode(payload["payload"]),
                "payload_text": payload["payload_text"],
            },
        )


# Each listed order's newest version: what a repair writes. At equal times, the one further
# along (an order listed twice while it changed within a second).
_NEWEST = f"""
    SELECT DISTINCT ON (order_id) * FROM {_LISTED}
    ORDER BY order_id, last_update_time DESC NULLS LAST, coalesce(fill_count_fp, 0) DESC,
             status IN ('executed', 'canceled') DESC
"""

# A listed record the parser rejected whose payload rejected_records does not hold.
_UNRECORDED = f"""
    FROM {_LISTED_BAD} b
    WHERE NOT EXISTS (
        SELECT 1 FROM rejected_records r
        WHERE r.stream = 'orders' AND (r.payload = b.payload OR r.payload_text = b.payload_text))
"""

_SAME_CARRIED = (
    f"({', '.join('l.' + c for c in _CARRIED)}) IS NOT DISTINCT FROM "
    f"({', '.join('o.' + c for c in _CARRIED)})"
)

_QUERIES = {
    "missing": f"""
        SELECT l.order_id FROM ({_NEWEST}) l
        WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = l.order_id)
    """,
    "stale": f"""
        SELECT l.order_id FROM ({_NEWEST}) l JOIN orders o ON o.order_id = l.order_id
        WHERE o.account <> :account
           OR ({replaces_sql("l", "o", stream=False)}
               AND NOT (o.raw ? 'created_ts_ms' AND {same_time_sql("l", "o")}
                        AND {_SAME_CARRIED}))
    """,
    "extra": f"""
        SELECT o.order_id FROM orders o
        WHERE o.account = :account AND o.first_synced_at < :started
          AND NOT EXISTS (SELECT 1 FROM {_LISTED} l WHERE l.order_id = o.order_id)
          AND NOT EXISTS (SELECT 1 FROM {_LISTED_BAD} b WHERE b.order_id = o.order_id)
    """,
    "unrecorded": f"""
        SELECT DISTINCT coalesce(b.order_id, left(coalesce(b.payload::text, b.payload_text), 60))
        {_UNRECORDED}
    """,
}


def counted_examples(
    conn: Connection, queries: dict[str, str], params: dict[str, Any], *, examples: int
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """For each kind of difference (a query of the differing keys): how many, and the first
    ``examples`` of them. One pass per kind: the window count sees every row before LIMIT
    keeps a few."""
    counts: dict[str, int] = {}
    found: dict[str, list[str]] = {}
    for kind, query in queries.items():
        rows = conn.execute(
            sa.text(f"SELECT q.*, count(*) OVER () FROM ({query}) q ORDER BY 1 LIMIT :n"),
            {**params, "n": max(examples, 1)},
        ).all()
        counts[kind] = int(rows[0][1]) if rows else 0
        found[kind] = [str(row[0]) for row in rows[:examples]]
    return counts, found


def compare(conn: Connection, *, account: str, started: datetime, examples: int) -> Comparison:
    """Compare the listing with the stored orders of ``account``; ``started`` is when the
    listing began."""
    params = {"account": account, "started": started}
    counts, found = counted_examples(conn, _QUERIES, params, examples=examples)
    listed = conn.execute(sa.text(f"SELECT count(DISTINCT order_id) FROM {_LISTED}")).scalar_one()
    bad = conn.execute(sa.text(f"SELECT count(*) FROM {_LISTED_BAD}")).scalar_one()
    stored = conn.execute(
        sa.text("SELECT count(*) FROM orders WHERE account = :account"), params
    ).scalar_one()
    return Comparison(listed, bad, stored, counts, found)


def listed_versions(
    conn: Connection, *, account: str, batch: int = 1000
) -> Iterator[list[dict[str, Any]]]:
    """The newest listed payload of every missing or stale order, ``batch`` at a time (in
    ``order_id`` order, so that memory stays bounded): what a repair writes.

    The differing ids are found once, into a temporary table, then read in keyset pages."""
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {_REPAIR}")
    conn.execute(
        sa.text(
            f"CREATE TEMP TABLE {_REPAIR} AS ({_QUERIES['missing']}) UNION ({_QUERIES['stale']})"
        ),
        {"account": account},
    )
    conn.exec_driver_sql(f"ALTER TABLE {_REPAIR} ADD PRIMARY KEY (order_id)")
    after = ""
    while True:
        rows = conn.execute(
            sa.text(
                f"""
                SELECT l.order_id, l.raw
                FROM {_REPAIR} w JOIN ({_NEWEST}) l ON l.order_id = w.order_id
                WHERE w.order_id > :after
                ORDER BY l.order_id
                LIMIT :batch
                """
            ),
            {"after": after, "batch": batch},
        ).all()
        if not rows:
            return
        yield [row.raw for row in rows]
        after = rows[-1].order_id


def unrecorded_rejects(conn: Connection) -> list[Rejected]:
    """The listed records the parser rejected that ``rejected_records`` lacks."""
    rows = conn.execute(sa.text(f"SELECT b.error, b.payload, b.payload_text {_UNRECORDED}")).all()
    return [
        Rejected(row.error, row.payload if row.payload is not None else row.payload_text)
        for row in rows
    ]


def end_listing(conn: Connection) -> None:
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {_LISTED}, {_LISTED_BAD}, {_REPAIR}")
