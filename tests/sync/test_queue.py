"""Queue positions: a snapshot row when an order's position is first seen or changes, nothing
when it holds still; every subaccount asked; bad entries kept aside."""

from __future__ import annotations

from datetime import timedelta

import httpx
import sqlalchemy as sa

from etl.simulator import Exchange, SimulatorApp
from etl.simulator.keys import key_id
from etl.sync.orders import sync_orders
from etl.sync.queue import poll_queue_positions
from tests.fix_exchange import NOW, make_client, rewriting
from tests.sync.helpers import count, runs

ACCOUNT = "acct"


def latest_positions(db) -> dict[str, str]:
    with db.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT DISTINCT ON (order_id) order_id, queue_position "
                "FROM queue_position_snapshots ORDER BY order_id, captured_at DESC"
            )
        )
        return {row.order_id: f"{row.queue_position:.2f}" for row in rows}


def test_the_first_poll_snapshots_every_resting_order_of_every_subaccount(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)
    result = poll_queue_positions(db, client, account=ACCOUNT)
    resting = exchange.resting_ids()
    assert {exchange.order(i).subaccount for i in resting} == {0, 1}
    assert latest_positions(db) == {i: f"{exchange.order(i).queue_position:.2f}" for i in resting}
    assert result.counts.inserted == len(resting)
    assert runs(db)[-1].stream == "queue_positions" and runs(db)[-1].status == "succeeded"


def test_a_poll_without_change_writes_nothing_and_a_move_writes_one_row(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW)
    rows = count(db, "SELECT count(*) FROM queue_position_snapshots")
    again = poll_queue_positions(
        db, client, account=ACCOUNT, clock=lambda: NOW + timedelta(seconds=10)
    )
    assert again.counts.inserted == 0
    assert count(db, "SELECT count(*) FROM queue_position_snapshots") == rows
    mover = exchange.resting_ids()[0]
    exchange.move_queue(mover, +7)
    moved = poll_queue_positions(
        db, client, account=ACCOUNT, clock=lambda: NOW + timedelta(seconds=20)
    )
    assert moved.counts.inserted == 1
    assert latest_positions(db)[mover] == f"{exchange.order(mover).queue_position:.2f}"


def test_2025_integer_positions_are_stored(db, private_key):
    exchange = Exchange(seed=5, orders=100, api="2025", now=NOW, events_per_second=0)
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    client = make_client(app, private_key)
    sync_orders(db, client, account=ACCOUNT)
    poll_queue_positions(db, client, account=ACCOUNT)
    assert len(latest_positions(db)) == len(exchange.resting_ids()) > 0


def test_a_bad_queue_entry_is_kept_aside_and_the_rest_is_written(db, client, app, private_key):
    sync_orders(db, client, account=ACCOUNT)

    def adds_a_bad_entry(request: httpx.Request, body: dict) -> dict:
        if "queue_positions" in request.url.path and body.get("queue_positions"):
            body["queue_positions"].append(
                {"order_id": "x", "market_ticker": "M", "queue_position_fp": "soon"}
            )
        return body

    poller = make_client(rewriting(app, adds_a_bad_entry), private_key)
    result = poll_queue_positions(db, poller, account=ACCOUNT)
    assert result.counts.rejected >= 1
    assert (
        count(
            db,
            "SELECT count(*) FROM rejected_records WHERE stream = 'queue_positions' "
            "AND error <> ''",
        )
        == result.counts.rejected
    )
    assert result.counts.inserted > 0
