"""The partitioned reader: a first load, a backfill and verify read a listing as time windows
at once, split a window whose first page is full, checkpoint each window, and stay under the
key's budget, whatever ``min_ts`` compares."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import cast
from urllib.parse import parse_qs

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.db.engine import StreamLock
from etl.db.state import read_state
from etl.db.upsert import Counts
from etl.errors import ApiStatusError
from etl.kalshi.client import Page
from etl.simulator import Exchange, SimulatorApp
from etl.simulator.keys import key_id
from etl.sync.orders import HistoricalOrders, sync_orders
from etl.sync.partitions import (
    OPEN_END,
    OPEN_START,
    Reading,
    Window,
    estimate_pages,
    first_load_plan,
    run_windows,
    uncovered,
)
from etl.sync.run import Run
from etl.sync.verify import verify_orders
from tests.fix_exchange import NOW, make_client
from tests.sync.helpers import ACCOUNT, assert_table_equals_truth, count, runs


def at(day: int) -> datetime:
    return datetime(2026, 11, day, tzinfo=UTC)


def test_a_first_load_plan_tiles_the_whole_time_line_newest_first():
    plan = first_load_plan(NOW)
    assert plan[0].end is None and plan[-1].start is None  # open at both ends
    for newer, older in zip(plan, plan[1:], strict=False):
        assert older.end == newer.start  # no gap, no overlap
    assert plan[0].bounds[1] == OPEN_END and plan[-1].bounds[0] == OPEN_START
    assert plan[0].start == NOW - timedelta(days=7)
    assert (plan[0].min_ts, plan[0].max_ts) == (int(plan[0].start.timestamp()), None)


def test_a_window_cuts_into_equal_pieces_and_an_open_end_up_to_now():
    pieces = Window(at(1), at(3)).pieces(2, NOW)
    assert pieces is not None
    left, right = pieces
    assert (left.start, left.end, right.start, right.end) == (at(1), at(2), at(2), at(3))
    pieces = Window(at(10), None, frozenset({"a"})).pieces(3, at(13))
    assert pieces is not None
    assert [(p.start, p.end) for p in pieces] == [
        (at(10), at(11)),
        (at(11), at(12)),
        (at(12), None),
    ]
    assert all(p.seen == {"a"} for p in pieces)
    assert Window(at(1), at(1) + timedelta(seconds=1)).pieces(2, NOW) is None


def test_what_done_windows_leave_of_an_open_window_keeps_its_open_end():
    win = Window(at(10), None)
    lo = int(at(10).timestamp())
    (piece,) = uncovered(win, [(lo, lo + 3600)])
    assert piece.start == at(10) + timedelta(hours=1) and piece.end is None
    assert uncovered(win, [(0, OPEN_END)]) == []


def _listing_windows(app: SimulatorApp, *, since: int = 0) -> list[dict[str, list[str]]]:
    """The windows of orders listed (first pages), of the requests from the ``since``-th."""
    return [
        parse_qs(query)
        for path, query in list(app.requests)[since:]
        if path.endswith("/portfolio/orders") and "cursor" not in query
    ]


@pytest.mark.parametrize("min_ts_on", ["created_time", "last_update_time"])
def test_a_first_load_splits_full_windows_and_copies_every_order_once(
    db, private_key, min_ts_on, caplog
):
    exchange = Exchange(
        seed=21, orders=3000, api="2026", min_ts_on=min_ts_on, now=NOW, events_per_second=0
    )
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    with caplog.at_level(logging.INFO):
        sync_orders(db, make_client(app, private_key, page_size=50), account=ACCOUNT)
    assert_table_equals_truth(db, exchange)
    windows = _listing_windows(app)
    assert len(windows) > len(first_load_plan(NOW))  # full windows were split
    # Windows overlap where one was split after its first page: those orders are merged,
    # never copied twice, so the COPY path met no stored order (no key violation).
    assert "stored already" not in caplog.text
    with db.connect() as conn:
        assert read_state(conn, ACCOUNT, "orders:load") is None  # the load's windows forgotten


@pytest.mark.parametrize("min_ts_on", ["created_time", "last_update_time"])
def test_orders_that_change_while_the_windows_are_read_are_found_by_the_next_sync(
    db, private_key, min_ts_on
):
    """While the first load reads, the market trades: old resting orders fill or cancel (with
    ``last_update_time`` they move to the newest window, maybe read already) and new ones
    arrive. The next sync converges, whichever timestamp ``min_ts`` compares."""
    exchange = Exchange(
        seed=22, orders=1500, api="2026", min_ts_on=min_ts_on, now=NOW, events_per_second=0
    )
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    inner = httpx.WSGITransport(app=app)
    oldest_resting = sorted(
        (exchange.order(i) for i in exchange.resting_ids()), key=lambda o: o.created
    )

    def trading(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("orders"):
            with app.lock:
                exchange.now += timedelta(seconds=30)
                if oldest_resting:
                    victim = oldest_resting.pop(0)
                    if victim.order_id in exchange.resting_ids():
                        exchange.cancel(victim.order_id)
                exchange.step(3)
        answer = inner.handle_request(request)
        answer.read()
        return httpx.Response(answer.status_code, content=answer.content)

    client = make_client(httpx.MockTransport(trading), private_key, page_size=100)
    sync_orders(db, client, account=ACCOUNT)
    sync_orders(db, make_client(app, private_key, page_size=100), account=ACCOUNT)
    assert_table_equals_truth(db, exchange)


def test_an_interrupted_first_load_resumes_its_windows_and_keeps_its_first_watermark(
    db, private_key
):
    exchange = Exchange(seed=23, orders=1200, api="2026", now=NOW, events_per_second=0)
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    week_ago = int((NOW - timedelta(days=7)).timestamp())

    def older_windows_fail(environ, start_response):
        # Every window older than a week fails; the newer ones are read to their end.
        query = parse_qs(environ.get("QUERY_STRING", ""))
        if "orders" in environ["PATH_INFO"] and int(query.get("max_ts", [OPEN_END])[0]) <= week_ago:
            start_response("503 Service Unavailable", [("Content-Type", "application/json")])
            return [b'{"code": "unavailable", "message": "down"}']
        return app(environ, start_response)

    with pytest.raises(ApiStatusError, match="503"):
        sync_orders(
            db, make_client(older_windows_fail, private_key, page_size=100), account=ACCOUNT
        )
    with db.connect() as conn:
        load = read_state(conn, ACCOUNT, "orders:load")
        assert read_state(conn, ACCOUNT, "orders") is None  # no watermark: not loaded yet
    assert load is not None
    done = [tuple(span) for span in load.state["done"]]
    in_done = {
        order_id
        for order_id in exchange.truth()
        if any(lo <= exchange.order(order_id).created.timestamp() < hi for lo, hi in done)
    }
    assert in_done  # windows holding orders were done
    began = load.watermark
    exchange.now += timedelta(hours=2)
    before = len(app.requests)
    result = sync_orders(db, make_client(app, private_key, page_size=100), account=ACCOUNT)
    assert_table_equals_truth(db, exchange)
    assert result.watermark == began  # what changed since the first attempt is the next sync's
    for window in _listing_windows(app, since=before):  # no done window is read again
        lo = int(window.get("min_ts", ["0"])[0])
        hi = int(window.get("max_ts", [str(OPEN_END)])[0])
        assert not any(a <= lo and hi <= b for a, b in done), (lo, hi, done)
    assert [r.status for r in runs(db)] == ["failed", "succeeded"]
    with db.connect() as conn:
        assert read_state(conn, ACCOUNT, "orders:load") is None


def test_windows_read_at_once_stay_under_the_keys_budget_read_from_the_api(db, private_key):
    """The simulator enforces 400 tokens/s (40 list calls/s) and says so at /account/limits;
    the client, told nothing, reads it there and never draws a 429, with windows read at
    once."""
    exchange = Exchange(seed=24, orders=3000, api="2026", now=NOW, events_per_second=0)
    app = SimulatorApp(
        exchange,
        {key_id(private_key): private_key.public_key()},
        advance=False,
        tokens_per_second=400,
    )
    inner = httpx.WSGITransport(app=app)
    statuses: list[int] = []

    def counting(request: httpx.Request) -> httpx.Response:
        answer = inner.handle_request(request)
        answer.read()
        statuses.append(answer.status_code)
        return httpx.Response(answer.status_code, content=answer.content)

    client = make_client(httpx.MockTransport(counting), private_key, page_size=100)
    client.bucket.set_rate(200, 200)  # what a client told nothing starts with (Basic)
    client._learn_budget = True  # noqa: SLF001 - as KalshiClient(tokens_per_second=None)
    sync_orders(db, client, account=ACCOUNT)
    assert client.bucket.rate == 400
    assert 429 not in statuses
    assert_table_equals_truth(db, exchange)
    result = verify_orders(db, client, account=ACCOUNT)
    assert result.equal and 429 not in statuses


def test_verify_reads_in_windows_and_finds_a_lost_order(db, private_key):
    exchange = Exchange(seed=25, orders=2000, api="2026", now=NOW, events_per_second=0)
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    client = make_client(app, private_key, page_size=100)
    sync_orders(db, client, account=ACCOUNT)
    lost = sorted(exchange.truth())[17]
    with db.begin() as conn:
        conn.execute(sa.text("DELETE FROM orders WHERE order_id = :id"), {"id": lost})
    before = len(_listing_windows(app))
    result = verify_orders(db, client, account=ACCOUNT)
    assert len(_listing_windows(app)) - before > 1  # windows, not one listing
    assert not result.equal and result.before.counts["missing"] == 1
    assert result.before.examples["missing"] == [lost]
    assert count(db, "SELECT count(*) FROM orders") == len(exchange.truth()) - 1


def _by_number(app: SimulatorApp, since: int) -> list[str]:
    """Historical listings asked for one subaccount, of the requests from the ``since``-th."""
    return [
        query
        for path, query in list(app.requests)[since:]
        if path.endswith("/historical/orders") and "subaccount=" in query
    ]


@pytest.mark.parametrize("all_subaccounts", [True, False])
def test_historical_listings_ask_by_subaccount_only_until_one_serves_another_subaccount(
    private_key, all_subaccounts
):
    """Whether ``/historical/orders`` without ``subaccount`` serves them all is learned once per
    sync: after one listing served an order of subaccount 1, an empty window asks nothing more
    (nor which subaccounts exist); a server that serves only subaccount 0 is asked by number
    in every window, the subaccounts asked for once."""
    exchange = Exchange(
        seed=26,
        orders=800,
        api="2026",
        now=NOW,
        events_per_second=0,
        historical_all_subaccounts=all_subaccounts,
    )
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    history = HistoricalOrders(make_client(app, private_key, page_size=100))
    listed = [o for page in history.pages() for o in page.items]
    assert {o["subaccount_number"] for o in listed} == {0, 1}
    start = len(app.requests)
    empty = Window(NOW + timedelta(days=1), NOW + timedelta(days=2))
    pages = history.pages(min_ts=empty.min_ts, max_ts=empty.max_ts)
    assert not [page for page in pages if page.items]
    assert len(_by_number(app, start)) == (0 if all_subaccounts else 1)
    asked = [p for p, _ in app.requests if p.endswith("/portfolio/subaccounts/balances")]
    assert len(asked) == (0 if all_subaccounts else 1)


def test_a_window_split_by_its_first_pages_density_keeps_pieces_near_it_and_one_for_the_rest():
    """A window of 90 days whose first page (newest first) covers one day: estimated at 90
    pages, cut into pieces of about TARGET_PAGES; the oldest, which the records may not reach,
    stay one window, so that an account younger than the window costs few empty listings."""
    win = Window(at(1) - timedelta(days=60), at(1) + timedelta(days=30))
    stamps = [at(1) + timedelta(days=30, seconds=-86.4 * i) for i in range(1000)]
    page = Page(
        items=[{"created_time": s.isoformat(), "order_id": str(i)} for i, s in enumerate(stamps)],
        cursor="next",
    )
    estimate = estimate_pages(win, page, NOW)
    assert estimate is not None and estimate.newest_first
    assert estimate.pages == pytest.approx(90, rel=0.01)
    queued: list[Window] = []

    def read(piece: Window, reading: Reading) -> Counts | None:
        if piece == win:
            assert reading.split(piece, ["0"], estimate)
            return None
        queued.append(piece)
        return Counts()

    run = Run(cast(Engine, None), ACCOUNT, "orders", 0, cast(StreamLock, None), clock=lambda: NOW)
    run_windows(run, [win], [], read, concurrency=3, on_progress=None)
    queued.sort(key=lambda w: w.bounds)
    assert queued[0].start == win.start and queued[-1].end == win.end
    assert all(a.end == b.start for a, b in zip(queued, queued[1:], strict=False))  # a tiling
    near = [w.span(NOW)[1] - w.span(NOW)[0] for w in queued[1:]]
    assert len(near) == 3 and all(d == near[0] for d in near)  # as many as are read at once
    assert queued[0].span(NOW)[1] - queued[0].span(NOW)[0] > near[0]  # the rest in one
    assert all(w.seen == {"0"} for w in queued)
