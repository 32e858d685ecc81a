"""The newcomer demo: what `make demo` shows in about a minute.

Backfills the account, runs a few incremental cycles (orders and queue positions) while the
simulated market trades, then reports from SQL: orders by status, latest queue positions, the
runs, and, against the simulator, whether the table equals the exchange's truth. Composition
only: the work is done by ``etl.sync`` exactly as the CLI and the daemon do it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.db.models import metadata
from etl.errors import ConfigError
from etl.kalshi.client import KalshiClient
from etl.money.books import books, dollars
from etl.money.lots import rebuild_marked
from etl.money.report import render
from etl.simulator import Exchange, SimulatorApp, serve
from etl.simulator.keys import SIMULATED_PREFIX, key_id, load_or_create
from etl.streams.registry import LISTINGS
from etl.sync.listing import sync_listing
from etl.sync.orders import backfill_orders, sync_orders
from etl.sync.queue import poll_queue_positions

EXPLORE_SQL = """\
-- Orders by market and status
SELECT ticker, status, count(*), sum(fill_count_fp) AS filled
FROM orders GROUP BY 1, 2 ORDER BY 1, 2;

-- Money spent per day (fills plus fees), whichever API version sent the order
SELECT date_trunc('day', created_time) AS day,
       sum(taker_fill_cost_dollars + maker_fill_cost_dollars) AS cost,
       sum(coalesce(taker_fees_dollars, 0) + coalesce(maker_fees_dollars, 0)) AS fees
FROM orders GROUP BY 1 ORDER BY 1 DESC LIMIT 14;

-- Where each open order stands in its queue now
SELECT order_id, ticker, outcome_side, book_side, yes_price_dollars, queue_position, captured_at
FROM queue_positions_current ORDER BY queue_position NULLS LAST LIMIT 20;

-- How one order's place in the queue moved (NULL: it had left the book)
SELECT valid_from, valid_to, queue_position FROM queue_position_intervals
WHERE order_id = '<order id>' ORDER BY valid_from;

-- Payloads that could not be parsed, with the reason
SELECT received_at, stream, error FROM rejected_records ORDER BY id DESC LIMIT 20;"""


def reset_simulated_data(engine: Engine) -> None:
    """Empty the tables for a fresh simulated run, but only when they hold nothing but
    simulated accounts (this demo's, or a `kalshi-etl simulate` left over from an earlier
    try): a database with a real account's data is never touched.

    Raises:
        ConfigError: when the database holds a real account's data.
    """
    with engine.begin() as conn:
        accounts = {
            row[0]
            for row in conn.execute(
                sa.text("SELECT account FROM sync_state UNION SELECT account FROM sync_runs")
            )
        }
        has_orders = conn.execute(sa.text("SELECT EXISTS (SELECT 1 FROM orders)")).scalar_one()
        real = sorted(a for a in accounts if not a.startswith(SIMULATED_PREFIX))
        if real or (has_orders and not accounts):
            who = ", ".join(real) or "orders without sync state"
            raise ConfigError(
                f"the database holds data of a real Kalshi account ({who}); the simulated demo "
                "will not mix into it: unset DATABASE_URL or point it at an empty database"
            )
        names = ", ".join(table.name for table in metadata.sorted_tables)
        conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY"))


@dataclass
class DemoSimulator:
    exchange: Exchange
    api_base: str
    key_id: str
    key_path: Path
    stop: Callable[[], None]


def start_simulator(home: Path, *, orders: int = 3000, seed: int = 7) -> DemoSimulator:
    """A busy simulated exchange on a free loopback port, with its key under ``home``."""
    key_path = (home / "simulator" / "key.pem").resolve()
    key = load_or_create(key_path)
    exchange = Exchange(seed=seed, orders=orders, api="2026", events_per_second=40)
    server = serve(SimulatorApp(exchange, {key_id(key): key.public_key()}))
    host, port = str(server.server_address[0]), int(server.server_address[1])

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return DemoSimulator(
        exchange=exchange,
        api_base=f"http://{host}:{port}/trade-api/v2",
        key_id=key_id(key),
        key_path=key_path,
        stop=stop,
    )


def run(
    engine: Engine,
    client: KalshiClient,
    *,
    account: str,
    exchange: Exchange | None,
    cycles: int = 3,
    pause: float = 2.0,
    lookback: timedelta = timedelta(minutes=5),
    report_path: Path | None = None,
) -> Iterator[str]:
    """Run the demo, yielding the report's lines as they come (and writing the HTML report
    to ``report_path``)."""
    now = datetime.now(UTC)
    started = time.monotonic()
    result = backfill_orders(
        engine,
        client,
        account=account,
        since=now - timedelta(days=90),
        until=now,
        window=timedelta(days=7),
        concurrency=4,
    )
    c = result.counts
    yield (
        f"backfill of the last 90 days: {c.fetched} orders fetched, {c.inserted} inserted "
        f"in {time.monotonic() - started:.1f}s"
    )
    for cycle in range(1, cycles + 1):
        orders = sync_orders(engine, client, account=account, lookback=lookback).counts
        queue = poll_queue_positions(engine, client, account=account).counts
        yield (
            f"cycle {cycle}: orders fetched {orders.fetched}, new {orders.inserted}, "
            f"changed {orders.updated}; queue positions polled {queue.fetched}, "
            f"changed {queue.inserted}"
        )
        if cycle < cycles:
            time.sleep(pause)
    if exchange is not None:
        exchange.events_per_second = 0  # pause the market, so the check below is exact
        final = sync_orders(engine, client, account=account, lookback=lookback).counts
        yield f"market paused; catch-up cycle: new {final.inserted}, changed {final.updated}"
    yield from the_money(engine, client, account=account, lookback=lookback)
    yield from report(engine, exchange)
    if report_path is not None:
        with engine.connect() as conn:
            report_path.write_text(render(conn, account), encoding="utf-8")
        yield ""
        yield f"the money, as a page: {report_path.resolve()} (open it in a browser)"


def the_money(
    engine: Engine, client: KalshiClient, *, account: str, lookback: timedelta
) -> Iterator[str]:
    """The rest of the account (fills, settlements, positions, balance, cash), its lots and
    the cash check."""
    for stream in LISTINGS.values():
        counts = sync_listing(engine, client, stream, account=account, lookback=lookback).counts
        yield f"{stream.name}: fetched {counts.fetched}, new {counts.inserted}"
    rebuilt = rebuild_marked(engine, account)
    with engine.connect() as conn:
        b = books(conn, account)
    yield (
        f"P&L lots of {rebuilt.markets} markets built; the cash check: balance "
        f"{dollars(b.balance_now)}, movements {dollars(b.movements)}, residual "
        f"{dollars(b.residual)}"
    )


def report(engine: Engine, exchange: Exchange | None) -> Iterator[str]:
    with engine.connect() as conn:
        yield ""
        yield "orders by status"
        for status, count in conn.execute(
            sa.text("SELECT status, count(*) FROM orders GROUP BY 1 ORDER BY 2 DESC")
        ):
            yield f"  {status:<10}{count:>8}"
        yield ""
        yield "latest queue positions (10 resting orders nearest the front)"
        rows = conn.execute(
            sa.text(
                "SELECT order_id, ticker, queue_position, captured_at FROM "
                "queue_positions_current WHERE queue_position IS NOT NULL "
                "ORDER BY queue_position, order_id LIMIT 10"
            )
        ).all()
        for row in rows:
            yield (
                f"  {row.order_id}  {row.ticker:<16} {row.queue_position:>8} ahead"
                f"  (as of {row.captured_at:%H:%M:%S})"
            )
        yield ""
        yield "runs"
        for run in conn.execute(
            sa.text(
                "SELECT id, stream, mode, status, fetched, inserted, updated, rejected "
                "FROM sync_runs ORDER BY id DESC LIMIT 8"
            )
        ):
            yield (
                f"  #{run.id:<4}{run.stream:<16}{run.mode:<12}{run.status:<10}fetched "
                f"{run.fetched}, inserted {run.inserted}, updated {run.updated}, "
                f"rejected {run.rejected}"
            )
        if exchange is not None:
            stored: dict[str, datetime] = {
                row.order_id: row.last_update_time
                for row in conn.execute(sa.text("SELECT order_id, last_update_time FROM orders"))
            }
            truth = {o.order_id: o.updated for o in exchange}
            behind = sum(
                1 for oid, ts in truth.items() if stored.get(oid) is None or stored[oid] < ts
            )
            yield ""
            yield (
                f"check against the simulator: {len(truth)} orders on the exchange, "
                f"{len(stored)} in the table, "
                + (f"{behind} NOT up to date" if behind else "every one up to date")
            )
    yield ""
    yield "explore further with any PostgreSQL client on the same database, for example:"
    yield from ("  " + line for line in EXPLORE_SQL.splitlines())
