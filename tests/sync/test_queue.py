"""Queue positions: a snapshot row when an order's position is first seen or changes, nothing
when it holds still, one closing row when the order leaves the book; every subaccount asked;
bad entries kept aside; times from the server's clock, never backwards; the views answer
"where was I at time t"; prune keeps each order's latest row."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import sqlalchemy as sa

from etl.db.retention import prune_snapshots
from etl.simulator import Exchange, SimulatorApp
from etl.simulator.keys import key_id
from etl.sync.orders import sync_orders
from etl.sync.queue import poll_queue_positions, snapshot_time
from tests.fix_exchange import NOW, make_client, rewriting
from tests.sync.helpers import ACCOUNT, count, current_queue_positions, queue_truth, runs


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
        == 1  # the one bad entry, kept once however many subaccount calls served it
    )
    assert result.counts.inserted > 0


def fixed(instant: datetime) -> Callable[[], datetime]:
    """A clock stopped at ``instant``."""
    return lambda: instant


def snapshots(db, order_id: str) -> list[tuple]:
    with db.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                sa.text(
                    "SELECT captured_at, queue_position FROM queue_position_snapshots "
                    "WHERE order_id = :id ORDER BY captured_at"
                ),
                {"id": order_id},
            )
        ]


def test_polls_over_unchanged_queues_add_no_rows(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW)
    rows = count(db, "SELECT count(*) FROM queue_position_snapshots")
    for n in range(1, 6):
        sync_orders(db, client, account=ACCOUNT)
        again = poll_queue_positions(
            db, client, account=ACCOUNT, clock=fixed(NOW + timedelta(seconds=10 * n))
        )
        assert again.counts.inserted == 0
    assert count(db, "SELECT count(*) FROM queue_position_snapshots") == rows
    assert current_queue_positions(db) == queue_truth(exchange)


def test_an_order_that_fills_or_is_canceled_gets_one_closing_row(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW)
    filled, canceled, partly = exchange.resting_ids()[:3]
    exchange.now += timedelta(minutes=1)
    exchange.fill(filled, exchange.order(filled).initial)
    exchange.cancel(canceled)
    exchange.fill(partly, 1)  # still resting: no closing row
    assert exchange.order(partly).status == "resting"
    sync_orders(db, client, account=ACCOUNT)
    closing_at = NOW + timedelta(seconds=10)
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: closing_at)
    for order_id in (filled, canceled):
        series = snapshots(db, order_id)
        assert series[-1] == (closing_at, None)
        assert series[-2][1] is not None
        assert order_id not in current_queue_positions(db)
    assert snapshots(db, partly)[-1][1] is not None
    assert current_queue_positions(db) == queue_truth(exchange)
    # The closing row is written once: later polls add nothing for these orders.
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW + timedelta(seconds=20))
    assert len(snapshots(db, filled)) == 2 and len(snapshots(db, canceled)) == 2


def test_intervals_answer_where_an_order_stood_at_any_time(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)
    order_id = exchange.resting_ids()[0]
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW)
    first = f"{exchange.order(order_id).queue_position:.2f}"
    exchange.move_queue(order_id, +3)
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW + timedelta(seconds=10))
    exchange.now += timedelta(minutes=1)
    exchange.cancel(order_id)
    sync_orders(db, client, account=ACCOUNT)
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW + timedelta(seconds=20))

    def as_of(seconds: float) -> str | None:
        with db.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT queue_position::text FROM queue_position_intervals "
                    "WHERE order_id = :id AND valid_from <= :t "
                    "AND (valid_to IS NULL OR :t < valid_to)"
                ),
                {"id": order_id, "t": NOW + timedelta(seconds=seconds)},
            ).scalar_one_or_none()

    assert as_of(5) == first
    assert as_of(15) == f"{exchange.order(order_id).queue_position:.2f}"
    assert as_of(25) is None  # canceled: out of the queue
    with db.connect() as conn:
        latest = conn.execute(
            sa.text(
                "SELECT valid_to FROM queue_position_intervals WHERE order_id = :id "
                "ORDER BY valid_from DESC LIMIT 1"
            ),
            {"id": order_id},
        ).scalar_one()
    assert latest is None


def test_a_local_clock_that_steps_back_cannot_reinsert_or_reorder_rows(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW + timedelta(hours=1))
    mover = exchange.resting_ids()[0]
    exchange.move_queue(mover, +5)
    stepped_back = poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW)
    assert stepped_back.counts.inserted == 1
    series = snapshots(db, mover)
    assert [at for at, _ in series] == sorted(at for at, _ in series)
    assert series[-1][0] > NOW + timedelta(hours=1)
    assert current_queue_positions(db)[mover] == f"{exchange.order(mover).queue_position:.2f}"


def test_snapshot_times_come_from_the_server_clock(db, app, private_key, exchange):
    server_time = datetime(2026, 11, 20, 9, 30, 0, tzinfo=UTC)

    def with_date(request: httpx.Request) -> httpx.Response:
        answer = httpx.WSGITransport(app=app).handle_request(request)
        answer.read()
        headers = dict(answer.headers)
        headers["Date"] = format_datetime(server_time, usegmt=True)
        return httpx.Response(answer.status_code, headers=headers, content=answer.content)

    client = make_client(httpx.MockTransport(with_date), private_key)
    sync_orders(db, client, account=ACCOUNT)
    # The local clock is a day off: the server's Date wins.
    result = poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW + timedelta(1))
    assert result.watermark == server_time
    assert count(db, "SELECT count(DISTINCT captured_at) FROM queue_position_snapshots") == 1
    with db.connect() as conn:
        stored = conn.execute(sa.text("SELECT max(captured_at) FROM queue_position_snapshots"))
        assert stored.scalar_one() == server_time


def test_snapshot_time_prefers_the_finer_local_reading_when_the_clocks_agree():
    server = datetime(2026, 11, 20, 12, 0, 0, tzinfo=UTC)
    local = server + timedelta(milliseconds=420)
    assert snapshot_time(server, local, None) == local
    assert snapshot_time(server, server + timedelta(minutes=5), None) == server
    assert snapshot_time(None, local, None) == local
    assert snapshot_time(server, local, local) == local + timedelta(milliseconds=1)


def test_prune_deletes_old_rows_in_batches_and_keeps_each_orders_latest(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)
    old = NOW - timedelta(days=200)
    ids = exchange.resting_ids()
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: old)
    movers = ids[:4]
    for step, mover in enumerate(movers, start=1):
        exchange.move_queue(mover, +1)
        poll_queue_positions(db, client, account=ACCOUNT, clock=fixed(old + timedelta(days=step)))
    exchange.move_queue(movers[0], +1)
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW)  # a recent row
    before = count(db, "SELECT count(*) FROM queue_position_snapshots")
    latest_before = latest_positions(db)

    result = prune_snapshots(db, older_than=NOW - timedelta(days=90), batch=7)

    assert result.batches > 2  # bounded batches, not one statement
    # The first rows of the four movers; mover 0's second row (old + 1 day) stays: it is its
    # position from the cutoff until the recent row.
    assert result.deleted == 4
    assert count(db, "SELECT count(*) FROM queue_position_snapshots") == before - 4
    assert latest_positions(db) == latest_before
    assert (
        count(
            db,
            "SELECT count(*) FROM (SELECT order_id FROM queue_position_snapshots "
            "GROUP BY order_id HAVING count(*) > 1) AS several",
        )
        == 1
    )
    again = prune_snapshots(db, older_than=NOW - timedelta(days=90), batch=7)
    assert again.deleted == 0


def position_at(db, order_id: str, at: datetime) -> object:
    with db.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT queue_position FROM queue_position_intervals WHERE order_id = :id "
                "AND valid_from <= :at AND (valid_to IS NULL OR valid_to > :at)"
            ),
            {"id": order_id, "at": at},
        ).scalar_one_or_none()


def test_prune_keeps_the_row_that_gives_a_position_inside_the_kept_span(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)
    mover = exchange.resting_ids()[0]
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW - timedelta(days=200))
    exchange.move_queue(mover, +1)
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW - timedelta(days=120))
    exchange.move_queue(mover, +1)
    poll_queue_positions(db, client, account=ACCOUNT, clock=lambda: NOW - timedelta(days=10))
    inside = NOW - timedelta(days=60)  # within the 90 days kept, before the recent row
    known = position_at(db, mover, inside)
    assert known is not None

    result = prune_snapshots(db, older_than=NOW - timedelta(days=90))

    assert result.deleted == 1  # the 200-day-old row: the 120-day-old one holds at the cutoff
    assert position_at(db, mover, inside) == known
