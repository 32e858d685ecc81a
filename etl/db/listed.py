"""Compare a complete listing of a stream (fills, settlements…) with its table: what ``verify``
reports for the streams beyond orders.

The listing goes into a session-local table as it is read (the record's key as text, its
payload), so memory stays flat however long the listing; the comparison is then a few
set-based queries on the caller's one connection:

- **missing**: listed, not stored;
- **stale**: stored with another payload than the listed one (a version only the WebSocket
  sent, say), or under another account name;
- **extra**: stored for the account, not listed, and first written before the listing began;
  never for a stream whose API forgets records (settlements: an archived settlement is
  kept, not extra).

And the cross-check of fills against their orders: an order executed or canceled, last
changed before ``settled_before``, whose fills' ``count_fp`` do not add up to its
``fill_count_fp`` is missing fills; one whose fills' ``fee_cost`` differ from its taker +
maker fees by more than $0.01 is reported apart (rebates and rounding are per order).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from etl.db.compare import counted_examples
from etl.db.upsert import json_text

_LISTED = "kalshi_etl_listed_rows"


@dataclass(frozen=True)
class RowComparison:
    """What differs between one stream's listing and its table, with a few keys of each."""

    stream: str
    listed: int
    stored: int
    counts: dict[str, int]
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def equal(self) -> bool:
        return not any(self.counts.values())


def _key_sql(table: sa.Table, key: Sequence[str], alias: str) -> str:
    """The text key of a stored row: its key columns but ``account``, joined by ``/``."""
    parts = [f"CAST({alias}.{c} AS text)" for c in key if c != "account"]
    return parts[0] if len(parts) == 1 else "concat_ws('/', " + ", ".join(parts) + ")"


def record_key(record: Any, key: Sequence[str]) -> str:
    """The text key of a parsed record (as :func:`_key_sql` makes it of a row)."""
    return "/".join(str(getattr(record, c)) for c in key if c != "account")


def start(conn: Connection) -> None:
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE IF NOT EXISTS {_LISTED} (key text NOT NULL, raw jsonb NOT NULL)"
    )
    conn.exec_driver_sql(f"TRUNCATE {_LISTED}")


def add(conn: Connection, keyed: Sequence[tuple[str, Any]]) -> None:
    """Add (key, payload) pairs of one page."""
    if keyed:
        conn.execute(
            sa.text(
                f"INSERT INTO {_LISTED} (key, raw) SELECT k, CAST(r AS jsonb) "
                "FROM unnest(CAST(:keys AS text[]), CAST(:raws AS text[])) AS u(k, r)"
            ),
            {"keys": [k for k, _ in keyed], "raws": [json_text(raw) for _, raw in keyed]},
        )


def compare(
    conn: Connection,
    table: sa.Table,
    key: Sequence[str],
    *,
    stream: str,
    account: str,
    started: datetime,
    examples: int,
    extras: bool = True,
) -> RowComparison:
    """Compare the listing with ``table``'s rows of ``account``."""
    k = _key_sql(table, key, "t")
    # The stored row of a listed key: this account's, or, where the key is global (a fill's
    # id), whichever account holds it (then it is stale: stored under another name).
    stored_row = f"{k} = l.key AND (t.account = :account OR {_shared_key(key)})"
    queries = {
        "missing": f"""
            SELECT DISTINCT l.key FROM {_LISTED} l
            WHERE NOT EXISTS (SELECT 1 FROM {table.name} t WHERE {stored_row})
        """,
        "stale": f"""
            SELECT DISTINCT l.key FROM {_LISTED} l JOIN {table.name} t ON {stored_row}
            WHERE t.account <> :account
               OR NOT EXISTS (SELECT 1 FROM {_LISTED} v WHERE v.key = l.key AND v.raw = t.raw)
        """,
        "extra": f"""
            SELECT {k} FROM {table.name} t
            WHERE t.account = :account AND t.first_synced_at < :started
              AND NOT EXISTS (SELECT 1 FROM {_LISTED} l WHERE l.key = {k})
        """,
    }
    if not extras:
        del queries["extra"]
    counts, found = counted_examples(
        conn, queries, {"account": account, "started": started}, examples=examples
    )
    counts.setdefault("extra", 0)
    found.setdefault("extra", [])
    listed = conn.execute(sa.text(f"SELECT count(DISTINCT key) FROM {_LISTED}")).scalar_one()
    stored = conn.execute(
        sa.select(sa.func.count()).select_from(table).where(table.c.account == account)
    ).scalar_one()
    return RowComparison(stream, int(listed), int(stored), counts, found)


def _shared_key(key: Sequence[str]) -> str:
    """Whether the table's key is global (a fill's id), so that a row of another account name
    with the listed key is this account's record stored under the wrong name."""
    return "false" if "account" in key else "true"


def differing(
    conn: Connection, table: sa.Table, key: Sequence[str], *, account: str, batch: int = 1000
) -> Iterator[list[tuple[str, Any]]]:
    """The listed (key, payload) of every missing or stale record, ``batch`` at a time."""
    k = _key_sql(table, key, "t")
    after = ""
    while True:
        rows = conn.execute(
            sa.text(
                f"""
                SELECT DISTINCT ON (l.key) l.key, l.raw FROM {_LISTED} l
                WHERE l.key > :after AND NOT EXISTS (
                    SELECT 1 FROM {table.name} t
                    WHERE {k} = l.key AND t.account = :account AND t.raw = l.raw)
                ORDER BY l.key LIMIT :batch
                """
            ),
            {"after": after, "account": account, "batch": batch},
        ).all()
        if not rows:
            return
        yield [(row.key, row.raw) for row in rows]
        after = rows[-1].key


def end(conn: Connection) -> None:
    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {_LISTED}")


@dataclass(frozen=True)
class FillCheck:
    """Orders whose fills do not add up: in count (missing fills), in fees (reported)."""

    missing_fills: int
    fee_differences: int
    examples: list[str]
    fee_examples: list[str]


def check_fills_against_orders(
    conn: Connection, *, account: str, settled_before: datetime, examples: int
) -> FillCheck:
    """Σ ``count_fp`` of each closed order's fills against its ``fill_count_fp``, and Σ
    ``fee_cost`` against its taker + maker fees (more than $0.01 apart), for the orders of
    ``account`` executed or canceled and last changed before ``settled_before``."""
    rows = conn.execute(
        sa.text(
            """
            SELECT o.order_id,
                   coalesce(f.n, 0) <> coalesce(o.fill_count_fp, 0) AS short,
                   abs(coalesce(f.fees, 0) - coalesce(o.taker_fees_dollars, 0)
                       - coalesce(o.maker_fees_dollars, 0)) > 0.01 AS fees_off
            FROM orders o
            LEFT JOIN (SELECT order_id, sum(count_fp) AS n, sum(fee_cost) AS fees
                       FROM fills WHERE account = :account GROUP BY order_id) f
              ON f.order_id = o.order_id
            WHERE o.account = :account AND o.status IN ('executed', 'canceled')
              AND o.last_update_time < :before
              AND (coalesce(f.n, 0) <> coalesce(o.fill_count_fp, 0)
                   OR abs(coalesce(f.fees, 0) - coalesce(o.taker_fees_dollars, 0)
                          - coalesce(o.maker_fees_dollars, 0)) > 0.01)
            ORDER BY o.order_id
            """
        ),
        {"account": account, "before": settled_before},
    ).all()
    short = [r.order_id for r in rows if r.short]
    fees = [r.order_id for r in rows if r.fees_off]
    return FillCheck(len(short), len(fees), short[:examples], fees[:examples])
