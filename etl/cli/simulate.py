"""`simulate` and `demo`: the built-in exchange, and the newcomer's tour on it."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import replace

from etl.cli.ops import status_lines
from etl.cli.wiring import (
    Commands,
    chosen_accounts,
    claim_accounts,
    database_lines,
    duration,
    explain_auth,
    log,
    number,
    open_client,
    open_engine,
)
from etl.config import Settings
from etl.errors import ApiStatusError


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from etl.simulator import Exchange, SimulatorApp
    from etl.simulator.app import Faults, make_server_for
    from etl.simulator.keys import key_id, load_or_create

    key_path = (settings.home / "simulator" / "key.pem").resolve()
    key = load_or_create(key_path)
    exchange = Exchange(
        seed=args.seed,
        orders=args.orders,
        api=args.api,
        min_ts_on=args.min_ts_on,
        events_per_second=args.events_per_second,
        resting=args.resting_fraction,
    )
    app = SimulatorApp(
        exchange,
        {key_id(key): key.public_key()},
        tokens_per_second=args.rate_limit,
        faults=Faults(
            error_rate=args.error_rate, latency=args.latency, malformed_rate=args.malformed_rate
        ),
        seed=args.seed,
    )
    app.stream.faults.duplicate_rate = args.stream_duplicate_rate
    app.stream.faults.reorder_rate = args.stream_reorder_rate
    if args.events_per_second:
        app.stream.trade_continuously(exchange)
    server = make_server_for(app, args.host, args.port)
    host, port = str(server.server_address[0]), int(server.server_address[1])
    print(f"KALSHI_API_BASE=http://{host}:{port}/trade-api/v2")
    print(f"KALSHI_API_KEY_ID={key_id(key)}")
    print(f"KALSHI_PRIVATE_KEY_PATH={key_path}")
    sys.stdout.flush()
    log.info(
        "simulator serving %d orders (API %s, min_ts on %s) on http://%s:%s and the "
        "user_orders WebSocket on ws://%s:%s/trade-api/ws/v2; Ctrl-C stops it",
        args.orders,
        args.api,
        args.min_ts_on,
        host,
        port,
        host,
        port,
    )
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    stopped = threading.Event()
    if args.stream_drop_every is not None:
        every = args.stream_drop_every.total_seconds()

        def drop_connections() -> None:
            while not stopped.wait(every):
                log.info("simulator: cut %d WebSocket connections", app.stream.drop())

        threading.Thread(target=drop_connections, name="ws-drops", daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        stopped.set()
        server.server_close()
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from etl import demo

    simulator = None
    # The demo never uses credentials it was not given for this run: a ./.env (the user's
    # account, or a `kalshi-etl simulate` long gone) is not asking. Exported variables are.
    exported = bool(os.environ.get("KALSHI_API_KEY_ID")) and bool(
        os.environ.get("KALSHI_PRIVATE_KEY_PATH") or os.environ.get("KALSHI_PRIVATE_KEY")
    )
    if args.simulator or not exported:
        if settings.has_credentials and not args.simulator:
            print(
                "demo: ignoring the Kalshi credentials in ./.env; export them (or pass them "
                "on the command line) to run the demo on that account",
                flush=True,
            )
        simulator = demo.start_simulator(settings.home)
        settings = replace(
            settings,
            accounts_file=None,
            file_accounts=(),
            api_base=simulator.api_base,
            api_key_id=simulator.key_id,
            private_key_path=simulator.key_path,
            private_key_pem=None,
            read_tokens_per_second=0,
        )
        print(f"demo: API       the built-in simulator at {settings.api_base}", flush=True)
    else:
        print(
            f"demo: API       {settings.api_base}, key {settings.api_key_id} (from the "
            "environment)",
            flush=True,
        )
    try:
        engine = open_engine(settings, migrate=True)
        for line in database_lines(settings, engine):
            print("demo: " + line, flush=True)
        if simulator is not None:
            demo.reset_simulated_data(engine)
        [account] = chosen_accounts(settings)[:1]
        claim_accounts(engine, [account], allow_simulated=simulator is not None)
        with open_client(account, settings) as client:
            for line in demo.run(
                engine,
                client,
                account=account.name,
                exchange=simulator.exchange if simulator else None,
                cycles=args.cycles,
                lookback=settings.lookback,
                report_path=settings.home / "report.html",
            ):
                print(line, flush=True)
        print()
        for line in status_lines(engine):
            print(line)
        print()
        for line in database_lines(settings, engine):
            print(line)
    except ApiStatusError as exc:
        raise explain_auth(exc, account, settings) from exc
    finally:
        if simulator is not None:
            simulator.stop()
    return 0


def register(commands: Commands) -> None:
    """Add this module's commands to the parser."""
    p = commands.add("simulate", cmd_simulate, "run the exchange simulator on loopback")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=number(int, 0, 65535), default=8765)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--orders",
        type=number(int, 0, 10_000_000),
        default=1000,
        help="orders in the account at start",
    )
    p.add_argument("--api", choices=("2025", "2026"), default="2026")
    p.add_argument(
        "--min-ts-on",
        choices=("created_time", "last_update_time"),
        default="created_time",
        help="the timestamp min_ts/max_ts compare",
    )
    p.add_argument(
        "--events-per-second", type=number(float, 0), default=2.0, help="trading intensity"
    )
    p.add_argument(
        "--resting-fraction",
        type=number(float, 0, 1),
        default=None,
        help="fraction of the orders at start still resting (default about 0.087)",
    )
    p.add_argument(
        "--rate-limit",
        type=number(float, 0),
        default=200.0,
        help="read tokens per second per key (0 = none)",
    )
    p.add_argument(
        "--error-rate", type=number(float, 0, 1), default=0.0, help="fraction of 503 answers"
    )
    p.add_argument(
        "--latency", type=number(float, 0, 60), default=0.0, help="seconds added to each answer"
    )
    p.add_argument(
        "--malformed-rate",
        type=number(float, 0, 1),
        default=0.0,
        help="fraction of order pages with one malformed record",
    )
    p.add_argument(
        "--stream-duplicate-rate",
        type=number(float, 0, 1),
        default=0.0,
        help="fraction of WebSocket user_order messages sent twice",
    )
    p.add_argument(
        "--stream-reorder-rate",
        type=number(float, 0, 1),
        default=0.0,
        help="fraction of WebSocket messages held back 20 ms, so later ones overtake them",
    )
    p.add_argument(
        "--stream-drop-every",
        type=duration,
        default=None,
        help="cut every WebSocket connection (no close frame) this often, e.g. 30s",
    )

    p = commands.add("demo", cmd_demo, "the newcomer demo (what `make demo` runs)")
    p.add_argument(
        "--cycles", type=number(int, 1, 100), default=3, help="incremental cycles to run"
    )
    p.add_argument(
        "--simulator",
        action="store_true",
        help="use the built-in simulator even when Kalshi credentials are exported",
    )
