"""The write rules of the account's streams over real PostgreSQL: a fill is written once (a
replay writes nothing, REST's version replaces the stream's), the newest settlement wins."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from etl.db.models import fills, settlements
from etl.db.write import InsertOnce, NewestWins, write_rows
from etl.kalshi.parse import (
    FILL_COLUMNS,
    SETTLEMENT_COLUMNS,
    Fill,
    Settlement,
    parse_fill,
    parse_settlement,
)

T0 = datetime(2026, 12, 1, tzinfo=UTC)
FILLS = InsertOnce(fills, ("fill_id",), stream_marker="ts_ms")
SETTLEMENTS = NewestWins(settlements, ("account", "subaccount_number", "ticker"), "settled_time")


def fill(**fields: Any) -> dict[str, Any]:
    payload = {
        "fill_id": "f1",
        "trade_id": "f1",
        "order_id": "o1",
        "ticker": "KX-M1",
        "outcome_side": "yes",
        "book_side": "bid",
        "count_fp": "3.00",
        "yes_price_dollars": "0.4100",
        "is_taker": True,
        "fee_cost": "0.0300",
        "created_time": "2026-12-01T00:00:01.250Z",
        **fields,
    }
    parsed = parse_fill(payload)
    assert isinstance(parsed, Fill), parsed
    return {"account": "acct", **{c: getattr(parsed, c) for c in FILL_COLUMNS}}


def streamed_fill() -> dict[str, Any]:
    message = {
        "trade_id": "f1",
        "order_id": "o1",
        "market_ticker": "KX-M1",
        "outcome_side": "yes",
        "book_side": "bid",
        "count_fp": "3.00",
        "yes_price_dollars": "0.4100",
        "is_taker": True,
        "fee_cost": "0.0300",
        "ts_ms": 1764547201250,
    }
    parsed = parse_fill(message)
    assert isinstance(parsed, Fill), parsed
    return {"account": "acct", **{c: getattr(parsed, c) for c in FILL_COLUMNS}}


def settlement(settled: str, revenue: int) -> dict[str, Any]:
    payload = {
        "ticker": "KX-M1",
        "event_ticker": "KX",
        "market_result": "scalar",
        "yes_count_fp": "10.00",
        "yes_total_cost_dollars": "4.100000",
        "no_count_fp": "0.00",
        "no_total_cost_dollars": "0.000000",
        "revenue": revenue,
        "value": 50,
        "fee_cost": "0.070000",
        "settled_time": settled,
    }
    parsed = parse_settlement(payload, subaccount=2)
    assert isinstance(parsed, Settlement), parsed
    return {"account": "acct", **{c: getattr(parsed, c) for c in SETTLEMENT_COLUMNS}}


def write(db, rule, *rows: dict[str, Any], claim: bool = False):
    with db.begin() as conn:
        return write_rows(conn, rule, list(rows), synced_at=T0, claim=claim)


def stored_fill(db) -> sa.Row[Any]:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT raw, xmin::text AS xmin FROM fills")).one()


def test_a_fill_is_written_once_and_a_replay_writes_nothing(db):
    assert write(db, FILLS, fill()).inserted == 1
    before = stored_fill(db)
    counts = write(db, FILLS, fill(), fill())
    assert (counts.inserted, counts.updated, counts.unchanged) == (0, 0, 2)
    assert stored_fill(db).xmin == before.xmin  # not even rewritten


def test_a_rest_fill_replaces_the_version_only_the_stream_sent_and_not_the_reverse(db):
    write(db, FILLS, streamed_fill())
    assert "ts_ms" in stored_fill(db).raw
    assert write(db, FILLS, fill()).updated == 1
    assert "ts_ms" not in stored_fill(db).raw
    assert write(db, FILLS, streamed_fill()).unchanged == 1


def test_a_repair_writes_the_apis_version_of_a_fill(db):
    write(db, FILLS, fill(fee_cost="0.0400"))
    assert write(db, FILLS, fill(), claim=True).updated == 1
    with db.connect() as conn:
        assert str(conn.execute(sa.text("SELECT fee_cost FROM fills")).scalar_one()) == "0.030000"


def test_the_newest_settlement_wins(db):
    write(db, SETTLEMENTS, settlement("2026-12-01T10:00:00Z", 500))
    assert write(db, SETTLEMENTS, settlement("2026-12-01T09:00:00Z", 100)).unchanged == 1
    assert write(db, SETTLEMENTS, settlement("2026-12-01T11:00:00Z", 700)).updated == 1
    assert write(db, SETTLEMENTS, settlement("2026-12-01T11:00:00Z", 700)).unchanged == 1
    with db.connect() as conn:
        row = conn.execute(sa.text("SELECT revenue, subaccount_number FROM settlements")).one()
    assert tuple(row) == (700, 2)
