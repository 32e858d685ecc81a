"""Reading the synced tables back, to compare them with the simulator's truth."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.kalshi.client import KalshiClient
from etl.simulator import Exchange
from etl.sync.orders import SyncResult, backfill_orders

ACCOUNT = "acct"


def backfill_history(
    db: Engine, client: KalshiClient, exchange: Exchange, **options: Any
) -> SyncResult:
    """Backfill the exchange's whole history (70 days) in 7-day windows."""
    return backfill_orders(
        db,
        client,
        account=ACCOUNT,
        since=exchange.now - timedelta(days=70),
        until=exchange.now + timedelta(seconds=1),
        window=timedelta(days=7),
        **options,
    )


def stored_orders(engine: Engine, account: str | None = None) -> dict[str, dict[str, Any]]:
    """``orders`` (of ``account``, else all) as order id → raw payload."""
    with engine.connect() as conn:
        return {
            row.order_id: row.raw
            for row in conn.execute(
                sa.text(
                    "SELECT order_id, raw FROM orders "
                    "WHERE CAST(:account AS text) IS NULL OR account = :account"
                ),
                {"account": account},
            )
        }


def assert_table_equals_truth(
    engine: Engine, exchange: Exchange, account: str | None = None
) -> None:
    """``orders`` (the rows of ``account``, else all) equals the exchange's orders."""
    stored = stored_orders(engine, account)
    truth = exchange.truth()
    missing = truth.keys() - stored.keys()
    extra = stored.keys() - truth.keys()
    stale = [oid for oid in truth.keys() & stored.keys() if stored[oid] != truth[oid]]
    assert not missing and not extra and not stale, (
        f"{account or 'orders'}: {len(missing)} missing, {len(extra)} extra, {len(stale)} stale: "
        f"{sorted(missing)[:3]} {sorted(extra)[:3]} {stale[:3]}"
    )


def current_queue_positions(engine: Engine) -> dict[str, str | None]:
    """``queue_positions_current`` as order id → position (two decimals; None when closed)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT order_id, queue_position FROM queue_positions_current"))
        return {
            row.order_id: None if row.queue_position is None else f"{row.queue_position:.2f}"
            for row in rows
        }


def queue_truth(exchange: Exchange) -> dict[str, str]:
    """Each resting order of the exchange → its queue position (two decimals)."""
    return {i: f"{exchange.order(i).queue_position:.2f}" for i in exchange.resting_ids()}


def runs(engine: Engine) -> list[sa.Row[Any]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT * FROM sync_runs ORDER BY id")))


def count(engine: Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql)).scalar_one())
