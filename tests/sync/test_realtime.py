"""The user_orders and fill WebSocket channels written into ``orders`` and ``fills``, reconciled
by REST, against the simulator over real loopback sockets (HTTP and WebSocket on one port) and
a real PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy.engine import Engine
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from etl import metrics
from etl.cli import status_lines
from etl.db.engine import create_engine
from etl.db.upsert import ORDER_COLUMNS
from etl.kalshi.auth import KalshiAuth
from etl.kalshi.client import KalshiClient, RetryPolicy
from etl.kalshi.parse import FILL_COLUMNS, STREAM_LACKS, Fill, Order, parse_fill, parse_order
from etl.kalshi.stream import WS_PATH, StreamPolicy, stream_url
from etl.simulator import Exchange, SimulatorApp, serve
from etl.simulator.keys import key_id
from etl.streams.fills import FILLS
from etl.streams.positions import POSITIONS
from etl.sync.listing import sync_listing
from etl.sync.realtime import RealtimeAccount
from tests.fix_exchange import wait_until
from tests.proxy import DatabaseProxy
from tests.sync.helpers import ACCOUNT, assert_table_equals_truth, count, runs

# What a user_order message carries: every column but the ones the channel lacks and raw.
STREAMED = [c for c in ORDER_COLUMNS if c not in STREAM_LACKS and c != "raw"]
FAST = StreamPolicy(ping_interval=0.2, ping_timeout=0.3, base_delay=0.05, max_delay=0.2)


class Clock:
    """Wall-clock time plus an offset a test can move (shared by the client and the server)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Live:
    exchange: Exchange
    app: SimulatorApp
    client: KalshiClient
    url: str
    clock: Clock
    key: rsa.RSAPrivateKey


@pytest.fixture
def live(private_key: rsa.RSAPrivateKey) -> Iterator[Live]:
    """An exchange trading only when the test says so, served over HTTP and WebSocket."""
    clock = Clock()
    exchange = Exchange(seed=7, orders=150, now=datetime.now(UTC), events_per_second=0)
    app = SimulatorApp(
        exchange,
        {key_id(private_key): private_key.public_key()},
        wall_clock=clock,
        stream_ping_interval=0.2,
    )
    server = serve(app)
    base = f"http://127.0.0.1:{server.server_address[1]}/trade-api/v2"
    client = KalshiClient(
        base,
        auth=KalshiAuth(key_id(private_key), private_key, clock=clock),
        tokens_per_second=0,
        page_size=200,
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, max_total=5),
    )
    try:
        yield Live(exchange, app, client, stream_url(base), clock, private_key)
    finally:
        client.close()
        server.shutdown()
        server.server_close()


@pytest.fixture
def realtime(db: Engine, live: Live) -> Iterator[RealtimeAccount]:
    """The account's realtime path, started and subscribed, its first REST catch-up done."""
    stop = threading.Event()
    rt = RealtimeAccount(
        db, live.client, account=ACCOUNT, stream_url=live.url, stop=stop, policy=FAST
    )
    rt.start()
    wait_until(lambda: rt.connected and rt.catch_ups >= 1, timeout=20)
    try:
        yield rt
    finally:
        stop.set()
        assert rt.join(timeout=10), "the realtime threads did not stop"


def trade(live: Live, events: int, *, pause: float = 0.0) -> float:
    """Play ``events`` trading events (one per millisecond of exchange time), ``pause``
    seconds apart in real time; returns the wall time of the last one."""
    for _ in range(events):
        with live.app.lock:
            live.exchange.step(1)
        if pause:
            time.sleep(pause)
    return time.time()


def streamed_table(engine: Engine) -> dict[str, tuple[Any, ...]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT order_id, {', '.join(STREAMED)} FROM orders"))
        return {row[0]: tuple(row[1:]) for row in rows}


def streamed_truth(exchange: Exchange) -> dict[str, tuple[Any, ...]]:
    truth: dict[str, tuple[Any, ...]] = {}
    for order_id, raw in exchange.truth().items():
        order = parse_order(raw)
        assert isinstance(order, Order)
        truth[order_id] = tuple(getattr(order, c) for c in STREAMED)
    return truth


def stream_caught_up(engine: Engine, live: Live) -> bool:
    """Every order in the table, each with the truth's values of every field the stream
    carries (the ones it lacks are filled by REST)."""
    with live.app.lock:
        truth = streamed_truth(live.exchange)
    return streamed_table(engine) == truth


def rest_runs(engine: Engine, stream: str = "orders") -> int:
    return count(engine, f"SELECT count(*) FROM sync_runs WHERE stream = '{stream}'")


FILL_VALUES = [c for c in FILL_COLUMNS if c != "raw"]  # the channel carries every one


def fills_table(engine: Engine) -> dict[str, tuple[Any, ...]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT {', '.join(FILL_VALUES)} FROM fills"))
        return {row.fill_id: tuple(row) for row in rows}


def fills_truth(exchange: Exchange) -> dict[str, tuple[Any, ...]]:
    truth = {}
    for sim in exchange.ledger.fills():
        fill = parse_fill(sim.render())
        assert isinstance(fill, Fill)
        truth[fill.fill_id] = tuple(getattr(fill, c) for c in FILL_VALUES)
    return truth


def fills_caught_up(engine: Engine, live: Live) -> bool:
    with live.app.lock:
        truth = fills_truth(live.exchange)
    return fills_table(engine) == truth


def test_with_the_stream_on_the_table_equals_the_truth_within_a_second_of_the_last_change(
    db, live, realtime
):
    assert_table_equals_truth(db, live.exchange)  # the first catch-up loaded everything
    before = rest_runs(db)

    last = trade(live, 300, pause=0.003)  # ~300 changes over about a second
    wait_until(lambda: stream_caught_up(db, live), timeout=10, poll=0.01)
    caught_up_after = time.time() - last

    assert caught_up_after < 1.0, f"the table matched the truth {caught_up_after:.2f}s late"
    assert rest_runs(db) == before, "REST ran: the stream alone should have done it"
    assert live.app.stream.counts["messages"] >= 250


def test_with_the_stream_on_fills_equal_the_truth_within_a_second_once_each_and_rest_completes_them(
    db, live, realtime
):
    hub = live.app.stream
    hub.faults.duplicate_rate = 0.3  # a fill sent twice is written once
    hub.faults.reorder_rate = 0.3
    before = rest_runs(db, "fills")
    with live.app.lock:
        known = len(fills_truth(live.exchange))

    last = trade(live, 300, pause=0.003)
    wait_until(lambda: fills_caught_up(db, live), timeout=10, poll=0.01)
    caught_up_after = time.time() - last

    assert caught_up_after < 1.0, f"fills matched the truth {caught_up_after:.2f}s late"
    assert rest_runs(db, "fills") == before, "REST ran: the fill channel alone should have done it"
    streamed = count(db, "SELECT count(*) FROM fills WHERE raw ? 'ts_ms'")
    assert streamed == len(fills_truth(live.exchange)) - known > 20
    assert hub.counts["duplicated"] > 0 and hub.counts["reordered"] > 0
    with db.connect() as conn:
        mark = conn.execute(
            sa.text("SELECT watermark FROM sync_state WHERE stream = 'fills:stream'")
        ).scalar_one()
    assert mark == max(v[FILL_VALUES.index("created_time")] for v in fills_table(db).values())

    # The REST version, which carries every field, replaces the channel's; nothing is added.
    sync_listing(db, live.client, FILLS, account=ACCOUNT)
    assert count(db, "SELECT count(*) FROM fills WHERE raw ? 'ts_ms'") == 0
    assert fills_caught_up(db, live)


def stream_positions(engine: Engine) -> dict[tuple[int, str], Any]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT DISTINCT ON (subaccount_number, ticker) subaccount_number, ticker, "
                "position_fp, market_exposure_dollars, realized_pnl_dollars, fees_paid_dollars "
                "FROM position_snapshots ORDER BY subaccount_number, ticker, captured_at DESC"
            )
        )
        return {(r[0], r[1]): tuple(r[2:]) for r in rows}


def positions_streamed_truth(live: Live) -> dict[tuple[int, str], Any]:
    with live.app.lock:
        positions = live.exchange.money.positions(archived=False)
        return {
            (p.subaccount, p.ticker): (
                Decimal(p.position).quantize(Decimal("0.01")),
                Decimal(p.exposure) / 100,
                Decimal(p.realized) / 100,
                Decimal(p.fees) / 100,
            )
            for p in positions
        }


def test_market_positions_messages_reach_position_snapshots_within_a_second_and_rest_completes(
    db, live, realtime
):
    before = rest_runs(db, "positions")
    last = trade(live, 200, pause=0.003)
    wait_until(
        lambda: stream_positions(db) == positions_streamed_truth(live), timeout=10, poll=0.01
    )
    caught_up_after = time.time() - last
    assert caught_up_after < 1.0, f"positions matched the truth {caught_up_after:.2f}s late"
    assert rest_runs(db, "positions") == before, "REST ran: the channel alone should have done it"
    assert live.app.stream.counts["messages"] > 0
    with db.connect() as conn:
        streamed = conn.execute(
            sa.text(
                "SELECT count(*) FILTER (WHERE raw ? 'position_cost_dollars'), "
                "count(*) FILTER (WHERE raw ? 'position_cost_dollars' "
                "AND total_traded_dollars IS NULL) FROM position_snapshots"
            )
        ).one()
    assert streamed[0] > 10
    # A column the channel lacks keeps the latest row's value (REST's, from the catch-up),
    # unless the market was first seen on the stream.
    first_seen = count(
        db,
        "SELECT count(DISTINCT (subaccount_number, ticker)) FROM position_snapshots s "
        "WHERE raw ? 'position_cost_dollars' AND NOT EXISTS (SELECT 1 FROM position_snapshots r "
        "WHERE r.subaccount_number = s.subaccount_number AND r.ticker = s.ticker "
        "AND NOT r.raw ? 'position_cost_dollars')",
    )
    assert streamed[1] == 0 or first_seen > 0

    # The next REST poll reconciles every column.
    sync_listing(db, live.client, POSITIONS, account=ACCOUNT)
    with live.app.lock:
        rest_truth = {
            (p.subaccount, p.ticker): p.render()["total_traded_dollars"]
            for p in live.exchange.money.positions(archived=False)
        }
    with db.connect() as conn:
        traded = conn.execute(
            sa.text(
                "SELECT DISTINCT ON (subaccount_number, ticker) subaccount_number, ticker, "
                "total_traded_dollars FROM position_snapshots "
                "ORDER BY subaccount_number, ticker, captured_at DESC"
            )
        ).all()
    assert {(r[0], r[1]): r[2] for r in traded} == {k: Decimal(v) for k, v in rest_truth.items()}


def test_a_malformed_fill_message_is_kept_in_rejected_records_of_fills(db, live, realtime):
    bad = {"trade_id": "t-1", "market_ticker": "KXSIM-E1-M1", "count_fp": "many"}
    batch = realtime.write([({"type": "fill", "sid": 2, "msg": bad}, 0.0)])
    assert batch.counts.rejected == 1
    with db.connect() as conn:
        row = conn.execute(sa.text("SELECT stream, error, payload FROM rejected_records")).one()
    assert row.stream == "fills"
    assert row.error.startswith("fill t-1: ") and "count_fp" in row.error
    assert row.payload == bad


def test_the_stream_records_the_newest_exchange_time_it_committed(db, live, realtime):
    trade(live, 20)
    wait_until(lambda: stream_caught_up(db, live), timeout=10)
    with db.connect() as conn:
        stored = conn.execute(
            sa.text(
                "SELECT watermark FROM sync_state WHERE account = :a AND stream = 'orders:stream'"
            ),
            {"a": ACCOUNT},
        ).scalar_one()
        newest = conn.execute(sa.text("SELECT max(last_update_time) FROM orders")).scalar_one()
    assert stored == newest
    assert f"  last change {newest.isoformat()}" in "\n".join(status_lines(db, ACCOUNT))


@pytest.mark.parametrize("fault", ["drop", "mute"])
def test_after_a_lost_connection_during_which_orders_change_the_table_equals_the_truth(
    db, live, realtime, fault
):
    hub = live.app.stream
    catch_ups = realtime.catch_ups
    with live.app.lock:  # the changes happen while no connection can carry them
        hub.drop() if fault == "drop" else hub.mute()
        live.exchange.step(60)
    pushed_before = hub.counts["messages"]

    wait_until(lambda: realtime.catch_ups > catch_ups and realtime.connected, timeout=20)
    wait_until(lambda: stream_caught_up(db, live), timeout=10)

    assert hub.counts["subscriptions"] >= 2
    assert hub.counts["messages"] == pushed_before, "the lost changes were never pushed"
    assert_table_equals_truth(db, live.exchange)  # the REST catch-up: every field, raw too
    assert fills_caught_up(db, live)  # and the fills made meanwhile


def test_duplicated_and_reordered_messages_leave_the_newest_version(db, live, realtime):
    hub = live.app.stream
    hub.faults.duplicate_rate = 0.4
    hub.faults.reorder_rate = 0.4
    with live.app.lock:
        orders = [live.exchange.create_order() for _ in range(30)]
        resting = [o for o in orders if o.status == "resting"]
    before = rest_runs(db)
    for order in resting:  # each order changes 2-5 times in a row, 1 ms apart
        while order.status == "resting":
            with live.app.lock:
                live.exchange.now += timedelta(milliseconds=1)
                if order.filled < order.initial - 1 and order.filled < 3:
                    live.exchange.fill(order.order_id, 1)
                else:
                    live.exchange.cancel(order.order_id)
            time.sleep(0.002)  # messages of one order land in different commits

    wait_until(lambda: stream_caught_up(db, live), timeout=10)
    assert hub.counts["duplicated"] > 10 and hub.counts["reordered"] > 10
    assert rest_runs(db) == before, "REST ran: the stream's guard alone should have done it"


def test_a_message_older_than_the_stored_version_changes_nothing(db, live, realtime):
    with live.app.lock:
        order = live.exchange.create_order()
        while order.status != "resting":
            order = live.exchange.create_order()
        older = {"type": "user_order", "sid": 1, "msg": order.render_user_order()}
        live.exchange.now += timedelta(milliseconds=5)
        live.exchange.fill(order.order_id, 1)
        newer = {"type": "user_order", "sid": 1, "msg": order.render_user_order()}
    wait_until(lambda: stream_caught_up(db, live), timeout=10)

    late = realtime.write([(older, time.time())])  # in a commit of its own, after the newer
    assert (late.counts.inserted, late.counts.updated, late.counts.unchanged) == (0, 0, 1)
    again = realtime.write([(newer, time.time()), (newer, time.time())])
    assert again.counts.unchanged == 2
    assert stream_caught_up(db, live)


def test_a_reconnect_signs_again_and_a_stale_signature_is_refused(db, live, realtime):
    hub = live.app.stream
    first = hub.upgrades[-1]
    live.clock.offset += 90  # both clocks move: the first attempt's signature is now stale
    subscriptions = hub.counts["subscriptions"]
    hub.drop()
    wait_until(lambda: hub.counts["subscriptions"] > subscriptions, timeout=20)

    again = hub.upgrades[-1]
    assert again["KALSHI-ACCESS-TIMESTAMP"] != first["KALSHI-ACCESS-TIMESTAMP"]
    with pytest.raises(InvalidStatus) as refused:
        connect(live.url, additional_headers=first, open_timeout=5)
    assert refused.value.response.status_code == 401
    assert b"more than 60 s off" in bytes(refused.value.response.body or b"")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda auth: {}, id="no signature"),
        pytest.param(lambda auth: auth.headers("GET", "/trade-api/v2"), id="wrong path signed"),
        pytest.param(lambda auth: auth.headers("POST", WS_PATH), id="wrong method signed"),
    ],
)
def test_an_upgrade_without_a_valid_signature_is_refused(live, headers):
    auth = KalshiAuth(key_id(live.key), live.key, clock=live.clock)
    with pytest.raises(InvalidStatus) as refused:
        connect(live.url, additional_headers=headers(auth), open_timeout=5)
    assert refused.value.response.status_code == 401
    assert live.app.stream.counts["refused"] == 1


def test_a_malformed_message_is_kept_in_rejected_records(db, live, realtime):
    messages = [
        ({"type": "user_order", "sid": 1, "msg": {"order_id": "x-1", "status": "resting"}}, 0.0),
        ("not json at all", 0.0),
    ]
    batch = realtime.write(messages)
    assert batch.counts.rejected == 2
    with db.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT error, payload, payload_text FROM rejected_records ORDER BY id")
        ).all()
    assert "order x-1: user_order: missing required field 'ticker'" in rows[0].error
    assert rows[0].payload == {"order_id": "x-1", "status": "resting"}
    assert rows[1].payload_text == "not json at all"
    assert runs(db)[-1].status == "succeeded"


def test_messages_that_arrive_while_the_database_is_away_are_written_once_it_is_back(
    db, database_url, live
):
    proxy = DatabaseProxy(database_url).start()
    engine = create_engine(proxy.proxied_url)
    stop = threading.Event()
    account = f"acct-{uuid.uuid4().hex[:6]}"  # the metrics are per process: read deltas
    rt = RealtimeAccount(
        engine, live.client, account=account, stream_url=live.url, stop=stop, policy=FAST
    )

    def written() -> float:
        return sum(
            metrics.REGISTRY.get_sample_value(
                "kalshi_etl_stream_messages_total", {"account": account, "outcome": outcome}
            )
            or 0.0
            for outcome in ("inserted", "updated", "unchanged")
        )

    try:
        rt.start()
        wait_until(lambda: rt.connected and rt.catch_ups >= 1, timeout=20)
        proxy.stop()
        trade(live, 40)
        time.sleep(1.5)  # the writer fails, keeps the messages, tries again each second
        assert written() == 0
        proxy.start()
        wait_until(lambda: written() >= 30, timeout=15)
        wait_until(lambda: stream_caught_up(db, live), timeout=15)
    finally:
        stop.set()
        rt.join(timeout=10)
        proxy.stop()
        engine.dispose()


def test_a_catch_up_reads_back_to_the_last_change_committed_before_the_drop(db, live):
    rt = RealtimeAccount(
        db, live.client, account=ACCOUNT, stream_url=live.url, stop=threading.Event(), policy=FAST
    )
    rt.catch_up()  # the first sync: no watermark yet, so no min_ts
    before_drop = datetime.now(UTC) - timedelta(minutes=20)
    rt._last_exchange_time = before_drop
    rt.disconnected("the connection dropped without a close frame")
    rt._last_exchange_time = datetime.now(UTC)  # the new connection's first messages
    live.app.requests.clear()

    rt.catch_up()

    min_ts = [
        int(query.split("min_ts=")[1].split("&")[0])
        for path, query in live.app.requests
        if path.endswith("/portfolio/orders") and "min_ts=" in query
    ]
    assert min_ts and min_ts[0] <= before_drop.timestamp() - 5  # the margin too
    fills_min_ts = [
        int(query.split("min_ts=")[1].split("&")[0])
        for path, query in live.app.requests
        if path.endswith("/portfolio/fills") and "min_ts=" in query
    ]
    assert fills_min_ts and fills_min_ts[0] <= before_drop.timestamp() - 5


def test_while_the_database_is_away_the_inbox_stays_bounded_and_rest_covers_what_was_dropped(
    db, database_url, live, caplog
):
    proxy = DatabaseProxy(database_url).start()
    engine = create_engine(proxy.proxied_url)
    stop = threading.Event()
    account = f"acct-{uuid.uuid4().hex[:6]}"
    rt = RealtimeAccount(
        engine,
        live.client,
        account=account,
        stream_url=live.url,
        stop=stop,
        policy=FAST,
        inbox_limit=20,
    )

    def backlog() -> float:
        value = metrics.REGISTRY.get_sample_value("kalshi_etl_stream_backlog", {"account": account})
        return value or 0.0

    try:
        rt.start()
        wait_until(lambda: rt.connected and rt.catch_ups >= 1, timeout=20)
        catch_ups = rt.catch_ups
        proxy.stop()
        with caplog.at_level("INFO", logger="etl.sync.realtime"):
            trade(live, 150, pause=0.01)
            time.sleep(2.5)  # the writer retries each second
            assert rt._inbox.qsize() <= 20
            assert 0 < backlog() <= 20 + 21  # the inbox, and the batch in hand (one more)
            assert rt.dropped_total > 0
            dropped = metrics.REGISTRY.get_sample_value(
                "kalshi_etl_stream_dropped_total", {"account": account}
            )
            assert dropped == rt.dropped_total
            proxy.start()
            wait_until(lambda: rt.catch_ups > catch_ups, timeout=20)
            wait_until(lambda: stream_caught_up(db, live), timeout=15)
        errors = [r for r in caplog.records if r.levelname == "ERROR" and "stream of" in r.message]
        assert len(errors) == 1, [r.message for r in errors]  # not one per retry
        assert any("the database is back after" in r.message for r in caplog.records)
        assert backlog() == 0
    finally:
        stop.set()
        rt.join(timeout=10)
        proxy.stop()
        engine.dispose()
