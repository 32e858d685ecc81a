"""The guarded upsert: newest last_update_time wins, an equal one with new content replaces,
a stale one never does, an identical replay writes nothing at all."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from etl.db.upsert import (
    ORDER_COLUMNS,
    Counts,
    copy_new_orders,
    insert_rejected,
    upsert_orders,
)
from etl.kalshi.parse import Order, Rejected, parse_order, parse_user_order
from etl.simulator import Exchange
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


# -- versions from the user_orders stream ------------------------------------------------------


def message(*, updated_ms: int | None, fill: str = "0.00", **fields: Any) -> Order:
    payload = {
        "order_id": "o1",
        "ticker": "KX-M1",
        "status": "resting",
        "outcome_side": "yes",
        "book_side": "bid",
        "yes_price_dollars": "0.4000",
        "fill_count_fp": fill,
        "created_ts_ms": int(T0.timestamp() * 1000),
        **({"last_updated_ts_ms": updated_ms} if updated_ms is not None else {}),
        **fields,
    }
    parsed = parse_user_order(payload)
    assert isinstance(parsed, Order)
    return parsed


def write_streamed(engine, *orders: Order) -> Counts:
    with engine.begin() as conn:
        return upsert_orders(conn, list(orders), account=ACCOUNT, synced_at=T0, from_stream=True)


S10 = int(T0.timestamp() * 1000) + 10_000  # 00:00:10, the REST version's time


def test_a_stream_version_never_overwrites_a_newer_rest_version(db):
    write(db, order(fill_count=2))
    assert write_streamed(db, message(updated_ms=S10 - 1, fill="1.00")).unchanged == 1
    assert stored(db).fill_count == 2


def test_a_newer_stream_version_replaces_rest_and_keeps_what_the_channel_lacks(db):
    write(db, order(type="limit", cancel_order_on_pause=True))
    assert write_streamed(db, message(updated_ms=S10 + 1, fill="1.00")).updated == 1
    with db.connect() as conn:
        row = conn.execute(
            sa.text("SELECT fill_count_fp, type, side, action, cancel_order_on_pause FROM orders")
        ).one()
    assert (str(row.fill_count_fp), row.type, row.side, row.action) == (
        "1.00",
        "limit",
        "yes",
        "buy",
    )
    assert row.cancel_order_on_pause is True


def test_at_equal_times_the_rest_version_is_kept_and_replaces_a_stream_version(db):
    write(db, order())
    assert write_streamed(db, message(updated_ms=S10)).unchanged == 1  # REST stays
    assert "created_ts_ms" not in stored(db).raw

    with db.begin() as conn:
        conn.execute(sa.text("TRUNCATE orders"))
    write_streamed(db, message(updated_ms=S10))
    assert write(db, order()).updated == 1  # the REST version, with every field, wins the tie
    assert "created_ts_ms" not in stored(db).raw
    assert write(db, order()).unchanged == 1


def test_two_stream_versions_at_the_same_millisecond_take_the_later_content(db):
    write_streamed(db, message(updated_ms=S10, fill="1.00"))
    assert write_streamed(db, message(updated_ms=S10, fill="2.00")).updated == 1
    assert write_streamed(db, message(updated_ms=S10, fill="2.00")).unchanged == 1


def test_a_stream_version_without_an_update_time_only_fills_a_gap(db):
    assert write_streamed(db, message(updated_ms=None)).inserted == 1
    assert write(db, order()).updated == 1
    assert write_streamed(db, message(updated_ms=None, fill="5.00")).unchanged == 1


def test_writers_touching_the_same_orders_in_opposite_orders_never_deadlock(db):
    """The stream's micro-batches and REST pages overlap: rows are locked in one order."""
    ids = [f"o{i:03d}" for i in range(150)]
    failures: list[BaseException] = []

    def writer(order_ids: list[str], second: int) -> None:
        try:
            for round_ in range(25):
                stamp = f"2026-01-01T00:{round_:02d}:{second:02d}Z"
                batch = [order(i, updated=stamp) for i in order_ids]
                with db.begin() as conn:
                    upsert_orders(conn, batch, account=ACCOUNT, synced_at=T0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [
        threading.Thread(target=writer, args=(ids, 1)),
        threading.Thread(target=writer, args=(ids[::-1], 2)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]


def test_the_parsers_copy_lines_and_the_typed_values_store_the_same_rows(db):
    """The parser hands COPY each order as a line of text (Order.line) made of the payload's
    own decimal and time strings; the table must hold exactly what the typed values would."""
    exchange = Exchange(seed=4, orders=150, api="2025", now=T0, events_per_second=0)
    payloads = [o.render("2025") for o in exchange] + [o.render("2026") for o in exchange]
    payloads += [
        {**payloads[0], "order_id": f"time-{n}", "created_time": text}
        for n, text in enumerate(
            [
                "2026-01-01T10:00:00",  # naive: UTC
                "2026-01-01T10:00:00.5Z",
                "2026-01-01T10:00:00.123456Z",
                "2026-01-01T10:00:00.1234567Z",  # Python truncates the seventh decimal
                "2026-01-01T10:00:00.9999995Z",  # where PostgreSQL would round it up
                "2026-01-01T10:00:00+05:30",
                "2026-01-01T10:00:00.25-00:00",
                "2026-01-01 10:00:00Z",
                "20260101T100000Z",
            ]
        )
    ]
    payloads += [
        {**payloads[-1], "order_id": f"id-{n}", "client_order_id": text}
        for n, text in enumerate(['"quoted"', "back\\slash", "tab\tand\nline", "é ☃ 𝄞"])
    ]
    for n, payload in enumerate(payloads):
        payload["order_id"] = f"{n}-{payload['order_id']}"
    orders = [o for o in map(parse_order, payloads) if isinstance(o, Order)]
    assert len(orders) == len(payloads)
    assert sum(o.line is None for o in orders) == 2  # the backslash and the tab: row by row

    def stored_rows() -> list[tuple[Any, ...]]:
        with db.connect() as conn:
            columns = ", ".join(ORDER_COLUMNS)
            return list(conn.execute(sa.text(f"SELECT {columns} FROM orders ORDER BY order_id")))

    with db.begin() as conn:
        conn.execute(
            sa.text("SET LOCAL TIME ZONE 'America/New_York'")
        )  # naive times are UTC all the same
        upsert_orders(conn, orders, account=ACCOUNT, synced_at=T0)
    from_lines = stored_rows()
    assert {row[0]: row[-1] for row in from_lines} == {o.order_id: o.raw for o in orders}
    with db.begin() as conn:
        conn.execute(sa.text("TRUNCATE orders"))
        upsert_orders(conn, [replace(o, line=None) for o in orders], account=ACCOUNT, synced_at=T0)
    assert stored_rows() == from_lines


def odd_orders() -> list[Order]:
    """Orders of both shapes, with ids COPY's text format must escape (no line for those)."""
    exchange = Exchange(seed=5, orders=80, api="2025", now=T0, events_per_second=0)
    payloads = [o.render("2025") for o in exchange] + [o.render("2026") for o in exchange]
    for n, payload in enumerate(payloads):
        payload["order_id"] = f"{n}-{payload['order_id']}"
    payloads[0]["client_order_id"] = "back\\slash"
    payloads[1]["client_order_id"] = "tab\tand\nline"
    orders = [o for o in map(parse_order, payloads) if isinstance(o, Order)]
    assert len(orders) == len(payloads) and orders[0].line is None and orders[1].line is None
    return orders


def every_column(engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT * FROM orders ORDER BY order_id")))


def test_a_first_load_copy_stores_exactly_what_the_merge_stores(db):
    orders = odd_orders()
    with db.begin() as conn:
        copied = copy_new_orders(conn, orders, account=ACCOUNT, synced_at=T0)
    assert copied == Counts(fetched=len(orders), inserted=len(orders))
    from_copy = every_column(db)
    with db.begin() as conn:
        conn.execute(sa.text("TRUNCATE orders"))
        upsert_orders(conn, orders, account=ACCOUNT, synced_at=T0)
    assert every_column(db) == from_copy


def test_a_first_load_copy_writes_nothing_once_an_order_is_stored(db):
    """An order listed twice, or written meanwhile by the stream: the caller merges instead,
    in the same transaction."""
    write(db, order("o2", updated="2026-01-01T00:00:30Z"))
    batch = [order(i) for i in ("o1", "o2", "o3")]
    with db.begin() as conn:
        assert copy_new_orders(conn, batch, account=ACCOUNT, synced_at=T0) is None
        assert conn.execute(sa.text("SELECT count(*) FROM orders")).scalar_one() == 1
        counts = upsert_orders(conn, batch, account=ACCOUNT, synced_at=T0)
    assert counts == Counts(fetched=3, inserted=2, unchanged=1)
    assert stored(db, "o2").last_update_time == datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)


def test_a_first_load_copy_keeps_the_newest_of_duplicates_in_one_batch(db):
    newer = order("o1", updated="2026-01-01T00:00:20Z", status="canceled")
    with db.begin() as conn:
        counts = copy_new_orders(conn, [newer, order("o1")], account=ACCOUNT, synced_at=T0)
    assert counts == Counts(fetched=2, inserted=1, unchanged=1)
    assert stored(db).status == "canceled"


def test_a_stream_version_keeps_every_stored_value_the_message_did_not_carry(db):
    write(
        db,
        order(
            subaccount_number=3,
            order_group_id="grp-1",
            self_trade_prevention_type="maker",
            expiration_time="2026-02-01T00:00:00Z",
        ),
    )
    # A message without any optional field: subaccount_number, order_group_id,
    # expiration_ts_ms, self_trade_prevention_type are all absent.
    assert write_streamed(db, message(updated_ms=S10 + 5_000, fill="1.00")).updated == 1
    with db.connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT fill_count_fp, subaccount_number, order_group_id, "
                "self_trade_prevention_type, expiration_time FROM orders"
            )
        ).one()
    assert str(row.fill_count_fp) == "1.00"
    assert row.subaccount_number == 3
    assert row.order_group_id == "grp-1"
    assert row.self_trade_prevention_type == "maker"
    assert row.expiration_time == datetime(2026, 2, 1, tzinfo=UTC)


def test_a_rest_version_in_whole_seconds_replaces_a_stream_version_behind_it_in_that_second(db):
    # The stream saw a partial fill at 00:00:10.700; REST, whose times have whole seconds,
    # has the order executed at 00:00:10: the later state, in the same second.
    write_streamed(db, message(updated_ms=S10 + 700, fill="1.00"))
    full = order(status="executed", fill_count=5, remaining_count=0)
    assert write(db, full).updated == 1
    row = stored(db)
    assert (row.status, row.fill_count) == ("executed", 5)
    assert write(db, full).unchanged == 1  # and it stays


def test_at_a_tie_in_the_coarser_precision_the_version_further_along_stays(db):
    # The stream's executed version at 00:00:10.300 is further along than REST's resting
    # version stamped 00:00:10: REST does not take it back.
    write_streamed(db, message(updated_ms=S10 + 300, fill="5.00", status="executed"))
    assert write(db, order(fill_count=0)).unchanged == 1
    assert stored(db).status == "executed"
    # Nor does a REST version behind another REST version in the same second.
    with db.begin() as conn:
        conn.execute(sa.text("TRUNCATE orders"))
    write(db, order(status="canceled", fill_count=2))
    assert write(db, order(fill_count=2)).unchanged == 1
    assert stored(db).status == "canceled"
