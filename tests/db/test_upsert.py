"""The guarded upsert: newest last_update_time wins, an equal one with new content replaces,
a stale one never does, an identical replay writes nothing at all."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from etl.db.upsert import Counts, insert_rejected, upsert_orders
from etl.kalshi.parse import Order, Rejected, parse_order
from tests.sync.helpers import ACCOUNT

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def order(
    order_id: str = "o1", *, updated: str | None = "2026-01-01T00:00:10Z", **fields: Any
) -> Order:
    payload = {
        "order_id": order_id,
        "ticker": "KX-M1",
        "status": "resting",
        "side": "yes",
        "action": "buy",
        "yes_price": 40,
        "fill_count": 0,
        "created_time": "2026-01-01T00:00:00Z",
        "last_update_time": updated,
        **fields,
    }
    parsed = parse_order(payload)
    assert isinstance(parsed, Order)
    return parsed


def write(engine, *orders: Order) -> Counts:
    with engine.begin() as conn:
        return upsert_orders(conn, list(orders), account=ACCOUNT, synced_at=T0)


def stored(engine, order_id: str = "o1") -> sa.Row[Any]:
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT status, fill_count, last_update_time, xmin::text AS xmin, raw "
                "FROM orders WHERE order_id = :id"
            ),
            {"id": order_id},
        ).one()


def test_a_new_order_is_inserted(db):
    assert write(db, order()) == Counts(fetched=1, inserted=1)
    assert stored(db).status == "resting"


def test_an_identical_replay_writes_nothing(db):
    write(db, order())
    before = stored(db).xmin
    assert write(db, order()) == Counts(fetched=1, unchanged=1)
    assert stored(db).xmin == before  # no new row version: no dead tuple


def test_a_newer_version_replaces_the_stored_one(db):
    write(db, order())
    counts = write(db, order(updated="2026-01-01T00:00:20Z", status="executed", fill_count=5))
    assert counts == Counts(fetched=1, updated=1)
    assert (stored(db).status, stored(db).fill_count) == ("executed", 5)


def test_a_stale_version_never_overwrites_a_newer_one(db):
    write(db, order(updated="2026-01-01T00:00:20Z", status="executed", fill_count=5))
    assert write(db, order(updated="2026-01-01T00:00:10Z")) == Counts(fetched=1, unchanged=1)
    assert stored(db).status == "executed"


def test_an_equal_timestamp_with_new_content_replaces(db):
    write(db, order())
    assert write(db, order(fill_count=2)) == Counts(fetched=1, updated=1)
    assert stored(db).fill_count == 2


def test_a_version_without_timestamp_never_overwrites_one_with_a_timestamp(db):
    write(db, order())
    assert write(db, order(updated=None, status="canceled")).unchanged == 1
    assert stored(db).status == "resting"


def test_the_newest_of_duplicates_in_one_batch_wins(db):
    counts = write(
        db,
        order(updated="2026-01-01T00:00:30Z", status="canceled"),
        order(updated="2026-01-01T00:00:10Z"),
        order("o2"),
    )
    assert counts == Counts(fetched=3, inserted=2, unchanged=1)
    assert stored(db).status == "canceled"


def test_first_synced_at_is_kept_and_synced_at_moves(db):
    write(db, order())
    with db.begin() as conn:
        upsert_orders(
            conn, [order(fill_count=1)], account=ACCOUNT, synced_at=datetime(2026, 2, 1, tzinfo=UTC)
        )
    with db.connect() as conn:
        first, last = conn.execute(sa.text("SELECT first_synced_at, synced_at FROM orders")).one()
    assert first == T0 and last == datetime(2026, 2, 1, tzinfo=UTC)


def test_unknown_fields_are_kept_in_raw(db):
    write(db, order(brand_new_field={"x": 1}))
    assert stored(db).raw["brand_new_field"] == {"x": 1}


def test_rejected_records_keep_payload_and_reason(db):
    with db.begin() as conn:
        insert_rejected(
            conn,
            [Rejected("status: unknown value", {"order_id": "x"}), Rejected("not JSON", "<html>")],
            stream="orders",
            account="acct",
            received_at=T0,
        )
    with db.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT stream, error, payload, payload_text FROM rejected_records ORDER BY id")
        ).all()
    assert rows[0] == ("orders", "status: unknown value", {"order_id": "x"}, None)
    assert rows[1] == ("orders", "not JSON", None, "<html>")


def test_a_write_is_rolled_back_with_its_transaction(db):
    try:
        with db.begin() as conn:
            upsert_orders(conn, [order()], account=ACCOUNT, synced_at=T0)
            raise RuntimeError("crash before commit")
    except RuntimeError:
        pass
    with db.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM orders")).scalar_one() == 0
