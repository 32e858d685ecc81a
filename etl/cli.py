"""The command line: argv → Settings → engine + client → one plain function → exit code.

This is the composition root: the only module that reads configuration, sets up logging and
turns an :class:`~etl.errors.EtlError` into one line on stderr and its exit code (a traceback
only with ``--debug``). Commands are thin: the work is in ``etl.sync``, ``etl.db`` and
``etl.scheduler``, which the daemon and the tests call the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl import __version__
from etl.config import (
    Account,
    Settings,
    default_home,
    environment,
    from_env,
    parse_duration,
    parse_time,
)
from etl.db import migrations
from etl.db.engine import (
    connection,
    create_engine,
    embedded_url,
    libpq_target,
    libpq_url,
    mask,
    psql_executable,
    transaction,
)
from etl.db.models import orders, queue_position_snapshots, rejected_records, sync_runs, sync_state
from etl.db.state import LIVE_STREAM, stream_health
from etl.errors import (
    ApiStatusError,
    ApiTransportError,
    ConfigError,
    DatabaseUnavailable,
    EtlError,
    LockBusyError,
    StopRequested,
)
from etl.kalshi.auth import (
    KalshiAuth,
    load_private_key,
    read_private_key_file,
    warn_if_exposed,
)
from etl.kalshi.client import KalshiClient
from etl.sync.orders import SWITCH_INTERVAL, BackfillProgress

if TYPE_CHECKING:
    from etl.db.compare import Comparison
    from etl.sync.verify import VerifyResult

log = logging.getLogger("etl")

EXIT_UNHEALTHY = 1  # `status`: a stream's last run failed, or it is older than --max-age
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) or SIGTERM ended a `sync` or `backfill`

# -- logging ------------------------------------------------------------------------------------

_PEM = re.compile(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----", re.S)
# A signed request's headers replay as the key until their timestamp expires: the signature's
# value goes, however a library prints a header (`name: value`, `'name': 'value'`, `(name,
# value)`), and so does a password in a URL.
_SIGNATURE = re.compile(
    r"""(kalshi-access-signature['"]?\s*[:=,]?\s*b?['"]?)[A-Za-z0-9+/=_-]+""", re.I
)
_URL_PASSWORD = re.compile(r"(://[^/:@\s]+:)[^@\s/]+@")


def _redact(message: str) -> str:
    """Last line of defence: no key material, signature or password reaches a log line."""
    if "-----BEGIN" in message:
        message = _PEM.sub("[redacted key]", message)
    if "ignature" in message or "IGNATURE" in message:
        message = _SIGNATURE.sub(r"\1[redacted]", message)
    if "://" in message and "@" in message:
        message = _URL_PASSWORD.sub(r"\1***@", message)
    return message


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _redact(super().format(record))


# What every LogRecord has; anything else on a record came as `extra=` and is a field.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the structured fields a
    call passed as ``extra`` (``stream``, ``account``, ``run_id``, counts, ``duration_ms``,
    ``error``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD or key.startswith("_") or key in entry:
                continue
            if isinstance(value, str):
                value = _redact(value)
            elif not isinstance(value, int | float | bool | type(None)):
                value = _redact(str(value))
            entry[key] = value
        if record.exc_info:
            entry["exception"] = _redact(self.formatException(record.exc_info))
        return json.dumps(entry)


def setup_logging(fmt: str, *, debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("httpx", "httpcore", "alembic", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    # "skipped: maximum number of running instances reached" each interval of a long run is
    # noise: a late run is coalesced by design.
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if debug else logging.ERROR)


# -- wiring -------------------------------------------------------------------------------------


def open_engine(settings: Settings, *, migrate: bool = False) -> Engine:
    """The database engine (embedded PostgreSQL when DATABASE_URL is unset), migrated on ask."""
    url = settings.database_url or embedded_url(settings.home)
    engine = create_engine(url)
    if migrate:
        migrations.upgrade(engine)
    return engine


def database_lines(settings: Settings, engine: Engine) -> list[str]:
    """Which database this is and how to open it, for `status` and the demo."""
    if settings.database_url:
        return [f"database    {mask(engine.url)} (open it: kalshi-etl psql)"]
    home = settings.home.resolve()
    hint = "" if home == default_home(Path.cwd()).resolve() else f"KALSHI_ETL_HOME={home} "
    return [
        f"database    embedded PostgreSQL in {home / 'pgdata'}",
        f"            open it with: {hint}kalshi-etl psql   (the embedded server runs while a "
        f"kalshi-etl command does; meanwhile any client can use {libpq_url(engine.url)})",
    ]


def chosen_accounts(settings: Settings, name: str | None = None) -> tuple[Account, ...]:
    """The accounts a command works on: all configured, or the one ``--account`` names."""
    accounts = settings.accounts()
    if not accounts:
        raise ConfigError(
            "KALSHI_API_KEY_ID is not set: set it and KALSHI_PRIVATE_KEY_PATH to your Kalshi "
            "API key, or KALSHI_ETL_ACCOUNTS to an accounts file (or try the simulator: "
            "kalshi-etl simulate > .env)"
        )
    if name is None:
        return accounts
    for account in accounts:
        if account.name == name:
            return (account,)
    where = f"in {settings.accounts_file}" if settings.accounts_file else "configured"
    raise ConfigError(
        f"--account {name}: no such account {where}; the accounts are: "
        + ", ".join(a.name for a in accounts)
    )


def claim_accounts(
    engine: Engine, accounts: Sequence[Account], *, allow_simulated: bool = False
) -> None:
    """Before a command writes: each key is synced under one name only, and a simulator key
    never writes beside a real account's data (unless ``--allow-simulated``)."""
    from etl.db.accounts import Claim, claim_keys

    with transaction(engine) as conn:
        claim_keys(
            conn, [Claim(a.name, a.key_id) for a in accounts], allow_simulated=allow_simulated
        )


def open_client(
    account: Account, settings: Settings, *, cancel: threading.Event | None = None
) -> KalshiClient:
    """A signed client for ``account``, with its own read budget; ``cancel`` cuts its waits
    short."""
    if account.private_key_path is not None:
        key = read_private_key_file(account.private_key_path)
    elif account.private_key_pem is not None:
        source = (
            "KALSHI_PRIVATE_KEY"
            if settings.accounts_file is None
            else (f"private_key of account {account.name!r} in {settings.accounts_file}")
        )
        holder = settings.accounts_file
        if holder is None and "KALSHI_PRIVATE_KEY" not in os.environ:
            holder = Path.cwd() / ".env"  # where from_env found it
        if holder is not None:
            warn_if_exposed(holder, what="holds a private key")
        key = load_private_key(account.private_key_pem.encode(), source=source)
    else:
        raise ConfigError(
            "KALSHI_PRIVATE_KEY_PATH is not set: point it at the PEM file of your API key "
            "(or put the PEM text in KALSHI_PRIVATE_KEY)"
        )
    return KalshiClient(
        account.api_base,
        auth=KalshiAuth(account.key_id, key),
        tokens_per_second=account.read_tokens_per_second,
        page_size=settings.page_size,
        cancel=cancel,
    )


def _explain_auth(exc: ApiStatusError, account: Account, settings: Settings) -> EtlError:
    if exc.status in (401, 403):
        which = (
            "KALSHI_API_KEY_ID and its private key"
            if settings.accounts_file is None
            else f"key_id and private key of account {account.name!r} in {settings.accounts_file}"
        )
        return ConfigError(
            f"{exc}; check {which}, and that the key belongs to {account.api_base} (demo and "
            "production keys differ)"
        )
    return exc


# -- commands -----------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    engine = open_engine(settings)
    migrations.upgrade(engine)
    print(f"{mask(engine.url)} is at revision {migrations.current_revision(engine)} (head)")
    return 0


def cmd_sync(args: argparse.Namespace, settings: Settings) -> int:
    accounts = chosen_accounts(settings, args.account)
    clients = [open_client(account, settings) for account in accounts]  # every key, up front
    engine = open_engine(settings, migrate=True)
    claim_accounts(engine, accounts, allow_simulated=args.allow_simulated)
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
    from etl.sync.orders import sync_orders
    from etl.sync.queue import poll_queue_positions

    name = account.name
    of = f" of {name}" if many else ""
    steps: list[tuple[str, Callable[[], object]]] = []
    if args.orders:
        steps.append(
            (
                "orders" + of,
                lambda: sync_orders(engine, client, account=name, lookback=settings.lookback),
            )
        )
    if args.queue:
        steps.append(
            ("queue positions" + of, lambda: poll_queue_positions(engine, client, account=name))
        )
    failed = 0
    for index, (step_name, step) in enumerate(steps):
        try:
            step()
        except ApiStatusError as exc:
            explained = _explain_auth(exc, account, settings)
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
    return failed


class BackfillDisplay:
    """A backfill's progress: a tqdm bar on a terminal, updated per page with orders/s and
    the ETA (log lines print above it); plain log lines every ``every`` seconds elsewhere."""

    def __init__(self, *, tty: bool, every: float = 10.0) -> None:
        self.started = time.monotonic()
        self.every = every
        self._lock = threading.Lock()
        self._last_line = self.started
        self._first: int | None = None
        self._bar: Any = None
        if tty:
            from tqdm import tqdm

            self._bar = tqdm(unit="window", file=sys.stderr, dynamic_ncols=True, leave=True)

    def __call__(self, progress: BackfillProgress) -> None:
        with self._lock:
            now = time.monotonic()
            if self._first is None:
                self._first = progress.windows_done
            rate = progress.orders / max(now - self.started, 1e-9)
            if self._bar is not None:
                self._bar.total = progress.windows_total
                self._bar.initial = self._first
                self._bar.update(progress.windows_done - self._bar.n)
                self._bar.set_postfix_str(f"{progress.orders:,} orders, {rate:,.0f}/s")
            elif now - self._last_line >= self.every or (
                progress.windows_done == progress.windows_total
            ):
                self._last_line = now
                log.info(
                    "backfill: %d/%d windows, %d orders (%.0f/s), ETA %s",
                    progress.windows_done,
                    progress.windows_total,
                    progress.orders,
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


def cmd_backfill(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from etl.sync.orders import backfill_orders

    since = parse_time(args.since, name="--since")
    until = parse_time(args.until, name="--until") if args.until else datetime.now(UTC)
    if since >= until:
        raise ConfigError(
            f"--since ({since.isoformat()}) must be before --until ({until.isoformat()})"
        )
    accounts = chosen_accounts(settings, args.account)
    clients = [open_client(account, settings) for account in accounts]
    engine = open_engine(settings, migrate=True)
    claim_accounts(engine, accounts, allow_simulated=args.allow_simulated)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    for account, client in zip(accounts, clients, strict=True):
        if len(accounts) > 1:
            log.info("backfill of account %s", account.name)
        display = BackfillDisplay(tty=sys.stderr.isatty())
        with client, logging_redirect_tqdm():
            try:
                result = backfill_orders(
                    engine,
                    client,
                    account=account.name,
                    since=since,
                    until=until,
                    window=args.window,
                    concurrency=args.concurrency,
                    on_progress=display,
                    stop=stop,
                )
            except ApiStatusError as exc:
                raise _explain_auth(exc, account, settings) from exc
            except StopRequested:
                display.close()
                print(
                    "kalshi-etl: backfill stopped; the windows done are kept: run the same "
                    "command again to resume",
                    file=sys.stderr,
                )
                return EXIT_INTERRUPTED
            finally:
                display.close()
        c = result.counts
        of = f" of {account.name}" if len(accounts) > 1 else ""
        print(
            f"backfill{of} {since.isoformat()} .. {until.isoformat()}: fetched {c.fetched}, "
            f"inserted {c.inserted}, updated {c.updated}, unchanged {c.unchanged}, "
            f"rejected {c.rejected}"
        )
    return 0


def cmd_daemon(args: argparse.Namespace, settings: Settings) -> int:
    from etl.health import Liveness, OperatorServer, Readiness
    from etl.kalshi.stream import stream_url
    from etl.scheduler import Job, run_daemon
    from etl.sync.orders import sync_orders
    from etl.sync.queue import poll_queue_positions
    from etl.sync.realtime import RealtimeOrders
    from etl.sync.run import is_due

    stop = threading.Event()
    accounts = chosen_accounts(settings)
    clients = {a.name: open_client(a, settings, cancel=stop) for a in accounts}
    realtime = bool(args.realtime or settings.realtime)
    # While the stream is up, REST is the safety net and runs less often; the readiness of
    # the orders job is judged against that longer interval.
    rest_every = max(args.orders_every, args.realtime_rest_every) if realtime else args.orders_every
    intervals = {"orders": rest_every, "queue_positions": args.queue_every}
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
    streams = {
        a.name: RealtimeOrders(
            engine,
            clients[a.name],
            account=a.name,
            stream_url=stream_url(a.api_base),
            stop=stop,
            lookback=settings.lookback,
        )
        for a in accounts
        if realtime
    }
    names = ", ".join(a.name for a in accounts)
    log.info(
        "daemon for %s %s%s; Ctrl-C or SIGTERM stops it",
        "account" if len(accounts) == 1 else f"{len(accounts)} accounts:",
        names,
        f"; realtime: the user_orders stream, REST every {rest_every} while it is up"
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

    jobs: dict[str, tuple[Job, timedelta]] = {}
    for account in accounts:
        of = f" of {account.name}" if len(accounts) > 1 else ""
        jobs["orders" + of] = (orders_job(account.name), args.orders_every)
        jobs["queue_positions" + of] = (queue_job(account.name), args.queue_every)

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
                jobs, stop=stop, on_stuck=exit_now, on_tick=liveness.beat, ticks=TICKS
            )
            for stream in streams.values():
                if not stream.join(timeout=5.0):
                    log.warning("the user_orders stream of %s did not stop in 5s", stream.account)
            return code
    finally:
        stop.set()
        if server is not None:
            server.stop()


def wait_for_database(
    settings: Settings,
    stop: threading.Event,
    *,
    on_wait: Callable[[], None] | None = None,
    max_delay: float = 30.0,
) -> Engine | None:
    """The daemon's start: open (and migrate) the database, waiting for it as long as it does
    not answer (a reboot, a failover: the service must come up by itself, not stay dead),
    with a backoff from 1 s up to ``max_delay``. A failure is logged when its message is new,
    and again every 5 minutes while it lasts; SIGINT/SIGTERM end the wait (``None``).

    Raises:
        ConfigError: a configuration error, which waiting cannot fix (a bad URL).
    """
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in _STOP_SIGNALS}
    delay, said, said_at, since = 1.0, "", 0.0, time.monotonic()
    try:
        while not stop.is_set():
            try:
                engine = open_engine(settings, migrate=True)
            except DatabaseUnavailable as exc:
                now = time.monotonic()
                if str(exc) != said or now - said_at >= 300:
                    log.warning(
                        "%s; waiting for it (tried for %.0fs; retrying with a backoff up to "
                        "%.0fs, /readyz answers 503 meanwhile)",
                        exc,
                        now - since,
                        max_delay,
                    )
                    said, said_at = str(exc), now
                deadline = now + delay
                while not stop.wait(min(0.5, max(0.0, deadline - time.monotonic()))):
                    if on_wait is not None:
                        on_wait()
                    if time.monotonic() >= deadline:
                        break
                delay = min(max_delay, delay * 2)
                continue
            if said:
                log.info("the database answers, after %.0fs", time.monotonic() - since)
            return engine
        return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TICKS = 4  # how often per interval the daemon tries each job (see is_due)


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from etl.sync.verify import verify_orders

    accounts = chosen_accounts(settings, args.account)
    clients = [open_client(account, settings) for account in accounts]
    engine = open_engine(settings, migrate=True)
    claim_accounts(engine, accounts, allow_simulated=args.allow_simulated)
    differing = 0
    for account, client in zip(accounts, clients, strict=True):
        with client:
            try:
                result = verify_orders(
                    engine, client, account=account.name, repair=args.repair, examples=args.examples
                )
            except ApiStatusError as exc:
                raise _explain_auth(exc, account, settings) from exc
        for line in verify_lines(result):
            print(line)
        differing += not result.equal
    return 1 if differing else 0


_KIND_TEXT = {
    "missing": "missing (listed, not in orders)",
    "stale": "stale (orders holds an older version)",
    "extra": "extra (in orders, not listed)",
    "unrecorded": "malformed records not in rejected_records",
}


def verify_lines(result: VerifyResult) -> list[str]:
    """The report of ``kalshi-etl verify`` for one account."""
    before = result.before
    lines = [
        f"verify {result.account}: the API lists {before.listed} orders"
        + (f" and {before.listed_rejected} malformed records" if before.listed_rejected else "")
        + f"; orders holds {before.stored} for this account"
    ]

    def describe(comparison: Comparison, indent: str) -> None:
        for kind, text in _KIND_TEXT.items():
            n = comparison.counts[kind]
            if n:
                ids = comparison.examples[kind]
                more = f" and {n - len(ids)} more" if n > len(ids) else ""
                lines.append(f"{indent}{n} {text}: {', '.join(ids)}{more}")

    describe(before, "  ")
    if result.repaired is not None:
        r = result.repaired
        lines.append(
            f"  repaired: inserted {r.inserted}, updated {r.updated}, unchanged {r.unchanged}, "
            f"rejected records written {r.rejected}"
        )
        if result.after is not None:
            describe(result.after, "  after the repair, ")
    if result.equal:
        lines.append(
            "  equal: every listed order is in orders, up to date"
            + (" (after the repair)" if result.repaired is not None else "")
        )
    else:
        lines.append("  DIFFERENT" + ("" if result.repaired else " (--repair writes what differs)"))
    return lines


def cmd_accounts_rename(args: argparse.Namespace, settings: Settings) -> int:
    """Move every row of account OLD to NEW in one transaction, under both names' locks."""
    from etl.db.accounts import rename_account
    from etl.db.engine import stream_lock

    engine = open_engine(settings, migrate=True)
    with contextlib.ExitStack() as locks:
        for name in (args.old, args.new):
            for stream in ("orders", "queue_positions"):
                try:
                    locks.enter_context(stream_lock(engine, name, stream, wait=0))
                except LockBusyError as exc:
                    raise ConfigError(
                        f"accounts rename: {exc}; stop the daemon (and any sync) of {name} first"
                    ) from None
        with transaction(engine) as conn:
            moved = rename_account(conn, args.old, args.new)
    total = sum(moved.values())
    detail = ", ".join(f"{table} {n}" for table, n in moved.items() if n)
    print(f"renamed account {args.old} to {args.new}: {total} rows ({detail})")
    return 0


def cmd_accounts_help(args: argparse.Namespace, settings: Settings) -> int:
    raise ConfigError("accounts: give a subcommand, e.g. kalshi-etl accounts rename OLD NEW")


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from etl.db.retention import prune_snapshots

    engine = open_engine(settings, migrate=True)
    cutoff = datetime.now(UTC) - args.snapshots_older_than
    result = prune_snapshots(engine, older_than=cutoff)
    print(
        f"pruned {result.deleted} queue-position snapshot(s) captured before "
        f"{cutoff.isoformat(timespec='seconds')} in {result.batches} batch(es); each order's "
        f"newest row at the cutoff is kept ({result.kept_old} of them older than that)"
    )
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    engine = open_engine(settings)
    for line in database_lines(settings, engine):
        print(line)
    if migrations.current_revision(engine) is None:
        print("no kalshi-etl schema yet: run kalshi-etl migrate")
        return EXIT_UNHEALTHY if args.max_age is not None else 0
    if args.account is not None and migrations.current_revision(engine) != (
        migrations.head_revision()
    ):
        raise ConfigError("--account needs the current schema: run kalshi-etl migrate first")
    if args.account is not None:
        _known_account(settings, engine, args.account)
    for line in status_lines(engine, args.account):
        print(line)
    with connection(engine) as conn:
        health = stream_health(
            conn, now=datetime.now(UTC), max_age=args.max_age, account=args.account
        )
    problems = [h for h in health if h.problem is not None]
    if args.max_age is not None and not health:
        print("health      UNHEALTHY: no sync has run yet")
        return EXIT_UNHEALTHY
    for item in problems:
        print(f"health      UNHEALTHY: {item.stream} (account {item.account}) {item.problem}")
    if problems:
        return EXIT_UNHEALTHY
    print("health      ok")
    return 0


def _known_account(settings: Settings, engine: Engine, name: str) -> None:
    """``--account NAME`` of a command that reads only: the name must be configured or have
    data in the database, so that a typo is an error and not a healthy "nothing yet".

    Raises:
        ConfigError: naming the accounts there are.
    """
    configured = [a.name for a in settings.accounts()]
    with connection(engine) as conn:
        stored = [
            row[0]
            for row in conn.execute(
                sa.text(
                    "SELECT account FROM sync_state UNION SELECT account FROM sync_runs "
                    "UNION SELECT DISTINCT account FROM orders ORDER BY 1"
                )
            )
        ]
    if name in configured or name in stored:
        return
    known = sorted(set(configured) | set(stored))
    where = f"in {settings.accounts_file} or " if settings.accounts_file else ""
    raise ConfigError(
        f"--account {name}: no such account {where}in the database; the accounts are: "
        + (", ".join(known) if known else "none yet")
    )


def status_lines(engine: Engine, account: str | None = None) -> list[str]:
    """The report of ``kalshi-etl status``: streams, their last runs, table sizes (of
    ``account`` only, when given)."""
    lines: list[str] = []

    def of(table: sa.Table) -> list[sa.ColumnElement[bool]]:
        return [] if account is None else [table.c.account == account]

    with engine.connect() as conn:
        states = conn.execute(
            sa.select(sync_state).where(*of(sync_state)).order_by("account", "stream")
        ).all()
        latest = (
            sa.select(sa.func.max(sync_runs.c.id))
            .where(*of(sync_runs))
            .group_by(sync_runs.c.account, sync_runs.c.stream)
        )
        last_runs = {
            (r.account, r.stream): r
            for r in conn.execute(sa.select(sync_runs).where(sync_runs.c.id.in_(latest)))
        }
        keys = sorted(
            {(s.account, s.stream) for s in states if ":" not in s.stream} | set(last_runs)
        )
        if not keys:
            lines.append("no sync has run yet")
        by_key = {(s.account, s.stream): s for s in states}
        for key in keys:
            state, run = by_key.get(key), last_runs.get(key)
            wm = state.watermark.isoformat() if state and state.watermark else "none"
            lines.append(f"{key[1]} (account {key[0]})")
            lines.append(f"  watermark   {wm}")
            if run is not None:
                took = (
                    f"{(run.finished_at - run.started_at).total_seconds():.1f}s"
                    if run.finished_at
                    else "still running"
                )
                lines.append(
                    f"  last run    #{run.id} {run.mode} {run.status} at "
                    f"{run.started_at.isoformat(timespec='seconds')} ({took})"
                )
                lines.append(
                    f"  counts      fetched {run.fetched}, inserted {run.inserted}, updated "
                    f"{run.updated}, unchanged {run.unchanged}, rejected {run.rejected}"
                )
                if run.error:
                    lines.append(f"  error       {run.error}")
        for state in states:
            if state.stream == LIVE_STREAM and state.watermark is not None:
                lines.append(f"user_orders stream (account {state.account})")
                lines.append(
                    f"  last change {state.watermark.isoformat()} (committed "
                    f"{state.updated_at.isoformat(timespec='seconds')})"
                )
        lines.append("rows" if account is None else f"rows of account {account}")
        for table in (orders, queue_position_snapshots, sync_runs, sync_state, rejected_records):
            count = conn.execute(
                sa.select(sa.func.count()).select_from(table).where(*of(table))
            ).scalar_one()
            lines.append(f"  {table.name:<26}{count}")
        open_count = conn.execute(
            sa.select(sa.func.count())
            .select_from(orders)
            .where(orders.c.status == "resting", *of(orders))
        ).scalar_one()
        lines.append(f"  {'(resting orders)':<26}{open_count}")
    return lines


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
            ):
                print(line, flush=True)
        print()
        for line in status_lines(engine):
            print(line)
        print()
        for line in database_lines(settings, engine):
            print(line)
    except ApiStatusError as exc:
        raise _explain_auth(exc, account, settings) from exc
    finally:
        if simulator is not None:
            simulator.stop()
    return 0


def cmd_psql(args: argparse.Namespace, settings: Settings) -> int:
    """Open psql on the database (starting the embedded one for as long as psql runs)."""
    engine = open_engine(settings)
    target, secret = libpq_target(engine.url)
    command = [psql_executable(), target, *args.psql_args]
    engine.dispose()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to psql
    try:
        return subprocess.call(command, env={**os.environ, **secret})
    finally:
        signal.signal(signal.SIGINT, previous)


# -- parser ---------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _number(kind: type[int] | type[float], low: float, high: float | None = None) -> Any:
    """An argparse type: an int or float within [low, high]."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected a value {span}, got {text!r}")
        return value

    return parse


def _duration(text: str) -> Any:
    """An argparse type: a duration above zero."""
    try:
        return parse_duration(text, name="duration", positive=True)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("duration: ")) from None


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="verbose logs and tracebacks",
    )
    common.add_argument(
        "--demo",
        action="store_true",
        default=argparse.SUPPRESS,
        help="target Kalshi's demo environment (demo-api.kalshi.co)",
    )
    parser = _Parser(
        prog="kalshi-etl",
        parents=[common],
        description="Sync a Kalshi trader's orders and queue positions into PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"kalshi-etl {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def add(
        name: str, func: Callable[[argparse.Namespace, Settings], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    add("migrate", cmd_migrate, "create or upgrade the schema (alembic upgrade head)")

    account_option = _Parser(add_help=False)
    account_option.add_argument(
        "--account",
        metavar="NAME",
        default=None,
        help="only this account (its name in KALSHI_ETL_ACCOUNTS; default: every account)",
    )

    def add_for_accounts(
        name: str, func: Callable[[argparse.Namespace, Settings], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common, account_option], help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    def allow_simulated(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--allow-simulated",
            action="store_true",
            help="write the simulator's data (a sim- key) even into a database that holds a "
            "real account's",
        )

    p = add_for_accounts("sync", cmd_sync, "one incremental pass: orders, then queue positions")
    allow_simulated(p)
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

    p = add_for_accounts(
        "backfill", cmd_backfill, "one-off resumable load of every order in [since, until)"
    )
    allow_simulated(p)
    p.add_argument("--since", required=True, help="ISO-8601 time or Unix seconds")
    p.add_argument("--until", help="ISO-8601 time or Unix seconds (default: now)")
    p.add_argument(
        "--window", type=_duration, default="1d", help="window length, e.g. 6h, 1d (default 1d)"
    )
    p.add_argument(
        "--concurrency",
        type=_number(int, 1, 64),
        default=4,
        help="windows fetched at once (default 4)",
    )

    p = add("daemon", cmd_daemon, "sync on a schedule until SIGINT/SIGTERM")
    allow_simulated(p)
    p.add_argument(
        "--orders-every", type=_duration, default="30s", help="orders sync interval (default 30s)"
    )
    p.add_argument(
        "--queue-every",
        type=_duration,
        default="10s",
        help="queue-position poll interval (default 10s)",
    )

    p.add_argument(
        "--realtime",
        action="store_true",
        help="also stream order changes from the user_orders WebSocket into orders, each "
        "reconnect reconciled by REST (default: KALSHI_ETL_REALTIME, else off)",
    )
    p.add_argument(
        "--realtime-rest-every",
        type=_duration,
        default="5m",
        help="with --realtime, the REST sync's interval while the stream is up (default 5m; "
        "--orders-every applies while it is down)",
    )
    p.add_argument(
        "--metrics-port",
        type=_number(int, 0, 65535),
        default=None,
        help="serve /metrics, /healthz and /readyz on this port (default: "
        "KALSHI_ETL_METRICS_PORT, else off)",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 in a container)",
    )

    p = add(
        "prune",
        cmd_prune,
        "delete old queue-position snapshots in batches, keeping each order's newest row at the "
        "cutoff",
    )
    p.add_argument(
        "--snapshots-older-than",
        type=_duration,
        required=True,
        metavar="D",
        help="age of the snapshots to delete, e.g. 90d",
    )

    p = add_for_accounts("status", cmd_status, "watermarks, last runs, row counts and health")
    p.add_argument(
        "--max-age",
        type=_duration,
        default=None,
        help="exit 1 also when a stream has not succeeded for this long, e.g. 5m",
    )

    p = add_for_accounts(
        "verify",
        cmd_verify,
        "compare orders with the complete listing of the API (both tiers); exit 1 on a difference",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="write the API's version of every missing or stale order",
    )
    allow_simulated(p)
    p.add_argument(
        "--examples",
        type=_number(int, 0, 10_000),
        default=5,
        help="order ids listed per kind of difference (default 5)",
    )

    p = add("accounts", cmd_accounts_help, "manage account names in the database")
    accounts_sub = p.add_subparsers(
        dest="accounts_command", required=True, metavar="SUBCOMMAND", parser_class=_Parser
    )
    p = accounts_sub.add_parser(
        "rename",
        parents=[common],
        help="move every row of account OLD to the name NEW (one transaction)",
        description="Move every row of account OLD to the name NEW, in every table with an "
        "account column, in one transaction: for a key first synced under another name (the "
        "key id, before an accounts file). Stop the daemon first.",
    )
    p.add_argument("old", metavar="OLD")
    p.add_argument("new", metavar="NEW")
    p.set_defaults(func=cmd_accounts_rename)

    p = add("psql", cmd_psql, "open psql on the database (the embedded one included)")
    p.set_defaults(psql_args=[])
    p.epilog = "Everything after `psql` goes to psql itself, e.g. kalshi-etl psql -c 'SELECT 1'."

    p = add("simulate", cmd_simulate, "run the exchange simulator on loopback")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_number(int, 0, 65535), default=8765)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--orders",
        type=_number(int, 0, 10_000_000),
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
        "--events-per-second", type=_number(float, 0), default=2.0, help="trading intensity"
    )
    p.add_argument(
        "--resting-fraction",
        type=_number(float, 0, 1),
        default=None,
        help="fraction of the orders at start still resting (default about 0.087)",
    )
    p.add_argument(
        "--rate-limit",
        type=_number(float, 0),
        default=200.0,
        help="read tokens per second per key (0 = none)",
    )
    p.add_argument(
        "--error-rate", type=_number(float, 0, 1), default=0.0, help="fraction of 503 answers"
    )
    p.add_argument(
        "--latency", type=_number(float, 0, 60), default=0.0, help="seconds added to each answer"
    )
    p.add_argument(
        "--malformed-rate",
        type=_number(float, 0, 1),
        default=0.0,
        help="fraction of order pages with one malformed record",
    )
    p.add_argument(
        "--stream-duplicate-rate",
        type=_number(float, 0, 1),
        default=0.0,
        help="fraction of WebSocket user_order messages sent twice",
    )
    p.add_argument(
        "--stream-reorder-rate",
        type=_number(float, 0, 1),
        default=0.0,
        help="fraction of WebSocket messages held back 20 ms, so later ones overtake them",
    )
    p.add_argument(
        "--stream-drop-every",
        type=_duration,
        default=None,
        help="cut every WebSocket connection (no close frame) this often, e.g. 30s",
    )

    p = add("demo", cmd_demo, "the newcomer demo (what `make demo` runs)")
    p.add_argument(
        "--cycles", type=_number(int, 1, 100), default=3, help="incremental cycles to run"
    )
    p.add_argument(
        "--simulator",
        action="store_true",
        help="use the built-in simulator even when Kalshi credentials are exported",
    )
    return parser


# The commands that pull orders, whose threads hand the GIL over more often (SWITCH_INTERVAL).
_PULLING = frozenset({"sync", "backfill", "daemon", "verify", "demo"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on: list[str] = []
    if "psql" in argv:  # what follows is psql's, options included
        at = argv.index("psql")
        argv, passed_on = argv[: at + 1], argv[at + 1 :]
    args = build_parser().parse_args(argv)
    if passed_on:
        args.psql_args = passed_on
    debug = getattr(args, "debug", False)
    if args.command in _PULLING:
        sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        settings = from_env(environment(), demo=getattr(args, "demo", False), cwd=Path.cwd())
        setup_logging(settings.log_format, debug=debug)
        code: int = args.func(args, settings)
        return code
    except StopRequested as exc:
        log.info("%s", exc)
        return 0
    except EtlError as exc:
        if debug:
            traceback.print_exc()
        print(f"kalshi-etl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kalshi-etl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug or an untranslated failure: still one line
        if debug:
            traceback.print_exc()
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"kalshi-etl: unexpected error: {type(exc).__name__}: {detail} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
