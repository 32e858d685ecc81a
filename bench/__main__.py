"""`make bench`: how fast kalshi-etl loads orders, against references measured in the same run.

Against the simulator in its own process over loopback HTTP (no rate limit, no trading while
measuring) and a fresh database on
BENCH_DATABASE_URL / DATABASE_URL (else the embedded PostgreSQL), it measures:

- read + parse only: every page of the simulator through the client and the parser (the cost
  of the source, which no loader can beat);
- plain COPY of the same parsed rows into an unindexed table (the floor for the database side);
- the guarded upsert alone, into an empty `orders`, then replaying the same rows (all unchanged);
- a first `sync` of the whole account end to end, then a no-change `sync`;
- the API calls of a first load with `KALSHI_PAGE_SIZE=auto` against `200` (the 2025 limit),
  and what they cost at the Basic tier's read budget (200 tokens/s, 10 per list call);
- a queue-position poll of about 10,000 resting orders over 500 markets (a simulator served
  in this process): the first poll, a poll with nothing changed and one with 1% changed,
  against reading the same positions from the API alone and a plain COPY of 10,000 rows.

- realtime: the ``user_orders`` and ``fill`` WebSocket channels into ``orders`` and ``fills``
  while a simulator in its own process trades at 50 and 500 changes a second: event → commit
  latency p50/p99 per channel, against event → received (the source: what no writer can beat)
  measured on the same messages, and the messages per commit.
- a first load with fills: ``kalshi-etl sync --streams orders,fills`` of 100,000 orders
  (BENCH_FILLS_ORDERS) and their fills, beside ``--streams orders`` over the same simulator.
- the money on 1,000,000 fills (BENCH_MONEY_FILLS): the rebuild of every market's lots, and
  the views queried, beside a plain aggregate over the same fills.

- as users load: the first ``kalshi-etl sync`` as a process of its own, on accounts of 100,000
  and 1,000,000 orders (``--quick``: 100,000 only) with 8% and 35% of them resting: orders/s
  against a fetch-only pass over the same simulator (every page of both tiers read and
  parsed as a sync does, nothing written), its CPU per order and peak RSS, then the no-change
  cycle's seconds and API calls. The 100,000-order loads are the median of three. Where the
  CPU went (the sync's, the simulator's, PostgreSQL's, from /proc) and the least wall time it
  allows on this machine's cores. Then the 100,000-order loads again against a simulator that
  answers 50 ms later (BENCH_REMOTE_LATENCY; 0 to skip), as an exchange across a network;
- a first load at the key's read budget (BENCH_ONLY=budget): for orders and for fills, the
  first ``kalshi-etl sync`` told nothing of the budget (it reads ``GET /account/limits``)
  against a simulator 50 ms away enforcing 200 and 1,000 tokens/s: list calls/s as a share of
  the budget, records/s, 429s received, peak RSS, a sequential fetch-only pass beside it, and
  the two ceilings measured in the same run, the budget's (list calls/s × page size) and the
  CPU's (the same load over loopback with no limit), with the one that binds; the cases run
  in rounds (each round runs each once: a ceiling and the loads it judges are measured minutes
  apart, whatever the machine's speed does meanwhile) and each ratio is the median of the
  rounds'; then one load of 1,000,000 orders (BENCH_BUDGET_LARGE) for its peak RSS.

Prints a table with ratios and writes bench/results.json. BENCH_ORDERS sets the account size
of the detailed part (default 100000); BENCH_ONLY=stream, =load, =fills, =money or =budget runs
one part alone;
BENCH_LOAD_SIZES and BENCH_RESTING set the loads (default 100000,1000000 and 0.08,0.35), and
BENCH_REPEATS the runs of each (default 3 up to 100,000 orders, else 1).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

from etl import metrics
from etl.config import environment, from_env
from etl.db import migrations
from etl.db.engine import embedded_url
from etl.db.upsert import ORDER_COLUMNS, _row, upsert_orders
from etl.kalshi.auth import KalshiAuth, read_private_key_file
from etl.kalshi.client import LIST_COST, KalshiClient, PageSize
from etl.kalshi.parse import Order, parse_order
from etl.kalshi.stream import stream_url
from etl.simulator import Exchange, SimulatorApp, serve
from etl.simulator.keys import generate_key, key_id
from etl.sync.orders import sync_orders
from etl.sync.queue import poll_queue_positions
from etl.sync.realtime import Batch, RealtimeAccount

PAGE = 1000
BASIC_TIER = 200.0  # read tokens per second
QUEUE_RESTING = 10_000
QUEUE_MARKETS = 500
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


def start_simulator(home: Path, *options: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """``kalshi-etl simulate`` in its own process on a free port; its three env lines."""
    simulator = subprocess.Popen(
        [sys.executable, "-m", "etl", "simulate", "--port", "0", "--rate-limit", "0", *options],
        env={**os.environ, "KALSHI_ETL_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert simulator.stdout is not None
    lines = [simulator.stdout.readline().strip() for _ in range(3)]
    return simulator, dict(line.split("=", 1) for line in lines)


def run(engine: sa.Engine, n: int) -> int:
    migrations.upgrade(engine)
    only = os.environ.get("BENCH_ONLY")
    if only == "stream":
        print_stream(measure_stream(engine))
        return 0
    if only == "load":
        print_loads(measure_loads(engine, quick=QUICK))
        return 0
    if only in ("budget", "limit"):
        print_budget(measure_budget(engine))
        return 0
    if only == "fills":
        print_fills(measure_fills(engine))
        return 0
    if only == "money":
        print_money(measure_money(engine))
        return 0
    print(f"kalshi-etl benchmark: {n} simulated orders, page size {PAGE}", file=sys.stderr)
    home = Path(tempfile.mkdtemp(prefix="ketl-bench-"))
    options = ("--orders", str(n), "--seed", "42", "--events-per-second", "0")
    made, (simulator, env) = timed("simulator start", lambda: start_simulator(home, *options))
    try:
        return measure(engine, n, env, made)
    finally:
        simulator.terminate()
        simulator.communicate(timeout=30)


def measure(engine: sa.Engine, n: int, env: dict[str, str], made: float) -> int:
    key = read_private_key_file(Path(env["KALSHI_PRIVATE_KEY_PATH"]))

    def client(page_size: PageSize = PAGE) -> KalshiClient:
        return KalshiClient(
            env["KALSHI_API_BASE"],
            auth=KalshiAuth(env["KALSHI_API_KEY_ID"], key),
            tokens_per_second=0,
            page_size=page_size,
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
                cur.copy(
                    f"COPY bench_copy (account, {', '.join(ORDER_COLUMNS)}) FROM STDIN"
                ) as copy,
            ):
                for order in parsed:
                    copy.write_row(_row("bench", order))

    t_copy, _ = timed("plain COPY", plain_copy)

    def upsert_all() -> None:
        now = datetime.now(UTC)
        for i in range(0, len(parsed), PAGE):
            with engine.begin() as conn:
                upsert_orders(conn, parsed[i : i + PAGE], account="bench", synced_at=now)

    t_upsert, _ = timed("guarded upsert, new rows", upsert_all)
    t_replay, _ = timed("guarded upsert, replay (unchanged)", upsert_all)
    # The 100,000 parsed orders are not needed again: held, every garbage collection of the
    # parts below would walk them.
    parsed.clear()
    gc.collect()
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE orders, bench_copy"))

    calls_before = api_calls()
    with client("auto") as c:
        t_first, first = timed("first sync", lambda: sync_orders(engine, c, account="bench"))
        calls_auto = api_calls() - calls_before
        t_again, again = timed("no-change sync", lambda: sync_orders(engine, c, account="bench"))
    assert first.counts.inserted == n, first.counts
    assert again.counts.inserted == again.counts.updated == 0, again.counts
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE orders, sync_state, sync_runs, rejected_records"))
    calls_before = api_calls()
    with client(200) as c:
        t_first_200, _ = timed(
            "first sync, page size 200", lambda: sync_orders(engine, c, account="bench")
        )
    calls_200 = api_calls() - calls_before
    queue = measure_queue(engine)
    stream = measure_stream(engine)
    loads = measure_loads(engine, quick=QUICK)
    with_fills = measure_fills(engine)
    money = measure_money(engine)
    budgeted = measure_budget(engine)

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
    floor = lambda calls: calls * LIST_COST / BASIC_TIER  # noqa: E731
    print()
    print(f"{'first load, API calls':<32}{'calls':>10}{'seconds':>12}   at the Basic tier")
    for label, calls, seconds in (
        ("KALSHI_PAGE_SIZE=auto (1000)", calls_auto, t_first),
        ("KALSHI_PAGE_SIZE=200", calls_200, t_first_200),
    ):
        print(f"{label:<32}{calls:>10.0f}{seconds:>12.2f}   ≥ {floor(calls):.1f}s of read budget")
    print(f"{'':<32}{calls_200 / calls_auto:>9.2f}× fewer calls with auto")
    q = queue
    print()
    print(
        f"queue poll: {q['resting']} resting orders over {q['markets']} markets, "
        f"{q['api_calls']} API calls a poll"
    )
    print(f"{'measure':<32}{'seconds':>10}{'rows':>12}   ratio")
    for label, seconds, rows_written, ratio in (
        ("API read alone (source)", q["read"], 0, "1.00× of source"),
        ("plain COPY of the rows", q["copy"], q["resting"], "1.00× of COPY"),
        (
            "first poll",
            q["first"],
            q["first_rows"],
            f"{q['first'] / (q['read'] + q['copy']):.2f}× (source + COPY)",
        ),
        (
            "poll, nothing changed",
            q["unchanged"],
            q["unchanged_rows"],
            f"{q['unchanged'] / q['read']:.2f}× source",
        ),
        (
            "poll, 1% changed",
            q["changed"],
            q["changed_rows"],
            f"{q['changed'] / q['read']:.2f}× source",
        ),
    ):
        print(f"{label:<32}{seconds:>10.2f}{rows_written:>12}   {ratio}")
    print_stream(stream)
    print_loads(loads)
    print_fills(with_fills)
    print_money(money)
    print_budget(budgeted)
    RESULTS.write_text(
        json.dumps(
            {
                "loads": loads,
                "fills_load": with_fills,
                "money": money,
                "budget": budgeted,
                "stream": stream,
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
                "first_load_api_calls": {
                    "auto": calls_auto,
                    "page_200": calls_200,
                    "basic_tier_seconds_auto": floor(calls_auto),
                    "basic_tier_seconds_200": floor(calls_200),
                    "first_sync_seconds_200": t_first_200,
                },
                "queue_poll": queue,
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


def api_calls(*, list_only: bool = False, status: str | None = None) -> float:
    """Kalshi API calls made by this process so far, from its own metrics: all of them, the
    list calls only, or the answers of one HTTP status."""
    return sum(
        sample.value
        for family in metrics.REGISTRY.collect()
        if family.name == "kalshi_etl_api_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
        and (not list_only or sample.labels["endpoint"] in LIST_ENDPOINTS)
        and (status is None or sample.labels["status"] == status)
    )


def measure_queue(engine: sa.Engine) -> dict[str, Any]:
    """Poll the queue positions of ~10,000 resting orders over 500 markets."""
    # About 8.7% of the simulator's seeded orders are resting.
    exchange = Exchange(
        seed=7,
        orders=int(QUEUE_RESTING / 0.087),
        markets=QUEUE_MARKETS,
        events_per_second=0,
        user_data_lag=timedelta(0),
    )
    private_key = generate_key()
    app = SimulatorApp(exchange, {key_id(private_key): private_key.public_key()}, advance=False)
    server = serve(app)
    base = f"http://127.0.0.1:{server.server_address[1]}/trade-api/v2"
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "TRUNCATE orders, queue_position_snapshots, sync_state, sync_runs, rejected_records"
            )
        )
    try:
        with KalshiClient(
            base, auth=KalshiAuth(key_id(private_key), private_key), tokens_per_second=0
        ) as c:
            timed("queue bench: load its orders", lambda: sync_orders(engine, c, account="q"))
            # A daemon polls for months after its first load: its orders were written long
            # before, and a poll looks for closed ones among those written since its last run.
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE orders SET synced_at = synced_at - interval '1 day'"))
                conn.execute(sa.text("ANALYZE orders"))
            resting = exchange.resting_ids()
            by_sub: dict[int, set[str]] = {}
            for order_id in resting:
                order = exchange.order(order_id)
                by_sub.setdefault(order.subaccount, set()).add(order.ticker)
            calls = api_calls()

            def read() -> list[Any]:
                return [
                    item
                    for sub, tickers in sorted(by_sub.items())
                    for item in c.queue_positions(market_tickers=tickers, subaccount=sub).items
                ]

            t_read, items = timed("queue API read alone", read)
            poll_calls = api_calls() - calls
            assert len(items) == len(resting), (len(items), len(resting))

            def plain_copy() -> None:
                with engine.begin() as conn:
                    conn.execute(
                        sa.text("CREATE TABLE bench_queue (LIKE queue_position_snapshots)")
                    )
                    driver = conn.connection.driver_connection
                    assert isinstance(driver, psycopg.Connection)
                    now = datetime.now(UTC)
                    with (
                        driver.cursor() as cur,
                        cur.copy(
                            "COPY bench_queue (order_id, account, market_ticker, "
                            "queue_position, captured_at) FROM STDIN"
                        ) as copy,
                    ):
                        for i in items:
                            copy.write_row(
                                (
                                    i["order_id"],
                                    "q",
                                    i["market_ticker"],
                                    i["queue_position_fp"],
                                    now,
                                )
                            )

            t_copy, _ = timed("queue plain COPY", plain_copy)
            poll = lambda: poll_queue_positions(engine, c, account="q")  # noqa: E731
            t_first, first = timed("first queue poll", poll)
            t_same, same = timed("queue poll, nothing changed", poll)
            for order_id in resting[: len(resting) // 100]:
                exchange.move_queue(order_id, -1 if exchange.order(order_id).queue_position else 1)
            t_moved, moved = timed("queue poll, 1% changed", poll)
    finally:
        server.shutdown()
        server.server_close()
    assert first.counts.inserted == len(resting), first.counts
    assert same.counts.inserted == 0, same.counts
    return {
        "resting": len(resting),
        "markets": QUEUE_MARKETS,
        "api_calls": poll_calls,
        "read": t_read,
        "copy": t_copy,
        "first": t_first,
        "first_rows": first.counts.inserted,
        "unchanged": t_same,
        "unchanged_rows": same.counts.inserted,
        "changed": t_moved,
        "changed_rows": moved.counts.inserted,
    }


QUICK = "--quick" in sys.argv[1:]
LOAD_SIZES = tuple(int(x) for x in os.environ.get("BENCH_LOAD_SIZES", "100000,1000000").split(","))
RESTING = tuple(float(x) for x in os.environ.get("BENCH_RESTING", "0.08,0.35").split(","))


def reset(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "TRUNCATE orders, queue_position_snapshots, fills, settlements, sync_state, "
                "sync_runs, rejected_records RESTART IDENTITY"
            )
        )


# Reads and parses every page of both tiers as a sync does (the next page fetched while one is
# parsed) and writes nothing, then prints its seconds, start-up excluded, the orders and its
# CPU seconds (start-up included).
_FETCH_ONLY = """
import os, resource, sys, time
from pathlib import Path
from etl.kalshi.auth import KalshiAuth, read_private_key_file
from etl.kalshi.client import KalshiClient
from etl.streams.fills import FILLS
from etl.sync.engine import prefetched, parse_page
from etl.sync.listing import listing_sink
from etl.sync.orders import SWITCH_INTERVAL, orders_sink
sys.setswitchinterval(SWITCH_INTERVAL)  # as the CLI runs
key = read_private_key_file(Path(os.environ["KALSHI_PRIVATE_KEY_PATH"]))
auth = KalshiAuth(os.environ["KALSHI_API_KEY_ID"], key)
budget = float(os.environ["BENCH_FETCH_BUDGET"])
started = time.perf_counter()
parsed = 0
with KalshiClient(os.environ["KALSHI_API_BASE"], auth=auth, tokens_per_second=budget) as c:
    if os.environ["BENCH_FETCH_STREAM"] == "fills":
        sink = listing_sink(FILLS)
        listings = tuple(c.iter_pages(p, "fills") for p in ("portfolio/fills", "historical/fills"))
    else:
        sink = orders_sink()
        listings = (c.iter_order_pages(), c.iter_historical_order_pages())
    for pages in listings:
        for page in prefetched(pages):
            parsed += len(parse_page(sink, page.items, screened=page.screened)[0])
r = resource.getrusage(resource.RUSAGE_SELF)
print(time.perf_counter() - started, parsed, r.ru_utime + r.ru_stime)
"""


@dataclass(frozen=True)
class FetchOnly:
    seconds: float  # start-up excluded
    process_seconds: float  # the whole process, as the sync is timed
    orders: int
    cpu_seconds: float  # the process's own, start-up included


def fetch_only(env: dict[str, str], *, stream: str = "orders", budget: float = 0.0) -> FetchOnly:
    """A sequential pass: every page of ``stream`` (both tiers, one cursor at a time) read
    and parsed, nothing written, in a process of its own (this one holds what earlier parts
    parsed, which would slow it), under ``budget`` tokens/s (0: none)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _FETCH_ONLY],
        env={
            **os.environ,
            **env,
            "BENCH_FETCH_STREAM": stream,
            "BENCH_FETCH_BUDGET": str(budget),
        },
        capture_output=True,
        text=True,
        check=True,
    )
    whole = time.perf_counter() - started
    seconds, parsed, cpu = done.stdout.split()
    return FetchOnly(float(seconds), whole, int(parsed), float(cpu))


# CPU accounting from Linux's /proc: what each party of a load spent, so that the bench shows
# how much of the machine a load needs, not only how long it took.
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _times(stat: str) -> int:
    """utime + stime + cutime + cstime, in clock ticks, of one /proc/PID/stat line: the
    process's own CPU and that of its children it has reaped."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(x) for x in fields[11:15])


def process_cpu(pid: int) -> float | None:
    """CPU seconds used so far by process ``pid``; None without /proc."""
    try:
        return _times(Path(f"/proc/{pid}/stat").read_text()) / _TICK
    except (OSError, ValueError, IndexError):
        return None


def postgres_cpu() -> float | None:
    """CPU seconds used so far by this machine's PostgreSQL processes: every process named
    ``postgres``, with the backends that exited counted in their postmaster's children time.
    None when there is none to see (a server elsewhere, or no /proc)."""
    total, found = 0, False
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = path.read_text()
            if stat[stat.index("(") + 1 : stat.rindex(")")] != "postgres":
                continue
            total += _times(stat)
            found = True
        except (OSError, ValueError, IndexError):
            continue
    return total / _TICK if found else None


CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def spent(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


# Runs the CLI, then reports its own CPU time and peak RSS on stderr. The peak is the
# process's own (VmHWM, per address space): ru_maxrss would also count the bench process it
# was forked from, as Linux carries it across exec.
_MEASURED_CLI = """
import json, resource, sys
from etl.cli import main
LIST_ENDPOINTS = %r
code = main(sys.argv[1:])
r = resource.getrusage(resource.RUSAGE_SELF)
peak = r.ru_maxrss
try:
    with open("/proc/self/status") as status:
        peak = next(int(x.split()[1]) for x in status if x.startswith("VmHWM:"))
except (OSError, StopIteration):
    pass
from etl import metrics
calls = {"list": 0.0, "429": 0.0}
for family in metrics.REGISTRY.collect():
    if family.name != "kalshi_etl_api_requests":
        continue
    for sample in family.samples:
        if sample.name.endswith("_total"):
            if sample.labels["endpoint"] in LIST_ENDPOINTS:
                calls["list"] += sample.value
            if sample.labels["status"] == "429":
                calls["429"] += sample.value
usage = [r.ru_utime + r.ru_stime, peak, calls["list"], calls["429"]]
print("BENCH-RUSAGE " + json.dumps(usage), file=sys.stderr)
sys.exit(code)
"""


def cli_sync(
    engine: sa.Engine, env: dict[str, str], streams: str = "orders", *, budget: float | None = 0.0
) -> dict[str, float]:
    """``kalshi-etl sync --streams STREAMS`` as its own process: wall seconds, the process's
    own CPU seconds (start-up included), peak RSS, list calls and 429s received. ``budget``:
    KALSHI_READ_TOKENS_PER_SECOND (None: unset, the key's budget is asked of the API)."""
    started = time.perf_counter()
    told = {} if budget is None else {"KALSHI_READ_TOKENS_PER_SECOND": f"{budget:g}"}
    outer = {k: v for k, v in os.environ.items() if k != "KALSHI_READ_TOKENS_PER_SECOND"}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED_CLI % (LIST_ENDPOINTS,), "sync", "--streams", streams],
        env={
            **outer,
            **env,
            "DATABASE_URL": engine.url.render_as_string(hide_password=False),
            **told,
        },
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"sync failed: {done.stderr[-2000:]}")
    line = next(x for x in done.stderr.splitlines() if x.startswith("BENCH-RUSAGE "))
    cpu, rss_kib, list_calls, throttled = json.loads(line.split(" ", 1)[1])
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "peak_rss_mb": rss_kib / 1024,
        "list_calls": list_calls,
        "responses_429": throttled,
    }


# Seconds the simulator adds to each answer for the rows that stand for an exchange across a
# network (as Kalshi is); 0 leaves them out. A parameter, not a measurement of Kalshi.
REMOTE_LATENCY = float(os.environ.get("BENCH_REMOTE_LATENCY", "0.05"))


def measure_loads(engine: sa.Engine, *, quick: bool) -> list[dict[str, Any]]:
    """First loads as users run them: a ``kalshi-etl sync`` process against a simulator in
    another, at each size and resting fraction, then at the smallest size against a simulator
    that answers ``REMOTE_LATENCY`` seconds later (an exchange across a network)."""
    sizes = LOAD_SIZES[:1] if quick else LOAD_SIZES
    cases = [(n, resting, 0.0) for n in sizes for resting in RESTING]
    if REMOTE_LATENCY > 0:
        cases += [(sizes[0], resting, REMOTE_LATENCY) for resting in RESTING]
    return [measure_load(engine, n, resting, latency) for n, resting, latency in cases]


# How often each load is repeated, by orders: this machine's timings vary by ±10% from run to
# run, so the smaller loads report the median of three (a fetch-only pass, then a sync, each
# time). BENCH_REPEATS overrides it for every size.
def repeats(n: int) -> int:
    return int(os.environ.get("BENCH_REPEATS", "3" if n <= 100_000 else "1"))


@dataclass(frozen=True)
class Trial:
    """One fetch-only pass then one first sync, with the CPU each party spent on the sync."""

    fetched: FetchOnly
    sync: dict[str, float]
    simulator_fetch_cpu: float | None  # the simulator's, serving the fetch-only pass
    simulator_cpu: float | None  # the simulator's, serving the sync
    postgres_cpu: float | None

    @property
    def cpu_floor(self) -> float | None:
        """The least wall time the sync's CPU allows: its start-up, which only one core can
        run (imports; taken as the fetch-only pass's, whose imports are a part of the sync's),
        then the rest of the three parties' CPU spread evenly over every core. No sync using
        that CPU can beat it."""
        parties = (self.sync["cpu_seconds"], self.simulator_cpu, self.postgres_cpu)
        if None in parties:
            return None
        serial = self.fetched.process_seconds - self.fetched.seconds
        rest = sum(p for p in parties if p is not None) - serial
        return serial + rest / CORES


def trial(engine: sa.Engine, env: dict[str, str], pid: int) -> Trial:
    reset(engine)
    served = process_cpu(pid)
    fetched = fetch_only(env)
    between, stored = process_cpu(pid), postgres_cpu()
    sync = cli_sync(engine, env)
    return Trial(
        fetched=fetched,
        sync=sync,
        simulator_fetch_cpu=spent(served, between),
        simulator_cpu=spent(between, process_cpu(pid)),
        postgres_cpu=spent(stored, postgres_cpu()),
    )


def median_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if len(known) == len(values) else None


def measure_load(engine: sa.Engine, n: int, resting: float, latency: float) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="ketl-bench-load-"))
    away = f", {latency * 1000:.0f} ms away" if latency else ""
    times = repeats(n)
    print(
        f"  load: {n} orders, {resting:.0%} resting{away}, {times}× …", file=sys.stderr, flush=True
    )
    simulator, env = start_simulator(
        home,
        *("--orders", str(n), "--seed", "42", "--events-per-second", "0"),
        *("--resting-fraction", str(resting), "--latency", str(latency)),
    )
    try:
        trials = [trial(engine, env, simulator.pid) for _ in range(times)]
        key = read_private_key_file(Path(env["KALSHI_PRIVATE_KEY_PATH"]))
        calls = api_calls()
        with KalshiClient(
            env["KALSHI_API_BASE"],
            auth=KalshiAuth(env["KALSHI_API_KEY_ID"], key),
            tokens_per_second=0,
        ) as c:
            # The account the CLI synced: its key id (no accounts file).
            account = env["KALSHI_API_KEY_ID"]
            again_seconds, again = timed(
                "  no-change sync", partial(sync_orders, engine, c, account=account)
            )
        again_calls = api_calls() - calls
    finally:
        simulator.terminate()
        simulator.communicate(timeout=60)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT count(*) FROM orders")).scalar_one()
        open_orders = conn.execute(
            sa.text("SELECT count(*) FROM orders WHERE status = 'resting'")
        ).scalar_one()
    copy_seconds = plain_copy_of_orders(engine)
    assert stored == n, (stored, n)
    assert again.counts.inserted == again.counts.updated == 0, again.counts
    assert all(t.fetched.orders == n for t in trials), [t.fetched.orders for t in trials]

    def median(value: Callable[[Trial], float | None]) -> float | None:
        return median_of([value(t) for t in trials])

    fetch_seconds = statistics.median(t.fetched.seconds for t in trials)
    fetch_process = statistics.median(t.fetched.process_seconds for t in trials)
    sync_seconds = statistics.median(t.sync["seconds"] for t in trials)
    sync_cpu = statistics.median(t.sync["cpu_seconds"] for t in trials)
    floor = median(lambda t: t.cpu_floor)
    fetch_busy = median(
        lambda t: (
            None
            if t.simulator_fetch_cpu is None
            else (t.fetched.cpu_seconds + t.simulator_fetch_cpu) / t.fetched.process_seconds
        )
    )
    return {
        "orders": n,
        "resting": open_orders,
        "latency": latency,
        "runs": times,
        "fetch_only_seconds": fetch_seconds,
        "fetch_only_process_seconds": fetch_process,
        "fetch_only_cores": fetch_busy,
        "first_sync_seconds": sync_seconds,
        "orders_per_second": n / sync_seconds,
        "vs_fetch_only": fetch_seconds / sync_seconds,
        "vs_fetch_only_process": fetch_process / sync_seconds,
        "cpu_us_per_order": sync_cpu / n * 1e6,
        "plain_copy_seconds": copy_seconds,
        "vs_plain_copy": sync_seconds / copy_seconds,
        "sync_cpu_seconds": sync_cpu,
        "simulator_cpu_seconds": median(lambda t: t.simulator_cpu),
        "postgres_cpu_seconds": median(lambda t: t.postgres_cpu),
        "cores": CORES,
        "cpu_floor_seconds": floor,
        "best_vs_fetch_only": None if floor is None else fetch_seconds / floor,
        "peak_rss_mb": max(t.sync["peak_rss_mb"] for t in trials),
        "no_change_seconds": again_seconds,
        "no_change_api_calls": again_calls,
        "no_change_fetched": again.counts.fetched,
        "trials": [
            {
                "fetch_only_seconds": t.fetched.seconds,
                "fetch_only_process_seconds": t.fetched.process_seconds,
                "sync_seconds": t.sync["seconds"],
                "sync_cpu_seconds": t.sync["cpu_seconds"],
                "simulator_cpu_seconds": t.simulator_cpu,
                "postgres_cpu_seconds": t.postgres_cpu,
            }
            for t in trials
        ],
    }


def plain_copy_of_orders(engine: sa.Engine) -> float:
    """Seconds of a plain COPY of every stored order (the same rows, as COPY text) into an
    unindexed table: what PostgreSQL alone needs to take the load's rows in."""
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as source:
        data = bytearray()
        with source.cursor().copy("COPY orders TO STDOUT") as out:
            for chunk in out:
                data += chunk
    with psycopg.connect(url) as target:
        target.execute("DROP TABLE IF EXISTS bench_plain_copy")
        target.execute("CREATE TABLE bench_plain_copy (LIKE orders)")
        target.commit()
        started = time.perf_counter()
        with target.cursor().copy("COPY bench_plain_copy FROM STDIN") as into:
            into.write(bytes(data))
        target.commit()
        seconds = time.perf_counter() - started
        target.execute("DROP TABLE bench_plain_copy")
    return seconds


def _seconds_or_na(value: float | None, width: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.2f}"


def print_loads(loads: list[dict[str, Any]]) -> None:
    print()
    print(
        "first load as users run it: `kalshi-etl sync` in its own process "
        "(median of the runs shown)"
    )
    print(
        f"{'orders':>10}{'resting':>9}{'exchange':>10}{'runs':>5}{'fetch-only s':>14}{'sync s':>9}"
        f"{'orders/s':>10}{'× fetch-only':>14}{'× process':>11}{'CPU µs/order':>14}"
        f"{'× COPY':>8}{'peak RSS':>10}{'no-change':>18}"
    )
    for r in loads:
        print(
            f"{r['orders']:>10,}{r['resting'] / r['orders']:>9.0%}{_where(r):>10}{r['runs']:>5}"
            f"{r['fetch_only_seconds']:>14.2f}"
            f"{r['first_sync_seconds']:>9.2f}{r['orders_per_second']:>10,.0f}"
            f"{r['vs_fetch_only']:>14.2f}{r['vs_fetch_only_process']:>11.2f}"
            f"{r['cpu_us_per_order']:>14.1f}{r['vs_plain_copy']:>8.1f}"
            f"{r['peak_rss_mb']:>7.0f} MB"
            f"{r['no_change_seconds']:>8.2f}s {r['no_change_api_calls']:>4.0f} calls"
        )
    print(
        "(× fetch-only: fetch-only seconds, its start-up excluded, ÷ sync seconds, start-up\n"
        " included; 1.00 = as fast as reading alone. × process: both timed as whole processes.\n"
        " × COPY: sync seconds ÷ a plain COPY of the same rows into an unindexed table.\n"
        " exchange: loopback, or a simulator adding that latency to each answer. On this\n"
        " machine a loopback load is bound by the CPU the sync, the simulator and PostgreSQL\n"
        " share: see the budget table for loads against an exchange across a network)"
    )
    print()
    print(
        f"where the CPU of each first load went (seconds), and the least wall time that CPU "
        f"allows on {CORES} cores"
    )
    print(
        f"{'orders':>10}{'resting':>9}{'exchange':>10}{'sync':>7}{'simulator':>11}"
        f"{'PostgreSQL':>12}{'least s':>9}{'sync s':>9}{'sync cores':>12}"
        f"{'best × fetch-only':>19}{'fetch-only cores':>18}"
    )
    for r in loads:
        best = r["best_vs_fetch_only"]
        floor = r["cpu_floor_seconds"]
        spent_cpu = (r["sync_cpu_seconds"], r["simulator_cpu_seconds"], r["postgres_cpu_seconds"])
        busy = None if None in spent_cpu else sum(spent_cpu) / r["first_sync_seconds"]
        print(
            f"{r['orders']:>10,}{r['resting'] / r['orders']:>9.0%}{_where(r):>10}"
            f"{r['sync_cpu_seconds']:>7.2f}{_seconds_or_na(r['simulator_cpu_seconds'], 11)}"
            f"{_seconds_or_na(r['postgres_cpu_seconds'], 12)}"
            f"{_seconds_or_na(floor, 9)}{r['first_sync_seconds']:>9.2f}"
            f"{_seconds_or_na(busy, 12)}{_seconds_or_na(best, 19)}"
            f"{_seconds_or_na(r['fetch_only_cores'], 18)}"
        )
    print(
        "(least s: the start-up on one core (the fetch-only pass's), then the rest of the three\n"
        " parties' CPU spread evenly over every core; no sync using that CPU can beat it. sync\n"
        " cores: the three's CPU ÷ the sync's seconds, the cores kept busy; best × fetch-only:\n"
        " fetch-only seconds ÷ that least time; fetch-only cores: its own and the simulator's\n"
        " CPU ÷ its seconds. PostgreSQL: every local process of that name; n/a for a server\n"
        " elsewhere)"
    )


MONEY_FILLS = int(os.environ.get("BENCH_MONEY_FILLS", "1000000"))
MONEY_MARKETS = 5_000


def measure_money(engine: sa.Engine) -> dict[str, Any]:
    """The money on ``MONEY_FILLS`` fills over ``MONEY_MARKETS`` markets (made in SQL): the
    rebuild of every market's lots, then each view queried whole, beside a plain aggregate
    over the same fills (the floor for a view that reads them all)."""
    from etl.money.lots import rebuild_marked

    account = "bench-money"
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE fills, settlements, pnl_lots, pnl_marks"))
        conn.execute(
            sa.text(
                """
                INSERT INTO fills (fill_id, account, ticker, outcome_side, count_fp,
                                   yes_price_dollars, no_price_dollars, fee_cost, created_time,
                                   subaccount_number, raw)
                SELECT 'bf-' || g, :account, 'KXBENCH-M' || (g % :markets),
                       CASE WHEN random() < 0.5 THEN 'yes' ELSE 'no' END,
                       1 + floor(random() * 20), p, 1 - p, 0.01, now() - g * interval '1 second',
                       0, '{}'::jsonb
                FROM (SELECT g, round((0.01 + random() * 0.98)::numeric, 2) AS p
                      FROM generate_series(1, :n) g) s
                """
            ),
            {"account": account, "markets": MONEY_MARKETS, "n": MONEY_FILLS},
        )
        conn.execute(
            sa.text(
                "INSERT INTO pnl_marks (account, subaccount_number, ticker) "
                "SELECT DISTINCT account, subaccount_number, ticker FROM fills"
            )
        )
        conn.execute(sa.text("ANALYZE fills"))
    print(f"  money: rebuilding the lots of {MONEY_FILLS:,} fills …", file=sys.stderr, flush=True)
    rebuild_seconds, rebuilt = timed("  rebuild", lambda: rebuild_marked(engine, account))
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE pnl_lots"))

    def query(sql: str) -> Callable[[], int]:
        def run() -> int:
            with engine.connect() as conn:
                return len(conn.execute(sa.text(sql), {"account": account}).all())

        return run

    rows = {
        "plain aggregate over fills": query(
            "SELECT ticker, sum(count_fp), sum(fee_cost) FROM fills WHERE account = :account "
            "GROUP BY ticker"
        ),
        "pnl_by_market, every market": query(
            "SELECT * FROM pnl_by_market WHERE account = :account"
        ),
        "pnl_by_market, one market": query(
            "SELECT * FROM pnl_by_market WHERE account = :account AND ticker = 'KXBENCH-M42'"
        ),
        "pnl_daily": query("SELECT * FROM pnl_daily WHERE account = :account"),
    }
    timings = {}
    for label, run in rows.items():
        run()  # warm
        timings[label] = statistics.median(timed(label, run)[0] for _ in range(3))
    return {
        "fills": MONEY_FILLS,
        "markets": MONEY_MARKETS,
        "lots": rebuilt.lots,
        "rebuild_seconds": rebuild_seconds,
        "fills_per_second": MONEY_FILLS / rebuild_seconds,
        "queries": timings,
    }


def print_money(r: dict[str, Any]) -> None:
    print()
    print(
        f"money: {r['fills']:,} fills over {r['markets']:,} markets: lots rebuilt in "
        f"{r['rebuild_seconds']:.1f}s ({r['fills_per_second']:,.0f} fills/s, {r['lots']:,} lots)"
    )
    floor = r["queries"]["plain aggregate over fills"]
    print(f"{'query':<34}{'seconds':>10}   ratio")
    for label, seconds in r["queries"].items():
        print(f"{label:<34}{seconds:>10.3f}   {seconds / floor:.2f}× the plain aggregate")


FILLS_ORDERS = int(os.environ.get("BENCH_FILLS_ORDERS", "100000"))


def measure_fills(engine: sa.Engine) -> dict[str, Any]:
    """A first load of ``FILLS_ORDERS`` orders with their fills (both tiers) beside the same
    orders alone, each a ``kalshi-etl sync`` process against one simulator, in turn, the
    median of the repeats."""
    home = Path(tempfile.mkdtemp(prefix="ketl-bench-fills-"))
    n = FILLS_ORDERS
    times = repeats(n)
    print(f"  load with fills: {n} orders, {times}× …", file=sys.stderr, flush=True)
    simulator, env = start_simulator(
        home, *("--orders", str(n), "--seed", "42", "--events-per-second", "0")
    )
    runs: dict[str, list[dict[str, float]]] = {"orders": [], "orders,fills": []}
    try:
        for _ in range(times):
            for streams, done in runs.items():
                reset(engine)
                done.append(cli_sync(engine, env, streams))
    finally:
        simulator.terminate()
        simulator.communicate(timeout=60)
    with engine.connect() as conn:
        fills = conn.execute(sa.text("SELECT count(*) FROM fills")).scalar_one()
        stored = conn.execute(sa.text("SELECT count(*) FROM orders")).scalar_one()
    assert stored == n and fills > 0, (stored, fills)
    seconds = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    return {
        "orders": n,
        "fills": fills,
        "runs": times,
        "orders_only_seconds": seconds["orders"],
        "with_fills_seconds": seconds["orders,fills"],
        "fills_seconds": seconds["orders,fills"] - seconds["orders"],
        "fills_per_second": fills / max(seconds["orders,fills"] - seconds["orders"], 1e-9),
        "rows_per_second": {
            "orders": n / seconds["orders"],
            "orders,fills": (n + fills) / seconds["orders,fills"],
        },
        "peak_rss_mb": {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()},
    }


def print_fills(r: dict[str, Any]) -> None:
    print()
    print(
        f"first load with fills: `kalshi-etl sync` of {r['orders']:,} orders and their "
        f"{r['fills']:,} fills (both tiers), median of {r['runs']}"
    )
    print(f"{'--streams':<16}{'rows':>10}{'seconds':>10}{'rows/s':>10}{'peak RSS':>10}   ratio")
    for streams, rows in (("orders", r["orders"]), ("orders,fills", r["orders"] + r["fills"])):
        seconds = r["orders_only_seconds" if streams == "orders" else "with_fills_seconds"]
        print(
            f"{streams:<16}{rows:>10,}{seconds:>10.2f}{r['rows_per_second'][streams]:>10,.0f}"
            f"{r['peak_rss_mb'][streams]:>7.0f} MB   "
            f"{seconds / r['orders_only_seconds']:.2f}× orders-only time"
        )
    print(
        f"(the fills alone: {r['fills_seconds']:.2f}s more, {r['fills_per_second']:,.0f} fills/s)"
    )


def _where(r: dict[str, Any]) -> str:
    return f"{r['latency'] * 1000:.0f} ms" if r["latency"] else "loopback"


# A first load at the key's read budget: each stream's first `kalshi-etl sync` against a
# simulator 50 ms away that enforces a budget (and says so at GET /account/limits), beside
# the two ceilings measured in the same run: the budget's (list calls/s × page size) and this
# machine's CPU's (the same load over loopback with no limit).
BUDGET_RECORDS = int(os.environ.get("BENCH_BUDGET_ORDERS", "100000"))
BUDGETS = tuple(float(x) for x in os.environ.get("BENCH_BUDGETS", "200,1000").split(","))
BUDGET_LATENCY = float(os.environ.get("BENCH_BUDGET_LATENCY", "0.05"))
# One load of this many orders at the highest budget, for its peak RSS (0 skips it).
BUDGET_LARGE = int(os.environ.get("BENCH_BUDGET_LARGE", "1000000"))
BUDGET_STREAMS = ("orders", "fills")
LIST_ENDPOINTS = (
    "/portfolio/orders",
    "/historical/orders",
    "/portfolio/fills",
    "/historical/fills",
)


def measure_budget(engine: sa.Engine) -> dict[str, Any]:
    """Per stream: the loopback load with no limit (the CPU's ceiling) and, 50 ms away, the
    load at each budget, in rounds (each round runs every case once, so that a ceiling and
    the loads it judges are measured minutes apart at most, whatever this machine's speed
    does meanwhile); the medians of the rounds; one large load for the peak RSS."""
    rows: list[dict[str, Any]] = []
    for stream in BUDGET_STREAMS:
        cases = [(0.0, 0.0), *((BUDGET_LATENCY, budget) for budget in BUDGETS)]
        trials = _budget_rounds(engine, stream, BUDGET_RECORDS, cases)
        free = _budget_row(stream, BUDGET_RECORDS, cases[0], trials[0])
        rows.append(free)
        for case, tried in zip(cases[1:], trials[1:], strict=True):
            row = _budget_row(stream, BUDGET_RECORDS, case, tried)
            budget = case[1]
            budget_ceiling = budget / LIST_COST * PAGE
            # Each round's load against that round's ceilings.
            ratios = []
            for mine, cpu in zip(tried, trials[0], strict=True):
                rate = mine[2] / mine[1]["seconds"]
                ceilings = {"budget": budget_ceiling, "CPU": cpu[2] / cpu[1]["seconds"]}
                ratios.append(rate / min(ceilings.values()))
            ceilings = {"budget": budget_ceiling, "CPU": free["records_per_second"]}
            row.update(
                budget_ceiling=budget_ceiling,
                cpu_ceiling=free["records_per_second"],
                binds=min(ceilings, key=ceilings.__getitem__),
                vs_lower_ceiling=statistics.median(ratios),
                vs_lower_each=ratios,
            )
            rows.append(row)
    large = None
    if BUDGET_LARGE:
        case = (BUDGET_LATENCY, max(BUDGETS))
        tried = _budget_rounds(engine, "orders", BUDGET_LARGE, [case], runs=1)[0]
        large = _budget_row("orders", BUDGET_LARGE, case, tried)
    return {"page_size": PAGE, "rows": rows, "large": large}


BudgetTrial = tuple[FetchOnly | None, dict[str, float], int]


def _budget_rounds(
    engine: sa.Engine,
    stream: str,
    n: int,
    cases: Sequence[tuple[float, float]],
    *,
    runs: int | None = None,
) -> list[list[BudgetTrial]]:
    """Each case's trials (latency, budget; a budget of 0: none): one simulator per case, all
    started first, then rounds of one trial per case (a fetch-only pass where there is a
    budget, then the sync); ``runs`` rounds (by default, :func:`repeats`)."""
    times = runs or repeats(n)
    table = "orders" if stream == "orders" else "fills"
    started = []
    try:
        for latency, budget in cases:
            where = (
                f"{latency * 1000:.0f} ms away at {budget:.0f} tokens/s" if budget else "loopback"
            )
            print(f"  budget: {stream} of {n:,} orders, {where}", file=sys.stderr, flush=True)
            home = Path(tempfile.mkdtemp(prefix="ketl-bench-budget-"))
            started.append(
                start_simulator(
                    home,
                    *("--orders", str(n), "--seed", "42", "--events-per-second", "0"),
                    *("--latency", str(latency), "--rate-limit", str(budget)),
                )
            )
        trials: list[list[BudgetTrial]] = [[] for _ in cases]
        for round_ in range(times):
            print(f"  budget: {stream}, round {round_ + 1} of {times}", file=sys.stderr, flush=True)
            for (_, budget), (_, env), tried in zip(cases, started, trials, strict=True):
                reset(engine)
                fetched = fetch_only(env, stream=stream, budget=budget) if budget else None
                # Told nothing, the sync reads the key's budget at GET /account/limits.
                sync = cli_sync(engine, env, stream, budget=None if budget else 0.0)
                with engine.connect() as conn:
                    stored = conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
                tried.append((fetched, sync, stored))
    finally:
        for simulator, _ in started:
            simulator.terminate()
            simulator.communicate(timeout=60)
    return trials


def _budget_row(
    stream: str, n: int, case: tuple[float, float], trials: Sequence[BudgetTrial]
) -> dict[str, Any]:
    latency, budget = case
    records = trials[-1][2]
    assert all(t[2] == records for t in trials), [t[2] for t in trials]
    seconds = statistics.median(t[1]["seconds"] for t in trials)
    calls = statistics.median(t[1]["list_calls"] for t in trials)
    fetch = [t[0] for t in trials if t[0] is not None]
    return {
        "stream": stream,
        "orders": n,
        "records": records,
        "latency": latency,
        "budget": budget,
        "runs": len(trials),
        "seconds": seconds,
        "records_per_second": records / seconds,
        "list_calls": calls,
        "list_calls_per_second": calls / seconds,
        "of_budget": (calls / seconds) / (budget / LIST_COST) if budget else None,
        "responses_429": max(t[1]["responses_429"] for t in trials),
        "peak_rss_mb": max(t[1]["peak_rss_mb"] for t in trials),
        "cpu_us_per_record": statistics.median(t[1]["cpu_seconds"] for t in trials) / records * 1e6,
        "sequential_fetch_per_second": (
            records / statistics.median(f.seconds for f in fetch) if fetch else None
        ),
    }


def print_budget(r: dict[str, Any]) -> None:
    print()
    print(
        f"first load at the key's read budget: `kalshi-etl sync --streams S` told nothing (it "
        f"reads GET /account/limits), a simulator {BUDGET_LATENCY * 1000:.0f} ms away enforcing "
        f"the budget, page size {r['page_size']}; medians of rounds that run each case once"
    )
    print(
        f"{'stream':<8}{'exchange':>10}{'budget':>8}{'calls/s':>9}{'of budget':>10}"
        f"{'records/s':>11}{'429s':>6}{'peak RSS':>10}{'seq. fetch/s':>14}"
        f"{'budget ceil.':>13}{'CPU ceil.':>11}{'binds':>8}{'× lower':>9}"
    )
    for row in r["rows"]:
        budget = f"{row['budget']:.0f}" if row["budget"] else "none"
        of_budget = f"{row['of_budget']:.2f}" if row["of_budget"] is not None else "-"
        seq = row["sequential_fetch_per_second"]
        print(
            f"{row['stream']:<8}{_where(row):>10}{budget:>8}{row['list_calls_per_second']:>9.1f}"
            f"{of_budget:>10}{row['records_per_second']:>11,.0f}{row['responses_429']:>6.0f}"
            f"{row['peak_rss_mb']:>7.0f} MB"
            + (f"{seq:>14,.0f}" if seq else f"{'-':>14}")
            + (
                f"{row['budget_ceiling']:>13,.0f}{row['cpu_ceiling']:>11,.0f}{row['binds']:>8}"
                f"{row['vs_lower_ceiling']:>9.2f}"
                if "binds" in row
                else f"{'-':>13}{'(CPU ceiling: this row)':>28}"
            )
        )
    large = r.get("large")
    if large:
        print(
            f"{large['stream']:<8}{_where(large):>10}{large['budget']:>8.0f}"
            f"{large['list_calls_per_second']:>9.1f}{large['of_budget']:>10.2f}"
            f"{large['records_per_second']:>11,.0f}{large['responses_429']:>6.0f}"
            f"{large['peak_rss_mb']:>7.0f} MB   ({large['orders']:,} orders, one run)"
        )
    print(
        "(calls/s: list calls a second; of budget: ÷ the budget's list calls a second; seq.\n"
        " fetch/s: one cursor at a time, read and parsed, nothing written; budget ceil.: the\n"
        " budget's list calls a second × the page size; CPU ceil.: the same load over loopback\n"
        " with no limit; × lower: in each round, records/s ÷ the lower of that round's two\n"
        " ceilings; the median of the rounds)"
    )
    each = [
        f"{row['stream']} {row['budget']:.0f}: "
        + ", ".join(f"{x:.2f}" for x in row["vs_lower_each"])
        for row in r["rows"]
        if "vs_lower_each" in row
    ]
    print("× lower, round by round: " + "; ".join(each))


STREAM_RATES = (50, 500)  # trading events a second
STREAM_SECONDS = 8.0
STREAM_WARMUP = 1.5  # seconds after the catch-up before messages count


# Each channel's message type, and the field with its exchange time (epoch ms).
STAMPS = {"user_order": "last_updated_ts_ms", "fill": "ts_ms"}


class MeasuredRealtime(RealtimeAccount):
    """The realtime path, keeping each message's latencies (per message type) and each
    commit's size."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.measuring_from = float("inf")
        self.to_commit: dict[str, list[float]] = {kind: [] for kind in STAMPS}
        self.to_receipt: dict[str, list[float]] = {kind: [] for kind in STAMPS}
        self.batch_sizes: list[int] = []

    def write(self, messages: list[tuple[Any, float]]) -> Batch:
        batch = super().write(messages)
        committed = time.time()
        for body, received in messages:
            kind = body.get("type") if isinstance(body, dict) else None
            msg = body.get("msg") if isinstance(body, dict) else None
            if kind not in STAMPS or not isinstance(msg, dict):
                continue
            stamp = msg.get(STAMPS[kind])
            if isinstance(stamp, int) and received >= self.measuring_from:
                self.to_receipt[kind].append(received - stamp / 1000)
                self.to_commit[kind].append(committed - stamp / 1000)
        if messages[0][1] >= self.measuring_from:
            self.batch_sizes.append(len(messages))
        return batch


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_stream(engine: sa.Engine) -> dict[str, Any]:
    """Event → commit latency of the user_orders stream at each of :data:`STREAM_RATES`."""
    results: dict[str, Any] = {}
    for rate in STREAM_RATES:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "TRUNCATE orders, fills, sync_state, sync_runs, rejected_records "
                    "RESTART IDENTITY"
                )
            )
        home = Path(tempfile.mkdtemp(prefix="ketl-bench-stream-"))
        simulator, env = start_simulator(
            home, "--orders", "2000", "--seed", "5", "--events-per-second", str(rate)
        )
        stop = threading.Event()
        key = read_private_key_file(Path(env["KALSHI_PRIVATE_KEY_PATH"]))
        try:
            with KalshiClient(
                env["KALSHI_API_BASE"],
                auth=KalshiAuth(env["KALSHI_API_KEY_ID"], key),
                tokens_per_second=0,
            ) as c:
                rt = MeasuredRealtime(
                    engine,
                    c,
                    account="bench",
                    stream_url=stream_url(env["KALSHI_API_BASE"]),
                    stop=stop,
                )
                rt.start()
                deadline = time.monotonic() + 30
                while rt.catch_ups < 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert rt.catch_ups >= 1, "the stream did not subscribe and catch up"
                rt.measuring_from = time.time() + STREAM_WARMUP
                print(f"  stream at {rate} events/s for {STREAM_SECONDS:.0f}s …", file=sys.stderr)
                time.sleep(STREAM_WARMUP + STREAM_SECONDS)
                stop.set()
                rt.join(timeout=10)
        finally:
            stop.set()
            simulator.terminate()
            simulator.communicate(timeout=30)
        sizes = rt.batch_sizes
        for kind in STAMPS:
            commit, receipt = rt.to_commit[kind], rt.to_receipt[kind]
            assert commit, f"no {kind} message measured at {rate} events/s"
            ours = [c - r for c, r in zip(commit, receipt, strict=True)]
            results[f"{rate} {kind}"] = {
                "events_per_second": rate,
                "kind": kind,
                "messages": len(commit),
                "messages_per_second": len(commit) / STREAM_SECONDS,
                "event_to_receipt": {
                    "p50": percentile(receipt, 0.5),
                    "p99": percentile(receipt, 0.99),
                },
                "event_to_commit": {
                    "p50": percentile(commit, 0.5),
                    "p99": percentile(commit, 0.99),
                },
                "receipt_to_commit": {"p50": percentile(ours, 0.5), "p99": percentile(ours, 0.99)},
                "commits": len(sizes),
                "messages_per_commit": {"mean": sum(sizes) / len(sizes), "max": max(sizes)},
            }
    return results


def print_stream(stream: dict[str, Any]) -> None:
    print()
    print(
        "realtime: user_orders and fill WebSocket channels → orders, fills "
        "(simulator in its own process)"
    )
    print(
        f"{'events/s':>9}{'channel':>12}{'messages':>10}{'event→received':>20}{'event→commit':>20}"
        f"{'received→commit':>20}{'msgs/commit':>14}   ratio"
    )
    for r in stream.values():
        receipt, commit, ours = r["event_to_receipt"], r["event_to_commit"], r["receipt_to_commit"]
        per = r["messages_per_commit"]
        print(
            f"{r['events_per_second']:>9}{r['kind']:>12}{r['messages']:>10}"
            f"{receipt['p50'] * 1000:>9.1f}/{receipt['p99'] * 1000:>6.1f} ms"
            f"{commit['p50'] * 1000:>9.1f}/{commit['p99'] * 1000:>6.1f} ms"
            f"{ours['p50'] * 1000:>9.1f}/{ours['p99'] * 1000:>6.1f} ms"
            f"{per['mean']:>8.1f}/{per['max']:>4}"
            f"   p99 {commit['p99'] / max(receipt['p99'], 1e-9):.2f}× source"
        )
    print(
        "(p50/p99; event = the change's exchange timestamp in ms as the channel sends it: "
        "an order's last_updated_ts_ms, a fill's ts_ms; msgs/commit counts both channels)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
