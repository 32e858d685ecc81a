"""`sync` and `backfill`: one incremental pass, and the one-off windowed load with its progress."""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from etl.cli.wiring import (
    EXIT_INTERRUPTED,
    Commands,
    chosen_streams,
    duration,
    explain_auth,
    log,
    number,
    open_accounts,
    stream_list,
)
from etl.config import (
    Account,
    Settings,
    parse_time,
)
from etl.errors import (
    ApiStatusError,
    ApiTransportError,
    ConfigError,
    EtlError,
    StopRequested,
)
from etl.kalshi.client import KalshiClient
from etl.sync.orders import SyncResult
from etl.sync.partitions import BackfillProgress


def cmd_sync(args: argparse.Namespace, settings: Settings) -> int:
    accounts, clients, engine = open_accounts(settings, args)
    failed = 0
    for account, client in zip(accounts, clients, strict=True):
        with client:
            failed += _sync_account(args, settings, engine, account, client, many=len(accounts) > 1)
    if failed:
        print(f"kalshi-etl: sync failed for {failed} stream(s); see the log above", file=sys.stderr)
    return 1 if failed else 0


def _sync_account(
    args: argparse.Namespace,
    settings: Settings,
    engine: Engine,
    account: Account,
    client: KalshiClient,
    *,
    many: bool,
) -> int:
    """One pass over one account's streams; returns how many failed."""
    from etl.streams.registry import LISTINGS
    from etl.sync.listing import sync_listing
    from etl.sync.orders import sync_orders
    from etl.sync.queue import poll_queue_positions

    name = account.name
    of = f" of {name}" if many else ""
    steps: list[tuple[str, Callable[[], object]]] = []
    for stream in chosen_streams(args):
        if stream == "orders":
            steps.append(
                (
                    "orders" + of,
                    lambda: sync_orders(engine, client, account=name, lookback=settings.lookback),
                )
            )
        elif stream == "queue_positions":
            steps.append(
                ("queue positions" + of, lambda: poll_queue_positions(engine, client, account=name))
            )
        else:
            listing = LISTINGS[stream]
            steps.append(
                (
                    stream + of,
                    functools.partial(
                        sync_listing,
                        engine,
                        client,
                        listing,
                        account=name,
                        lookback=settings.lookback,
                    ),
                )
            )
    failed = 0
    for index, (step_name, step) in enumerate(steps):
        try:
            step()
        except ApiStatusError as exc:
            explained = explain_auth(exc, account, settings)
            if isinstance(explained, ConfigError) and not many:
                raise explained from exc
            log.error("%s sync failed: %s", step_name, explained)
            failed += 1
        except (ConfigError, StopRequested):
            raise
        except ApiTransportError as exc:
            log.error("%s sync failed: %s", step_name, exc)
            failed += 1 + len(steps[index + 1 :])
            skipped = ", ".join(later for later, _ in steps[index + 1 :])
            if skipped:
                log.error("%s not tried: the API cannot be reached", skipped)
            break
        except EtlError as exc:
            log.error("%s sync failed: %s", step_name, exc)
            failed += 1
    return failed + _rebuild_lots(engine, name)


def _rebuild_lots(engine: Engine, account: str) -> int:
    """The lots of the markets this pass (or any write before it) marked; 1 when it failed."""
    from etl.money.lots import rebuild_marked

    try:
        rebuild_marked(engine, account)
    except EtlError as exc:
        log.error("P&L rebuild of %s failed: %s (the markets stay marked)", account, exc)
        return 1
    return 0


class BackfillDisplay:
    """A backfill's progress: a tqdm bar on a terminal, updated per page with records/s and
    the ETA (log lines print above it); plain log lines every ``every`` seconds elsewhere."""

    def __init__(self, *, tty: bool, noun: str = "orders", every: float = 10.0) -> None:
        self.noun = noun
        self.started = time.monotonic()
        self.every = every
        self._lock = threading.Lock()
        self._last_line = self.started
        self._first: int | None = None
        self._bar: Any = None
        if tty:
            from tqdm import tqdm

            self._bar = tqdm(
                desc=noun, unit="window", file=sys.stderr, dynamic_ncols=True, leave=True
            )

    def __call__(self, progress: BackfillProgress) -> None:
        with self._lock:
            now = time.monotonic()
            if self._first is None:
                self._first = progress.windows_done
            rate = progress.records / max(now - self.started, 1e-9)
            if self._bar is not None:
                self._bar.total = progress.windows_total
                self._bar.initial = self._first
                self._bar.update(progress.windows_done - self._bar.n)
                self._bar.set_postfix_str(f"{progress.records:,} {self.noun}, {rate:,.0f}/s")
            elif now - self._last_line >= self.every or (
                progress.windows_done == progress.windows_total
            ):
                self._last_line = now
                log.info(
                    "backfill: %d/%d windows, %d %s (%.0f/s), ETA %s",
                    progress.windows_done,
                    progress.windows_total,
                    progress.records,
                    self.noun,
                    rate,
                    self._eta(progress, now),
                )

    def _eta(self, progress: BackfillProgress, now: float) -> str:
        done = progress.windows_done - (self._first or 0)
        left = progress.windows_total - progress.windows_done
        if left == 0:
            return "0s"
        if done <= 0:
            return "unknown"
        return f"{(now - self.started) / done * left:.0f}s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# The streams `backfill` covers (those read by time window).
BACKFILLED = ("orders", "fills")


def _backfill_one(
    stream: str,
    engine: Engine,
    client: KalshiClient,
    account: Account,
    settings: Settings,
    args: argparse.Namespace,
    span: tuple[datetime, datetime],
    stop: threading.Event,
) -> SyncResult | None:
    """One stream's backfill of one account with its progress; ``None`` when stopped."""
    from etl.streams.registry import LISTINGS
    from etl.sync.listing import backfill_listing
    from etl.sync.orders import backfill_orders

    display = BackfillDisplay(tty=sys.stderr.isatty(), noun=stream)
    window = {
        "since": span[0],
        "until": span[1],
        "window": args.window,
        "concurrency": args.concurrency,
        "on_progress": display,
        "stop": stop,
    }
    try:
        if stream == "orders":
            return backfill_orders(engine, client, account=account.name, **window)
        return backfill_listing(engine, client, LISTINGS[stream], account=account.name, **window)
    except ApiStatusError as exc:
        raise explain_auth(exc, account, settings) from exc
    except StopRequested:
        display.close()
        print(
            "kalshi-etl: backfill stopped; the windows done are kept: run the same command "
            "again to resume",
            file=sys.stderr,
        )
        return None
    finally:
        display.close()


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    since = parse_time(args.since, name="--since")
    until = parse_time(args.until, name="--until") if args.until else datetime.now(UTC)
    if since >= until:
        raise ConfigError(
            f"--since ({since.isoformat()}) must be before --until ({until.isoformat()})"
        )
    streams = [s for s in (args.streams or BACKFILLED) if s in BACKFILLED]
    if not streams:
        raise ConfigError(f"backfill covers {' and '.join(BACKFILLED)}: --streams names neither")
    accounts, clients, engine = open_accounts(settings, args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    for account, client in zip(accounts, clients, strict=True):
        if len(accounts) > 1:
            log.info("backfill of account %s", account.name)
        with client, logging_redirect_tqdm():
            for stream in streams:
                result = _backfill_one(
                    stream, engine, client, account, settings, args, (since, until), stop
                )
                if result is None:
                    return EXIT_INTERRUPTED
                c = result.counts
                of = f" of {account.name}" if len(accounts) > 1 else ""
                named = "" if stream == "orders" else f" ({stream})"
                print(
                    f"backfill{of}{named} {since.isoformat()} .. {until.isoformat()}: fetched "
                    f"{c.fetched}, inserted {c.inserted}, updated {c.updated}, unchanged "
                    f"{c.unchanged}, rejected {c.rejected}"
                )
    return 0


def register(commands: Commands) -> None:
    """Add this module's commands to the parser."""
    p = commands.add_for_accounts(
        "sync",
        cmd_sync,
        "one incremental pass over every stream: orders, queue positions, fills, settlements, "
        "positions, balance, cash",
    )
    commands.streams(p)
    commands.allow_simulated(p)
    p.add_argument(
        "--orders",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sync orders (default: yes)",
    )
    p.add_argument(
        "--queue",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="poll queue positions (default: yes)",
    )

    p = commands.add_for_accounts(
        "backfill",
        cmd_backfill,
        "one-off resumable load of every order and fill in [since, until)",
    )
    commands.allow_simulated(p)
    p.add_argument(
        "--streams",
        type=stream_list,
        default=None,
        metavar="LIST",
        help="only these of orders,fills (default: both)",
    )
    p.add_argument("--since", required=True, help="ISO-8601 time or Unix seconds")
    p.add_argument("--until", help="ISO-8601 time or Unix seconds (default: now)")
    p.add_argument(
        "--window", type=duration, default="1d", help="window length, e.g. 6h, 1d (default 1d)"
    )
    p.add_argument(
        "--concurrency",
        type=number(int, 1, 64),
        default=None,
        help="windows fetched at once (default: as many as keep the key's read budget busy)",
    )
