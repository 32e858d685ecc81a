"""What every command needs: the engine, the accounts and their clients, the database at start,
and the argument types and parser plumbing the command modules register with.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy.engine import Engine

from etl.config import (
    Account,
    Settings,
    default_home,
    parse_duration,
)
from etl.db import migrations
from etl.db.engine import (
    create_engine,
    embedded_url,
    libpq_url,
    mask,
    transaction,
)
from etl.errors import (
    ApiStatusError,
    ConfigError,
    DatabaseUnavailable,
    EtlError,
)
from etl.kalshi.auth import (
    KalshiAuth,
    load_private_key,
    read_private_key_file,
    warn_if_exposed,
)
from etl.kalshi.client import KalshiClient

log = logging.getLogger("etl")

EXIT_UNHEALTHY = 1  # `status`: a stream's last run failed, or it is older than --max-age
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) or SIGTERM ended a `sync` or `backfill`


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


def open_accounts(
    settings: Settings, args: argparse.Namespace
) -> tuple[tuple[Account, ...], list[KalshiClient], Engine]:
    """What a command that pulls and writes opens first: the accounts it works on
    (``--account``), a client for every key (all read up front, so a bad key fails before any
    work), the migrated engine, and the accounts claimed (:func:`claim_accounts`)."""
    accounts = chosen_accounts(settings, args.account)
    clients = [open_client(account, settings) for account in accounts]
    engine = open_engine(settings, migrate=True)
    claim_accounts(engine, accounts, allow_simulated=args.allow_simulated)
    return accounts, clients, engine


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


def explain_auth(exc: ApiStatusError, account: Account, settings: Settings) -> EtlError:
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


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def number(kind: type[int] | type[float], low: float, high: float | None = None) -> Any:
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


def duration(text: str) -> Any:
    """An argparse type: a duration above zero."""
    try:
        return parse_duration(text, name="duration", positive=True)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("duration: ")) from None


def stream_list(text: str) -> tuple[str, ...]:
    """An argparse type: ``--streams orders,fills`` → the names, checked."""
    from etl.streams.registry import AVAILABLE, NAMES

    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError("give at least one stream, e.g. orders,fills")
    for name in names:
        if name not in NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown stream {name!r}; the streams are: {', '.join(NAMES)}"
            )
        if name not in AVAILABLE:
            raise argparse.ArgumentTypeError(
                f"stream {name!r} is not synced by this release yet; it syncs: "
                + ", ".join(AVAILABLE)
            )
    return names


def chosen_streams(args: argparse.Namespace) -> tuple[str, ...]:
    """The streams a command covers: ``--streams`` (default: every one), less those
    ``--no-orders`` and ``--no-queue`` turn off."""
    from etl.streams.registry import AVAILABLE

    chosen = args.streams or AVAILABLE
    off = {"orders"} if getattr(args, "orders", True) is False else set()
    if getattr(args, "queue", True) is False:
        off.add("queue_positions")
    return tuple(name for name in chosen if name not in off)


class Commands:
    """What a command module registers its commands with (``register(commands)``): the
    subparsers, and the options several commands share."""

    def __init__(self, sub: Any, common: Parser) -> None:
        self.sub = sub
        self.common = common
        self.account_option = Parser(add_help=False)
        self.account_option.add_argument(
            "--account",
            metavar="NAME",
            default=None,
            help="only this account (its name in KALSHI_ETL_ACCOUNTS; default: every account)",
        )

    def add(
        self, name: str, func: Callable[[argparse.Namespace, Settings], int], help_: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = self.sub.add_parser(
            name, parents=[self.common], help=help_, description=help_
        )
        p.set_defaults(func=func)
        return p

    def add_for_accounts(
        self, name: str, func: Callable[[argparse.Namespace, Settings], int], help_: str
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = self.sub.add_parser(
            name, parents=[self.common, self.account_option], help=help_, description=help_
        )
        p.set_defaults(func=func)
        return p

    @staticmethod
    def streams(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--streams",
            type=stream_list,
            default=None,
            metavar="LIST",
            help="only these streams, e.g. orders,fills (default: every stream: orders, "
            "queue_positions, fills, settlements, positions, balance, cash)",
        )

    @staticmethod
    def allow_simulated(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--allow-simulated",
            action="store_true",
            help="write the simulator's data (a sim- key) even into a database that holds a "
            "real account's",
        )
