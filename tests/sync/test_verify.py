"""`verify` proves the table complete: it finds every kind of difference, and repairs what a
write can repair."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from etl.db.upsert import upsert_orders
from etl.kalshi.parse import Order, parse_user_order
from etl.simulator import Exchange, SimulatorApp
from etl.simulator.keys import key_id
from etl.sync.orders import sync_orders
from etl.sync.verify import verify_orders
from tests.fix_exchange import NOW, make_client
from tests.sync.helpers import ACCOUNT, assert_table_equals_truth, count


@pytest.fixture
def exchange() -> Exchange:
    """300 orders, a few of them always served malformed, and a historical tier."""
    return Exchange(seed=3, orders=300, api="2026", now=NOW, events_per_second=0, malformed=0.03)


def test_a_synced_table_verifies_equal_and_the_malformed_records_are_accounted_for(
    db, client, exchange
):
    assert exchange.malformed_records(), "the fixture must serve malformed records"
    sync_orders(db, client, account=ACCOUNT)
    result = verify_orders(db, client, account=ACCOUNT)
    assert result.equal, result
    before = result.before
    assert before.listed == before.stored == len(exchange.truth())
    assert before.listed_rejected == len(exchange.malformed_records())
    assert exchange.cutoff() is not None and any(
        exchange.is_historical(o) for o in exchange if not o.malformed
    )  # both tiers were needed


def test_verify_lists_missing_stale_extra_and_unrecorded_and_exits_unequal(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)
    resting = exchange.resting_ids()
    with db.begin() as conn:
        conn.exec_driver_sql("DELETE FROM orders WHERE order_id = %s", (resting[0],))
        conn.exec_driver_sql(
            "INSERT INTO orders (order_id, account, ticker, status, raw, first_synced_at) "
            "VALUES ('ghost-1', %s, 'KXSIM-E1-M1', 'resting', '{}', now() - interval '1 hour')",
            (ACCOUNT,),
        )
        conn.exec_driver_sql("DELETE FROM rejected_records")
    exchange.fill(resting[1], 1)  # the table now holds an older version of it
    result = verify_orders(db, client, account=ACCOUNT, examples=2)
    before = result.before
    assert not result.equal
    assert before.counts == {
        "missing": 1,
        "stale": 1,
        "extra": 1,
        "unrecorded": len(exchange.malformed_records()),
    }
    assert before.examples["missing"] == [resting[0]]
    assert before.examples["stale"] == [resting[1]]
    assert before.examples["extra"] == ["ghost-1"]
    assert len(before.examples["unrecorded"]) == min(2, len(exchange.malformed_records()))


def test_repair_writes_what_differs_and_leaves_only_what_a_write_cannot_fix(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)
    resting = exchange.resting_ids()
    with db.begin() as conn:
        conn.exec_driver_sql("DELETE FROM orders WHERE order_id = %s", (resting[0],))
        conn.exec_driver_sql("DELETE FROM rejected_records")
    exchange.cancel(resting[1])
    result = verify_orders(db, client, account=ACCOUNT, repair=True)
    assert result.repaired is not None
    assert (result.repaired.inserted, result.repaired.updated) == (1, 1)
    assert result.repaired.rejected == len(exchange.malformed_records())
    assert result.after is not None and result.after.equal and result.equal
    assert_table_equals_truth(db, exchange)
    assert count(db, "SELECT count(*) FROM sync_runs WHERE mode = 'reconcile'") == 1
    assert verify_orders(db, client, account=ACCOUNT).equal  # and it stays so


def test_an_order_another_process_writes_during_the_listing_is_not_extra(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)

    def meanwhile(read: int) -> None:
        if read and not count(db, "SELECT count(*) FROM orders WHERE order_id = 'late-1'"):
            with db.begin() as conn:
                conn.exec_driver_sql(
                    "INSERT INTO orders (order_id, account, ticker, status, raw) "
                    "VALUES ('late-1', %s, 'KXSIM-E1-M1', 'resting', '{}')",
                    (ACCOUNT,),
                )

    result = verify_orders(db, client, account=ACCOUNT, on_page=meanwhile)
    assert result.before.counts["extra"] == 0 and result.equal


def test_verify_is_per_account(db, account_keys):
    first, second = (
        Exchange(seed=21 + n, orders=120, api="2026", now=NOW, events_per_second=0)
        for n in range(2)
    )
    (key1, _), (key2, _) = account_keys[:2]
    app = SimulatorApp(
        first,
        {key_id(k): k.public_key() for k in (key1, key2)},
        exchanges={key_id(key1): first, key_id(key2): second},
        advance=False,
    )
    with make_client(app, key1) as c1, make_client(app, key2) as c2:
        sync_orders(db, c1, account="one")
        sync_orders(db, c2, account="two")
        assert verify_orders(db, c1, account="one").equal
        assert verify_orders(db, c2, account="two").equal
        wrong = verify_orders(db, c1, account="two")  # the other account's key
    assert wrong.before.counts["extra"] == len(second.truth())
    assert wrong.before.counts["stale"] == len(first.truth())  # stored for another account


def test_a_version_from_the_stream_is_current_when_every_field_it_carries_agrees(
    db, client, exchange
):
    sync_orders(db, client, account=ACCOUNT)
    same, changed = exchange.resting_ids()[:2]
    messages = [
        exchange.order(same).render_user_order(),
        exchange.order(changed).render_user_order(),
    ]
    # What no listed version says, and not further along (a fill would be: see
    # test_a_rest_version_in_whole_seconds_replaces_a_stream_version_behind_it_in_that_second)
    messages[1]["remaining_count_fp"] = "99.00"
    streamed = [o for o in map(parse_user_order, messages) if isinstance(o, Order)]
    assert len(streamed) == 2
    with db.begin() as conn:  # as if the stream had written these two first
        conn.execute(
            sa.text("DELETE FROM orders WHERE order_id IN (:a, :b)"), {"a": same, "b": changed}
        )
        upsert_orders(conn, streamed, account=ACCOUNT, synced_at=NOW, from_stream=True)

    result = verify_orders(db, client, account=ACCOUNT)
    assert result.before.counts == {"missing": 0, "stale": 1, "extra": 0, "unrecorded": 0}
    assert result.before.examples["stale"] == [changed]


def test_verify_sees_a_fill_the_stream_missed_within_the_same_second_and_a_repair_converges(
    db, client, exchange
):
    target = exchange.resting_ids()[0]
    rest = exchange.order(target)
    rest.updated = rest.updated.replace(microsecond=0)  # REST's times in whole seconds
    sync_orders(db, client, account=ACCOUNT)
    # The stream wrote a version 700 ms into that second, still resting, over REST's.
    message = rest.render_user_order()
    message["last_updated_ts_ms"] += 700
    streamed = parse_user_order(message)
    assert isinstance(streamed, Order)
    with db.begin() as conn:
        conn.execute(sa.text("DELETE FROM orders WHERE order_id = :id"), {"id": target})
        upsert_orders(conn, [streamed], account=ACCOUNT, synced_at=NOW, from_stream=True)
    # The exchange filled the order in that same second: REST lists it executed.
    rest.filled = rest.initial
    rest.status = "executed"

    result = verify_orders(db, client, account=ACCOUNT)
    assert result.before.counts["stale"] == 1
    assert result.before.examples["stale"] == [target]

    repaired = verify_orders(db, client, account=ACCOUNT, repair=True)
    assert repaired.after is not None and repaired.after.equal
    assert verify_orders(db, client, account=ACCOUNT).equal
    with db.connect() as conn:
        status = conn.execute(
            sa.text("SELECT status FROM orders WHERE order_id = :id"), {"id": target}
        ).scalar_one()
    assert status == "executed"
