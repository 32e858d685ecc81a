"""`daemon`: every stream on its schedule until SIGINT/SIGTERM, with metrics and health."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import threading
from datetime import timedelta

from etl.cli.wiring import (
    Commands,
    chosen_accounts,
    chosen_streams,
    claim_accounts,
    duration,
    log,
    number,
    open_client,
    wait_for_database,
)
from etl.config import Settings

TICKS = 4  # how often per interval the daemon tries each job (see is_due)
LOTS_EVERY = timedelta(seconds=10)  # how often the daemon rebuilds the lots of marked markets


def cmd_daemon(args: argparse.Namespace, settings: Settings) -> int:
    from etl.db.engine import transaction
    from etl.db.state import record_intervals
    from etl.health import Liveness, OperatorServer, Readiness
    from etl.kalshi.stream import stream_url
    from etl.money.lots import rebuild_marked
    from etl.scheduler import Job, run_daemon
    from etl.streams import Listing
    from etl.streams.registry import CHANNEL_OF, LISTINGS
    from etl.sync.listing import sync_listing
    from etl.sync.orders import sync_orders
    from etl.sync.queue import poll_queue_positions
    from etl.sync.realtime import RealtimeAccount
    from etl.sync.run import RETRY_FAILED, is_due

    stop = threading.Event()
    accounts = chosen_accounts(settings)
    clients = {a.name: open_client(a, settings, cancel=stop) for a in accounts}
    chosen = chosen_streams(args)
    # The WebSocket channels of the streams chosen (user_orders, fill).
    channels = [CHANNEL_OF[s] for s in chosen if s in CHANNEL_OF]
    realtime = bool(args.realtime or settings.realtime) and bool(channels)
    # While the stream is up, REST is the safety net and runs less often; the readiness of
    # the orders job is judged against that longer interval.
    rest_every = max(args.orders_every, args.realtime_rest_every) if realtime else args.orders_every
    every = {
        "orders": args.orders_every,
        "queue_positions": args.queue_every,
        "fills": args.fills_every,
        "settlements": args.settlements_every,
        "positions": args.positions_every,
        "balance": args.balance_every,
        "cash": args.cash_every,
    }
    intervals = {
        stream: rest_every if stream == "orders" else every[stream]
        for stream in chosen
        if stream in every
    }
    port = args.metrics_port if args.metrics_port is not None else settings.metrics_port
    liveness = Liveness()
    server = None
    readiness = Readiness(
        None,
        {(a.name, stream): every for a in accounts for stream, every in intervals.items()},
        links=[a.name for a in accounts] if realtime else [],
    )
    if port is not None:
        server = OperatorServer(args.metrics_host, port, liveness=liveness, readiness=readiness)
        server.start()
    try:
        engine = wait_for_database(settings, stop, on_wait=liveness.beat)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    if engine is None:  # stopped while waiting
        if server is not None:
            server.stop()
        return 0
    readiness.engine = engine
    claim_accounts(engine, accounts, allow_simulated=args.allow_simulated)
    with transaction(engine) as conn:  # what `status --max-age` judges each stream against
        for a in accounts:
            record_intervals(conn, a.name, intervals)
    streams = {
        a.name: RealtimeAccount(
            engine,
            clients[a.name],
            account=a.name,
            stream_url=stream_url(a.api_base),
            stop=stop,
            lookback=settings.lookback,
            channels=channels,
        )
        for a in accounts
        if realtime
    }
    names = ", ".join(a.name for a in accounts)
    log.info(
        "daemon for %s %s%s; Ctrl-C or SIGTERM stops it",
        "account" if len(accounts) == 1 else f"{len(accounts)} accounts:",
        names,
        f"; realtime: the {' and '.join(channels)} channels, orders by REST every "
        f"{rest_every} while they are up"
        if realtime
        else "",
    )

    # Replicas share the work: each tries a job TICKS times per interval and runs it only
    # when no replica started it within the interval (less half a tick of slack).
    def due(name: str, stream_name: str, every: timedelta) -> bool:
        return is_due(engine, name, stream_name, every, slack=every / TICKS / 2)

    def orders_job(name: str) -> Job:
        def job(stop: threading.Event) -> None:
            if not due(name, "orders", args.orders_every):
                return
            stream = streams.get(name)
            if stream is not None and not stream.rest_due(rest_every):
                return  # the stream is up and REST ran recently: the safety net can wait
            sync_orders(
                engine,
                clients[name],
                account=name,
                lookback=settings.lookback,
                lock_wait=0,
                stop=stop,
            )
            if stream is not None:
                stream.rest_synced()

        return job

    def queue_job(name: str) -> Job:
        def job(stop: threading.Event) -> None:
            if due(name, "queue_positions", args.queue_every):
                poll_queue_positions(engine, clients[name], account=name, lock_wait=0, stop=stop)

        return job

    def listing_job(name: str, listing: Listing) -> Job:
        def job(stop: threading.Event) -> None:
            if due(name, listing.name, every[listing.name]):
                sync_listing(
                    engine,
                    clients[name],
                    listing,
                    account=name,
                    lookback=settings.lookback,
                    lock_wait=0,
                    stop=stop,
                )

        return job

    def lots_job(name: str) -> Job:
        def job(stop: threading.Event) -> None:
            rebuild_marked(engine, name, lock_wait=0)

        return job

    jobs: dict[str, tuple[Job, timedelta]] = {}
    for account in accounts:
        of = f" of {account.name}" if len(accounts) > 1 else ""
        if "orders" in chosen:
            jobs["orders" + of] = (orders_job(account.name), args.orders_every)
        if "queue_positions" in chosen:
            jobs["queue_positions" + of] = (queue_job(account.name), args.queue_every)
        for kind in chosen:
            if kind in LISTINGS:
                jobs[kind + of] = (listing_job(account.name, LISTINGS[kind]), every[kind])
        if {"fills", "settlements"} & set(chosen):
            # The lots of the markets that fills and settlements (REST or the stream) marked.
            jobs["P&L lots" + of] = (lots_job(account.name), LOTS_EVERY)

    def exit_now() -> None:
        logging.shutdown()
        os._exit(0)

    try:
        with contextlib.ExitStack() as open_clients:
            for client in clients.values():
                open_clients.enter_context(client)
            for stream in streams.values():
                stream.start()
            code = run_daemon(
                jobs,
                stop=stop,
                on_stuck=exit_now,
                on_tick=liveness.beat,
                ticks=TICKS,
                # A failed run is due again after RETRY_FAILED (is_due): try that often.
                max_tick=RETRY_FAILED.total_seconds() / 2,
            )
            for stream in streams.values():
                if not stream.join(timeout=5.0):
                    log.warning(
                        "the %s stream of %s did not stop in 5s", stream.name, stream.account
                    )
            return code
    finally:
        stop.set()
        if server is not None:
            server.stop()


def register(commands: Commands) -> None:
    """Add this module's commands to the parser."""
    p = commands.add("daemon", cmd_daemon, "sync on a schedule until SIGINT/SIGTERM")
    commands.allow_simulated(p)
    p.add_argument(
        "--orders-every", type=duration, default="30s", help="orders sync interval (default 30s)"
    )
    commands.streams(p)
    p.add_argument(
        "--fills-every", type=duration, default="30s", help="fills sync interval (default 30s)"
    )
    p.add_argument(
        "--settlements-every",
        type=duration,
        default="10m",
        help="settlements interval (default 10m; they vanish from the API when archived)",
    )
    p.add_argument(
        "--positions-every",
        type=duration,
        default="1m",
        help="positions snapshot interval (default 1m)",
    )
    p.add_argument(
        "--balance-every", type=duration, default="1m", help="balance interval (default 1m)"
    )
    p.add_argument(
        "--cash-every",
        type=duration,
        default="1h",
        help="deposits, withdrawals and transfers interval (default 1h)",
    )
    p.add_argument(
        "--queue-every",
        type=duration,
        default="10s",
        help="queue-position poll interval (default 10s)",
    )

    p.add_argument(
        "--realtime",
        action="store_true",
        help="also stream order changes (user_orders) and fills (fill) from the WebSocket into "
        "orders and fills, each reconnect reconciled by REST (default: KALSHI_ETL_REALTIME, "
        "else off)",
    )
    p.add_argument(
        "--realtime-rest-every",
        type=duration,
        default="5m",
        help="with --realtime, the REST sync's interval while the stream is up (default 5m; "
        "--orders-every applies while it is down)",
    )
    p.add_argument(
        "--metrics-port",
        type=number(int, 0, 65535),
        default=None,
        help="serve /metrics, /healthz and /readyz on this port (default: "
        "KALSHI_ETL_METRICS_PORT, else off)",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 in a container)",
    )
