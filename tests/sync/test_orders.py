"""The orders sync keeps `orders` equal to what the exchange knows, run after run: every
order of both tiers, late fills and cancels of long-resting orders, bad records kept aside,
and a rerun after a crash that converges without duplicates."""

from __future__ import annotations

import logging
import subprocess
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from etl.db.state import StreamState, read_state, write_state
from etl.db.upsert import upsert_orders
from etl.errors import ApiProtocolError, ApiStatusError, StopRequested
from etl.kalshi.client import Page
from etl.kalshi.parse import Order, parse_order
from etl.simulator import Exchange, SimulatorApp
from etl.simulator.keys import key_id
from etl.sync.orders import NewAccount, pull, sync_orders
from etl.sync.run import recorded_run
from tests.fix_exchange import CLI, NOW, make_client, rewriting, spawn, wait_until
from tests.sync.helpers import (
    ACCOUNT,
    assert_table_equals_truth,
    backfill_history,
    count,
    runs,
    stored_orders,
)


def watermark_of(state: StreamState | None):
    assert state is not None
    return state.watermark


def sync(db, client, **kwargs):
    return sync_orders(db, client, account=ACCOUNT, **kwargs)


def backfill(db, client, exchange, *, concurrency: int):
    return backfill_history(db, client, exchange, concurrency=concurrency)


def test_the_first_sync_loads_every_order_of_both_tiers(db, client, exchange):
    assert any(exchange.is_historical(o) for o in exchange)
    result = sync(db, client)
    assert_table_equals_truth(db, exchange)
    assert result.counts.inserted == len(exchange.truth())
    (run,) = runs(db)
    assert (run.status, run.mode, run.stream, run.inserted) == (
        "succeeded",
        "incremental",
        "orders",
        len(exchange.truth()),
    )


def test_a_second_sync_inserts_and_updates_nothing(db, client, exchange):
    sync(db, client)
    again = sync(db, client).counts
    assert (again.inserted, again.updated, again.rejected) == (0, 0, 0)
    assert again.unchanged == again.fetched > 0


def test_the_watermark_is_what_the_server_had_seen_before_the_pull(db, client, exchange):
    sync(db, client)
    with db.connect() as conn:
        assert watermark_of(read_state(conn, ACCOUNT, "orders")) == exchange.user_data_timestamp()


def test_the_watermark_never_moves_backwards(db, client, exchange):
    later = exchange.now + timedelta(days=1)
    with db.begin() as conn:
        write_state(conn, ACCOUNT, "orders", watermark=later)
    sync(db, client)
    with db.connect() as conn:
        assert watermark_of(read_state(conn, ACCOUNT, "orders")) == later


@pytest.mark.parametrize("api", ["2025", "2026"])
@pytest.mark.parametrize("min_ts_on", ["created_time", "last_update_time"])
def test_old_resting_orders_that_fill_or_cancel_later_are_updated(db, private_key, api, min_ts_on):
    exchange = Exchange(
        seed=3, orders=300, api=api, min_ts_on=min_ts_on, now=NOW, events_per_second=0
    )
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    client = make_client(app, private_key)
    sync(db, client)
    old = sorted((exchange.order(i) for i in exchange.resting_ids()), key=lambda o: o.created)[:4]
    assert old[0].created < exchange.now - timedelta(days=7)  # long before the watermark
    exchange.now += timedelta(hours=1)
    exchange.fill(old[0].order_id, 1)  # partial fill: still resting
    exchange.fill(old[1].order_id, old[1].initial)  # full fill: executed
    exchange.cancel(old[2].order_id)  # canceled
    exchange.step(20)  # and the market goes on
    counts = sync(db, client).counts
    assert_table_equals_truth(db, exchange)
    assert counts.updated >= 3
    assert stored_orders(db)[old[1].order_id]["status"] == "executed"
    assert stored_orders(db)[old[2].order_id]["status"] == "canceled"


@pytest.mark.parametrize("min_ts_on", ["created_time", "last_update_time"])
def test_an_order_canceled_then_moved_to_the_historical_tier_is_settled(
    db, client, exchange, min_ts_on
):
    exchange.min_ts_on = min_ts_on
    sync(db, client)
    victim = min((exchange.order(i) for i in exchange.resting_ids()), key=lambda o: o.created)
    exchange.now += timedelta(hours=1)
    exchange.cancel(victim.order_id)
    exchange.now += timedelta(days=15)  # past the live window: only the historical tier has it
    assert exchange.is_historical(victim)
    sync(db, client)
    assert stored_orders(db)[victim.order_id]["status"] == "canceled"
    assert_table_equals_truth(db, exchange)


def test_a_malformed_record_is_kept_aside_and_the_rest_of_its_page_lands(db, client, app, exchange):
    app.faults.malformed_rate = 1.0
    result = sync(db, client)
    assert_table_equals_truth(db, exchange)
    rejected = count(
        db,
        "SELECT count(*) FROM rejected_records WHERE stream = 'orders' "
        "AND error LIKE '%status: unknown value%' AND payload IS NOT NULL",
    )
    assert rejected == result.counts.rejected > 0
    assert runs(db)[-1].status == "succeeded" and runs(db)[-1].rejected == rejected


def test_a_page_that_is_not_json_is_kept_and_fails_the_run(db, private_key, app, exchange):
    calls = []

    def broken_once(environ, start_response):
        if environ["PATH_INFO"].endswith("/portfolio/orders"):
            calls.append(1)
            if len(calls) == 2:  # the second page of orders listed
                start_response("200 OK", [("Content-Type", "text/html")])
                return [b"<html>upstream hiccup</html>"]
        return app(environ, start_response)

    with pytest.raises(ApiProtocolError, match="not JSON"):
        sync(db, make_client(broken_once, private_key))
    assert (
        count(
            db,
            "SELECT count(*) FROM rejected_records "
            "WHERE payload_text = '<html>upstream hiccup</html>'",
        )
        == 1
    )
    assert runs(db)[-1].status == "failed" and "not JSON" in runs(db)[-1].error
    sync(db, make_client(app, private_key))  # the next run converges
    assert_table_equals_truth(db, exchange)


def test_transient_server_errors_are_retried_and_the_sync_converges(db, client, app, exchange):
    app.faults.error_rate = 0.3
    sync(db, client)
    assert_table_equals_truth(db, exchange)


def test_a_stop_request_commits_the_page_in_flight_then_ends_the_run(db, private_key, app):
    stop = threading.Event()

    def stops_at_the_first_page(environ, start_response):
        answer = b"".join(app(environ, start_response))
        if b'"order_id"' in answer:
            stop.set()  # asked while the first page of orders is in flight
        return [answer]

    with pytest.raises(StopRequested):
        sync(db, make_client(stops_at_the_first_page, private_key), stop=stop)
    assert count(db, "SELECT count(*) FROM orders") >= 1  # the pages in flight are committed
    assert runs(db)[-1].status == "failed" and "stopped on request" in runs(db)[-1].error
    with db.connect() as conn:
        assert read_state(conn, ACCOUNT, "orders") is None  # a half-read pull justifies nothing


@pytest.mark.slow
def test_a_sync_killed_mid_run_converges_on_rerun(db, live_simulator, exchange):
    live_simulator.app.faults.latency = 0.03
    env = {**live_simulator.env, "KALSHI_PAGE_SIZE": "10"}
    proc = spawn(["sync", "--streams", "orders"], env)
    wait_until(lambda: count(db, "SELECT count(*) FROM orders") >= 40)
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.communicate()
    partial = count(db, "SELECT count(*) FROM orders")
    assert 0 < partial < len(exchange.truth())
    live_simulator.app.faults.latency = 0
    rerun = subprocess.run(
        [*CLI, "sync", "--streams", "orders"], env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert_table_equals_truth(db, exchange)
    assert count(db, "SELECT count(*) FROM orders") == len(exchange.truth())
    first, second = runs(db)
    assert first.status == "failed" and first.error.startswith("interrupted")
    assert second.status == "succeeded"


@pytest.mark.slow
def test_two_concurrent_syncs_never_interleave(db, live_simulator, exchange):
    live_simulator.app.faults.latency = 0.1  # each run takes ~2 s: longer than any start skew
    env = {**live_simulator.env, "KALSHI_PAGE_SIZE": "25"}
    procs = [spawn(["sync", "--streams", "orders"], env) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert any("waiting for another run" in err for _, err in outputs)  # they did collide
    first, second = runs(db)
    assert first.finished_at <= second.started_at
    assert_table_equals_truth(db, exchange)


def test_backfill_loads_a_range_and_a_rerun_resumes_with_nothing_left(db, client, exchange):
    first = backfill(db, client, exchange, concurrency=3)
    assert_table_equals_truth(db, exchange)
    assert first.counts.inserted == len(exchange.truth())
    again = backfill(db, client, exchange, concurrency=3)
    assert again.counts.fetched == 0
    assert [r.mode for r in runs(db)] == ["backfill", "backfill"]


def test_a_failed_backfill_keeps_its_done_windows_and_resumes(db, private_key, app, exchange):
    calls = []

    def dies_after_nine_calls(environ, start_response):
        calls.append(1)
        if len(calls) > 9:
            start_response("503 Service Unavailable", [("Content-Type", "application/json")])
            return [b'{"code": "unavailable", "message": "down"}']
        return app(environ, start_response)

    failing = make_client(dies_after_nine_calls, private_key)
    with pytest.raises(ApiStatusError, match="503"):
        backfill(db, failing, exchange, concurrency=1)
    loaded_before = count(db, "SELECT count(*) FROM orders")
    assert loaded_before > 0
    resumed = backfill(db, make_client(app, private_key), exchange, concurrency=2)
    assert_table_equals_truth(db, exchange)
    assert resumed.counts.fetched < len(exchange.truth())  # done windows were not fetched again
    assert [r.status for r in runs(db)] == ["failed", "succeeded"]


def test_an_order_postgresql_cannot_store_is_rejected_not_a_poison_pill(db, private_key, app):
    def adds_nul(request: httpx.Request, body: dict) -> dict:
        if body.get("orders"):
            body["orders"][0] = {**body["orders"][0], "client_order_id": "bad\x00id"}
        return body

    client = make_client(rewriting(app, adds_nul), private_key)
    result = sync(db, client)
    assert result.counts.rejected >= 1
    assert count(db, "SELECT count(*) FROM rejected_records WHERE payload_text LIKE '%u0000%'") >= 1
    assert runs(db)[-1].status == "succeeded"


def test_a_server_with_a_cutoff_but_no_historical_orders_still_moves_the_watermark(
    db, private_key, app, exchange
):
    def no_historical_orders(environ, start_response):
        if environ["PATH_INFO"].endswith("/historical/orders"):
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [b'{"code": "not_found", "message": "no such route"}']
        return app(environ, start_response)

    sync(db, make_client(no_historical_orders, private_key))
    with db.connect() as conn:
        assert watermark_of(read_state(conn, ACCOUNT, "orders")) == exchange.user_data_timestamp()


def test_a_server_clock_running_ahead_cannot_push_the_watermark_into_the_future(db, private_key):
    future = NOW.replace(year=2099)
    exchange = Exchange(seed=4, orders=50, api="2026", now=future, events_per_second=0)
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    before = datetime.now(UTC)
    sync(db, make_client(app, private_key))
    with db.connect() as conn:
        watermark = watermark_of(read_state(conn, ACCOUNT, "orders"))
    assert before <= watermark <= datetime.now(UTC)


def test_an_order_met_twice_in_a_first_load_ends_at_its_newest_version(db, caplog):
    """A first load COPYs its pages straight into ``orders``, without the merge. An order met
    again (it changed while the listing ran) turns the rest of the load over to the merge,
    whichever page commits first, and the newest version wins."""
    exchange = Exchange(seed=6, orders=400, now=NOW, events_per_second=0)
    sim = list(exchange)
    again = sim[7]
    newer = replace(again, status="canceled", updated=again.updated + timedelta(seconds=1))
    payloads = [o.render("2026") for o in sim]
    pages = [
        Page(items=payloads[:100], cursor="a"),
        Page(items=[*payloads[100:200], newer.render("2026")], cursor="b"),
        Page(items=payloads[200:300], cursor="c"),
        Page(items=[*payloads[300:], again.render("2026")], cursor=None),
    ]
    new = NewAccount()
    with caplog.at_level(logging.INFO, logger="etl.sync.orders"):
        with recorded_run(db, ACCOUNT, "orders", "incremental") as run:
            result = pull(run, pages, checkpoint=None, label="test", new=new)
    assert not new.holds
    assert "merging from now on" in caplog.text
    expected = {o.order_id: o.render("2026") for o in sim}
    expected[again.order_id] = newer.render("2026")
    assert stored_orders(db) == expected
    assert (result.counts.fetched, result.counts.inserted) == (402, 400)


def test_a_first_load_without_repeats_is_copied_to_its_end(db, client, exchange, caplog):
    with caplog.at_level(logging.INFO, logger="etl.sync.orders"):
        sync(db, client)
    assert_table_equals_truth(db, exchange)
    assert "merging from now on" not in caplog.text


def test_a_first_load_resumed_after_a_kill_merges_from_its_first_page(db, client, exchange, caplog):
    """Its earlier pages are stored: copying would only meet them again."""
    truth = list(exchange)
    with db.begin() as conn:
        upsert_orders(
            conn,
            [
                o
                for o in map(parse_order, (t.render("2026") for t in truth[:30]))
                if isinstance(o, Order)
            ],
            account=ACCOUNT,
            synced_at=NOW,
        )
    with caplog.at_level(logging.INFO, logger="etl.sync.orders"):
        sync(db, client)
    assert_table_equals_truth(db, exchange)
    assert "merging from now on" not in caplog.text
