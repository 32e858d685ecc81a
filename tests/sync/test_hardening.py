"""Nothing stops a stream, nothing lies: poison records, unparseable bodies, orders that cannot
be fetched, a lock that vanishes, a database that goes away, a cutoff that moves mid-pull, a
backfill resumed under a later `until`, and a backfill and a sync of one account kept apart."""

from __future__ import annotations

import json
import logging
import threading
from datetime import timedelta

import httpx
import pytest
import sqlalchemy as sa

from etl.db.engine import create_engine
from etl.db.state import read_state, write_state
from etl.db.upsert import upsert_orders
from etl.errors import ApiError, DatabaseError, LockBusyError, LockLostError
from etl.kalshi.parse import Order, parse_order
from etl.simulator import Exchange, SimulatorApp
from etl.simulator.keys import key_id
from etl.sync.orders import backfill_orders, sync_orders
from etl.sync.partitions import BackfillProgress
from etl.sync.queue import poll_queue_positions
from etl.sync.run import UNRECORDED, recorded_run
from tests.fix_exchange import NOW, make_client, rewriting, wait_until
from tests.proxy import DatabaseProxy
from tests.sync.helpers import (
    ACCOUNT,
    assert_table_equals_truth,
    backfill_history,
    count,
    runs,
    stored_orders,
)

# One order of each kind the issue names, as raw JSON text: each parses as JSON, and each
# would make PostgreSQL refuse its whole page if it reached the database.
POISON = {
    "int4": '{"order_id": "p-int4", "ticker": "T", "status": "resting", "fill_count": 2147483648}',
    "1e400": '{"order_id": "p-1e400", "ticker": "T", "status": "resting", "x": 1e400}',
    "surrogate": '{"order_id": "p-surrogate", "ticker": "T", "status": "resting", "u": "\\ud800"}',
    "deep": '{"order_id": "p-deep", "ticker": "T", "status": "resting", "x": '
    + "[" * 5000
    + "]" * 5000
    + "}",
    "1e30": '{"order_id": "p-1e30", "ticker": "T", "status": "resting", "fill_count": 1'
    + "0" * 30
    + "}",
    "long id": '{"order_id": "' + "i" * 3000 + '", "ticker": "T", "status": "resting"}',
    "long ticker": '{"order_id": "p-ticker", "ticker": "' + "T" * 3000 + '", "status": "resting"}',
    "5000 digits": '{"order_id": "p-digits", "ticker": "T", "status": "resting", "n": '
    + "9" * 5000
    + "}",
    "nul": '{"order_id": "p-nul", "ticker": "T", "status": "resting", "c": "a\\u0000b"}',
}


@pytest.fixture
def small_exchange() -> Exchange:
    """50 live orders (no historical tier to speak of), frozen in time."""
    return Exchange(
        seed=9, orders=50, api="2026", now=NOW, events_per_second=0, live_window=timedelta(3650)
    )


def poisoned(app: SimulatorApp, *, always: bool = False) -> httpx.MockTransport:
    """Answers like ``app``; the first listing of the newest orders (no ``max_ts``: the newest
    window of a first load, or an incremental listing; every such listing, ``always``) also
    carries every POISON record."""
    served: list[int] = []

    def handle(request: httpx.Request) -> httpx.Response:
        answer = httpx.WSGITransport(app=app).handle_request(request)
        answer.read()
        query = request.url.params
        if (
            request.url.path.endswith("/portfolio/orders")
            and "status" not in query
            and "max_ts" not in query
            and (always or not served)
        ):
            served.append(1)
            body = answer.json()
            good = [json.dumps(order) for order in body["orders"]]
            text = '{"orders": [' + ", ".join([*good, *POISON.values()]) + '], "cursor": ""}'
            return httpx.Response(200, content=text.encode())
        return httpx.Response(answer.status_code, content=answer.content)

    return httpx.MockTransport(handle)


def test_one_page_of_poison_and_50_good_orders_stores_the_50_and_moves_the_watermark(
    db, private_key, small_exchange
):
    app = SimulatorApp(
        small_exchange, {key_id(private_key): private_key.public_key()}, advance=False
    )
    client = make_client(poisoned(app), private_key, page_size=100)
    result = sync_orders(db, client, account=ACCOUNT)
    assert count(db, "SELECT count(*) FROM orders") == 50
    assert_table_equals_truth(db, small_exchange)
    with db.connect() as conn:
        reasons = [r for (r,) in conn.execute(sa.text("SELECT error FROM rejected_records"))]
        state = read_state(conn, ACCOUNT, "orders")
    assert len(reasons) == len(POISON) and all(reasons)
    assert result.counts.rejected == len(POISON)
    assert state is not None and state.watermark == small_exchange.user_data_timestamp()
    assert runs(db)[-1].status == "succeeded"
    # A second cycle is clean: nothing was left to fail forever.
    assert sync_orders(db, make_client(app, private_key, page_size=100), account=ACCOUNT)


def test_a_record_the_api_keeps_serving_is_kept_once_and_counted_on_every_run(
    db, private_key, small_exchange
):
    app = SimulatorApp(
        small_exchange, {key_id(private_key): private_key.public_key()}, advance=False
    )
    client = make_client(poisoned(app, always=True), private_key, page_size=100)
    for _ in range(3):
        result = sync_orders(db, client, account=ACCOUNT)
        assert result.counts.rejected == len(POISON)  # the run says what it met
    assert count(db, "SELECT count(*) FROM rejected_records") == len(POISON)
    assert [run.rejected for run in runs(db)] == [len(POISON)] * 3


def test_a_page_postgresql_refuses_is_written_record_by_record(db, client, exchange):
    """A constraint the parser knows nothing of stands for any refusal the parser missed:
    only the refused order is rejected, the rest of its page lands."""
    victim = sorted(exchange.truth())[7]
    with db.begin() as conn:
        conn.execute(
            sa.text(f"ALTER TABLE orders ADD CONSTRAINT test_refuse CHECK (order_id <> '{victim}')")
        )
    try:
        result = sync_orders(db, client, account=ACCOUNT)
    finally:
        with db.begin() as conn:
            conn.execute(sa.text("ALTER TABLE orders DROP CONSTRAINT test_refuse"))
    assert victim not in stored_orders(db)
    assert len(stored_orders(db)) == len(exchange.truth()) - 1
    with db.connect() as conn:
        error, text = conn.execute(
            sa.text("SELECT error, payload_text FROM rejected_records")
        ).one()
    assert "PostgreSQL refused it" in error and victim in text
    assert result.counts.rejected == 1 and runs(db)[-1].status == "succeeded"


def test_a_queue_position_postgresql_cannot_hold_is_rejected_not_the_poll(
    db, client, app, private_key
):
    sync_orders(db, client, account=ACCOUNT)

    def adds_huge(request: httpx.Request, body: dict) -> dict:
        if "queue_positions" in request.url.path and body.get("queue_positions"):
            body["queue_positions"].append(
                {"order_id": "x", "market_ticker": "M", "queue_position": 10**17}
            )
            body["queue_positions"].append(
                {"order_id": "y", "market_ticker": "M", "queue_position_fp": "1e17"}
            )
        return body

    result = poll_queue_positions(
        db, make_client(rewriting(app, adds_huge), private_key), account=ACCOUNT
    )
    assert result.counts.rejected >= 2 and result.counts.inserted > 0  # once per subaccount call
    # Each payload is kept once, however many subaccount calls served it.
    assert count(db, "SELECT count(*) FROM rejected_records WHERE error LIKE '%out of range%'") == 2
    assert runs(db)[-1].status == "succeeded"


@pytest.mark.parametrize("status", [200, 502])
def test_a_body_with_a_nul_byte_is_kept_escaped_and_the_api_error_is_reported(
    db, private_key, app, status
):
    def broken(environ, start_response):
        if environ["PATH_INFO"].endswith("/portfolio/orders"):
            start_response(f"{status} X", [("Content-Type", "text/html")])
            return [b"<html>bad\x00gateway</html>"]
        return app(environ, start_response)

    with pytest.raises(ApiError) as caught:
        sync_orders(db, make_client(broken, private_key), account=ACCOUNT)
    assert "database" not in str(caught.value).lower()
    run = runs(db)[-1]
    assert run.status == "failed" and (str(status) in run.error or "not JSON" in run.error)
    if status == 200:  # a page body, kept
        assert count(db, "SELECT count(*) FROM rejected_records WHERE payload_text LIKE '%u0000%'")


def test_one_order_that_cannot_be_fetched_does_not_block_settling(db, private_key, app, exchange):
    client = make_client(app, private_key)
    sync_orders(db, client, account=ACCOUNT)
    stuck, fine = sorted(exchange.resting_ids())[:2]
    exchange.now += timedelta(minutes=1)
    exchange.cancel(stuck)
    exchange.cancel(fine)

    def refuses_one(environ, start_response):
        if environ["PATH_INFO"].endswith(f"/portfolio/orders/{stuck}"):
            start_response("400 Bad Request", [("Content-Type", "application/json")])
            return [b'{"code": "invalid", "message": "this order is broken"}']
        return app(environ, start_response)

    for _ in range(2):
        result = sync_orders(db, make_client(refuses_one, private_key), account=ACCOUNT)
        assert runs(db)[-1].status == "succeeded"
    assert stored_orders(db)[fine]["status"] == "canceled"
    assert stored_orders(db)[stuck]["status"] == "resting"  # kept as stored, and said so
    with db.connect() as conn:
        (error,) = conn.execute(sa.text("SELECT error FROM rejected_records")).scalars()
    assert f"could not settle order {stuck}" in error and "this order is broken" in error
    assert result.counts.rejected == 0  # recorded once, not every cycle


def test_an_order_id_that_is_not_a_path_segment_is_recorded_not_fetched(db, client, exchange):
    sync_orders(db, client, account=ACCOUNT)
    odd = parse_order({"order_id": ".", "ticker": exchange.tickers[0], "status": "resting"})
    assert isinstance(odd, Order)
    with db.begin() as conn:
        upsert_orders(conn, [odd], account=ACCOUNT, synced_at=NOW)
    sync_orders(db, client, account=ACCOUNT)
    assert runs(db)[-1].status == "succeeded"
    assert (
        count(db, "SELECT count(*) FROM rejected_records WHERE error LIKE '%settle order .:%'") == 1
    )


def test_a_run_whose_lock_vanished_stops_before_its_next_commit(db):
    with pytest.raises(LockLostError, match="orders lock of account acct was lost"):
        with recorded_run(db, ACCOUNT, "orders", "incremental") as run:
            with db.begin() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": run.lock.pid})
            wait_until(
                lambda: (
                    count(db, f"SELECT count(*) FROM pg_stat_activity WHERE pid = {run.lock.pid}")
                    == 0
                )
            )
            with run.transaction() as conn:
                write_state(conn, ACCOUNT, "orders", watermark=NOW)
    with db.connect() as conn:
        assert read_state(conn, ACCOUNT, "orders") is None  # nothing was committed
    assert runs(db)[-1].status == "failed" and "was lost" in runs(db)[-1].error


def test_a_run_that_lost_the_database_is_recorded_failed_once_it_is_back(
    db, database_url, private_key, app
):
    proxy = DatabaseProxy(database_url).start()
    engine = create_engine(proxy.proxied_url)
    calls = []

    def cut_midway(environ, start_response):
        calls.append(1)
        if len(calls) == 3:
            proxy.stop()
        return app(environ, start_response)

    try:
        with pytest.raises(DatabaseError, match="lost the database"):
            sync_orders(engine, make_client(cut_midway, private_key), account=ACCOUNT)
        assert len(UNRECORDED) == 1 and runs(db)[-1].status == "running"
        proxy.start()
        sync_orders(engine, make_client(app, private_key), account=ACCOUNT)
    finally:
        proxy.stop()
        engine.dispose()
    first, second = runs(db)
    assert first.status == "failed" and "lost the database" in first.error
    assert second.status == "succeeded" and len(UNRECORDED) == 0


def test_orders_that_move_to_the_historical_tier_during_the_live_pull_are_found(
    db, private_key, app, exchange
):
    client = make_client(app, private_key)
    sync_orders(db, client, account=ACCOUNT)
    exchange.now += timedelta(minutes=10)
    newcomer = exchange.create_order()
    if newcomer.status == "resting":
        exchange.now += timedelta(seconds=1)
        exchange.cancel(newcomer.order_id)
    jumped: list[int] = []

    def jump_during_live_pull(environ, start_response):
        query = environ.get("QUERY_STRING", "")
        if environ["PATH_INFO"].endswith("/portfolio/orders") and "status" not in query:
            if not jumped:  # the exchange moves on while the live tier is read
                jumped.append(1)
                exchange.now += timedelta(days=15)
        return app(environ, start_response)

    sync_orders(db, make_client(jump_during_live_pull, private_key), account=ACCOUNT)
    assert exchange.is_historical(newcomer)
    assert newcomer.order_id in stored_orders(db)
    assert_table_equals_truth(db, exchange)


def test_a_server_whose_historical_tier_defaults_to_subaccount_0_still_gives_every_order(
    db, private_key
):
    exchange = Exchange(seed=12, orders=300, api="2026", now=NOW, events_per_second=0)
    exchange.historical_all_subaccounts = False
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    assert any(exchange.is_historical(o) and o.subaccount == 1 for o in exchange)
    sync_orders(db, make_client(app, private_key), account=ACCOUNT)
    assert_table_equals_truth(db, exchange)
    asked = [q for path, q in app.requests if path.endswith("/historical/orders")]
    assert any("subaccount=1" in q for q in asked)


def test_a_backfill_and_a_sync_of_one_account_never_write_at_the_same_time(
    db, private_key, app, exchange
):
    app.faults.latency = 0.02
    client = make_client(app, private_key)
    done = threading.Event()

    def backfill() -> None:
        try:
            backfill_history(db, client, exchange, concurrency=1)
        finally:
            done.set()

    thread = threading.Thread(target=backfill)
    thread.start()
    wait_until(lambda: any(r.status == "running" for r in runs(db)))
    with pytest.raises(LockBusyError, match=r"backfill #1"):
        sync_orders(db, make_client(app, private_key), account=ACCOUNT, lock_wait=0)
    thread.join(60)
    assert done.is_set()
    assert [(r.mode, r.status) for r in runs(db)] == [("backfill", "succeeded")]


def _rerun_after_new_orders(db, client, exchange, since, window, new):
    """An hour later, ``new`` orders created, the same backfill again up to "now": its result
    and the new orders."""
    exchange.now += timedelta(hours=1)
    fresh = [exchange.create_order() for _ in range(new)]
    again = backfill_orders(
        db,
        client,
        account=ACCOUNT,
        since=since,
        until=exchange.now + timedelta(seconds=1),
        window=window,
    )
    return again, fresh


def test_a_backfill_rerun_with_a_later_until_reuses_the_windows_done(db, client, exchange):
    since = exchange.now - timedelta(days=70)
    first = backfill_orders(
        db, client, account=ACCOUNT, since=since, until=exchange.now, window=timedelta(days=7)
    )
    assert first.counts.fetched == len(exchange.truth())
    # The default --until is "now", later on every run: only the new window is read.
    again, fresh = _rerun_after_new_orders(db, client, exchange, since, timedelta(days=7), 5)
    assert again.counts.fetched == len(fresh)
    assert_table_equals_truth(db, exchange)


def test_a_backfill_rerun_reads_only_the_tail_of_a_window_cut_short_by_the_first_runs_now(
    db, client, exchange, caplog
):
    since = exchange.now - timedelta(days=70)  # the whole history: one 100-day window,
    window = timedelta(days=100)  # cut short at "now"
    backfill_orders(db, client, account=ACCOUNT, since=since, until=exchange.now, window=window)
    with caplog.at_level(logging.INFO, logger="etl.sync.partitions"):
        again, fresh = _rerun_after_new_orders(db, client, exchange, since, window, 3)
    assert again.counts.fetched == len(fresh)
    assert "backfill resumes: 0 of 1 windows already done, 1 partly" in caplog.text
    assert_table_equals_truth(db, exchange)


def test_backfill_progress_is_reported_per_page_before_the_end(db, client, exchange):
    events: list[BackfillProgress] = []
    backfill_history(db, client, exchange, concurrency=2, on_progress=events.append)
    total = events[-1].windows_total
    assert events[-1].windows_done == total
    assert any(0 < e.windows_done < total for e in events)  # not 0/N until the very end
    assert len(events) > total and events[-1].records == len(exchange.truth())
