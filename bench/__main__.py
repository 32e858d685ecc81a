"""`make bench`: how fast kalshi-etl loads orders, against references measured in the same run.

Against the simulator in its own process over loopback HTTP (no rate limit, no trading while
measuring) and a fresh database on
BENCH_DATABASE_URL / DATABASE_URL (else the embedded PostgreSQL), it measures:

- read + parse only: every page of the simulator through the client and the parser (the cost
  of the source, which no loader can beat);
- plain COPY of the same parsed rows into an unindexed table (the floor for the database side);
- the guarded upsert alone, into an empty `orders`, then replaying the same rows (all unchanged);
- a first `sync` of the whole account end to end, then a no-change `sync`.

Prints a table with ratios and writes bench/results.json. BENCH_ORDERS sets the account size
(default 100000).
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

from etl.config import environment, from_env
from etl.db import migrations
from etl.db.engine import embedded_url
from etl.db.upsert import ORDER_COLUMNS, _row, upsert_orders
from etl.kalshi.auth import KalshiAuth, read_private_key_file
from etl.kalshi.client import KalshiClient
from etl.kalshi.parse import Order, parse_order
from etl.sync.orders import sync_orders

PAGE = 1000
RESULTS = Path(__file__).with_name("results.json")


def timed(label: str, fn: Callable[[], Any]) -> tuple[float, Any]:
    print(f"  {label} …", end="", flush=True, file=sys.stderr)
    started = time.perf_counter()
    value = fn()
    elapsed = time.perf_counter() - started
    print(f" {elapsed:.2f}s", file=sys.stderr)
    return elapsed, value


def main() -> int:
    n = int(os.environ.get("BENCH_ORDERS", "100000"))
    settings = from_env(environment())
    server = os.environ.get("BENCH_DATABASE_URL") or settings.database_url
    server_url = sa.make_url(
        server.replace("postgresql://", "postgresql+psycopg://", 1)
        if server
        else embedded_url(Path(".kalshi-etl"))
    )
    name = f"ketl_bench_{secrets.token_hex(3)}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = sa.create_engine(server_url.set(database=name))
    try:
        return run(engine, n)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run(engine: sa.Engine, n: int) -> int:
    migrations.upgrade(engine)
    print(f"kalshi-etl benchmark: {n} simulated orders, page size {PAGE}", file=sys.stderr)
    home = Path(tempfile.mkdtemp(prefix="ketl-bench-"))
    simulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "etl",
            "simulate",
            "--port",
            "0",
            "--orders",
            str(n),
            "--seed",
            "42",
            "--events-per-second",
            "0",
            "--rate-limit",
            "0",
        ],
        env={**os.environ, "KALSHI_ETL_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert simulator.stdout is not None
        made, lines = timed(
            "simulator start", lambda: [simulator.stdout.readline().strip() for _ in range(3)]
        )
        env = dict(line.split("=", 1) for line in lines)
        return measure(engine, n, env, made)
    finally:
        simulator.terminate()
        simulator.communicate(timeout=30)


def measure(engine: sa.Engine, n: int, env: dict[str, str], made: float) -> int:
    key = read_private_key_file(Path(env["KALSHI_PRIVATE_KEY_PATH"]))

    def client() -> KalshiClient:
        return KalshiClient(
            env["KALSHI_API_BASE"],
            auth=KalshiAuth(env["KALSHI_API_KEY_ID"], key),
            tokens_per_second=0,
            page_size=PAGE,
        )

    def read_and_parse() -> list[Order]:
        with client() as c:
            pages = [*c.iter_order_pages(), *c.iter_historical_order_pages()]
        orders = [parse_order(item) for page in pages for item in page.items]
        return [o for o in orders if isinstance(o, Order)]

    t_read, parsed = timed("read + parse over HTTP", read_and_parse)
    assert len(parsed) == n, (len(parsed), n)

    def plain_copy() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE bench_copy (LIKE orders INCLUDING DEFAULTS)"))
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            with (
                driver.cursor() as cur,
                cur.copy(f"COPY bench_copy ({', '.join(ORDER_COLUMNS)}) FROM STDIN") as copy,
            ):
                for order in parsed:
                    copy.write_row(_row(order))

    t_copy, _ = timed("plain COPY", plain_copy)

    def upsert_all() -> None:
        now = datetime.now(UTC)
        for i in range(0, len(parsed), PAGE):
            with engine.begin() as conn:
                upsert_orders(conn, parsed[i : i + PAGE], synced_at=now)

    t_upsert, _ = timed("guarded upsert, new rows", upsert_all)
    t_replay, _ = timed("guarded upsert, replay (unchanged)", upsert_all)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE orders, bench_copy"))

    with client() as c:
        t_first, first = timed("first sync", lambda: sync_orders(engine, c, account="bench"))
        t_again, again = timed("no-change sync", lambda: sync_orders(engine, c, account="bench"))
    assert first.counts.inserted == n, first.counts
    assert again.counts.inserted == again.counts.updated == 0, again.counts

    rate = lambda seconds: n / seconds  # noqa: E731
    rows = [
        ("read + parse over HTTP (source)", t_read, rate(t_read), "1.00× of source"),
        ("plain COPY (db floor)", t_copy, rate(t_copy), "1.00× of COPY"),
        ("guarded upsert, new", t_upsert, rate(t_upsert), f"{t_upsert / t_copy:.2f}× COPY time"),
        ("guarded upsert, replay", t_replay, rate(t_replay), f"{t_replay / t_copy:.2f}× COPY time"),
        (
            "first sync end to end",
            t_first,
            rate(t_first),
            f"{t_first / (t_read + t_copy):.2f}× (source + COPY)",
        ),
    ]
    print()
    print(f"{'measure':<32}{'seconds':>10}{'orders/s':>12}   ratio")
    for label, seconds, per_second, ratio in rows:
        print(f"{label:<32}{seconds:>10.2f}{per_second:>12,.0f}   {ratio}")
    print(
        f"{'no-change sync':<32}{t_again:>10.2f}{'':>12}   re-read {again.counts.fetched} "
        f"orders (incremental window + every resting order), wrote none"
    )
    RESULTS.write_text(
        json.dumps(
            {
                "orders": n,
                "page_size": PAGE,
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                "seconds": {
                    "simulator_setup": made,
                    "read_parse": t_read,
                    "plain_copy": t_copy,
                    "upsert_new": t_upsert,
                    "upsert_replay": t_replay,
                    "first_sync": t_first,
                    "no_change_sync": t_again,
                },
                "orders_per_second": {
                    "first_sync": rate(t_first),
                    "upsert_new": rate(t_upsert),
                    "plain_copy": rate(t_copy),
                },
                "no_change_sync_fetched": again.counts.fetched,
                "ratios": {
                    "upsert_new_vs_copy": t_upsert / t_copy,
                    "first_sync_vs_source_plus_copy": t_first / (t_read + t_copy),
                },
            },
            indent=2,
        )
    )
    print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
